"""Item scoring over a loaded item index: ``score = <u, v> + bias (+ re-buy bonus on history items)``.

The exact scorer (:class:`ExactScorer`) is one ``[B, dim] x [dim, N]`` product (float32, or
bfloat16 item vectors to halve memory traffic); a float32 one also offers a certified bfloat16
prefilter (approximate scores with an error bound, re-scored exactly by ``serving.ranking``). The
ANN scorer (:class:`AnnScorer`) is a FAISS IVF index over ``[v, bias]`` queried with ``[u, 1]``
(the same inner product), returning candidates that are then re-scored exactly together with the
user's history items.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from recflow.modeling import ItemIndex

log = logging.getLogger("recflow.serving")


class ExactScorer:
    """Scores of every item: ``U @ V.T + bias`` (float32 or bfloat16 item vectors).

    A float32 scorer also keeps a bfloat16 copy of the item vectors for :meth:`prefilter_scores`:
    approximate scores within :meth:`error_bound` of the float32 ones, from a product about twice
    as fast on CPUs with bfloat16 support. ``serving.ranking`` uses them to find every item that can
    still be in a user's exact top k, then re-scores only those in float32 (exact results).
    """

    kind = "exact"
    # Bound on |bf16 score - fp32 score| / (|u| max|v|): bf16 rounding of u and v (2 * 2^-8), of the
    # result (2^-8), fp32 accumulation (~2^-18); 2^-6 leaves a third of margin. Checked at load.
    PREFILTER_REL_ERROR = 2.0**-6

    def __init__(self, index: ItemIndex, dtype: str = "float32", prefilter: bool = True) -> None:
        self.dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        self.matrix = torch.from_numpy(index.matrix).to(self.dtype).contiguous()
        self.bias = torch.from_numpy(index.bias).float()
        self.name = f"exact-{dtype}"
        self.max_norm = float(torch.linalg.vector_norm(self.matrix.float(), dim=1).max()) if len(self.matrix) else 0.0
        self.approx: torch.Tensor | None = None
        if prefilter and self.dtype == torch.float32 and len(self.matrix):
            self.approx = self.matrix.to(torch.bfloat16).contiguous()
            if not self._prefilter_within_bound():
                log.warning("bfloat16 prefilter exceeds its error bound on this machine: exact scoring in float32 only")
                self.approx = None

    def scores(self, users: np.ndarray) -> torch.Tensor:
        """``[B, N]`` float32 scores."""
        u = torch.from_numpy(np.ascontiguousarray(users, dtype=np.float32))
        if self.dtype == torch.float32:
            return torch.addmm(self.bias, u, self.matrix.T)
        return (u.to(self.dtype) @ self.matrix.T).float().add_(self.bias)

    def prefilter_scores(self, users: np.ndarray) -> torch.Tensor:
        """``[B, N]`` float32 approximations of :meth:`scores` (bfloat16 product), each within
        :meth:`error_bound` of the exact score."""
        assert self.approx is not None
        u = torch.from_numpy(np.ascontiguousarray(users, dtype=np.float32)).to(torch.bfloat16)
        return (u @ self.approx.T).float().add_(self.bias)

    def error_bound(self, users: np.ndarray) -> np.ndarray:
        """``[B]`` bound on ``|prefilter_scores - scores|`` per user."""
        norms = np.linalg.norm(np.asarray(users, dtype=np.float64), axis=1)
        return norms * self.max_norm * self.PREFILTER_REL_ERROR + 1e-4

    def exact_rows(self, users: np.ndarray, cols: np.ndarray, user_of: np.ndarray) -> np.ndarray:
        """float32 ``<u[user_of[j]], v[cols[j]]> + bias[cols[j]]`` for each pair ``j``."""
        m = self.matrix[torch.from_numpy(cols)].float()
        u = torch.from_numpy(np.ascontiguousarray(users, dtype=np.float32))[torch.from_numpy(user_of)]
        return ((m * u).sum(dim=1) + self.bias[torch.from_numpy(cols)]).numpy()

    def _prefilter_within_bound(self, n_users: int = 8) -> bool:
        gen = torch.Generator().manual_seed(0)
        u = torch.randn(n_users, self.matrix.shape[1], generator=gen).numpy() * 10
        err = (self.prefilter_scores(u) - self.scores(u)).abs().max(dim=1).values.numpy()
        return bool(np.all(err <= self.error_bound(u)))


class AnnScorer:
    """FAISS IVF (inner product) over ``[v, bias]``; :meth:`candidates` gives approximate top positions.

    IVF probes the lists whose centroids score best, and the items with the largest bias (the most
    popular) can sit in lists a user's query never probes, whatever ``nprobe``; they are top-10 for
    many users, so the ``n_popular`` highest-bias items are always candidates (exactly re-scored).
    """

    kind = "ann"

    def __init__(self, index: ItemIndex, nlist: int = 0, nprobe: int = 16, seed: int = 0, n_popular: int = 64) -> None:
        import faiss

        self.popular = np.argsort(-index.bias, kind="stable")[:n_popular].astype(np.int64)

        n, d = index.matrix.shape
        data = np.ascontiguousarray(np.hstack([index.matrix, index.bias[:, None]]).astype(np.float32))
        nlist = nlist or max(1, int(4 * np.sqrt(n)))
        nlist = min(nlist, max(1, n // 39))  # FAISS wants >= 39 training points per list
        quantizer = faiss.IndexFlatIP(d + 1)
        ivf = faiss.IndexIVFFlat(quantizer, d + 1, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.cp.seed = seed
        ivf.train(data)
        ivf.add(data)
        ivf.nprobe = min(nprobe, nlist)
        self.index = ivf
        self.name = f"ann-ivf{nlist}-nprobe{ivf.nprobe}"

    def candidates(self, users: np.ndarray, n: int) -> np.ndarray:
        """``[B, n]`` candidate positions (-1 = none) by approximate ``<u, v> + bias``."""
        q = np.ascontiguousarray(np.hstack([users, np.ones((len(users), 1), np.float32)]), dtype=np.float32)
        _, ids = self.index.search(q, n)
        return ids

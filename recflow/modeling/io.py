"""Save and load a :class:`RecModel` as safetensors + JSON (never pickle)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from recflow.modeling.config import ModelConfig
from recflow.modeling.model import RecModel

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CATALOGUE = "catalogue.json"
TOKENIZER = "tokenizer"


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=str))
    os.replace(tmp, path)


def save_model(model: RecModel, folder: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``config.json`` (architecture + metadata), ``model.safetensors`` (weights and catalogue
    buffers), ``catalogue.json`` (item ids, unique texts) and ``tokenizer/`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS), metadata={"format": "pt"})
    _write_json(folder / CATALOGUE, {"item_ids": model.item_ids, "texts": model.texts})
    _write_json(
        folder / CONFIG,
        {
            "format_version": FORMAT_VERSION,
            "model": model.config.to_dict(),
            "n_items": len(model.item_ids),
            "n_texts": len(model.texts),
            "metadata": metadata or {},
        },
    )
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(folder / TOKENIZER))
    return folder


def read_metadata(folder: str | Path) -> dict[str, Any]:
    """The metadata dict saved with a model (without loading the weights)."""
    return json.loads((Path(folder) / CONFIG).read_text()).get("metadata", {})


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> RecModel:
    """Rebuild a model saved by :func:`save_model`, in eval mode, on ``device``."""
    folder = Path(folder)
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise FileNotFoundError(f"{folder}: not a recflow model folder (needs {CONFIG} and {WEIGHTS})")
    raw = json.loads((folder / CONFIG).read_text())
    if raw.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{folder}: model format {raw.get('format_version')} is not {FORMAT_VERSION}")
    config = ModelConfig.from_dict(raw["model"])
    model = RecModel(config, n_items=raw["n_items"], n_texts=raw["n_texts"])
    state = load_file(str(folder / WEIGHTS))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{folder}: weights do not match the config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    cat = json.loads((folder / CATALOGUE).read_text())
    model.set_catalogue(cat["item_ids"], cat["texts"])
    if (folder / TOKENIZER).is_dir():
        from transformers import AutoTokenizer

        model.tokenizer = AutoTokenizer.from_pretrained(str(folder / TOKENIZER), local_files_only=True)
    return model.to(device).eval()

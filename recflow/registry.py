"""Model registry: trained models in the BentoML model store, and a ``champion`` pointer.

- :func:`register` saves a :class:`recflow.modeling.RecModel` with ``bentoml.models.create`` into
  the store under ``settings.paths.bentoml_home`` (never ``~/bentoml``): safetensors weights +
  JSON config (:func:`recflow.modeling.save_model`), and metadata (metrics, search config, data
  window, FeatureService, git commit).
- The champion pointer is ``settings.paths.models / "champion.json"``: ``{"tag", "path", "set_at",
  "reason", "history": [previous champions, oldest first]}``, replaced atomically and durably
  (write, fsync, ``os.replace``, fsync of the folder: ``recflow.durable``). :func:`set_champion` pushes the current champion onto ``history``;
  :func:`rollback` restores the most recent one.
- :func:`load_champion` is what serving calls: ``(model, pointer)``.

The store is opened by path (``ModelStore(bentoml_home / "models")``), so this works whatever
``BENTOML_HOME`` was when bentoml was first imported in the process.
"""

from __future__ import annotations

import json
import os
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recflow.settings import Settings

if TYPE_CHECKING:
    from recflow.modeling import RecModel

CHAMPION_FILE = "champion.json"
HISTORY_KEEP = 20
RANKER_DIR = "ranker"  # the two-stage model inside a registered model folder (recflow.ranker.save_two_stage)


def model_store(settings: Settings) -> Any:
    """The BentoML model store under the recflow home (``<home>/bentoml/models``), by path.

    The one use of a BentoML internal (``bentoml._internal.models.model.ModelStore``): BentoML has no
    public constructor for a store at a path other than ``BENTOML_HOME``'s, which is fixed at its
    import. ``tests/code/test_adapters.py`` pins what recflow relies on, so an upgrade that moves it
    fails there, not in a train run."""
    home = settings.paths.bentoml_home
    home.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("BENTOML_HOME", str(home))
    from bentoml._internal.models.model import ModelStore

    return ModelStore(home / "models")


def provenance(settings: Settings, window: dict[str, Any]) -> dict[str, Any]:
    """The metadata every registered model carries about what it was trained on: the data window and the
    feature services and stored history length it expects online (shared by the train and retrain flows)."""
    return {
        "data_window": window,
        "feature_service": settings.feast.serving_service,
        "training_feature_service": settings.feast.training_service,
        "history_length_in_store": settings.features.history_length,
    }


def _json_safe(obj: Any) -> Any:
    """JSON types BentoML accepts as metadata: no None (dropped from dicts, "" in lists), NaN kept as a float."""

    def clean(x: Any) -> Any:
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items() if v is not None}
        if isinstance(x, list):
            return ["" if v is None else clean(v) for v in x]
        return x

    return clean(json.loads(json.dumps(obj, default=str)))


def git_commit(cwd: str | Path | None = None) -> str | None:
    """The current git commit of ``cwd`` (default: this package's checkout), or None outside git."""
    where = Path(cwd) if cwd else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def register(
    settings: Settings, model: RecModel, metadata: dict[str, Any], *, name: str | None = None,
    labels: dict[str, str] | None = None, two_stage: Any = None,
) -> str:
    """Save ``model`` (and the two-stage ranker, under ``ranker/``) into the BentoML store; returns its
    tag (``name:version``)."""
    import bentoml

    from recflow.modeling import save_model

    meta = _json_safe(metadata)
    meta.setdefault("feature_service", settings.feast.serving_service)
    meta.setdefault("git_commit", git_commit() or "unknown")
    meta.setdefault("format", "recflow.modeling: config.json + model.safetensors + catalogue.json + tokenizer/")
    lab = {"framework": "recflow", "feature_service": str(meta["feature_service"])} | (labels or {})
    with bentoml.models.create(
        name or settings.training.model_name, labels=lab, metadata=meta, module="recflow.modeling",
        _model_store=model_store(settings),
    ) as bento_model:
        save_model(model, bento_model.path, meta)
        if two_stage is not None:
            from recflow.ranker import save_two_stage

            save_two_stage(two_stage, Path(bento_model.path) / RANKER_DIR)
    return str(bento_model.tag)


def model_path(settings: Settings, tag: str) -> Path:
    """Folder of a registered model (raises ``bentoml.exceptions.NotFound`` for an unknown tag)."""
    import bentoml

    return Path(bentoml.models.get(tag, _model_store=model_store(settings)).path)


def load(settings: Settings, tag: str, device: str = "cpu") -> RecModel:
    """Load a registered model by tag."""
    from recflow.modeling import load_model

    return load_model(model_path(settings, tag), device=device)


def list_models(settings: Settings, name: str | None = None) -> list[dict[str, Any]]:
    """Registered models (newest first): tag, creation time, metadata."""
    import bentoml

    models = bentoml.models.list(name or settings.training.model_name, _model_store=model_store(settings))
    rows = [{"tag": str(m.tag), "created": str(m.info.creation_time), "metadata": dict(m.info.metadata)} for m in models]
    return sorted(rows, key=lambda r: r["created"], reverse=True)


def champion_path(settings: Settings) -> Path:
    return settings.paths.models / CHAMPION_FILE


def get_champion(settings: Settings) -> dict[str, Any] | None:
    """The champion pointer, or None when no champion was ever set."""
    p = champion_path(settings)
    return json.loads(p.read_text()) if p.is_file() else None


def _write_pointer(settings: Settings, pointer: dict[str, Any]) -> None:
    """Replace the pointer atomically and durably (fsync, rename, fsync of the folder)."""
    from recflow.durable import write_text_durably

    write_text_durably(champion_path(settings), json.dumps(pointer, indent=1))


def set_champion(settings: Settings, tag: str, reason: str = "") -> dict[str, Any]:
    """Point the champion at ``tag`` (which must exist); the current champion goes onto the history."""
    path = model_path(settings, tag)
    current = get_champion(settings)
    history: list[dict[str, Any]] = []
    if current:
        history = list(current.get("history", []))
        history.append({k: current[k] for k in ("tag", "path", "set_at", "reason") if k in current})
    pointer = {
        "tag": tag,
        "path": str(path),
        "set_at": datetime.now(UTC).isoformat(),
        "reason": reason,
        "history": history[-HISTORY_KEEP:],
    }
    _write_pointer(settings, pointer)
    return pointer


def rollback(settings: Settings, reason: str = "rollback") -> dict[str, Any]:
    """Make the previous champion the champion again. Raises ``LookupError`` when there is none."""
    current = get_champion(settings)
    if not current or not current.get("history"):
        raise LookupError("no previous champion to roll back to")
    history = list(current["history"])
    prev = history.pop()
    model_path(settings, prev["tag"])  # still in the store?
    pointer = {
        "tag": prev["tag"],
        "path": prev["path"],
        "set_at": datetime.now(UTC).isoformat(),
        "reason": f"{reason} (from {current['tag']})",
        "history": history,
    }
    _write_pointer(settings, pointer)
    return pointer


def load_champion(settings: Settings, device: str = "cpu") -> tuple[RecModel, dict[str, Any]]:
    """The champion model and its pointer. Raises ``LookupError`` when no champion is set."""
    pointer = get_champion(settings)
    if pointer is None:
        raise LookupError(f"no champion model: {champion_path(settings)} does not exist; run `recflow train` first")
    return load(settings, pointer["tag"], device=device), pointer

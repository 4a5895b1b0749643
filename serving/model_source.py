"""Which model a worker serves, and reading its files.

:func:`resolve_model` picks the model: ``serving.model_path`` > ``serving.model_tag`` > the model
packed into the running bento > the registry's champion. :func:`read_champion` reads the champion's
files or, when they cannot be read (damaged or partially copied), the newest previous champion that
can, and says so in a :class:`ChampionFallback`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from recflow.settings import Settings

if TYPE_CHECKING:
    from recflow.modeling import RecModel
    from recflow.ranker import TwoStage

log = logging.getLogger("recflow.serving")


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


def read_model(settings: Settings, src: ModelSource) -> tuple[RecModel, TwoStage | None]:
    """The model and its two-stage ranker (None when it has none or ``serving.two_stage`` is off) read
    from ``src.folder``, with the current daily item side of ``recflow.item_refresh`` when there is
    one; raises whatever a damaged or partial file raises."""
    from recflow.modeling import load_model
    from recflow.registry import RANKER_DIR

    model = load_model(src.folder)
    path = Path(src.folder) / RANKER_DIR
    if not settings.serving.two_stage or not path.is_dir():
        return model, None
    from recflow import item_refresh
    from recflow.ranker import load_two_stage

    refreshed = item_refresh.current(settings, src.version)  # the daily item side, same weights
    if refreshed is not None:
        try:
            return model, load_two_stage(refreshed[0])
        except Exception as exc:  # noqa: BLE001 - a damaged refresh must not cost the model: its own side serves
            log.warning("item refresh %s of %s cannot be loaded (%s: %s): serving the model's own item side",
                        refreshed[1].get("as_of"), src.version, type(exc).__name__, exc)
    return model, load_two_stage(path)


def read_champion(settings: Settings, src: ModelSource) -> tuple[ModelSource, RecModel, TwoStage | None,
                                                                  ChampionFallback | None]:
    """The champion's model, or, when its files cannot be read, the newest previous champion (of the
    pointer's history) that can: a damaged or partially copied champion never leaves a worker with
    nothing to serve. Raises the champion's own error when no previous one loads either."""
    from recflow import registry

    try:
        return (src, *read_model(settings, src), None)
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
                model, two_stage = read_model(settings, candidate)
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

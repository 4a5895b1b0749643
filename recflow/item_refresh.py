"""Daily item-side refresh of a two-stage model: the contract between the ``refresh_items`` flow and
the service.

A trained two-stage model carries its item side (popularity windows, trend, launches, re-buy gaps,
co-purchase neighbours, user vectors) as of its data end; evaluation and retraining score with the
item side as of each week's start. The ``refresh_items`` flow recomputes it for the champion, as of
a day, with the same function (``training.two_stage.refresh``), and saves it here:

    <home>/item_refresh/<model name>_<version>/<as_of, e.g. 20171201T000000Z>/   a recflow.ranker folder
    <home>/item_refresh/<model name>_<version>/current.json                       {"as_of", "folder", ...}

``current.json`` is swapped atomically after the folder is complete; the previous folder is kept (a
worker may be loading it) and older ones are removed, so a reader sees one refresh, whole. The service loads the
current refresh of the model it serves (its weights unchanged) at every model load and reload.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pandas as pd

from recflow.durable import write_text_durably
from recflow.settings import Settings
from recflow.timeutil import to_utc

CURRENT = "current.json"


def model_folder(settings: Settings, version: str) -> Path:
    """The refresh folder of model ``version`` (a registry tag, ``name:version``)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in version)
    return settings.paths.item_refresh / safe


def current(settings: Settings, version: str) -> tuple[Path, dict[str, Any]] | None:
    """The current refresh of ``version``: its two-stage folder and record, or None (never refreshed,
    or the record names a folder that is gone)."""
    pointer = model_folder(settings, version) / CURRENT
    try:
        record = json.loads(pointer.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    folder = pointer.parent / str(record.get("folder", ""))
    return (folder, record) if record.get("folder") and folder.is_dir() else None


def write(settings: Settings, version: str, model: Any, as_of: pd.Timestamp, **record: Any) -> Path:
    """Save ``model`` (a ``recflow.ranker.TwoStage`` with a refreshed item side) as the current refresh
    of ``version`` as of ``as_of``; returns its folder. ``record`` adds fields to ``current.json``."""
    from recflow.ranker import save_two_stage

    base = model_folder(settings, version)
    as_of = to_utc(as_of)
    stamp = as_of.strftime("%Y%m%dT%H%M%SZ")
    target = base / stamp
    partial = base / f".{stamp}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    save_two_stage(model, partial)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    info = {"model": version, "as_of": as_of.isoformat(), "folder": stamp, **record}
    write_text_durably(base / CURRENT, json.dumps(info, indent=1, default=str))
    # Older refreshes go, but the previous one stays: a worker may be loading it right now.
    done = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != stamp)
    for name in done[:-1]:
        shutil.rmtree(base / name, ignore_errors=True)
    return target

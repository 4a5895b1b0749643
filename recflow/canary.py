"""The canary pointer: a challenger that passed the offline gate serves a share of users before it is promoted.

- :func:`start` writes ``settings.paths.models / "canary.json"``: ``{"tag", "path", "share", "salt",
  "champion", "started_at", "reason"}``, atomically and durably, like the champion pointer.
- Every worker that serves the champion follows it (``serving.canary``): a user whose hash falls below
  ``share`` (:func:`serves_canary`, salted by the canary's tag, so each canary draws its own users) is
  answered by the canary, every other user by the champion, and the request log records the arm.
- The monitor (``monitoring.canary``) compares the arms' hit rate on the purchases that follow and calls
  :func:`end`: ``promote`` makes the canary the champion (``recflow.registry.set_champion``), ``rollback``
  only removes the pointer. Each ended canary is appended to ``canary_history.jsonl`` next to it.

A promotion writes the champion first and removes the canary pointer second: a crash in between leaves a
canary naming the champion, which workers ignore and the next decision clears.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from recflow.settings import Settings

CANARY_FILE = "canary.json"
HISTORY_FILE = "canary_history.jsonl"
ARMS = ("champion", "canary")


def canary_path(settings: Settings) -> Path:
    return settings.paths.models / CANARY_FILE


def get(settings: Settings) -> dict[str, Any] | None:
    """The running canary's pointer, or None when no canary runs."""
    p = canary_path(settings)
    return json.loads(p.read_text()) if p.is_file() else None


def serves_canary(user_id: str, salt: str, share: float) -> bool:
    """Whether the canary answers ``user_id``: a stable hash of the salted id, uniform on [0, 1), below ``share``."""
    if share <= 0:
        return False
    digest = hashlib.blake2b(f"{salt}\x00{user_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64 < share


def start(settings: Settings, tag: str, share: float, reason: str = "") -> dict[str, Any]:
    """Make ``tag`` (a registered model, not the champion) the canary for ``share`` of users. A canary
    already running is ended first (rolled back, the reason says it was replaced)."""
    from recflow import registry
    from recflow.durable import write_text_durably

    if not 0 < share < 1:
        raise ValueError(f"canary share {share} must be above 0 and below 1 (canary.share)")
    champion = registry.get_champion(settings)
    if champion is None:
        raise LookupError("no champion to compare a canary with: promote a model first (`recflow train`)")
    if champion["tag"] == tag:
        raise ValueError(f"{tag} is the champion already; a canary must be another model")
    path = registry.model_path(settings, tag)  # raises for an unknown tag
    if get(settings) is not None:
        end(settings, "rollback", f"replaced by the canary {tag}")
    pointer = {"tag": tag, "path": str(path), "share": float(share), "salt": tag, "champion": champion["tag"],
               "started_at": datetime.now(UTC).isoformat(), "reason": reason}
    write_text_durably(canary_path(settings), json.dumps(pointer, indent=1))
    return pointer


def end(settings: Settings, action: Literal["promote", "rollback"], reason: str,
        detail: dict[str, Any] | None = None) -> dict[str, Any]:
    """End the running canary: ``promote`` makes it the champion, ``rollback`` leaves the champion as it is.
    Returns the record appended to the history. Raises ``LookupError`` when no canary runs."""
    from recflow import registry
    from recflow.durable import fsync_dir

    pointer = get(settings)
    if pointer is None:
        raise LookupError(f"no canary is running ({canary_path(settings)} does not exist)")
    champion = registry.get_champion(settings)
    if action == "promote" and (champion is None or champion["tag"] != pointer["tag"]):
        registry.set_champion(settings, pointer["tag"], reason=f"canary promoted: {reason}")
    record = {**pointer, "ended_at": datetime.now(UTC).isoformat(), "action": action, "why": reason,
              **({"detail": detail} if detail else {})}
    history = settings.paths.models / HISTORY_FILE
    with history.open("a") as out:
        out.write(json.dumps(record, default=str) + "\n")
        out.flush()
        os.fsync(out.fileno())
    canary_path(settings).unlink(missing_ok=True)
    fsync_dir(canary_path(settings).parent)
    return record


def history(settings: Settings) -> list[dict[str, Any]]:
    """Ended canaries, oldest first."""
    p = settings.paths.models / HISTORY_FILE
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]

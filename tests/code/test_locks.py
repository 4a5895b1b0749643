"""recflow.locks: an exclusive flock with a bounded wait; push_events gives up on a held lock."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import pytest


def test_a_held_lock_times_out_naming_the_file_and_is_released_after(tmp_path: Path) -> None:
    from recflow.locks import LockTimeout, file_lock

    path = tmp_path / "locks" / "x.lock"
    with file_lock(path, 1.0):
        t0 = time.perf_counter()
        with pytest.raises(LockTimeout, match="x.lock"), file_lock(path, 0.2):
            pass
        assert 0.15 < time.perf_counter() - t0 < 1.0
    with file_lock(path, 0.2):  # released on exit
        pass


def test_push_events_under_a_held_lock_fails_without_touching_the_store(tmp_path: Path) -> None:
    from recflow.locks import LockTimeout, file_lock
    from serving.online_push import push_events

    class Untouchable:
        def __getattr__(self, name: str) -> None:
            raise AssertionError(f"the store was used ({name}) without the lock")

    ev = pd.DataFrame({"event_id": ["e"], "user_id": ["a"], "item_id": ["x"], "event_type": ["purchase"],
                       "event_timestamp": [pd.Timestamp("2024-05-20T10:00:00Z")], "basket_id": ["b"],
                       "quantity": [1.0], "price": [1.0]})
    lock = tmp_path / "online-push.lock"
    with file_lock(lock, 1.0), pytest.raises(LockTimeout):
        push_events(Untouchable(), ev, history_length=10, category_of=lambda _: None,  # type: ignore[arg-type]
                    lock_path=lock, lock_timeout_s=0.1)

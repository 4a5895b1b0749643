"""The durable feedback event log."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pandas as pd
import pytest

from recflow.event_log import EventLog


def _events(ids: list[str], user: str = "a") -> pd.DataFrame:
    return pd.DataFrame(
        {
            "event_id": ids,
            "user_id": user,
            "item_id": "x",
            "event_type": "purchase",
            "event_timestamp": pd.Timestamp("2024-05-01T10:00:00Z"),
            "basket_id": None,
            "quantity": 1.0,
            "price": None,
        }
    )


def test_append_is_idempotent_by_event_id(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "log")
    assert log.append(_events(["f1", "f2"])) == 2
    assert log.append(_events(["f2", "f3"])) == 1
    df = log.read()
    assert sorted(df.event_id) == ["f1", "f2", "f3"]
    assert df.event_timestamp.iloc[0] == pd.Timestamp("2024-05-01T10:00:00Z")
    assert pd.isna(df.price.iloc[0]) and df.quantity.iloc[0] == 1.0


def test_push_bookkeeping(tmp_path: Path) -> None:
    log = EventLog(tmp_path)
    log.append(_events(["f1", "f2", "f3"]))
    log.mark_pushed(["f1"])
    log.mark_pushed(["f2"], ok=False)
    pending = log.pending_push()
    assert pending.event_id.tolist() == ["f2", "f3"]
    assert pending.set_index("event_id").loc["f2", "push_attempts"] == 1
    assert log.stats() == {"logged": 3, "pushed": 1, "pending_push": 2, "flushed": 0}


def test_flush_writes_segments_and_read_sees_everything_once(tmp_path: Path) -> None:
    log = EventLog(tmp_path)
    log.append(_events(["f1", "f2"]))
    first = log.flush()
    assert first is not None and pd.read_parquet(first).event_id.tolist() == ["f1", "f2"]
    assert log.flush() is None, "nothing new to flush"
    log.append(_events(["f3"]))
    assert sorted(log.read().event_id) == ["f1", "f2", "f3"], "segments plus the unflushed journal"
    log.flush()
    assert len(log.segments()) == 2 and len(log.read()) == 3


def test_bad_events_are_refused_with_the_column_named(tmp_path: Path) -> None:
    bad = _events(["f1"]).assign(user_id=None)
    with pytest.raises(ValueError, match="user_id"):
        EventLog(tmp_path).append(bad)


def _writer(folder: str, start: int) -> None:
    log = EventLog(Path(folder))
    for i in range(start, start + 50):
        log.append(_events([f"p{i}"]))


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    procs = [mp.get_context("spawn").Process(target=_writer, args=(str(tmp_path), k * 50)) for k in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert EventLog(tmp_path).stats()["logged"] == 150


def test_flush_marks_rows_flushed_only_after_the_segment_is_fsynced(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    from recflow import durable

    log = EventLog(tmp_path / "log")
    log.append(_events(["f1", "f2"]))

    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(durable.os, "fsync", failing)
    with pytest.raises(OSError):
        log.flush()
    assert log.stats()["flushed"] == 0 and log.segments() == [], "nothing is marked flushed that is not on disk"
    assert not list((tmp_path / "log").glob("*.tmp"))
    monkeypatch.undo()
    path = log.flush()
    assert path is not None and log.stats()["flushed"] == 2
    assert sorted(log.read().event_id) == ["f1", "f2"]


def test_same_event_id_with_another_payload_is_a_conflict_and_nothing_is_written(tmp_path: Path) -> None:
    from recflow.event_log import EventConflict

    log = EventLog(tmp_path / "log")
    assert log.append(_events(["k1"])) == 1
    assert log.append(_events(["k1"])) == 0, "same key, same payload: an idempotent success"
    other = _events(["k2", "k1"])
    other.loc[1, "quantity"] = 3.0
    with pytest.raises(EventConflict, match="'k1'.*quantity") as err:
        log.append(other)
    assert err.value.event_id == "k1" and err.value.fields == ["quantity"]
    assert sorted(log.read().event_id) == ["k1"], "the whole append is refused (k2 not written)"
    twice = pd.concat([_events(["k3"]), _events(["k3"], user="b")], ignore_index=True)
    with pytest.raises(EventConflict, match="user_id"):
        log.append(twice)
    assert log.append(pd.concat([_events(["k4"]), _events(["k4"])], ignore_index=True)) == 1
    assert log.stats()["logged"] == 2 and log.pending_count() == 2
    log.mark_pushed(["k1"])
    assert log.pending_count() == 1

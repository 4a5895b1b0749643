"""The feedback event log: accepted events are durable before they are acknowledged.

Writers (the serving ``/feedback`` endpoint, replay) append canonical events to a SQLite journal
(``<home>/event_log/journal.db``, WAL mode, ``synchronous=FULL``): once :meth:`EventLog.append`
returns, the events survive a crash. Each row records whether it has been pushed to the Feast
online store, so a failed push is retried from the log (:meth:`EventLog.pending_push`).
:meth:`EventLog.flush` moves journal rows into immutable parquet segments
(``events-<time>.parquet``, canonical schema) that the feature build and monitoring read; a
segment is fsynced and renamed into place (``recflow.durable``) before its rows are marked flushed,
so a crash leaves either the rows in the journal or a complete segment, never neither.

Several processes may use the log at once: SQLite serialises writers, and every call waits at
most ``timeout_s`` for the journal (then ``sqlite3.OperationalError``, nothing written).

Idempotency: ``event_id`` is the key. Re-appending an event with the same id and the same content
is a no-op; the same id with other content raises :class:`EventConflict` and nothing of that
append is written.

Group commit: a long-lived writer (:meth:`EventLog.session`, one per thread) commits many appends in
one transaction, and so one fsync (:meth:`JournalSession.append_many`); each append is a savepoint,
so a conflicting one records nothing and the others commit. Callers acknowledge an append only after
``append_many`` returned. A session opened with ``durable=False`` (the push bookkeeping) commits
without its own fsync: it only ever records ``pushed``/``push_attempts``, which a crash may roll
back (the events are then pushed again, and a push skips what is already online); every append
stays fsynced, and the WAL keeps commits in order, so no append is ever lost behind it.
"""

from __future__ import annotations

import math
import sqlite3
import time
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pyarrow.parquet as pq

from recflow.durable import replace_durably
from recflow.schemas import EVENTS_SCHEMA, conform

JOURNAL = "journal.db"
_COLUMNS = list(EVENTS_SCHEMA.names)
_DDL = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    user_id TEXT NOT NULL,
    item_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    event_ts_us INTEGER NOT NULL,
    basket_id TEXT,
    quantity REAL,
    price REAL,
    received_ts_us INTEGER NOT NULL,
    pushed INTEGER NOT NULL DEFAULT 0,
    push_attempts INTEGER NOT NULL DEFAULT 0,
    flushed INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS events_pending ON events (pushed, seq);
CREATE INDEX IF NOT EXISTS events_unflushed ON events (flushed, seq);
"""


_PAYLOAD = ("user_id", "item_id", "event_type", "event_ts_us", "basket_id", "quantity", "price")
_INSERT = ("INSERT OR IGNORE INTO events (event_id, user_id, item_id, event_type, event_ts_us, basket_id, quantity, "
           "price, received_ts_us) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")
EVENT_TYPES = frozenset({"view", "cart", "purchase"})

Record = tuple[str, str, str, str, int, str | None, float | None, float | None]
"""One event as the journal stores it: ``(event_id, user_id, item_id, event_type, event time in epoch
microseconds, basket_id, quantity, price)``."""


class EventConflict(ValueError):
    """An ``event_id`` already logged (or repeated in one append) with a different payload."""

    def __init__(self, event_id: str, fields: list[str]) -> None:
        super().__init__(f"event_id {event_id!r} was already recorded with a different {', '.join(fields)}")
        self.event_id = event_id
        self.fields = fields


_FIELD = {"event_ts_us": "timestamp"}


def _differs(a: tuple[object, ...], b: tuple[object, ...], with_time: bool = True) -> list[str]:
    return [_FIELD.get(name, name) for name, x, y in zip(_PAYLOAD, a, b, strict=True)
            if x != y and (with_time or name != "event_ts_us")]


def _us(ts: pd.Series) -> pd.Series:
    return pd.to_datetime(ts, utc=True).astype("datetime64[us, UTC]").astype("int64")


def to_records(events: pd.DataFrame) -> list[Record]:
    """Canonical events as journal records; ``ValueError`` naming the column when the frame does not
    fit ``EVENTS_SCHEMA``."""
    conform(events[_COLUMNS], EVENTS_SCHEMA, name="feedback events")  # validates types and nulls

    def nullable(col: pd.Series) -> list[object]:
        return col.astype(object).where(col.notna(), None).tolist()

    return list(zip(events["event_id"].astype(str).tolist(), events["user_id"].astype(str).tolist(),
                    events["item_id"].astype(str).tolist(), events["event_type"].astype(str).tolist(),
                    _us(events["event_timestamp"]).tolist(), nullable(events["basket_id"]),
                    nullable(events["quantity"].astype("float64")), nullable(events["price"].astype("float64")),
                    strict=True))


def check_record(r: Record) -> None:
    """``ValueError`` naming the field when a record does not fit the canonical schema (the service
    builds records from validated requests: this is a cheap guard, not the validation)."""
    for name, v in zip(("event_id", "user_id", "item_id", "event_type"), r[:4], strict=True):
        if not isinstance(v, str) or not v:
            raise ValueError(f"feedback events.{name}: {v!r} is not a non-empty string")
    if r[3] not in EVENT_TYPES:
        raise ValueError(f"feedback events.event_type: {r[3]!r} is not one of {sorted(EVENT_TYPES)}")
    if not isinstance(r[4], int) or isinstance(r[4], bool):
        raise ValueError(f"feedback events.event_timestamp: {r[4]!r} is not epoch microseconds")
    if r[5] is not None and not isinstance(r[5], str):
        raise ValueError(f"feedback events.basket_id: {r[5]!r} is not a string")
    for name, v in (("quantity", r[6]), ("price", r[7])):
        if v is not None and (not isinstance(v, float) or not math.isfinite(v)):
            raise ValueError(f"feedback events.{name}: {v!r} is not a finite float")


def _insert(con: sqlite3.Connection, records: Sequence[Record], server_timed: set[str]) -> int:
    """Conflict check and insert of one append inside the caller's transaction; returns how many were new."""
    _check_conflicts(con, records, server_timed)
    received = int(time.time() * 1e6)
    before = con.total_changes
    con.executemany(_INSERT, [(*r, received) for r in records])
    return con.total_changes - before


def _check_conflicts(con: sqlite3.Connection, tuples: Sequence[tuple[object, ...]], server_timed: set[str]) -> None:
    """Raise :class:`EventConflict` for the first event id whose payload differs from an earlier
    row of this append or from the logged row (``tuples``: event_id, payload...)."""
    first: dict[object, tuple[object, ...]] = {}
    for t in tuples:
        payload = t[1:8]
        seen = first.setdefault(t[0], payload)
        if seen is not payload and (fields := _differs(seen, payload, t[0] not in server_timed)):
            raise EventConflict(str(t[0]), fields)
    ids = list(first)
    for i in range(0, len(ids), 500):
        chunk = ids[i : i + 500]
        logged = con.execute(
            f"SELECT event_id, {', '.join(_PAYLOAD)} FROM events WHERE event_id IN ({','.join('?' * len(chunk))})",
            chunk,
        ).fetchall()
        for row in logged:
            if fields := _differs(tuple(row[1:]), first[row[0]], row[0] not in server_timed):
                raise EventConflict(str(row[0]), fields)


def _open(folder: Path, timeout_s: float, durable: bool = True) -> sqlite3.Connection:
    folder.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(folder / JOURNAL, timeout=timeout_s, isolation_level=None)
    try:
        con.execute("PRAGMA journal_mode=WAL")
        con.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        con.executescript(_DDL)
    except BaseException:
        con.close()
        raise
    return con


def _frame(con: sqlite3.Connection, where: str, limit: int | None = None) -> pd.DataFrame:
    query = f"SELECT * FROM events WHERE {where} ORDER BY seq" + (f" LIMIT {int(limit)}" if limit else "")
    df = pd.read_sql_query(query, con)
    df["event_timestamp"] = pd.to_datetime(df["event_ts_us"], unit="us", utc=True)
    return df


def _mark(con: sqlite3.Connection, event_ids: list[str], ok: bool) -> None:
    column = "pushed = 1" if ok else "push_attempts = push_attempts + 1"
    con.execute("BEGIN IMMEDIATE")
    try:
        con.executemany(f"UPDATE events SET {column} WHERE event_id = ?", [(e,) for e in event_ids])
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


class JournalSession:
    """A long-lived connection to the journal, for one thread (see the module docstring): group
    commit of appends, and the push bookkeeping without a connection per call."""

    def __init__(self, folder: Path, timeout_s: float, durable: bool = True) -> None:
        self.folder = folder
        self.timeout_s = timeout_s
        self.durable = durable
        self._con: sqlite3.Connection | None = None

    def _connection(self) -> sqlite3.Connection:
        if self._con is None:
            self._con = _open(self.folder, self.timeout_s, self.durable)
        return self._con

    def append_many(self, appends: Sequence[tuple[Sequence[Record], Collection[str]]]) -> list[int | Exception]:
        """Append several batches of records in one transaction (one fsync); per batch, how many events
        were new, or the :class:`EventConflict` / ``ValueError`` that kept that batch (only) out.
        Raises ``sqlite3`` errors (a busy journal past ``timeout_s``): then nothing was written."""
        if not self.durable:
            raise ValueError("append_many needs a durable session")
        con = self._connection()
        results: list[int | Exception] = []
        con.execute("BEGIN IMMEDIATE")
        try:
            for records, server_timed in appends:
                try:
                    for r in records:
                        check_record(r)
                except ValueError as exc:
                    results.append(exc)
                    continue
                con.execute("SAVEPOINT append")
                try:
                    results.append(_insert(con, records, set(server_timed)))
                except EventConflict as exc:
                    con.execute("ROLLBACK TO append")
                    results.append(exc)
                con.execute("RELEASE append")
            con.execute("COMMIT")  # synchronous=FULL: the WAL is fsynced before this returns
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
        return results

    def pending_push(self, limit: int = 10_000) -> pd.DataFrame:
        """Accepted events not yet pushed to the online store, oldest first."""
        return _frame(self._connection(), "pushed = 0", limit=limit)[_COLUMNS + ["push_attempts"]]

    def mark_pushed(self, event_ids: list[str], ok: bool = True) -> None:
        """Record a push outcome (see :meth:`EventLog.mark_pushed`)."""
        if event_ids:
            _mark(self._connection(), event_ids, ok)

    def pending_count(self) -> int:
        """How many events wait to be pushed."""
        return int(self._connection().execute("SELECT count(*) FROM events WHERE pushed = 0").fetchone()[0])

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None


class EventLog:
    """Durable append-only log of accepted feedback events (see the module docstring)."""

    def __init__(self, folder: Path, timeout_s: float = 30.0) -> None:
        self.folder = Path(folder)
        self.timeout_s = timeout_s

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        con = _open(self.folder, self.timeout_s)
        try:
            yield con
        finally:
            con.close()

    def session(self, durable: bool = True) -> JournalSession:
        """A long-lived connection for one thread (group commit; see the module docstring)."""
        return JournalSession(self.folder, self.timeout_s, durable)

    def append(self, events: pd.DataFrame, server_timed: Collection[str] = ()) -> int:
        """Durably append canonical events; returns how many were new (an event id already logged
        with the same payload is ignored).

        Raises :class:`EventConflict` when an event id is known with another payload (nothing of
        this append is written), ``ValueError`` naming the column when the frame does not fit the
        canonical schema. ``server_timed``: event ids whose timestamp the writer assigned (the
        client sent none), so a retry's later time is not a conflict.
        """
        if events.empty:
            return 0
        return self._append(to_records(events), server_timed)

    def append_records(self, records: Sequence[Record], server_timed: Collection[str] = ()) -> int:
        """:meth:`append` for journal records (:data:`Record`), checked with :func:`check_record`."""
        for r in records:
            check_record(r)
        return self._append(records, server_timed)

    def _append(self, records: Sequence[Record], server_timed: Collection[str]) -> int:
        if not records:
            return 0
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                new = _insert(con, records, set(server_timed))
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")
            return new

    def pending_push(self, limit: int = 10_000) -> pd.DataFrame:
        """Accepted events not yet pushed to the online store, oldest first."""
        with self._connect() as con:
            df = _frame(con, "pushed = 0", limit=limit)
        return df[_COLUMNS + ["push_attempts"]]

    def mark_pushed(self, event_ids: list[str], ok: bool = True) -> None:
        """Record a push outcome: ``ok`` marks the events pushed, otherwise counts a failed attempt."""
        if not event_ids:
            return
        with self._connect() as con:
            _mark(con, event_ids, ok)

    def flush(self) -> Path | None:
        """Move journal rows not yet flushed into a new parquet segment; returns its path (None if none)."""
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            df = _frame(con, "flushed = 0")
            if df.empty:
                con.execute("COMMIT")
                return None
            name = f"events-{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}-{int(df.seq.iloc[-1])}.parquet"
            path = self.folder / name
            tmp = path.with_name(name + ".tmp")
            try:
                pq.write_table(conform(df[_COLUMNS], EVENTS_SCHEMA, name="event log"), tmp)
                replace_durably(tmp, path)  # on disk before the rows are marked flushed
            finally:
                tmp.unlink(missing_ok=True)
            con.execute("UPDATE events SET flushed = 1 WHERE seq <= ?", (int(df.seq.iloc[-1]),))
            con.execute("COMMIT")
        return path

    def segments(self) -> list[Path]:
        """Flushed parquet segments, oldest first."""
        return sorted(self.folder.glob("events-*.parquet")) if self.folder.exists() else []

    def read(self) -> pd.DataFrame:
        """Every logged event (segments and journal), canonical columns, one row per event id."""
        tables = [pq.read_table(p) for p in self.segments()]
        if (self.folder / JOURNAL).exists():
            with self._connect() as con:
                tables.append(conform(_frame(con, "flushed = 0")[_COLUMNS], EVENTS_SCHEMA, name="event log"))
        if not tables:
            return EVENTS_SCHEMA.empty_table().to_pandas()
        df = pa.concat_tables(tables).to_pandas()
        return df.drop_duplicates("event_id", keep="first").reset_index(drop=True)

    def forget(self, user_id: str) -> tuple[int, int, int]:
        """Erase every event of ``user_id``: journal rows (then VACUUM, so the bytes leave the file)
        and segment rows (each affected segment rewritten atomically). Returns ``(journal rows,
        segment rows, segments rewritten)``."""
        journal = 0
        if (self.folder / JOURNAL).exists():
            with self._connect() as con:
                con.execute("BEGIN IMMEDIATE")
                journal = con.execute("DELETE FROM events WHERE user_id = ?", (str(user_id),)).rowcount
                con.execute("COMMIT")
                con.execute("VACUUM")
                con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        rows = files = 0
        for path in self.segments():
            table = pq.read_table(path)
            keep = pa.compute.not_equal(table["user_id"].cast(pa.string()), str(user_id))
            kept = table.filter(pa.compute.fill_null(keep, True))
            if kept.num_rows == table.num_rows:
                continue
            rows += table.num_rows - kept.num_rows
            files += 1
            tmp = path.with_name(path.name + ".tmp")
            pq.write_table(kept, tmp)
            replace_durably(tmp, path)
        return journal, rows, files

    def pending_count(self) -> int:
        """How many events wait to be pushed (an index range, not a scan of the whole journal)."""
        if not (self.folder / JOURNAL).exists():
            return 0
        with self._connect() as con:
            return int(con.execute("SELECT count(*) FROM events WHERE pushed = 0").fetchone()[0])

    def stats(self) -> dict[str, int]:
        """Counts of logged, pushed, pending and flushed events."""
        if not (self.folder / JOURNAL).exists():
            return {"logged": 0, "pushed": 0, "pending_push": 0, "flushed": 0}
        with self._connect() as con:
            logged, pushed, flushed = con.execute(
                "SELECT count(*), coalesce(sum(pushed), 0), coalesce(sum(flushed), 0) FROM events"
            ).fetchone()
        return {"logged": logged, "pushed": pushed, "pending_push": logged - pushed, "flushed": flushed}

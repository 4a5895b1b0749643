"""Row-level validation shared by every adapter: vectorised checks, quarantine and a report.

Every input row ends up in exactly one place: the canonical table or the quarantine file,
with the first reason it failed. Nothing is dropped or coerced silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from recflow.schemas import EVENT_TYPES, EVENTS_SCHEMA, conform
from recflow.timeutil import to_utc

# Order matters: a row is quarantined under the first reason it meets.
EVENT_CHECKS: tuple[str, ...] = (
    "missing_user_id",
    "missing_item_id",
    "unparsable_timestamp",
    "future_timestamp",
    "unknown_event_type",
    "unparsable_number",
    "negative_quantity",
    "negative_price",
    "unknown_item_id",
    "duplicate_event_id",
)
N_EXAMPLES = 3


class IngestError(RuntimeError):
    """Raised when input is unusable: missing columns, unreadable files, or too many bad rows."""


@dataclass
class TableReport:
    """What happened to one input table."""

    name: str
    total_rows: int
    accepted_rows: int
    rejected: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    quarantine_path: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def rejected_rows(self) -> int:
        return self.total_rows - self.accepted_rows

    @property
    def bad_share(self) -> float:
        return self.rejected_rows / self.total_rows if self.total_rows else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "total_rows": self.total_rows,
            "accepted_rows": self.accepted_rows,
            "rejected_rows": self.rejected_rows,
            "bad_share": round(self.bad_share, 6),
            "rejected": self.rejected,
            "examples": self.examples,
            "quarantine_path": self.quarantine_path,
            "notes": self.notes,
        }


@dataclass
class IngestReport:
    """What ingestion did: per-table reports, where the canonical tables went, how long it took."""

    source: str
    tables: dict[str, TableReport]
    outputs: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    note: str | None = None  # e.g. that the home's own source was ingested again (none was given)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            **({"note": self.note} if self.note else {}),
            "seconds": round(self.seconds, 3),
            "outputs": self.outputs,
            "tables": {k: v.to_dict() for k, v in self.tables.items()},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)


def _blank(series: pd.Series) -> pd.Series:
    """True where a raw value is missing or only whitespace."""
    as_str = series.astype("string")
    return as_str.isna() | (as_str.str.strip() == "")


def normalise_id(series: pd.Series) -> pd.Series:
    """Ids as trimmed strings. Integral floats (from CSV/parquet) lose their '.0' so ids stay stable."""
    if pd.api.types.is_float_dtype(series):
        whole = series.notna() & (series == np.floor(series))
        out = series.astype("string")
        out[whole] = series[whole].astype("int64").astype("string")
        return out.str.strip()
    return series.astype("string").str.strip()


def hex64(values: np.ndarray) -> np.ndarray:
    """Vectorised 16-digit hex strings of uint64 values."""
    if len(values) == 0:
        return np.array([], dtype="<U16")
    return np.array(values.astype(">u8").tobytes().hex()).reshape(1).view("<U16")


CONTENT_KEY = ("user_id", "item_id", "event_timestamp", "event_type", "basket_id")


def content_event_ids(events: pd.DataFrame, prefix: str) -> pd.Series:
    """Deterministic event ids (``<prefix>-<16 hex digits>``) from the :data:`CONTENT_KEY` columns
    (UTC timestamps): the same event always gets the same id, so a re-sent event is recognised.
    Ingest and the service's ``/feedback`` both derive ids this way."""
    key = events[list(CONTENT_KEY)]
    hashed = pd.util.hash_pandas_object(key.astype("string"), index=False).to_numpy(dtype=np.uint64)
    return (prefix + "-") + pd.Series(hex64(hashed), index=key.index)


def parse_timestamps(raw: pd.Series) -> pd.Series:
    """Parse timestamps to UTC. Naive values are taken as UTC; numbers are epoch seconds (or ms).

    Unparsable values become NaT (the caller quarantines them); nothing is guessed beyond this.
    """
    if pd.api.types.is_datetime64_any_dtype(raw):
        ts = raw
        return ts.dt.tz_localize("UTC") if ts.dt.tz is None else ts.dt.tz_convert("UTC")
    if pd.api.types.is_numeric_dtype(raw):
        values = pd.to_numeric(raw, errors="coerce")
        unit = "ms" if values.abs().median() > 1e11 else "s"
        return pd.to_datetime(values, unit=unit, utc=True, errors="coerce")
    text = raw.astype("string").str.strip()
    parsed = pd.to_datetime(text, utc=True, errors="coerce")
    retry = parsed.isna() & text.notna() & (text != "")
    if retry.any():  # a file may mix formats: second, slower pass over the failures only
        parsed.loc[retry] = pd.to_datetime(text[retry], utc=True, errors="coerce", format="mixed")
    return parsed


def _to_number(raw: pd.Series) -> tuple[pd.Series, pd.Series]:
    """Numbers and a mask of values that were present but not numeric."""
    if pd.api.types.is_numeric_dtype(raw):
        return raw.astype("float64"), pd.Series(False, index=raw.index)
    values = pd.to_numeric(raw.astype("string").str.strip().replace("", pd.NA), errors="coerce")
    bad = values.isna() & ~_blank(raw)
    return values.astype("float64"), bad


def validate_events(
    raw: pd.DataFrame,
    *,
    known_items: pd.Series | None,
    now: datetime | None = None,
    event_id_prefix: str = "ev",
    default_event_type: str = "purchase",
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split raw events into (accepted canonical events, rejected rows with a ``reason``).

    ``raw`` has columns ``user_id, item_id, timestamp`` and optionally ``event_id, event_type,
    quantity, price, basket_id``. ``known_items``: when given, events on other items are rejected.
    The rejected frame keeps the raw values as strings plus ``_row`` (0-based input row) and
    ``reason``.
    """
    for col in ("user_id", "item_id", "timestamp"):
        if col not in raw.columns:
            raise IngestError(f"interactions: required column '{col}' is missing; found {list(raw.columns)}")
    now_ts = to_utc(now or datetime.now(UTC))
    n = len(raw)
    idx = raw.index
    out = pd.DataFrame(index=idx)
    out["user_id"] = normalise_id(raw["user_id"])
    out["item_id"] = normalise_id(raw["item_id"])
    out["event_timestamp"] = parse_timestamps(raw["timestamp"])
    if "event_type" in raw.columns:
        out["event_type"] = raw["event_type"].astype("string").str.strip().str.lower()
    else:
        out["event_type"] = pd.Series(default_event_type, index=idx, dtype="string")
    out["basket_id"] = normalise_id(raw["basket_id"]) if "basket_id" in raw.columns else pd.NA
    bad_number = pd.Series(False, index=idx)
    for col in ("quantity", "price"):
        if col in raw.columns:
            out[col], bad = _to_number(raw[col])
            bad_number |= bad
        else:
            out[col] = np.nan
    if "event_id" in raw.columns:
        out["event_id"] = normalise_id(raw["event_id"])
        missing_id = _blank(raw["event_id"])
    else:
        missing_id = pd.Series(True, index=idx)
    if missing_id.any():  # deterministic id from the row's content: identical rows get the same id
        out.loc[missing_id, "event_id"] = content_event_ids(out.loc[missing_id], event_id_prefix)

    checks: dict[str, pd.Series] = {
        "missing_user_id": _blank(raw["user_id"]),
        "missing_item_id": _blank(raw["item_id"]),
        "unparsable_timestamp": out["event_timestamp"].isna(),
        "future_timestamp": out["event_timestamp"] > now_ts,
        "unknown_event_type": ~out["event_type"].isin(EVENT_TYPES).fillna(False).astype(bool),
        "unparsable_number": bad_number,
        "negative_quantity": (out["quantity"] < 0).fillna(False).astype(bool),
        "negative_price": (out["price"] < 0).fillna(False).astype(bool),
        "unknown_item_id": (
            ~out["item_id"].isin(known_items.astype("string")).fillna(False).astype(bool)
            if known_items is not None
            else pd.Series(False, index=idx)
        ),
    }
    reason = pd.Series(pd.NA, index=idx, dtype="string")
    for name in EVENT_CHECKS[:-1]:
        reason = reason.mask(reason.isna() & checks[name].fillna(False).to_numpy(), name)
    # Duplicates are judged among rows that passed everything else: the first one wins.
    reason = reason.mask(later_duplicates(out["event_id"], reason.isna()), "duplicate_event_id")

    accepted = out.loc[reason.isna(), list(EVENTS_SCHEMA.names)].reset_index(drop=True)
    rejected = split_rejected(raw, reason)
    assert len(accepted) + len(rejected) == n
    return accepted, rejected


def later_duplicates(keys: pd.Series, eligible: pd.Series) -> np.ndarray:
    """Mask of eligible rows whose key already appeared in an earlier eligible row."""
    ok = eligible.to_numpy(dtype=bool)
    dup = np.zeros(len(keys), dtype=bool)
    dup[ok] = keys[ok].duplicated(keep="first").to_numpy(dtype=bool)
    return dup


def split_rejected(raw: pd.DataFrame, reason: pd.Series) -> pd.DataFrame:
    """Rows of ``raw`` with a reason, as strings, with ``_row`` (0-based input row) and ``reason``."""
    bad = reason.notna().to_numpy()
    rejected = raw.loc[bad].astype("string")
    rejected.insert(0, "_row", np.flatnonzero(bad))
    rejected.insert(1, "reason", reason[bad])
    return rejected.reset_index(drop=True)


def summarise(name: str, total: int, accepted: int, rejected: pd.DataFrame) -> TableReport:
    """Counts per reason and a few example rows for each."""
    counts = rejected["reason"].value_counts().to_dict() if len(rejected) else {}
    examples = {
        str(r): rejected.loc[rejected["reason"] == r]
        .head(N_EXAMPLES)
        .astype(object)
        .where(lambda d: d.notna(), None)
        .to_dict("records")
        for r in counts
    }
    return TableReport(
        name=name,
        total_rows=total,
        accepted_rows=accepted,
        rejected={str(k): int(v) for k, v in counts.items()},
        examples=examples,
    )


def write_quarantine(rejected: pd.DataFrame, folder: Path, name: str, run_id: str) -> Path | None:
    """Write rejected rows (all as strings) to ``folder/<name>-<run_id>.parquet``."""
    if rejected.empty:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{run_id}.parquet"
    table = pa.Table.from_pandas(rejected.astype({"_row": "int64"}), preserve_index=False)
    pq.write_table(table, path)
    return path


def enforce_limit(report: TableReport, max_bad_share: float) -> None:
    """Fail with a clear message when too many rows were rejected."""
    if report.bad_share > max_bad_share:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(report.rejected.items(), key=lambda kv: -kv[1]))
        raise IngestError(
            f"{report.name}: {report.rejected_rows} of {report.total_rows} rows "
            f"({report.bad_share:.1%}) were rejected, above the limit of {max_bad_share:.1%} "
            f"(data.max_bad_share). Reasons: {reasons}. The rejected rows are in "
            f"{report.quarantine_path}. Fix the input, or raise the limit with "
            "RECFLOW_DATA__MAX_BAD_SHARE if these rows are expected. Nothing was written to the canonical tables."
        )


def events_table(accepted: pd.DataFrame) -> pa.Table:
    """Accepted events as an Arrow table in the canonical schema, sorted by time."""
    ordered = accepted.sort_values(["event_timestamp", "event_id"], kind="stable").reset_index(drop=True)
    return conform(ordered, EVENTS_SCHEMA, name="events")

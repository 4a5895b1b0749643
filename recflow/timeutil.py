"""Time helpers shared by every layer: one definition of "a UTC timestamp"."""

from __future__ import annotations

from datetime import UTC, datetime

import pandas as pd


def to_utc(value: datetime | str | pd.Timestamp | object) -> pd.Timestamp:
    """``value`` as a UTC ``pd.Timestamp``; naive values (no time zone) are taken to be UTC."""
    ts = pd.Timestamp(value)  # type: ignore[arg-type]
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def as_utc(value: datetime) -> datetime:
    """A ``datetime`` in UTC without pandas (any year ``datetime`` allows); naive values are taken to be UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

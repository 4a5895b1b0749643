"""Adapter for a shop's own files.

Interactions (CSV or parquet): ``user_id, item_id, timestamp`` and optionally ``event_id,
event_type, quantity, price, basket_id``. Items (optional): ``item_id`` and optionally ``title,
text, category, department, brand, price``. Users (optional): ``user_id`` and any of the profile
columns in :data:`recflow.schemas.USER_PROFILE_COLUMNS`. ``data.columns`` renames the file's
columns to these names. CSV values are read as text and parsed explicitly, so nothing is coerced.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from recflow.datasets.validation import (
    IngestError,
    TableReport,
    _blank,
    _to_number,
    later_duplicates,
    normalise_id,
    split_rejected,
    summarise,
)
from recflow.schemas import USER_PROFILE_COLUMNS

NAME = "generic"
ITEM_TEXT_COLUMNS = ("title", "category", "department", "brand")
ITEM_COLUMNS = ("item_id", "title", "text", "category", "department", "brand", "price")


def read_table(path: Path, *, what: str, columns: dict[str, str] | None = None) -> pd.DataFrame:
    """Read a CSV/TSV (optionally gzipped) or parquet file, renaming columns to recflow's names."""
    if not path.exists():
        raise IngestError(f"{what}: file {path} does not exist. Check data.{what}_path / RECFLOW_DATA__{what.upper()}_PATH.")
    name = path.name.lower()
    try:
        if name.endswith((".parquet", ".pq")):
            df = pd.read_parquet(path)
        elif name.endswith((".csv", ".csv.gz", ".tsv", ".tsv.gz", ".txt")):
            sep = "\t" if ".tsv" in name else ","
            df = pd.read_csv(path, sep=sep, dtype="string", keep_default_na=False, na_values=[""])
        else:
            raise IngestError(f"{what}: {path} is neither CSV/TSV nor parquet (by its name). Convert it or rename it.")
    except IngestError:
        raise
    except Exception as exc:  # noqa: BLE001 - surface any reader error with the file named
        raise IngestError(f"{what}: could not read {path}: {exc}") from exc
    if columns:
        inverse = {src: dst for dst, src in columns.items() if src in df.columns}
        df = df.rename(columns=inverse)
    df.columns = [str(c).strip() for c in df.columns]
    return df


def validate_items(raw: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, TableReport]:
    """Split an items file into (accepted items, rejected rows, report)."""
    if "item_id" not in raw.columns:
        raise IngestError(f"items: required column 'item_id' is missing; found {list(raw.columns)}")
    idx = raw.index
    items = pd.DataFrame({"item_id": normalise_id(raw["item_id"])}, index=idx)
    for col in ("title", "text", "category", "department", "brand"):
        items[col] = (
            raw[col].astype("string").str.strip().replace("", pd.NA)
            if col in raw.columns
            else pd.Series(pd.NA, index=idx, dtype="string")
        )
    bad_price = pd.Series(False, index=idx)
    if "price" in raw.columns:
        items["price"], bad_price = _to_number(raw["price"])
    else:
        items["price"] = np.nan
    if "text" not in raw.columns:  # build the text to encode from whatever describes the item
        text = pd.Series("", index=idx, dtype="string")
        for col in ITEM_TEXT_COLUMNS:
            text = text.str.cat(items[col].str.lower().fillna(""), sep="; ")
        items["text"] = text.str.replace(r"(; )+", "; ", regex=True).str.strip("; ").replace("", pd.NA)
    reason = pd.Series(pd.NA, index=idx, dtype="string")
    reason = reason.mask(_blank(raw["item_id"]), "missing_item_id")
    reason = reason.mask(reason.isna() & bad_price, "unparsable_number")
    reason = reason.mask(reason.isna() & (items["price"] < 0).fillna(False).astype(bool), "negative_price")
    dup = later_duplicates(items["item_id"], reason.isna())
    reason = reason.mask(dup, "duplicate_item_id")
    accepted = items.loc[reason.isna(), list(ITEM_COLUMNS)].reset_index(drop=True)
    rejected = split_rejected(raw, reason)
    report = summarise("items", len(raw), len(accepted), rejected)
    unused = [c for c in raw.columns if c not in ITEM_COLUMNS]
    if unused:
        report.notes.append(f"columns not used by recflow (kept in the source file only): {unused}")
    return accepted, rejected, report


def items_from_events(item_ids: pd.Series) -> pd.DataFrame:
    """A minimal catalogue when the shop gives no items file: ids only, no text."""
    ids = pd.Series(item_ids.dropna().unique(), dtype="string")
    empty = pd.Series(pd.NA, index=ids.index, dtype="string")
    return pd.DataFrame(
        {
            "item_id": ids,
            "title": ids,
            "text": empty,
            "category": empty,
            "department": empty,
            "brand": empty,
            "price": np.nan,
        }
    )


def validate_users(raw: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, TableReport]:
    """Split a users file into (profile rows keyed by user id, rejected rows, report)."""
    if "user_id" not in raw.columns:
        raise IngestError(f"users: required column 'user_id' is missing; found {list(raw.columns)}")
    out = pd.DataFrame({"user_id": normalise_id(raw["user_id"])}, index=raw.index)
    for col in USER_PROFILE_COLUMNS:
        out[col] = (
            raw[col].astype("string").str.strip().replace("", pd.NA)
            if col in raw.columns
            else pd.Series(pd.NA, index=raw.index, dtype="string")
        )
    reason = pd.Series(pd.NA, index=raw.index, dtype="string").mask(_blank(raw["user_id"]), "missing_user_id")
    dup = later_duplicates(out["user_id"], reason.isna())
    reason = reason.mask(dup, "duplicate_user_id")
    accepted = out.loc[reason.isna()].reset_index(drop=True)
    rejected = split_rejected(raw, reason)
    report = summarise("users", len(raw), len(accepted), rejected)
    unused = [c for c in raw.columns if c not in ("user_id", *USER_PROFILE_COLUMNS)]
    if unused:
        report.notes.append(
            f"columns not used by recflow: {unused}; profile columns are {list(USER_PROFILE_COLUMNS)}"
        )
    return accepted, rejected, report

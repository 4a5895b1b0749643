"""Everything a training run needs, prepared once and shared read-only by every trial."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from recflow.modeling.build import unique_texts
from training.evaluate import EvalSet, make_evalset
from training.examples import (
    Catalogue,
    UserRows,
    popularity_grid,
    purchases,
    split_anchors,
    to_utc,
    user_rows,
    week_purchases,
)

if TYPE_CHECKING:
    from training.text_cache import TokenStates


@dataclass
class TrainData:
    """Catalogue, text embeddings, popularity grid, training rows and the two evaluation weeks.

    ``anchors`` = training anchors, then validation, test and ``end`` (the day after the last
    event: the popularity snapshot saved with the model). ``pop_grid[a]`` holds the raw popularity
    features of every item as of ``anchors[a]``.
    """

    catalogue: Catalogue
    texts: list[str]
    item_text: np.ndarray  # [N] row in text_emb
    text_emb: np.ndarray  # [T, text_dim]
    anchors: list[pd.Timestamp]
    pop_grid: np.ndarray  # [A, N, P] float32
    train: UserRows
    val: EvalSet
    test: EvalSet | None
    item_counts: np.ndarray  # [N] purchase lines before the cutoff
    encoder: dict[str, Any]  # BertConfig dict of the text encoder
    encoder_dir: str | None = None  # local pretrained encoder folder (None: random/tiny encoder)
    window: dict[str, str] = field(default_factory=dict)
    token_states: TokenStates | None = None  # cached lower-layer MiniLM states of ``texts`` (top-layer fine-tuning)

    @property
    def val_anchor_idx(self) -> int:
        return self.anchors.index(self.val.anchor)

    @property
    def test_anchor_idx(self) -> int | None:
        return None if self.test is None else self.anchors.index(self.test.anchor)

    @property
    def end_anchor_idx(self) -> int:
        return len(self.anchors) - 1


def prepare_data(
    *,
    events: pd.DataFrame,
    items: pd.DataFrame,
    training_set: Any,
    item_popularity: pd.DataFrame,
    cutoff: pd.Timestamp,
    train_weeks: int,
    text_emb: np.ndarray,
    encoder: dict[str, Any],
    encoder_dir: str | None = None,
    eval_days: int = 7,
) -> TrainData:
    """Build :class:`TrainData`. ``training_set`` is the Feast training set of
    ``entity_frame(events, train_anchors + [val, test])``; ``text_emb`` follows ``unique_texts(items' texts)``."""
    cat = Catalogue.from_items(items)
    texts, item_text = unique_texts(cat.texts)
    if text_emb.shape[0] != len(texts):
        raise ValueError(f"text_emb has {text_emb.shape[0]} rows but the catalogue has {len(texts)} unique texts")
    cutoff = to_utc(cutoff)
    train_anchors, val_anchor, test_anchor = split_anchors(cutoff, train_weeks, eval_days)
    last = to_utc(purchases(events)["event_timestamp"].max()).normalize() + pd.Timedelta(days=1)
    has_test = test_anchor + pd.Timedelta(days=eval_days) <= last
    anchors = [*train_anchors, val_anchor, test_anchor, max(last, test_anchor)]
    targets = week_purchases(events, anchors[:-1], eval_days)
    rows = user_rows(training_set, cat, anchors, targets=targets)
    n_train = len(train_anchors)
    train = rows.select(np.flatnonzero(rows.anchor < n_train))
    val = make_evalset("validation", rows.select(np.flatnonzero(rows.anchor == n_train)), events, cat, val_anchor)
    test = (
        make_evalset("test", rows.select(np.flatnonzero(rows.anchor == n_train + 1)), events, cat, test_anchor)
        if has_test
        else None
    )
    p = purchases(events)
    before = p[p["event_timestamp"] < cutoff]
    pos = cat.positions(before["item_id"].to_numpy())
    counts = np.bincount(pos[pos >= 0], minlength=len(cat))
    grid = popularity_grid(item_popularity, cat, anchors)
    window = {
        "train_start": str(train_anchors[0]) if train_anchors else str(cutoff),
        "cutoff": str(cutoff),
        "validation": f"{val_anchor} .. {val_anchor + pd.Timedelta(days=eval_days)}",
        "test": f"{test_anchor} .. {test_anchor + pd.Timedelta(days=eval_days)}" if has_test else "none",
        "data_end": str(last),
    }
    return TrainData(
        cat, texts, item_text, np.asarray(text_emb, dtype=np.float32), anchors, grid, train, val, test,
        counts, encoder, encoder_dir, window,
    )

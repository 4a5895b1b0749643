"""The evaluation protocol of the two-stage model: weekly anchors, one validation and several test weeks.

Time layout (``cutoff`` = the validation week's start, midnight UTC; weeks of ``days`` days)::

    train anchors: cutoff - k * days (k = train_weeks .. 1) | validation: cutoff | tests: cutoff + j * days

The model is trained once (its examples end before the cutoff; the validation week early-stops
it); every test week is then ranked over the full catalogue with history and features as of that
week's start, as serving would see them. Users of a week: a purchase in the week and one before.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

from training.evaluate import EvalSet, make_evalset
from training.examples import Catalogue, UserRows, to_utc, week_purchases

MIN_TEST_USERS = 200


@dataclass(frozen=True)
class Protocol:
    """Anchors of a run: training weeks, the validation week and the test weeks (UTC timestamps)."""

    train: tuple[pd.Timestamp, ...]
    validation: pd.Timestamp
    tests: tuple[pd.Timestamp, ...]
    days: int

    @classmethod
    def make(cls, cutoff: object, train_weeks: int, test_weeks: int, days: int = 7) -> Protocol:
        c = to_utc(cutoff)
        step = pd.Timedelta(days=days)
        return cls(tuple(c - step * k for k in range(train_weeks, 0, -1)), c,
                   tuple(c + step * j for j in range(1, test_weeks + 1)), days)

    @classmethod
    def default(cls, events: pd.DataFrame, train_weeks: int, test_weeks: int, days: int = 7) -> Protocol:
        """The latest protocol the data allows: the last test week ends with the data."""
        last = to_utc(pd.to_datetime(events["event_timestamp"], utc=True).max()).normalize() + pd.Timedelta(days=1)
        return cls.make(last - pd.Timedelta(days=days) * (test_weeks + 1), train_weeks, test_weeks, days)

    def describe(self) -> dict[str, object]:
        return {
            "train_anchors": [str(a.date()) for a in self.train],
            "validation_week": str(self.validation.date()),
            "test_weeks": [str(a.date()) for a in self.tests],
            "days": self.days,
        }


def week_evalset(name: str, events: pd.DataFrame, catalogue: Catalogue, anchor: pd.Timestamp, days: int = 7,
                 cold_since: pd.Timestamp | None = None) -> EvalSet:
    """The users of ``[anchor, anchor + days)`` with their targets (straight from the events).

    ``cold_since``: the protocol's cutoff, so that the ``_cold`` slice holds the items first sold
    after the model was trained (default: the week's anchor, items never sold before the week).
    """
    wp = week_purchases(events, [anchor], days)
    pos = catalogue.positions(wp["item_id"].to_numpy())
    wp = wp.assign(pos=pos)[pos >= 0]
    users = np.asarray(sorted(wp["user_id"].unique()), dtype=object).astype(str)
    u = pd.Index(users).get_indexer(wp["user_id"].to_numpy())
    order = np.lexsort((wp["pos"].to_numpy(), u))
    t_off = np.concatenate([[0], np.cumsum(np.bincount(u, minlength=len(users)))]).astype(np.int64)
    r = len(users)
    rows = UserRows(users, np.zeros(r, np.int64), np.zeros(r + 1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64),
                    np.zeros((r, 0)), [[] for _ in range(r)], t_off, wp["pos"].to_numpy()[order].astype(np.int64))
    return make_evalset(name, rows, events, catalogue, to_utc(anchor), cold_since)


def check_users(evalsets: list[EvalSet], minimum: int = MIN_TEST_USERS) -> list[str]:
    """Warnings for weeks with fewer than ``minimum`` evaluated users (and a hint how to widen them)."""
    out = []
    for ev in evalsets:
        if len(ev) < minimum:
            msg = (f"{ev.name} week from {ev.anchor.date()} has only {len(ev)} users with a purchase before and in "
                   f"the week (fewer than {minimum}): its metrics are noisy. Widen the window with "
                   f"training.eval_days / --days, or move the cutoff (--cutoff).")
            warnings.warn(msg, stacklevel=2)
            out.append(msg)
    return out

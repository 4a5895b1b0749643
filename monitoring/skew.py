"""Training-serving skew: the features each request was served with against the offline truth.

The two-stage service logs, with every answer, the user-level ranker features it ranked with
(:data:`recflow.ranker.features.USER_FEATURES`, computed from the online history as of the
request). This report recomputes them for the same user and time from the purchase events (the
canonical events and the feedback journal: what training and evaluation learn from) with the same
function, and compares. It is its own verdict, never part of the drift decision:

- ``ok``: every compared request was served with exactly the offline features;
- ``skew``: some were not -- a pipeline fault ("served features disagree with the offline
  truth"), not a change in shoppers. The report names the features, how often and by how much
  they differ, and a few (pseudonymous) examples;
- ``no_data``: no request in the window logged the ranker's features (e.g. the two-tower model).

Typical causes it names: an online history cut at ``features.history_length`` (the served
``u_n_lines`` is below the truth), lost or late pushes, a materialisation that did not run.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from recflow.ranker.features import USER_FEATURES
from recflow.ranker.log import epoch_seconds

if TYPE_CHECKING:
    from recflow.ranker.model import TwoStage

# Served and offline values are equal when within this (the log rounds to 6 decimals).
TOLERANCE = 1e-5


def offline_user_features(model: TwoStage, histories: Sequence[tuple[list[str], list[int]]],
                          times: Sequence[int]) -> list[dict[str, float | None]]:
    """The user-level ranker features of each (history, time), by the serving path's own functions
    (:func:`recflow.ranker.recommend.history_log`, ``user_context``, ``served_user_features``)."""
    from recflow.ranker.features import user_context
    from recflow.ranker.recommend import Ask, history_log, served_user_features

    out: list[dict[str, float | None]] = []
    for (ids, stamps), t in zip(histories, times, strict=True):  # one context per time: a bounded sample
        log = history_log(model, [Ask(ids, stamps, int(t), 1, user_id="u")])
        ctx = user_context(log, model.side.stats, int(t), model.category)
        out.extend(served_user_features([ctx], [np.array([0])], 1))
    return out


def _served(features: Any) -> dict[str, Any] | None:
    try:
        values = json.loads(features) if isinstance(features, str) else dict(features or {})
    except (TypeError, ValueError):
        return None
    return values if all(n in values for n in USER_FEATURES) else None


def skew_report(model: TwoStage, requests: pd.DataFrame, purchases: pd.DataFrame, *, max_rows: int = 500,
                seed: int = 0, examples: int = 5, history_length: int | None = None) -> dict[str, Any]:
    """Compare the served user-level ranker features of ``requests`` (request-log rows: ``user_id``,
    ``ts``, ``features``) with the offline ones from ``purchases`` (``user_id`` keyed like the log,
    ``item_id``, ``event_timestamp``: every purchase known, any time), for at most ``max_rows``
    sampled requests. Returns the verdict, the features that differ, per-feature share mismatched
    and max abs diff, and a few examples."""
    served = requests["features"].map(_served) if len(requests) else pd.Series(dtype=object)
    rows = requests[served.notna().to_numpy()] if len(requests) else requests
    base: dict[str, Any] = {"requests": int(len(requests)), "compared": 0, "features": list(USER_FEATURES),
                            "tolerance": TOLERANCE, "features_mismatched": [], "max_abs_diff": 0.0,
                            "per_feature": {}, "examples": []}
    if not len(rows):
        return {**base, "verdict": "no_data",
                "reason": "no request in the window logged the two-stage model's user features"}
    if len(rows) > max_rows:
        rows = rows.sample(n=max_rows, random_state=seed)
    rows = rows.sort_values("ts", kind="stable")
    p = purchases[purchases["user_id"].isin(set(rows["user_id"]))]
    p = p.assign(t=epoch_seconds(p["event_timestamp"]) if len(p) else np.zeros(0, np.int64))
    p = p.sort_values(["user_id", "t"], ascending=[True, False], kind="stable")
    by_user = {u: (g["item_id"].astype(str).tolist(), g["t"].astype(int).tolist()) for u, g in p.groupby("user_id")}
    times = epoch_seconds(pd.to_datetime(rows["ts"], utc=True)).tolist()
    histories = [by_user.get(u, ([], [])) for u in rows["user_id"]]
    truth = offline_user_features(model, histories, times)
    got = [_served(f) or {} for f in rows["features"]]
    per: dict[str, Any] = {}
    found: list[dict[str, Any]] = []
    for name in USER_FEATURES:
        s = np.array([np.nan if g.get(name) is None else float(g[name]) for g in got])
        o = np.array([np.nan if t.get(name) is None else float(t[name]) for t in truth])
        both = ~np.isnan(s) & ~np.isnan(o)
        diff = np.where(both, np.abs(s - o), 0.0)
        bad = (np.isnan(s) != np.isnan(o)) | (diff > TOLERANCE * np.maximum(1.0, np.abs(np.where(both, o, 0.0))))
        per[name] = {"share_mismatched": round(float(bad.mean()), 4), "max_abs_diff": round(float(diff.max()), 6),
                     "mean_served": _mean(s), "mean_offline": _mean(o)}
        for k in np.flatnonzero(bad)[: max(0, examples - len(found))]:
            found.append({"user_id": str(rows["user_id"].iloc[k]), "ts": str(rows["ts"].iloc[k]), "feature": name,
                          "served": None if np.isnan(s[k]) else float(s[k]),
                          "offline": None if np.isnan(o[k]) else float(o[k])})
    mismatched = [n for n in USER_FEATURES if per[n]["share_mismatched"] > 0]
    causes = _causes(got, truth, history_length) if "u_n_lines" in mismatched else []
    report = {**base, "compared": len(rows), "features_mismatched": mismatched,
              "max_abs_diff": max((per[n]["max_abs_diff"] for n in USER_FEATURES), default=0.0),
              "per_feature": per, "examples": found, "verdict": "skew" if mismatched else "ok"}
    report["reason"] = ("pipeline fault: served features disagree with the offline truth for " + ", ".join(mismatched)
                        + (f" ({'; '.join(causes)})" if causes else "")) if mismatched else \
        f"served features equal the offline truth on all {len(rows)} compared requests"
    return report


def _causes(got: list[dict[str, Any]], truth: list[dict[str, Any]], history_length: int | None) -> list[str]:
    """Why the served line counts differ, from the logged history length: cut at
    ``history_length``, not (yet) online, or lines the event log does not hold."""
    served = np.array([float(g.get("u_n_lines") or 0) for g in got])
    offline = np.array([float(t.get("u_n_lines") or 0) for t in truth])
    hist = np.array([float(g.get("history_len") or 0) for g in got])
    fewer = served < offline
    cut = fewer & (hist >= history_length) if history_length else np.zeros(len(got), bool)
    out = []
    if cut.any():
        out.append(f"{int(cut.sum())} request(s) had an online history cut at features.history_length="
                   f"{history_length:,}: raise it (the feature build says to what)")
    late = fewer & ~cut
    if late.any():
        out.append(f"{int(late.sum())} request(s) were served before up to {int((offline - served)[late].max())} of the "
                   "user's purchases were online: a push still under way or lost, or a materialisation that did not "
                   "run (check pending feedback and push errors on /status and /metrics)")
    more = served > offline
    if more.any():
        out.append(f"{int(more.sum())} request(s) were served with purchases the event log does not hold")
    return out


def _mean(values: np.ndarray) -> float | None:
    ok = values[~np.isnan(values)]
    return round(float(ok.mean()), 4) if len(ok) else None

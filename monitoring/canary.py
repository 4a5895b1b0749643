"""Canary analysis: does the canary answer its users at least as well as the champion answers theirs?

While a canary runs (``recflow.canary``), the service answers a hash-chosen share of users with it and
records each request's arm in the request log. :func:`compare_arms` takes each user's first answer in
the canary's time (users stay in one arm) and counts it a hit when the user bought one of its top ``k``
within ``horizon`` after it (capped at ``until``): the arms' hit rates, and a 95% bootstrap interval of
the canary's minus the champion's. The arms hold different users, so each arm is resampled on its own;
a bootstrap mean of 0/1 outcomes is a binomial draw, which is how it is computed.

:func:`decide` is the policy, in the spirit of automated canary analysis (Kayenta): roll back as soon as
the canary is worse beyond the interval; promote once each arm has ``min_users`` users and the canary
has run ``min_days`` without being worse; roll back one that has no verdict after ``max_days`` (the
champion is what is known to work). :func:`run` applies it to a home and ends the canary when there is
a verdict.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
import pandas as pd

from monitoring import data as mdata
from recflow.settings import CanarySettings, Settings
from recflow.timeutil import to_utc

ARMS = ("champion", "canary")


@dataclass(frozen=True)
class ArmStats:
    """One arm: users with an answer, of whom ``hits`` bought one of its top k within the horizon."""

    users: int
    hits: int
    requests: int

    @property
    def hit_rate(self) -> float:
        return self.hits / self.users if self.users else float("nan")


@dataclass(frozen=True)
class Comparison:
    """The arms over ``[since, until)`` (log time) and the canary-minus-champion hit-rate difference."""

    champion: ArmStats
    canary: ArmStats
    diff: float
    ci95_lo: float
    ci95_hi: float
    since: pd.Timestamp | None
    until: pd.Timestamp
    k: int

    @property
    def age_days(self) -> float:
        """Days from the canary's first answer to ``until``."""
        return 0.0 if self.since is None else (self.until - self.since) / pd.Timedelta(days=1)

    def to_dict(self) -> dict[str, Any]:
        arms = {a: {**asdict(s), "hit_rate": _num(s.hit_rate)} for a, s in (("champion", self.champion),
                                                                              ("canary", self.canary))}
        return {"arms": arms, f"hit_rate@{self.k}_diff": _num(self.diff), "ci95_lo": _num(self.ci95_lo),
                "ci95_hi": _num(self.ci95_hi), "since": self.since.isoformat() if self.since is not None else None,
                "until": self.until.isoformat(), "age_days": round(self.age_days, 3)}


@dataclass(frozen=True)
class Verdict:
    action: Literal["promote", "rollback", "wait"]
    reason: str


def _num(x: float) -> float | None:
    return None if not np.isfinite(x) else round(float(x), 6)


def compare_arms(log: pd.DataFrame, purchases: pd.DataFrame, *, canary_tag: str, until: pd.Timestamp | str,
                 k: int = 10, horizon_days: float = 7.0, resamples: int = 1000, seed: int = 0) -> Comparison:
    """The arms' hit rate@``k`` (see the module docstring). ``log``: request-log rows (``user_id, ts, arm,
    model_version, item_ids``); canary rows are those of ``canary_tag``, champion rows those from the
    canary's first answer on. ``purchases``: ``user_id, item_id, event_timestamp`` with the log's user ids
    (pseudonyms)."""
    until = to_utc(until)
    horizon = pd.Timedelta(days=horizon_days)
    df = log.assign(ts=pd.to_datetime(log["ts"], utc=True))
    df = df[df["user_id"].notna() & (df["ts"] < until)]
    arm = df["arm"] if "arm" in df.columns else pd.Series(None, index=df.index, dtype=object)
    canary_rows = df[(arm == "canary") & (df["model_version"] == canary_tag)]
    since = canary_rows["ts"].min() if len(canary_rows) else None
    champion_rows = df[(arm == "champion") & (df["ts"] >= since)] if since is not None else df.iloc[0:0]
    stats = {}
    for name, rows in (("champion", champion_rows), ("canary", canary_rows)):
        stats[name] = (_hits(rows, purchases, k, horizon, until), len(rows))
    rng = np.random.default_rng(seed)
    (hc, nc_req), (hk, nk_req) = stats["champion"], stats["canary"]
    champion = ArmStats(len(hc), int(hc.sum()), nc_req)
    canary = ArmStats(len(hk), int(hk.sum()), nk_req)
    if champion.users and canary.users:
        diff = canary.hit_rate - champion.hit_rate
        boot = (rng.binomial(canary.users, canary.hit_rate, resamples) / canary.users
                - rng.binomial(champion.users, champion.hit_rate, resamples) / champion.users)
        lo, hi = (float(v) for v in np.quantile(boot, [0.025, 0.975]))
    else:
        diff = lo = hi = float("nan")
    return Comparison(champion, canary, diff, lo, hi, since, until, k)


def _hits(rows: pd.DataFrame, purchases: pd.DataFrame, k: int, horizon: pd.Timedelta,
          until: pd.Timestamp) -> np.ndarray:
    """Per user (their first answer in ``rows``): 1 when they bought one of its top ``k`` in
    ``[ts, min(ts + horizon, until))``, else 0."""
    if rows.empty:
        return np.zeros(0, dtype=np.int8)
    first = mdata.first_request_per_user(rows).reset_index(drop=True)
    lists = first["item_ids"].map(lambda ids: list(ids)[:k] if ids is not None else [])
    long = pd.DataFrame({"user_id": np.repeat(first["user_id"].to_numpy(), lists.map(len).to_numpy()),
                         "item_id": np.concatenate([np.asarray(x, dtype=object) for x in lists] or [[]]).astype(str),
                         "req_ts": np.repeat(first["ts"].to_numpy(), lists.map(len).to_numpy())})
    buys = purchases[["user_id", "item_id", "event_timestamp"]].astype({"item_id": str})
    joined = long.merge(buys, on=["user_id", "item_id"], how="inner")
    ts = pd.to_datetime(joined["event_timestamp"], utc=True)
    req = pd.to_datetime(joined["req_ts"], utc=True)
    stop = (req + horizon).clip(upper=until)
    hit_users = set(joined.loc[(ts >= req) & (ts < stop), "user_id"])
    return first["user_id"].isin(hit_users).to_numpy(dtype=np.int8)


def decide(cmp: Comparison, cfg: CanarySettings) -> Verdict:
    """The canary policy (see the module docstring), with a reason that names the figures."""
    k = cmp.k
    figures = (f"hit rate@{k} canary {cmp.canary.hit_rate:.4f} ({cmp.canary.users} users) vs champion "
               f"{cmp.champion.hit_rate:.4f} ({cmp.champion.users} users), difference {cmp.diff:+.4f} "
               f"[{cmp.ci95_lo:+.4f}, {cmp.ci95_hi:+.4f}] over {cmp.age_days:.1f} days")
    short = min(cmp.canary.users, cmp.champion.users) < cfg.min_users
    if not short and cmp.ci95_hi < 0:
        return Verdict("rollback", f"the canary answers worse: {figures}")
    if short:
        if cmp.age_days >= cfg.max_days:
            return Verdict("rollback", f"no verdict after {cfg.max_days:g} days: fewer than {cfg.min_users} users in an "
                                       f"arm (canary {cmp.canary.users}, champion {cmp.champion.users}); the champion "
                                       "keeps serving")
        return Verdict("wait", f"too few users yet (canary {cmp.canary.users}, champion {cmp.champion.users}; "
                               f"{cfg.min_users} each needed)")
    if cmp.age_days < cfg.min_days:
        return Verdict("wait", f"not worse so far ({figures}); promotion waits until it has served {cfg.min_days:g} days")
    return Verdict("promote", f"not worse than the champion: {figures}")


def run(settings: Settings, until: pd.Timestamp | str | None = None, act: bool = True) -> dict[str, Any] | None:
    """Compare the running canary's arms up to ``until`` (default now; the demo passes its replay time),
    decide, and (``act``) end the canary on a verdict: promote or roll back (``recflow.canary.end``). Writes
    ``<reports>/canary/<time>.json``. Returns the record, or None when no canary runs."""
    from monitoring.monitor_run import purchase_paths
    from recflow import canary as pointer_io
    from recflow import registry
    from recflow.privacy import pseudonym_key, pseudonymise_frame

    pointer = pointer_io.get(settings)
    if pointer is None:
        return None
    cfg = settings.canary
    until_ts = to_utc(until) if until is not None else pd.Timestamp.now(tz="UTC")
    champion = registry.get_champion(settings) or {}
    # answers since the canary started; answers carry the request's time, which a replay sets in the past, so also
    # the max_days before `until` (a canary older than that is rolled back anyway)
    since_at = min(to_utc(pointer["started_at"]), until_ts - pd.Timedelta(days=cfg.max_days + 1))
    log = mdata.load_request_log(settings.paths.request_log, since_at, until_ts, arms_only=True)
    purchases = pseudonymise_frame(mdata.load_events(purchase_paths(settings), since_at, until_ts),
                                   pseudonym_key(settings))
    cmp = compare_arms(log, purchases, canary_tag=pointer["tag"], until=until_ts, k=cfg.k,
                       horizon_days=cfg.horizon_days, resamples=cfg.resamples, seed=cfg.seed)
    if champion.get("tag") not in (pointer.get("champion"), pointer["tag"]):
        verdict = Verdict("rollback", f"the champion changed from {pointer.get('champion')} to {champion.get('tag')} "
                                      "while the canary ran: its comparison no longer holds")
    else:
        verdict = decide(cmp, cfg)
    record = {"canary": pointer["tag"], "champion": pointer.get("champion"), "share": pointer.get("share"),
              "action": verdict.action, "reason": verdict.reason, "acted": False, **cmp.to_dict()}
    if act and verdict.action != "wait":
        pointer_io.end(settings, verdict.action, verdict.reason, detail=cmp.to_dict())
        record["acted"] = True
        record["champion_after"] = (registry.get_champion(settings) or {}).get("tag")
    out = settings.paths.reports / "canary" / f"{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1, default=str))
    record["report"] = str(out)
    return record

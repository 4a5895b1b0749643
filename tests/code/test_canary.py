"""Canary before promotion: the user split, the pointer, the arms' comparison and the policy
(``recflow.canary``, ``monitoring.canary``)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from recflow.schemas import REQUEST_LOG_SCHEMA, conform, request_log_row
from recflow.settings import CanarySettings

T0 = pd.Timestamp("2024-06-03T09:00:00Z")


def test_the_split_is_stable_salted_and_close_to_the_share() -> None:
    from recflow.canary import serves_canary

    users = [f"user-{i}" for i in range(20_000)]
    first = [serves_canary(u, "recflow:abc", 0.1) for u in users]
    assert first == [serves_canary(u, "recflow:abc", 0.1) for u in users], "a user stays in one arm"
    assert 0.09 < np.mean(first) < 0.11
    other = [serves_canary(u, "recflow:def", 0.1) for u in users]
    assert 0.09 < np.mean(other) < 0.11 and first != other, "each canary draws its own users"
    assert not any(serves_canary(u, "recflow:abc", 0.0) for u in users[:100])
    wider = [serves_canary(u, "recflow:abc", 0.3) for u in users]
    assert all(w for f, w in zip(first, wider, strict=True) if f), "a wider share keeps the canary's users"


def _log(rows: list[tuple[str, str, str, list[str], pd.Timestamp]]) -> pd.DataFrame:
    return pd.DataFrame([{"request_id": f"r{n}", "ts": ts, "endpoint": "recommend", "user_id": u, "arm": arm,
                          "model_version": version, "item_ids": items, "k": len(items)}
                         for n, (u, arm, version, items, ts) in enumerate(rows)])


def test_compare_arms_counts_each_users_first_answer_within_the_horizon() -> None:
    from monitoring.canary import compare_arms

    day = pd.Timedelta(days=1)
    log = _log([
        ("c1", "canary", "m:new", ["x", "y"], T0), ("c1", "canary", "m:new", ["z"], T0 + day),  # first answer counts
        ("c2", "canary", "m:new", ["x"], T0 + day),
        ("c3", "canary", "m:new", ["y"], T0 + 2 * day),
        ("h1", "champion", "m:old", ["x"], T0 - day),  # before the canary's first answer: not in the comparison
        ("h2", "champion", "m:old", ["x", "q"], T0), ("h3", "champion", "m:old", ["y"], T0),
        ("h4", "champion", "m:old", ["w"], T0), ("h5", "champion", "m:old", ["x"], T0),
        ("o1", None, "m:old", ["x"], T0),  # no canary running: no arm
    ])
    buys = pd.DataFrame([
        ("c1", "y", T0 + 3 * day),  # in c1's first list, within 7 days: hit
        ("c1", "z", T0 + 2 * day),  # z was in c1's second answer only
        ("c2", "x", T0 + 9 * day),  # after the horizon
        ("c3", "y", T0 - day),  # before the answer
        ("h2", "q", T0 + day), ("h3", "y", T0 + 6 * day), ("h4", "q", T0 + day),
        ("h1", "x", T0),
    ], columns=["user_id", "item_id", "event_timestamp"])
    cmp = compare_arms(log, buys, canary_tag="m:new", until=T0 + 20 * day, k=10, resamples=2000)
    assert (cmp.canary.users, cmp.canary.hits, cmp.canary.requests) == (3, 1, 4)
    assert (cmp.champion.users, cmp.champion.hits) == (4, 2)
    assert cmp.diff == pytest.approx(1 / 3 - 2 / 4)
    assert cmp.ci95_lo < cmp.diff < cmp.ci95_hi and cmp.since == T0 and cmp.age_days == pytest.approx(20)
    # capped at `until`: h3's purchase 6 days on is after a window that ends 5 days on
    capped = compare_arms(log, buys, canary_tag="m:new", until=T0 + 5 * day, k=10)
    assert capped.champion.hits == 1
    # k=1: only the top item counts (h2 bought its second)
    assert compare_arms(log, buys, canary_tag="m:new", until=T0 + 20 * day, k=1).champion.hits == 1


def test_the_bootstrap_interval_matches_the_normal_approximation() -> None:
    from monitoring.canary import compare_arms

    rng = np.random.default_rng(1)
    rows, buys = [], []
    for arm, rate, n in (("canary", 0.30, 3000), ("champion", 0.40, 6000)):
        for i in range(n):
            u = f"{arm}-{i}"
            rows.append((u, arm, "m:new" if arm == "canary" else "m:old", ["x"], T0))
            if rng.random() < rate:
                buys.append((u, "x", T0 + pd.Timedelta(days=1)))
    cmp = compare_arms(_log(rows), pd.DataFrame(buys, columns=["user_id", "item_id", "event_timestamp"]),
                       canary_tag="m:new", until=T0 + pd.Timedelta(days=8), resamples=4000, seed=3)
    p1, p0 = cmp.canary.hit_rate, cmp.champion.hit_rate
    se = np.sqrt(p1 * (1 - p1) / 3000 + p0 * (1 - p0) / 6000)
    assert cmp.ci95_lo == pytest.approx(cmp.diff - 1.96 * se, abs=0.003)
    assert cmp.ci95_hi == pytest.approx(cmp.diff + 1.96 * se, abs=0.003)


def _cmp(canary: tuple[int, int], champion: tuple[int, int], lo: float, hi: float, days: float):  # noqa: ANN202
    from monitoring.canary import ArmStats, Comparison

    c, h = ArmStats(canary[0], canary[1], canary[0]), ArmStats(champion[0], champion[1], champion[0])
    return Comparison(h, c, c.hit_rate - h.hit_rate, lo, hi, T0, T0 + pd.Timedelta(days=days), 10)


@pytest.mark.parametrize(("cmp", "action", "words"), [
    (_cmp((300, 60), (3000, 900), -0.15, -0.05, 1), "rollback", "answers worse"),  # worse: at once, before min_days
    (_cmp((300, 95), (3000, 900), -0.06, 0.05, 1), "wait", "waits until it has served 3 days"),
    (_cmp((300, 95), (3000, 900), -0.06, 0.05, 4), "promote", "not worse than the champion"),
    (_cmp((50, 5), (600, 180), -0.3, -0.1, 4), "wait", "too few users"),  # too few to say, even if it looks worse
    (_cmp((50, 20), (600, 180), -0.1, 0.3, 15), "rollback", "no verdict after 14 days"),
])
def test_the_policy(cmp, action: str, words: str) -> None:  # noqa: ANN001
    from monitoring.canary import decide

    verdict = decide(cmp, CanarySettings())
    assert verdict.action == action and words in verdict.reason, verdict


def test_the_pointer_starts_promotes_and_rolls_back(tiny_champion, shop_model) -> None:  # noqa: ANN001
    from recflow import canary, registry

    settings, first = tiny_champion
    second = registry.register(settings, shop_model(settings, seed=1), {"note": "second"})
    with pytest.raises(ValueError, match="is the champion already"):
        canary.start(settings, first, 0.1)
    with pytest.raises(ValueError, match="must be above 0"):
        canary.start(settings, second, 0.0)
    started = canary.start(settings, second, 0.2, "retrain: +3%")
    assert canary.get(settings) == started and started["champion"] == first and started["salt"] == second
    third = registry.register(settings, shop_model(settings, seed=2), {"note": "third"})
    canary.start(settings, third, 0.1)  # replaces the running one, which is rolled back
    assert [(h["tag"], h["action"]) for h in canary.history(settings)] == [(second, "rollback")]
    assert "replaced by the canary" in canary.history(settings)[0]["why"]
    canary.end(settings, "rollback", "worse")
    assert canary.get(settings) is None and registry.get_champion(settings)["tag"] == first
    canary.start(settings, second, 0.1)
    record = canary.end(settings, "promote", "not worse", detail={"ci95_lo": -0.01})
    assert registry.get_champion(settings)["tag"] == second and canary.get(settings) is None
    assert record["detail"] == {"ci95_lo": -0.01} and "canary promoted: not worse" in registry.get_champion(settings)["reason"]
    with pytest.raises(LookupError, match="no canary is running"):
        canary.end(settings, "rollback", "nothing")


def _write_log(settings, df: pd.DataFrame) -> None:  # noqa: ANN001
    folder = settings.paths.request_log / "2024-06-03"
    folder.mkdir(parents=True, exist_ok=True)
    rows = pd.DataFrame([request_log_row(request_id=r.request_id, ts=r.ts, user_id=r.user_id, model_version=r.model_version,
                                         k=r.k, item_ids=r.item_ids, scores=[1.0] * len(r.item_ids), features="{}",
                                         arm=r.arm) for r in df.itertuples()])
    pq.write_table(conform(rows, REQUEST_LOG_SCHEMA, name="log"), folder / f"requests-{len(list(folder.iterdir()))}.parquet")


def test_a_worse_canary_is_rolled_back_by_the_monitor(tiny_champion, shop_model) -> None:  # noqa: ANN001
    """End to end through the home: a canary whose users buy what it recommends less often than the
    champion's users is rolled back by the monitor's canary step, which says why."""
    from monitoring.canary import run
    from recflow import canary, registry
    from recflow.privacy import pseudonym, pseudonym_key

    settings, first = tiny_champion
    settings = settings.model_copy(update={"canary": CanarySettings(min_users=100)})
    worse = registry.register(settings, shop_model(settings, seed=1), {"note": "worse"})
    canary.start(settings, worse, 0.2)
    assert run(settings, until=T0) is not None and canary.get(settings) is not None  # nothing served yet: waits
    key = pseudonym_key(settings)
    rng = np.random.default_rng(0)
    rows, buys = [], []
    for i in range(1500):
        raw = f"shopper-{i}"
        arm = "canary" if canary.serves_canary(raw, worse, 0.2) else "champion"
        rows.append((pseudonym(raw, key), arm, worse if arm == "canary" else first, ["w", "x"], T0))
        if rng.random() < (0.2 if arm == "canary" else 0.5):
            buys.append({"event_id": f"e{i}", "user_id": raw, "item_id": "x", "event_type": "purchase",
                         "event_timestamp": T0 + pd.Timedelta(days=2), "basket_id": None, "quantity": 1.0,
                         "price": 1.0})
    _write_log(settings, _log(rows))
    from recflow.event_log import EventLog

    journal = EventLog(settings.paths.event_log)
    journal.append(pd.DataFrame(buys))
    journal.flush()
    record = run(settings, until=T0 + pd.Timedelta(days=8))
    assert record is not None and record["action"] == "rollback" and record["acted"], record
    assert "answers worse" in record["reason"] and record["ci95_hi"] < 0
    assert record["arms"]["canary"]["users"] > 200 and record["arms"]["champion"]["users"] > 1000
    assert canary.get(settings) is None and registry.get_champion(settings)["tag"] == first
    assert canary.history(settings)[-1]["action"] == "rollback"
    assert record["report"] and pd.read_json(record["report"], typ="series")["action"] == "rollback"

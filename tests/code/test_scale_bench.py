"""benchmarks/scale.py: the synthetic shop has Complete Journey's skew, and the growth exponent is a log-log slope.

The pipeline itself is not run here (the benchmark is minutes even at a tiny scale).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from benchmarks import scale


@pytest.fixture(scope="module")
def shop():  # noqa: ANN201
    return scale.synthetic_shop(0.05, seed=0)


def test_tiny_shop_has_the_requested_size_and_span(shop) -> None:  # noqa: ANN001
    interactions, items = shop
    assert interactions["user_id"].nunique() == round(scale.CJ["users"] * 0.05)
    assert len(items) == round(scale.CJ["items"] * 0.05)
    assert len(interactions) == pytest.approx(scale.CJ["events"] * 0.05, rel=0.15)
    ts = interactions["timestamp"]
    assert ts.min() >= pd.Timestamp("2017-01-01", tz="UTC") and ts.max() < pd.Timestamp(
        "2018-01-01", tz="UTC"
    )
    assert ts.max() - ts.min() > pd.Timedelta(days=350)
    assert interactions[
        "event_id"
    ].is_unique  # one line per (basket, item): nothing quarantined as a duplicate
    assert set(interactions["item_id"]) <= set(items["item_id"])
    assert set(interactions.columns) >= {
        "user_id",
        "item_id",
        "timestamp",
        "event_id",
        "basket_id",
        "quantity",
        "price",
    }


def test_tiny_shop_has_popularity_and_rebuy_skew(shop) -> None:  # noqa: ANN001
    interactions, items = shop
    stats = scale.shop_stats(interactions, len(items))
    assert stats["top10pct_item_share"] > 0.4  # Zipf-like popularity (CJ: 0.72)
    assert 0.25 < stats["repeat_share"] < 0.8  # staples re-bought, plus exploration (CJ: 0.41)
    assert stats["items_sold"] < len(items)  # a tail of the catalogue never sells
    assert 5 < stats["lines_per_basket"] < 15  # CJ: 9.4
    # re-buys follow personal intervals: a user's gaps on one item are more regular than across users
    ev = interactions.sort_values(["user_id", "item_id", "timestamp"])
    days = (ev["timestamp"] - ev["timestamp"].min()).dt.total_seconds().to_numpy() / 86400
    same = (ev["user_id"].to_numpy()[1:] == ev["user_id"].to_numpy()[:-1]) & (
        ev["item_id"].to_numpy()[1:] == ev["item_id"].to_numpy()[:-1]
    )
    gaps = np.diff(days)[same]
    pair = (ev["user_id"].astype(str) + "/" + ev["item_id"].astype(str)).to_numpy()[1:][same]
    g = pd.DataFrame({"pair": pair, "gap": gaps}).groupby("pair")["gap"].agg(["mean", "std", "size"])
    g = g[g["size"] >= 4]
    assert len(g) > 100
    assert (g["std"] / g["mean"]).median() < gaps.std() / gaps.mean()


def test_generator_is_deterministic() -> None:
    a, _ = scale.synthetic_shop(0.01, seed=3)
    b, _ = scale.synthetic_shop(0.01, seed=3)
    assert a.equals(b)


def test_growth_exponent_is_the_log_log_slope() -> None:
    events = [1e5, 4e5, 1.6e6]
    assert scale.growth_exponent(events, [2.0 * e for e in events]) == pytest.approx(1.0, abs=1e-6)
    assert scale.growth_exponent(events, [3e-9 * e**1.5 for e in events]) == pytest.approx(1.5, abs=1e-3)
    assert scale.growth_exponent(events, [5.0, 5.0, 5.0]) == pytest.approx(0.0, abs=1e-6)
    assert scale.growth_exponent([1e5], [1.0]) is None
    assert scale.growth_exponent([1e5, 4e5], [1.0, 0.0]) is None  # a zero time has no logarithm


def test_plan_skips_a_stage_predicted_over_budget() -> None:
    done = {
        "scale": 1.0,
        "events": scale.CJ["events"],
        "stages": {s: {"seconds": 10.0} for s in scale.STAGES},
    }
    done["stages"]["features"] = {"seconds": 100.0}
    done["stages"]["materialize"] = {"skipped": "test"}
    done["stages"]["serving"] = {"seconds": 25.0, "model_build_s": 5.0}  # + a fixed 20 s of load
    skip, pred = scale.plan([done], 4.0, budget=300.0)
    assert pred["features"] == pytest.approx(400.0) and "features" in skip  # linear at least
    assert "materialize" in skip  # skipped at a smaller size
    assert "ingest" not in skip and pred["ingest"] == pytest.approx(40.0)
    assert pred["serving"] == pytest.approx(4 * 5.0 + 20.0)  # only the model build grows


def test_plan_skips_a_stage_predicted_over_the_memory_limit() -> None:
    def stages(mb: float) -> dict:
        return {
            s: {"seconds": 1.0, "rss_at_start_mb": 300.0, "peak_rss_mb": 300.0 + mb} for s in scale.STAGES
        }

    # the stage's own growth: 1000 MB at 1x, 1500 MB at 2x (+500 MB per 1x), from 300 MB
    sizes = [
        {"scale": k, "events": scale.CJ["events"] * k, "stages": stages(mb)}
        for k, mb in ((1.0, 1000.0), (2.0, 1500.0))
    ]
    skip, pred = scale.plan(sizes, 4.0, budget=1e9, rss_limit_mb=2000.0)
    assert pred["ingest_peak_rss_mb"] == pytest.approx(300 + 2500)
    assert "ingest" in skip and "GB" in skip["ingest"]
    assert "features_peak_rss_mb" not in pred and "features" not in skip  # DuckDB bounds its own memory
    assert scale.plan(sizes, 4.0, budget=1e9)[0] == {}
    one = scale.plan(sizes[:1], 4.0, budget=1e9)[1]
    assert one["ingest_peak_rss_mb"] == pytest.approx(300 + 4000)  # one size: growth through zero

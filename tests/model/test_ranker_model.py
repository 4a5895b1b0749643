"""The two-stage model on a synthetic shop: it learns, it round-trips, and serving equals offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recflow.ranker import load_two_stage, save_two_stage, score_users
from recflow.ranker.features import user_context
from recflow.ranker.log import DAY_S
from recflow.ranker.model import Scored
from recflow.ranker.recommend import Ask, reason_text, recommend
from training.evaluate import evaluate
from training.protocol import Protocol, week_evalset
from training.synthetic import synthetic_shop
from training.two_stage import Inputs, config_for, final_model, fit, seconds, week_scorer


@pytest.fixture(scope="module")
def shop() -> dict:
    events, items = synthetic_shop(n_users=150, n_items=200, days=120, seed=7)
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(items["text"].nunique() + 1, 16)).astype(np.float32)
    from recflow.modeling.build import unique_texts
    from training.examples import Catalogue

    texts, _ = unique_texts(Catalogue.from_items(items).texts)
    inputs = Inputs.build(events, items, emb[: len(texts)])
    protocol = Protocol.make("2024-04-08", train_weeks=5, test_weeks=2)
    cfg = config_for(inputs, max_rounds=40, early_stopping_rounds=10, min_data_in_leaf=5, threads=1,
                     negative_share=0.5, seen_ranker=True)  # the opt-in seen booster too: every path is exercised
    fitted = fit(inputs, protocol, cfg)
    return {"events": events, "items": items, "inputs": inputs, "protocol": protocol, "cfg": cfg, "fit": fitted}


def test_ranker_beats_a_shuffled_ranker(shop: dict) -> None:
    inputs, cfg, fitted = shop["inputs"], shop["cfg"], shop["fit"]
    ev = week_evalset("test", shop["events"], inputs.catalogue, shop["protocol"].tests[0])
    scorer, week = week_scorer(inputs, fitted.ranker, ev, cfg)
    model = evaluate(scorer, ev)["ndcg@10"]
    rng = np.random.default_rng(1)
    shuffled = Scored(week.cands, rng.permutation(fitted.ranker.predict(week.x)), week.anchor)
    users = pd.Index(inputs.log.user_ids).get_indexer(ev.rows.user_ids)
    dense = shuffled.dense(users, len(inputs.catalogue))
    rand = evaluate(lambda rows: dense[rows], ev)["ndcg@10"]
    assert fitted.ranker.metrics["best_iteration"] >= 1
    assert model > rand + 0.05, (model, rand)


def test_each_part_keeps_its_positions_in_its_own_boosters_order(shop: dict) -> None:
    """Ranker.score: the never-bought candidates of each user get the same set of scores the main
    booster gave them (the same list positions), handed out in the unseen booster's order; the re-buy
    candidates likewise in the seen booster's order (``seen_ranker``, opt-in). Without the two, the
    main scores are served."""
    from dataclasses import replace

    inputs, cfg, fitted = shop["inputs"], shop["cfg"], shop["fit"]
    r = fitted.ranker
    assert r.unseen is not None and "unseen" in r.metrics
    assert r.seen is not None and "seen" in r.metrics
    ev = week_evalset("test", shop["events"], inputs.catalogue, shop["protocol"].tests[0])
    _, week = week_scorer(inputs, r, ev, cfg)
    main, final = r.predict(week.x), r.score(week.x, week.cands.user)
    unseen = week.x[:, cfg.features.index("ui_bought")] == 0
    checked = {"unseen": 0, "seen": 0}
    for part, rows, booster in (("unseen", unseen, r.unseen), ("seen", ~unseen, r.seen)):
        second = r._predict(booster, week.x, 1)
        for u in np.unique(week.cands.user):
            m = (week.cands.user == u) & rows
            if m.sum() < 2:
                continue
            np.testing.assert_array_equal(np.sort(final[m]), np.sort(main[m]))
            # a strictly better position always goes to an item the part's booster scores at least as high
            better = final[m][:, None] > final[m][None, :]
            assert np.all((second[m][:, None] >= second[m][None, :] - 1e-12)[better])
            checked[part] += 1
    assert min(checked.values()) > 10, checked
    assert not np.array_equal(final[~unseen], main[~unseen])  # the seen booster did reorder some re-buys
    plain = replace(r, unseen=None, seen=None)
    np.testing.assert_array_equal(plain.score(week.x, week.cands.user), main)


def test_round_trip_gives_identical_scores(shop: dict, tmp_path: Path) -> None:
    inputs, fitted = shop["inputs"], shop["fit"]
    end = seconds(shop["protocol"].tests[-1])
    model = final_model(inputs, fitted.ranker, end)
    loaded = load_two_stage(save_two_stage(model, tmp_path / "ranker"))
    ctx = user_context(inputs.log, model.side.stats, end, model.category)
    users = np.arange(min(40, inputs.log.n_users))
    a = score_users(model.ranker, ctx, model.side, users)
    b = score_users(loaded.ranker, user_context(inputs.log, loaded.side.stats, end, loaded.category), loaded.side, users)
    assert np.array_equal(a.cands.item, b.cands.item)
    np.testing.assert_array_equal(a.score, b.score)
    assert (tmp_path / "ranker" / "ranker.txt").read_text().startswith("tree")  # LightGBM text, not a pickle
    assert loaded.ranker.unseen is not None and (tmp_path / "ranker" / "ranker_unseen.txt").read_text().startswith("tree")
    assert loaded.ranker.seen is not None and (tmp_path / "ranker" / "ranker_seen.txt").read_text().startswith("tree")


def test_a_bag_averages_its_seeds_round_trips_and_continues_member_by_member(shop: dict, tmp_path: Path) -> None:
    """bag=2: two boosters per stage with seeds seed and seed+1, scores their mean; saved as
    ranker.txt + ranker_1.txt (and the unseen and seen pairs), loaded to identical scores; an incremental
    refit continues each member from its counterpart; saving a single booster removes stale members."""
    from dataclasses import replace

    from recflow.ranker.model import BoosterBag, members
    from training.two_stage import refit

    inputs, protocol = shop["inputs"], shop["protocol"]
    cfg = replace(shop["cfg"], bag=2)
    bag = fit(inputs, protocol, cfg).ranker
    assert isinstance(bag.booster, BoosterBag) and isinstance(bag.unseen, BoosterBag) and isinstance(bag.seen, BoosterBag)
    one, two = members(bag.booster)
    assert one.params["seed"] == cfg.seed and two.params["seed"] == cfg.seed + 1
    assert [m["seed"] for m in bag.metrics["bag_members"]] == [cfg.seed + 1]
    week = shop["fit"].validation
    np.testing.assert_allclose(bag.predict(week.x), (one.predict(week.x) + two.predict(week.x)) / 2)
    assert not np.allclose(one.predict(week.x), two.predict(week.x))  # the seeds differ
    # the first member is the single-booster fit with the same seed: bag=1 is unchanged
    np.testing.assert_allclose(one.predict(week.x), shop["fit"].ranker.predict(week.x))
    end = seconds(protocol.tests[-1])
    model = final_model(inputs, bag, end)
    folder = save_two_stage(model, tmp_path / "bag")
    assert {p.name for p in folder.glob("ranker*.txt")} == {"ranker.txt", "ranker_1.txt", "ranker_unseen.txt",
                                                            "ranker_unseen_1.txt", "ranker_seen.txt", "ranker_seen_1.txt"}
    loaded = load_two_stage(folder)
    assert len(members(loaded.ranker.booster)) == 2 and len(members(loaded.ranker.unseen)) == 2
    assert len(members(loaded.ranker.seen)) == 2
    np.testing.assert_array_equal(loaded.ranker.score(week.x, week.cands.user), bag.score(week.x, week.cands.user))
    inc = refit(inputs, bag, protocol.tests[1], 2, 7, incremental=True)
    for old, new in zip(members(bag.booster), members(inc.ranker.booster), strict=True):
        assert new.num_trees() >= old.num_trees() and new.params["seed"] == old.params["seed"]
    save_two_stage(final_model(inputs, shop["fit"].ranker, end), folder)
    assert {p.name for p in folder.glob("ranker*.txt")} == {"ranker.txt", "ranker_unseen.txt", "ranker_seen.txt"}


def test_served_answer_equals_the_offline_scorer(shop: dict) -> None:
    """recommend() on the users' online histories gives the offline scorer's top 10 (same user, same time)."""
    inputs, fitted = shop["inputs"], shop["fit"]
    as_of = seconds(shop["protocol"].tests[0]) + 3 * 3600
    model = final_model(inputs, fitted.ranker, as_of)
    log = inputs.log.before(as_of)
    off = log.offsets()
    users = [u for u in range(log.n_users) if off[u + 1] > off[u]][:25]
    asks = [Ask(inputs.catalogue.item_ids[log.item[off[u]:off[u + 1]]][::-1].tolist(),
                log.ts[off[u]:off[u + 1]][::-1].tolist(), as_of, 10, user_id=str(log.user_ids[u])) for u in users]
    served = recommend(model, asks)
    ctx = user_context(inputs.log, model.side.stats, as_of, model.category)
    sc = score_users(model.ranker, ctx, model.side, np.array(users))
    for k, u in enumerate(users):
        m = sc.cands.user == u
        order = np.argsort(-sc.score[m], kind="stable")[:10]
        assert [p.position for p in served[k]] == sc.cands.item[m][order].tolist()
        np.testing.assert_allclose([p.score for p in served[k]], sc.score[m][order], rtol=1e-12)
    texts = [reason_text(p, lambda i: f"item {i}") for picks in served for p in picks]
    assert any(t.startswith("you buy this about every") for t in texts)
    assert all(t for t in texts)


def test_filters_and_fill(shop: dict) -> None:
    inputs, fitted = shop["inputs"], shop["fit"]
    as_of = seconds(shop["protocol"].tests[0])
    model = final_model(inputs, fitted.ranker, as_of)
    log = inputs.log.before(as_of)
    off = log.offsets()
    u = int(np.argmax(np.diff(off)))
    hist_ids = inputs.catalogue.item_ids[log.item[off[u]:off[u + 1]]].tolist()
    hist_ts = log.ts[off[u]:off[u + 1]].tolist()
    no_repeat = recommend(model, [Ask(hist_ids, hist_ts, as_of, 10, exclude_history=True)])[0]
    assert len(no_repeat) == 10 and not set(p.position for p in no_repeat) & set(log.item[off[u]:off[u + 1]].tolist())
    rows = np.arange(0, 200, 7)
    only = recommend(model, [Ask(hist_ids, hist_ts, as_of, 12, rows=rows)])[0]
    assert len(only) == 12 and all(p.position in set(rows.tolist()) for p in only)
    cold_user = recommend(model, [Ask([], [], as_of, 5)])[0]  # no history: popular items
    assert [p.kind for p in cold_user] == ["popular"] * 5
    assert as_of - max(hist_ts) >= 0 and DAY_S == 86400


def test_monitoring_reference_is_what_the_two_stage_service_serves(shop: dict) -> None:
    """The monitor's reference rows rank the point-in-time histories with the same core as /recommend:
    same items and scores as recommend() on those histories; no history -> the popularity fallback."""
    from monitoring.reference import _two_stage_reference

    inputs, fitted = shop["inputs"], shop["fit"]
    at = pd.Timestamp(shop["protocol"].tests[0])
    as_of = seconds(shop["protocol"].tests[0])
    model = final_model(inputs, fitted.ranker, as_of)
    log = inputs.log.before(as_of)
    off = log.offsets()
    users = [u for u in range(log.n_users) if off[u + 1] > off[u]][:12]
    hist = [(inputs.catalogue.item_ids[log.item[off[u]:off[u + 1]]][::-1].tolist(), log.ts[off[u]:off[u + 1]][::-1].tolist())
            for u in users]
    records = [{"user_id": str(log.user_ids[u]), "user_history__history_item_ids": ids, "user_history__history_ts": ts}
               for u, (ids, ts) in zip(users, hist, strict=True)]
    records.append({"user_id": "newcomer", "user_history__history_item_ids": None, "user_history__history_ts": None})
    ref = _two_stage_reference(model, records, at, 10, "v1", b"k" * 32, False, batch_size=5)
    served = recommend(model, [Ask(ids, ts, as_of, 10, user_id=str(log.user_ids[u]))
                               for u, (ids, ts) in zip(users, hist, strict=True)])
    assert len(ref) == len(records) and ref["fallback"].tolist() == [False] * len(users) + [True]
    for row, picks in zip(ref.itertuples(), served, strict=False):
        assert list(row.item_ids) == [str(model.item_ids[p.position]) for p in picks]
        np.testing.assert_allclose(row.scores, [p.score for p in picks], rtol=1e-6)
    assert list(ref["item_ids"].iloc[-1]) == [str(model.item_ids[p]) for p in model.side.popular[:10]]
    assert "newcomer" not in ref["user_id"].tolist()  # pseudonymised


def test_retrain_refit_continues_from_the_champion_and_never_sees_the_gate_week(shop: dict) -> None:
    from training.two_stage import inputs_for, refit, week_metrics

    inputs, fitted = shop["inputs"], shop["fit"]
    gate_week = shop["protocol"].tests[1]
    champion = final_model(inputs, fitted.ranker, seconds(gate_week))
    again = inputs_for(champion, inputs.catalogue, shop["events"])
    trees = fitted.ranker.booster.num_trees()
    inc = refit(again, fitted.ranker, gate_week, 2, 7, incremental=True)
    assert inc.ranker.metrics["continued_from_trees"] == trees and inc.ranker.booster.num_trees() >= trees
    assert inc.validation.anchor == seconds(gate_week - pd.Timedelta(days=7))  # early-stopped before the gate week
    full = refit(again, fitted.ranker, gate_week, 2, 7, incremental=False)
    assert "continued_from_trees" not in full.ranker.metrics
    ev = week_evalset("gate", shop["events"], inputs.catalogue, gate_week)
    m = week_metrics(again, inc.ranker, ev)
    assert 0 < m["ndcg@10"] <= 1 and set(m) >= {"ndcg@10", "ndcg@10_new", "recall@20"}
    from training.examples import Catalogue

    with pytest.raises(ValueError, match="catalogue differs"):
        inputs_for(champion, Catalogue.from_items(shop["items"].iloc[::-1]), shop["events"])


def test_without_text_keeps_every_candidate_a_non_text_source_found(shop: dict) -> None:
    from recflow.ranker.candidates import SOURCES
    from recflow.ranker.model import TEXT_FEATURES
    from training.ranker import without_text

    week = shop["fit"].validation
    f = week.cands.features
    feats = tuple(n for n in week.features if n not in TEXT_FEATURES)
    nt = without_text(week, feats)
    other = [s for s in SOURCES if f"src_{s}" not in TEXT_FEATURES]
    assert {"history", "new"} <= set(other) and "text" not in other and "cold" not in other
    want = np.zeros(len(week.y), bool)
    for s in other:
        want |= f[f"src_{s}"] > 0
    assert 0 < len(nt.y) == int(want.sum()) <= len(week.y)
    np.testing.assert_array_equal(nt.cands.item, week.cands.item[want])
    np.testing.assert_array_equal(nt.x, week.x[want][:, [list(week.features).index(n) for n in feats]])


def test_skew_report_is_zero_for_exact_histories_and_names_a_cut_one(shop: dict) -> None:
    """The service's logged user features (recommend(..., features)) against the offline truth from
    the purchase events: exact histories give no skew; histories cut to 3 lines are named."""
    from monitoring.skew import skew_report
    from recflow.schemas import logged_features

    inputs, fitted, events = shop["inputs"], shop["fit"], shop["events"]
    as_of = seconds(shop["protocol"].tests[0]) + 5 * 3600
    model = final_model(inputs, fitted.ranker, as_of)
    log = inputs.log.before(as_of)
    off = log.offsets()
    users = [u for u in range(log.n_users) if off[u + 1] - off[u] > 5][:30]

    def requests(cut: int | None) -> pd.DataFrame:
        asks = []
        for u in users:
            ids = inputs.catalogue.item_ids[log.item[off[u]:off[u + 1]]][::-1].tolist()
            ts = log.ts[off[u]:off[u + 1]][::-1].tolist()
            asks.append(Ask(ids[:cut], ts[:cut], as_of, 10, user_id=str(log.user_ids[u])))
        served: list = []
        recommend(model, asks, served)
        rows = [{"user_history__history_item_ids": list(a.history_ids)} for a in asks]  # as the online row held it
        return pd.DataFrame({"user_id": [str(log.user_ids[u]) for u in users],
                             "ts": pd.to_datetime(as_of, unit="s", utc=True),
                             "features": [logged_features(r, len(r["user_history__history_item_ids"]), model_features=f)
                                          for r, f in zip(rows, served, strict=True)]})

    purchases = events[events["event_type"] == "purchase"] if "event_type" in events.columns else events
    exact = skew_report(model, requests(None), purchases)
    assert exact["verdict"] == "ok" and exact["compared"] == len(users) and exact["max_abs_diff"] == 0.0
    assert exact["features_mismatched"] == [] and set(exact["per_feature"]) >= {"u_n_lines", "u_days_since_last"}
    cut = skew_report(model, requests(3), purchases, history_length=3)
    assert cut["verdict"] == "skew" and "u_n_lines" in cut["features_mismatched"]
    assert cut["per_feature"]["u_n_lines"]["share_mismatched"] == 1.0 and cut["max_abs_diff"] > 2
    assert "cut at features.history_length=3" in cut["reason"] and cut["examples"][0]["served"] == 3.0
    late = skew_report(model, requests(3), purchases, history_length=5_000)  # same rows, not a cut: not online yet
    assert f"{len(users)} request(s) were served before up to" in late["reason"] and "cut at" not in late["reason"]
    none = skew_report(model, pd.DataFrame({"user_id": ["a"], "ts": [pd.Timestamp("2024-01-01", tz="UTC")],
                                            "features": ['{"purchases_7d": 1, "history_len": 1}']}), purchases)
    assert none["verdict"] == "no_data" and none["compared"] == 0


def test_visit_reference_has_one_request_per_basket_at_its_time(shop: dict) -> None:
    """The monitoring reference as traffic arrives: a row per (user, basket time) of the week, ranked
    on the purchases strictly before it, with the features the service would log."""
    import json

    from monitoring.reference import visit_reference
    from recflow.privacy import pseudonym
    from recflow.ranker.log import epoch_seconds

    inputs, fitted, events = shop["inputs"], shop["fit"], shop["events"]
    start = shop["protocol"].tests[0]
    model = final_model(inputs, fitted.ranker, seconds(start))
    key = b"k" * 32
    start_ts = pd.Timestamp(start) if pd.Timestamp(start).tzinfo else pd.Timestamp(start).tz_localize("UTC")
    ref = visit_reference(model, events, start=start_ts, days=7, k=10, model_version="v",
                          key=key, max_rows=10_000)
    p = events[events["event_type"] == "purchase"] if "event_type" in events.columns else events
    t = epoch_seconds(p["event_timestamp"])
    lo = seconds(start)
    week = p[(t >= lo) & (t < lo + 7 * 86400)]
    visits = week.groupby([week["user_id"].astype(str), week["event_timestamp"]]).size()
    assert len(ref) == len(visits) and ref["ts"].min() >= start_ts
    u, when = visits.index[len(visits) // 2]
    row = ref[(ref["user_id"] == pseudonym(u, key)) & (ref["ts"] == pd.Timestamp(when))]
    assert len(row) == 1
    before = int(((p["user_id"].astype(str) == u) & (p["event_timestamp"] < when)).sum())
    feats = json.loads(row["features"].iloc[0])
    assert feats["history_len"] == before and (before == 0 or feats["u_n_lines"] == before)
    assert all(len(x) == 10 for x in ref["item_ids"]) and ref["fallback"].sum() == sum(
        json.loads(f)["history_len"] == 0 for f in ref["features"])
    assert len(visit_reference(model, events, start=start_ts, days=7, k=10, model_version="v",
                               key=key, max_rows=25)) == 25


def test_launch_slots_put_each_users_best_launches_at_the_listed_positions(shop: dict, tmp_path: Path) -> None:
    """With launch_slots, the listed positions of each user's never-bought part hold their best
    launches (in the unseen booster's order), re-buys keep their scores, and the config round-trips."""
    from dataclasses import replace

    inputs, cfg, fitted = shop["inputs"], shop["cfg"], shop["fit"]
    ev = week_evalset("test", shop["events"], inputs.catalogue, shop["protocol"].tests[0])
    _, week = week_scorer(inputs, fitted.ranker, ev, cfg)
    age = week.x[:, cfg.features.index("item_age_d")]
    days = float(np.nanpercentile(age, 10))  # the youngest tenth of the sold candidates are launches
    r = replace(fitted.ranker, config=replace(cfg, launch_slots=(1, 3), launch_days=days))
    base, final = fitted.ranker.score(week.x, week.cands.user), r.score(week.x, week.cands.user)
    unseen = week.x[:, cfg.features.index("ui_bought")] == 0
    np.testing.assert_array_equal(final[~unseen], base[~unseen])
    second = r._predict(r.unseen, week.x, 1)
    launch = np.nan_to_num(age, nan=np.inf) < days
    checked = 0
    main = fitted.ranker.predict(week.x)
    for u in np.unique(week.cands.user):
        m = np.flatnonzero((week.cands.user == u) & unseen)
        slots = np.sort(main[m])[::-1][:5]  # the scores of the user's first five new-item positions
        if launch[m].sum() < 2 or (~launch[m]).sum() < 3 or len(np.unique(slots)) < 5:
            continue  # (a tiny booster ties; positions are only well defined without ties)
        best = np.sort(second[m][launch[m]])[::-1][:2]
        for pos, want in zip((1, 3), best, strict=True):
            holder = m[final[m] == slots[pos]]
            assert len(holder) == 1 and launch[holder[0]] and second[holder[0]] == want, (u, pos)
        checked += 1
    assert checked > 5
    loaded = load_two_stage(save_two_stage(final_model(inputs, r, seconds(ev.anchor)), tmp_path / "launch"))
    assert loaded.ranker.config.launch_slots == (1, 3) and loaded.ranker.config.launch_days == days


@pytest.mark.timeout(400)
def test_ranker_search_picks_the_best_trials_settings_and_trains_with_them(shop: dict, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """training.ranker_trials > 0: a Ray Tune search (ASHA over boosting rounds, validation NDCG@10)
    picks the LightGBM settings, the ranker is trained with the best trial's, and the record says so."""
    import ray

    from training.ranker_search import SEARCHED

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    inputs, protocol, cfg = shop["inputs"], shop["protocol"], shop["cfg"]
    fitted = fit(inputs, protocol, cfg, search={"trials": 3, "max_minutes": 3, "num_cpus": 2, "searcher": "random",
                                                "storage_path": str(tmp_path / "ray")})
    assert not ray.is_initialized()
    record = fitted.ranker.metrics["search"]
    trials, best = record["trials"], record["best"]
    assert len(trials) == 3 and best["ndcg@10"] == max(t["ndcg@10"] for t in trials)
    assert all(0 < t["ndcg@10"] <= 1 and 1 <= t["best_round"] <= t["rounds"] <= cfg.max_rounds for t in trials)
    assert len({tuple(t[k] for k in SEARCHED) for t in trials}) == 3  # three different settings were tried
    chosen = fitted.ranker.config
    for k in SEARCHED:
        assert getattr(chosen, k) == pytest.approx(best[k]), k
    assert chosen.features == cfg.features and fitted.seconds["search"] > 0
    assert trials[0]["num_leaves"] in (15, 31, 63) and 0.02 <= trials[0]["learning_rate"] <= 0.1


def test_compiled_ranker_scores_as_lightgbm_and_serves_the_offline_answer(shop: dict, tmp_path: Path) -> None:
    """serving.compile_ranker: the lleaves-compiled boosters (main, unseen, seen; bag members too) give
    LightGBM's scores, recommend() through them gives the offline scorer's top 10, and a second
    compile of the same boosters loads the cached objects instead of compiling again."""
    import time
    from dataclasses import replace

    from recflow.ranker.compiled import CompiledBooster, compile_ranker
    from recflow.ranker.model import BoosterBag, members

    inputs, fitted, week = shop["inputs"], shop["fit"], shop["fit"].validation
    ranker = fitted.ranker
    started = time.perf_counter()
    compiled, _ = compile_ranker(ranker, tmp_path / "cache")
    first_s = time.perf_counter() - started
    objects = sorted(p.name for p in (tmp_path / "cache").glob("*.o"))
    assert len(objects) == 3  # main, unseen, seen
    for ours, theirs in ((compiled.booster, ranker.booster), (compiled.unseen, ranker.unseen), (compiled.seen, ranker.seen)):
        assert isinstance(ours, CompiledBooster) and ours.num_trees() == theirs.num_trees()
        np.testing.assert_allclose(ours.predict(week.x, num_threads=1), theirs.predict(week.x, num_threads=1),
                                   rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(compiled.score(week.x, week.cands.user), ranker.score(week.x, week.cands.user),
                               rtol=1e-12, atol=1e-12)
    started = time.perf_counter()
    again, _ = compile_ranker(ranker, tmp_path / "cache")
    assert sorted(p.name for p in (tmp_path / "cache").glob("*.o")) == objects
    assert time.perf_counter() - started < first_s
    np.testing.assert_array_equal(again.predict(week.x), compiled.predict(week.x))

    as_of = seconds(shop["protocol"].tests[0]) + 3 * 3600
    model = final_model(inputs, ranker, as_of)
    served_model = replace(model, ranker=compiled)
    log = inputs.log.before(as_of)
    off = log.offsets()
    users = [u for u in range(log.n_users) if off[u + 1] > off[u]][:25]
    asks = [Ask(inputs.catalogue.item_ids[log.item[off[u]:off[u + 1]]][::-1].tolist(),
                log.ts[off[u]:off[u + 1]][::-1].tolist(), as_of, 10, user_id=str(log.user_ids[u])) for u in users]
    assert [[p.position for p in r] for r in recommend(served_model, asks)] == \
        [[p.position for p in r] for r in recommend(model, asks)]

    bag = fit(inputs, shop["protocol"], replace(shop["cfg"], bag=2, seen_ranker=False)).ranker
    cbag, _ = compile_ranker(bag, tmp_path / "cache")
    assert isinstance(cbag.booster, BoosterBag) and len(members(cbag.booster)) == 2 and cbag.seen is None
    np.testing.assert_allclose(cbag.score(week.x, week.cands.user), bag.score(week.x, week.cands.user),
                               rtol=1e-12, atol=1e-12)


def test_a_shop_with_views_gets_a_ranker_that_reads_them_and_serves_the_offline_answer() -> None:
    """Where the events hold views and carts, config_for adds the engaged candidates and features; the
    ranker learns from them (it beats the same pipeline on the purchases alone), and the served answer
    from the online history with its event types is the offline scorer's on the event log."""
    from recflow.ranker.log import history_lines
    from recflow.ranker.model import ENGAGED_FEATURES
    from training.synthetic import with_views

    events, items = synthetic_shop(n_users=150, n_items=200, days=120, seed=7)
    viewed = with_views(events, seed=3)
    protocol = Protocol.make("2024-04-08", train_weeks=5, test_weeks=1)
    scores = {}
    for name, ev_ in (("views", viewed), ("purchases", events)):
        inputs = Inputs.build(ev_, items, None)
        cfg = config_for(inputs, max_rounds=40, early_stopping_rounds=10, min_data_in_leaf=5, threads=1, negative_share=0.5)
        fitted = fit(inputs, protocol, cfg)
        ev = week_evalset("test", ev_, inputs.catalogue, protocol.tests[0])
        scores[name] = evaluate(week_scorer(inputs, fitted.ranker, ev, cfg)[0], ev)["ndcg@10"]
        if name == "views":
            gain = dict(zip(cfg.features, fitted.ranker.booster.feature_importance("gain"), strict=True))
            assert set(ENGAGED_FEATURES) <= set(gain) and sum(gain[f] for f in ENGAGED_FEATURES) > 0
            model_inputs, model_fit = inputs, fitted
    assert scores["views"] > scores["purchases"], scores

    as_of = seconds(protocol.tests[0]) + 3 * 3600
    model = final_model(model_inputs, model_fit.ranker, as_of)
    assert model.reads_engagement
    log = model_inputs.log.before(as_of)
    users = [str(u) for u in log.user_ids[:25]]
    asks = []
    for u in users:
        mine = viewed[(viewed.user_id == u) & (viewed.event_timestamp < pd.Timestamp(as_of, unit="s", tz="UTC"))]
        mine = mine.sort_values("event_timestamp", ascending=False, kind="stable")
        row = {"user_history__history_item_ids": mine.item_id.tolist(),
               "user_history__history_ts": [int(t.timestamp()) for t in mine.event_timestamp],
               "user_history__history_types": mine.event_type.tolist()}
        ids, stamps, kinds = history_lines(row, engagement=True)
        asks.append(Ask(ids, stamps, as_of, 10, user_id=u, history_types=kinds))
    served = recommend(model, asks)
    ctx = user_context(model_inputs.log, model.side.stats, as_of, model.category)
    codes = np.arange(len(users))
    sc = score_users(model.ranker, ctx, model.side, codes)
    for k in codes:
        m = sc.cands.user == k
        order = np.argsort(-sc.score[m], kind="stable")[:10]
        assert [p.position for p in served[k]] == sc.cands.item[m][order].tolist()
    texts = [reason_text(p, lambda i: f"item {i}") for picks in served for p in picks]
    assert any(t.startswith(("you looked at this", "in your cart")) for t in texts), texts[:20]

"""/recommend serves the two-stage model: a real `bentoml serve` on the tiny shop, with a model whose
folder holds a ranker. Feedback pushed through /feedback reaches the ranker's features exactly: the
served answer equals the offline scorer's on the event log (canonical events + the journal)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tests.integration.test_serving import AUTH, _online, _post, _serving, _wait

NOW = pd.Timestamp("2024-05-20T12:00:00Z")


def _toy_ranker(features: tuple[str, ...], signal: tuple[str, str] = ("ui_cnt", "ui_dec_30d")):  # noqa: ANN202
    """A real LightGBM booster over the ranker's features that prefers frequent, recent re-buys (high
    values of the two ``signal`` features)."""
    import lightgbm as lgb

    from recflow.ranker import Ranker, RankerConfig

    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, len(features))).astype(np.float32)
    cnt, last = features.index(signal[0]), features.index(signal[1])
    y = (x[:, cnt] + x[:, last] > 0).astype(float)
    cfg = RankerConfig(features=features, objective="binary", max_rounds=10, min_data_in_leaf=5, threads=1)
    booster = lgb.train(cfg.lgb_params(), lgb.Dataset(x, y, feature_name=list(features)), num_boost_round=10)
    return Ranker(cfg, booster)


def _two_stage(settings, model, engagement: bool = False):  # noqa: ANN001, ANN202
    from dataclasses import replace

    from recflow.ranker import TwoStage
    from recflow.ranker.log import PurchaseLog
    from recflow.ranker.model import ENGAGED_FEATURES, FEATURES, TEXT_FEATURES
    from training.ranker import ItemInputs, item_side_at

    events = pd.read_parquet(settings.paths.events)
    ids = pd.Index(list(model.item_ids))
    log = PurchaseLog.from_events(events, ids)
    side = item_side_at(log, int(NOW.value // 10**9), ItemInputs(), neighbors=10)
    features = tuple(f for f in FEATURES if f not in TEXT_FEATURES) + (ENGAGED_FEATURES if engagement else ())
    ranker = _toy_ranker(features, ("ue_views", "ui_dec_30d") if engagement else ("ui_cnt", "ui_dec_30d"))
    if engagement:
        ranker = replace(ranker, config=replace(ranker.config, candidates=replace(ranker.config.candidates, n_engaged=10)))
    return TwoStage(ranker, side, ids.to_numpy())


def _offline_events(settings, ts, user: str, at: pd.Timestamp, k: int, views: bool = True) -> dict[str, float]:  # noqa: ANN001
    """The offline scorer's top ``k`` (item id: score, best first) for ``user`` at ``at`` over the event log
    (canonical + journal) with its views and carts (``views=False``: its purchases only): the training and
    evaluation path (PurchaseLog.from_events, score_users)."""
    from recflow.event_log import EventLog
    from recflow.ranker.features import user_context
    from recflow.ranker.log import PurchaseLog
    from recflow.ranker.model import score_users

    events = pd.concat([pd.read_parquet(settings.paths.events), EventLog(settings.paths.event_log).read()])
    events = events.drop_duplicates("event_id")
    log = PurchaseLog.from_events(events if views else events[events.event_type == "purchase"], ts.item_index)
    t = int(at.value // 10**9)
    ctx = user_context(log, ts.side.stats, t, ts.category)
    code = int(np.flatnonzero(log.user_ids == user)[0])
    sc = score_users(ts.ranker, ctx, ts.side, np.array([code]))
    order = np.argsort(-sc.score, kind="stable")[:k]
    return {str(ts.item_ids[p]): float(v) for p, v in zip(sc.cands.item[order], sc.score[order], strict=True)}


def _offline(settings, ts, user: str, at: pd.Timestamp, k: int):  # noqa: ANN001, ANN202
    """The offline answer: the user's purchase lines from the canonical events and the feedback journal."""
    from recflow.event_log import EventLog
    from recflow.ranker.log import epoch_seconds
    from recflow.ranker.recommend import Ask, recommend

    events = pd.concat([pd.read_parquet(settings.paths.events), EventLog(settings.paths.event_log).read()])
    p = events[(events.user_id == user) & (events.event_type == "purchase")]
    secs = epoch_seconds(p["event_timestamp"]).tolist()
    return recommend(ts, [Ask(p["item_id"].astype(str).tolist(), secs, int(at.value // 10**9), k)])[0]


def test_recommend_serves_the_two_stage_model(tiny_features, shop_model) -> None:  # noqa: ANN001
    from recflow import registry
    from recflow.event_log import EventLog
    from serving.launcher import start_local

    settings = _serving(tiny_features)
    _online(settings)
    model = shop_model(settings)
    ts = _two_stage(settings, model)
    tag = registry.register(settings, model, {"note": "two-stage"}, two_stage=ts)
    registry.set_champion(settings, tag, "test")
    assert (registry.model_path(settings, tag) / registry.RANKER_DIR / "ranker.txt").is_file()
    import httpx

    with start_local(settings) as svc, httpx.Client(base_url=svc.url, timeout=30) as c:
        # The answer prefill ranked the default answer of "a" (a recent user) before the service said
        # ready: the first request is a hit, and it is the offline scorer's answer as of about now.
        hits, misses = _cache_count(c, "hit"), _cache_count(c, "miss")
        pre = _post(c, "/recommend", {"user_id": "a"}).json()
        assert (_cache_count(c, "hit"), _cache_count(c, "miss")) == (hits + 1, misses)
        want = _offline(settings, ts, "a", pd.Timestamp.now(tz="UTC"), settings.serving.default_k)
        assert [i["item_id"] for i in pre["items"]] == [model.item_ids[p.position] for p in want]
        # the workers compiled the ranker's trees (serving.compile_ranker): the served answers below are
        # compiled code's, checked against the offline LightGBM scorer
        from recflow.ranker.model import members

        boosters = [m for b in (ts.ranker.booster, ts.ranker.unseen, ts.ranker.seen) if b is not None for m in members(b)]
        assert len(list((settings.paths.cache / "lleaves").glob("*.o"))) == len(boosters)

        r = _post(c, "/recommend", {"user_id": "a", "k": 4, "timestamp": NOW.isoformat()})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["fallback"] is False
        want = _offline(settings, ts, "a", NOW, 4)
        assert [i["item_id"] for i in body["items"]] == [model.item_ids[p.position] for p in want]
        np.testing.assert_allclose([i["score"] for i in body["items"]], [p.score for p in want], atol=1e-6,
                                   err_msg=str((body["items"], want)))
        repeat = [i for i in body["items"] if i["reason"]["kind"] == "repeat"]
        assert repeat and all(i["reason"]["text"].startswith(("you buy this about every", "you bought this"))
                              for i in repeat)

        # "Now" (no timestamp): the second answer for the same history comes from the answer cache.
        first = _post(c, "/recommend", {"user_id": "a", "k": 4}).json()
        hits = _cache_count(c, "hit")
        again = _post(c, "/recommend", {"user_id": "a", "k": 4}).json()
        assert _cache_count(c, "hit") == hits + 1 and again["items"] == first["items"]

        # Purchases pushed through /feedback: the next answer equals the offline scorer on the journal.
        for n, (item, day) in enumerate([("w", "2024-05-10"), ("w", "2024-05-17"), ("y", "2024-05-18")]):
            ev = {"event_id": f"fb-{n}", "user_id": "a", "item_id": item, "event_type": "purchase",
                  "timestamp": f"{day}T09:00:00Z"}
            assert _post(c, "/feedback", ev, AUTH).json()["pushed"] is True
        # Views and carts go into the same online history; the ranker reads its purchases only, as the
        # offline scorer reads the event log's purchase lines (counted as purchases, "w" would look
        # bought five times and "v", never sold, bought once).
        for n, (item, kind, day) in enumerate([("w", "view", "2024-05-19"), ("w", "cart", "2024-05-19"),
                                               ("v", "view", "2024-05-19"), ("w", "view", "2024-05-20")]):
            ev = {"event_id": f"fb-v{n}", "user_id": "a", "item_id": item, "event_type": kind,
                  "timestamp": f"{day}T0{n}:00:00Z"}
            assert _post(c, "/feedback", ev, AUTH).json()["pushed"] is True
        b = _post(c, "/recommend", {"user_id": "b", "k": 4, "timestamp": NOW.isoformat()}).json()  # viewed, carted, bought x
        assert [i["item_id"] for i in b["items"]] == [model.item_ids[p.position] for p in _offline(settings, ts, "b", NOW, 4)]
        later = NOW + pd.Timedelta(hours=1)
        body = _post(c, "/recommend", {"user_id": "a", "k": 4, "timestamp": later.isoformat()}).json()
        want = _offline(settings, ts, "a", later, 4)
        assert [i["item_id"] for i in body["items"]] == [model.item_ids[p.position] for p in want]
        np.testing.assert_allclose([i["score"] for i in body["items"]], [p.score for p in want], atol=1e-6,
                                   err_msg=str((body["items"], want)))
        w = next(i for i in body["items"] if i["item_id"] == "w")
        assert w["reason"]["text"] == "you buy this about every 7 days; last bought 3 days ago"
        # the pushes changed the history: "now" is ranked again, not served from the cache
        hits, misses = _cache_count(c, "hit"), _cache_count(c, "miss")
        now = _post(c, "/recommend", {"user_id": "a", "k": 4}).json()
        assert (_cache_count(c, "hit"), _cache_count(c, "miss")) == (hits, misses + 1)
        assert now["items"] != first["items"]
        after_pushes = {body["request_id"], now["request_id"]}

        # The daily item refresh: the refresh_items flow recomputes the item side as of the next day over
        # the canonical events and the journal; after a reload the service serves it, and its answer
        # equals the offline scorer's with the item side recomputed independently.
        from flows.refresh_items import refresh_items
        from recflow.reload import reload_service
        from training.two_stage import refresh

        day = NOW.floor("D") + pd.Timedelta(days=1)
        before = _post(c, "/status", {}).json()["item_side_as_of"]
        done = refresh_items(as_of=day.isoformat(), home=str(settings.home))
        assert done["model"] == tag and done["events"] > 0 and done["seconds"] > 0
        reload_service(settings, svc.url)
        assert before == NOW.floor("s").isoformat().replace("Z", "+00:00")
        assert _post(c, "/status", {}).json()["item_side_as_of"] == day.isoformat()
        events = pd.concat([pd.read_parquet(settings.paths.events), EventLog(settings.paths.event_log).read()])
        bought = events[(events.event_type == "purchase") & (pd.to_datetime(events.event_timestamp, utc=True) < day)]
        fresh = refresh(ts, bought.drop_duplicates("event_id"), int(day.timestamp()))
        assert fresh.side.stats["item_pop_7d"].sum() > ts.side.stats["item_pop_7d"].sum()  # the pushed purchases count
        t = day + pd.Timedelta(hours=2)
        got = _post(c, "/recommend", {"user_id": "a", "k": 4, "timestamp": t.isoformat()}).json()
        want = _offline(settings, fresh, "a", t, 4)
        assert [i["item_id"] for i in got["items"]] == [model.item_ids[p.position] for p in want]
        np.testing.assert_allclose([i["score"] for i in got["items"]], [p.score for p in want], atol=1e-6)

        # A model that reads views and carts (what config_for trains for a shop with them): the service hands
        # it every interaction of the online history with its type, and the answer is the offline scorer's
        # on the whole event log (canonical + journal: a's views and cart above included).
        engaged = _two_stage(settings, model, engagement=True)
        tag2 = registry.register(settings, model, {"note": "two-stage, views and carts"}, two_stage=engaged)
        registry.set_champion(settings, tag2, "test")
        reload_service(settings, svc.url)
        t2 = t + pd.Timedelta(hours=1)
        got = _post(c, "/recommend", {"user_id": "a", "k": 5, "timestamp": t2.isoformat()}).json()
        assert got["model_version"] == tag2 and got["fallback"] is False, got
        want = _offline_events(settings, engaged, "a", t2, 5)
        assert [i["item_id"] for i in got["items"]] == list(want), (got["items"], want)
        np.testing.assert_allclose([i["score"] for i in got["items"]], list(want.values()), atol=1e-6)
        blind = _offline_events(settings, engaged, "a", t2, 5, views=False)  # the same model without the views
        assert blind["w"] != pytest.approx(want["w"], abs=1e-6), (blind, want)  # w: viewed twice and carted

    # The features these answers were served with equal the offline ones for the same user and time,
    # recomputed from the purchase events (canonical + journal) by the skew report: zero skew.
    from monitoring.data import load_request_log
    from monitoring.skew import skew_report
    from recflow.privacy import pseudonym_key, pseudonymise_frame

    served = load_request_log(settings.paths.request_log, "1970-01-01", "2100-01-01")
    served = served[served["request_id"].isin(after_pushes)]
    events = pd.concat([pd.read_parquet(settings.paths.events), EventLog(settings.paths.event_log).read()])
    purchases = pseudonymise_frame(events[events.event_type == "purchase"], pseudonym_key(settings))
    skew = skew_report(ts, served, purchases)
    assert skew["verdict"] == "ok" and skew["compared"] == 2 and skew["max_abs_diff"] == 0.0, skew


def _cache_count(c, result: str) -> float:  # noqa: ANN001
    """The service's ``recflow_user_cache_total{result=...}`` counter (0 before the first lookup)."""
    for line in c.get("/metrics").text.splitlines():
        if line.startswith("recflow_user_cache_total{") and f'result="{result}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_canary_answers_its_share_of_users_until_it_ends(tiny_features, shop_model) -> None:  # noqa: ANN001
    """A running canary (``recflow.canary``): every worker loads it next to the champion, answers the users
    its hash picks with it (each arm's answer is that model's offline answer), records the arm in the
    request log, and serves the champion to everyone once the canary is rolled back."""
    import httpx

    from monitoring.data import load_request_log
    from recflow import canary, registry
    from recflow.privacy import pseudonym, pseudonym_key
    from serving.launcher import start_local

    settings = _serving(tiny_features, champion_poll_s=0.3)
    _online(settings)
    model = shop_model(settings)
    ts = _two_stage(settings, model)
    champion = registry.register(settings, model, {"note": "champion"}, two_stage=ts)
    registry.set_champion(settings, champion, "test")
    engaged = _two_stage(settings, model, engagement=True)  # another ranker: reads views and carts
    challenger = registry.register(settings, model, {"note": "canary"}, two_stage=engaged)
    canary.start(settings, challenger, 0.5, "test")
    users = ["a", "b", "c"] + [f"new-{i}" for i in range(24)]
    arm_of = {u: "canary" if canary.serves_canary(u, challenger, 0.5) else "champion" for u in users}
    assert set(arm_of.values()) == {"canary", "champion"}
    with start_local(settings) as svc, httpx.Client(base_url=svc.url, timeout=30) as c:
        _wait(lambda: _post(c, "/status", {}).json()["canary_version"] == challenger, 60, "the canary loaded")
        assert _post(c, "/status", {}).json()["canary_share"] == 0.5
        for u in users:
            body = _post(c, "/recommend", {"user_id": u, "k": 4, "timestamp": NOW.isoformat()}).json()
            assert body["model_version"] == (challenger if arm_of[u] == "canary" else champion), (u, body)
            if u in ("a", "b", "c"):
                want = (list(_offline_events(settings, engaged, u, NOW, 4)) if arm_of[u] == "canary" else
                        [model.item_ids[p.position] for p in _offline(settings, ts, u, NOW, 4)])
                # the offline scorer ranks candidates only; the service fills a short list with popular items
                assert [i["item_id"] for i in body["items"]][:len(want)] == want, (u, arm_of[u], body["items"], want)
        canary.end(settings, "rollback", "test")
        _wait(lambda: _post(c, "/status", {}).json()["canary_version"] is None, 60, "the canary dropped")
        assert {_post(c, "/recommend", {"user_id": u, "k": 4}).json()["model_version"] for u in users} == {champion}
    log = load_request_log(settings.paths.request_log, "1970-01-01", "2100-01-01")
    key = pseudonym_key(settings)
    first = log[log["ts"] == NOW].set_index("user_id")["arm"]
    assert first.to_dict() == {pseudonym(u, key): arm_of[u] for u in users}
    assert log.loc[log["ts"] != NOW, "arm"].isna().all(), "no arm once the canary ended"


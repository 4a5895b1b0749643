"""The BentoML service on the tiny shop: a real `bentoml serve` process on a free port.

One server per test (start-up is about 10 s): the end-to-end test covers readiness before a model
exists, the registry's champion, every endpoint, each class of bad input, feedback reflected by
the next /recommend, the request log, and a zero-downtime /reload; the outage test stops the
Redis online store mid-run.
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest

from recflow import feature_store as fs
from recflow.schemas import REQUEST_LOG_SCHEMA

TOKEN = "t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _serving(settings, **serving):  # noqa: ANN001, ANN003, ANN202
    fast = {"token": TOKEN, "load_retry_s": 0.3, "push_retry_s": 0.3, "request_log_flush_s": 0.2,
            "request_log_rotate_s": 0.5, "feature_timeout_s": 2.0, "champion_poll_s": 0.0}
    return settings.model_copy(update={"serving": settings.serving.model_copy(update={**fast, **serving})})


def _online(settings) -> None:  # noqa: ANN001
    store = fs.get_store(settings)
    fs.apply(settings, store)
    fs.materialize(settings, *fs.default_window(settings), store=store)


def _post(client: httpx.Client, path: str, body: object, headers: dict[str, str] | None = None) -> httpx.Response:
    return client.post(path, json=body, headers=headers or {})


def _wait(predicate, timeout: float = 30.0, what: str = "condition") -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _fuzz(url: str, folder: Path) -> None:
    """A short Schemathesis run against the service's own OpenAPI document: no 5xx (when installed)."""
    import shutil
    import subprocess
    import sys

    exe = shutil.which("schemathesis") or str(Path(sys.executable).with_name("schemathesis"))
    if not Path(exe).exists():
        return  # the benchmark runs the full fuzz (benchmarks/serving.py); here it is a bonus when installed
    done = subprocess.run(
        [exe, "run", f"{url}/docs.json", "-H", f"Authorization: Bearer {TOKEN}", "--checks", "not_a_server_error",
         "-n", "10", "--exclude-path", "/reload", "--seed", "3", "--report", "json", "--report-dir", str(folder)],
        capture_output=True, text=True, timeout=300,
    )
    report = json.loads(next(folder.glob("json-*.json")).read_text())
    assert report["test_cases"]["generated"] >= 50 and not report["failures"], done.stdout[-3000:]
    assert done.returncode == 0, done.stdout[-3000:]


BAD_INPUTS = [
    # (path, body, status, field named in the answer)
    ("/recommend", {"k": 5}, 400, "user_id"),
    ("/recommend", {"user_id": 7}, 400, "user_id"),
    ("/recommend", {"user_id": ""}, 400, "user_id"),
    ("/recommend", {"user_id": "a", "k": 0}, 400, "k"),
    ("/recommend", {"user_id": "a", "k": 101}, 400, "k"),
    ("/recommend", {"user_id": "a", "k": "many"}, 400, "k"),
    ("/recommend", {"user_id": "a", "exclude_purchased": "perhaps"}, 400, "exclude_purchased"),
    ("/recommend", {"user_id": "a", "kk": 3}, 400, "kk"),
    ("/recommend", {"user_id": "a", "timestamp": "yesterday-ish"}, 400, "timestamp"),
    ("/recommend", {"user_id": "a", "timestamp": "2999-01-01T00:00:00Z"}, 400, "timestamp"),
    ("/recommend", {"user_id": "a", "category": "no such aisle"}, 404, "category"),
    ("/recommend", [1, 2], 400, "body"),
    ("/similar", {"item_id": "nope"}, 404, "item_id"),
    ("/similar", {"item_id": "x", "k": -1}, 400, "k"),
    ("/search", {"query": ""}, 400, "query"),
    ("/search", {"query": "x" * 501}, 400, "query"),
    ("/feedback", {"user_id": "a", "item_id": "x", "event_type": "like"}, 400, "event_type"),
    ("/feedback", {"user_id": "a", "item_id": "x", "event_type": "purchase", "quantity": -1}, 400, "quantity"),
    ("/feedback", {"user_id": "a", "item_id": "x", "event_type": "purchase", "price": "free"}, 400, "price"),
    ("/feedback", {"user_id": "a", "item_id": "nope", "event_type": "view"}, 404, "item_id"),
    ("/reload", {"model_path": "/no/such/model"}, 400, "model_path"),  # registry tags only, never paths
    ("/reload", {"model_tag": "../../etc/passwd"}, 400, "model_tag"),
    ("/reload", {"model_tag": "no_such_model:v1"}, 404, "model_tag"),
]


def test_service_end_to_end(tiny_features, shop_model) -> None:  # noqa: ANN001
    from recflow import registry
    from recflow.event_log import EventLog
    from serving.launcher import start_local, wait_ready

    settings = _serving(tiny_features)
    _online(settings)
    with start_local(settings, ready=False) as svc, httpx.Client(base_url=svc.url, timeout=30) as c:
        # Live at once, not ready while there is no model: the champion does not exist yet.
        assert c.get("/livez").status_code == 200
        assert c.get("/readyz").status_code == 503
        _wait(lambda: "champion" in (_post(c, "/status", {}).json()["load_error"] or ""), what="a load attempt")
        r = _post(c, "/recommend", {"user_id": "a"})
        assert r.status_code == 503 and "no champion model yet" in r.json()["error"]
        assert c.get("/readyz").status_code == 503
        first = registry.register(settings, shop_model(settings), {"note": "first"})
        registry.set_champion(settings, first, "test")
        wait_ready(svc.url, timeout=60, process=svc.process)
        status = _post(c, "/status", {}).json()
        assert status["ready"] and status["model_version"] == first and status["model_source"].startswith("champion")
        assert status["items"] == 5, "the cold-start item v was added from its text"

        # /recommend: a known user gets the model, with the history item behind each pick.
        r = _post(c, "/recommend", {"user_id": "a", "k": 3})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["fallback"] is False and body["degraded"] is False and body["model_version"] == first
        assert len(body["items"]) == 3 and body["feature_age_s"] > 0
        assert [i["score"] for i in body["items"]] == sorted((i["score"] for i in body["items"]), reverse=True)
        for item in body["items"]:
            assert item["reason"]["item_id"] in {"x", "y", "z"}, item  # user a's history
            assert item["reason"]["kind"] == ("repeat" if item["item_id"] in {"x", "y", "z"} else "similar")
        assert {i["title"] for i in body["items"]} <= {"Oat milk 1l", "Rye bread", "Olive oil 500ml", "Lemons",
                                                       "Sparkling water"}
        # k is capped at the catalogue; purchased items can be left out; category filters.
        assert len(_post(c, "/recommend", {"user_id": "a", "k": 100}).json()["items"]) == 5
        fresh = _post(c, "/recommend", {"user_id": "a", "k": 10, "exclude_purchased": True}).json()["items"]
        assert {i["item_id"] for i in fresh} == {"w", "v"}
        dairy = _post(c, "/recommend", {"user_id": "a", "category": "DAIRY"}).json()["items"]
        assert [i["item_id"] for i in dairy] == ["x"]
        # Unknown user: popularity, flagged.
        unknown = _post(c, "/recommend", {"user_id": "nobody", "k": 2}).json()
        assert unknown["fallback"] is True and unknown["degraded"] is False and unknown["feature_age_s"] is None
        assert [i["reason"]["kind"] for i in unknown["items"]] == ["popular", "popular"]

        # /similar and /search.
        sim = _post(c, "/similar", {"item_id": "x", "k": 10}).json()
        assert len(sim["items"]) == 4 and "x" not in {i["item_id"] for i in sim["items"]}
        found = _post(c, "/search", {"query": "rye bread", "k": 2, "user_id": "a"}).json()
        assert len(found["items"]) == 2 and found["personalised"] is True
        assert _post(c, "/search", {"query": "lemons"}).json()["personalised"] is False

        # Every class of bad input is a 4xx that names the field; never a 500.
        for path, bad, status_code, field in BAD_INPUTS:
            r = _post(c, path, bad, AUTH)
            assert r.status_code == status_code, (path, bad, r.status_code, r.text)
            assert field in r.json()["fields"], (path, bad, r.json())
            assert str(settings.home) not in r.text and "/tmp" not in r.text, ("a server path in", path, r.text)
        assert str(settings.home) not in _post(c, "/status", {}).text
        r = c.post("/recommend", content=b'{"user_id": "a",', headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["fields"] == ["body"]
        r = c.post("/recommend", content=b"user_id=a", headers={"content-type": "application/x-www-form-urlencoded"})
        assert r.status_code == 415
        # A chunked body (no Content-Length) over the limit, and duplicate or conflicting headers: 4xx.
        chunked = c.post("/feedback", content=iter([b'{"user_id": "', b"x" * 70_000, b'"}']), headers=AUTH)
        assert chunked.status_code == 413, chunked.text
        for dup in ([("content-type", "application/json"), ("content-type", "text/plain")],
                    [("content-type", "application/json"), ("content-type", "application/json")]):
            r = c.post("/recommend", content=b'{"user_id": "a"}', headers=dup)
            assert r.status_code == 400 and r.json()["fields"] == ["content-type"], r.text
        assert _post(c, "/recommend", {"user_id": "a", "category": "Dairy"}).status_code == 200

        # /feedback needs the token, is durable, and the next /recommend reflects it.
        event = {"user_id": "newbie", "item_id": "w", "event_type": "purchase", "quantity": 2, "price": 0.5}
        assert _post(c, "/feedback", event).status_code == 401
        assert _post(c, "/feedback", event, {"Authorization": "Bearer wrong"}).status_code == 401
        assert _post(c, "/recommend", {"user_id": "newbie"}).json()["fallback"] is True
        r = _post(c, "/feedback", {**event, "event_id": "ev-1"}, AUTH)
        assert r.status_code == 200 and r.json() == {"event_id": "ev-1", "accepted": True, "duplicate": False,
                                                     "pushed": True}
        assert _post(c, "/feedback", {**event, "event_id": "ev-1"}, AUTH).json()["duplicate"] is True
        after = _post(c, "/recommend", {"user_id": "newbie", "k": 5}).json()
        assert after["fallback"] is False and after["feature_age_s"] < 60
        assert {i["reason"]["item_id"] for i in after["items"]} == {"w"}
        logged = EventLog(settings.paths.event_log).read()
        assert logged.loc[logged.event_id == "ev-1", "quantity"].item() == 2.0
        assert EventLog(settings.paths.event_log).stats()["pending_push"] == 0
        # Idempotency keys and the timestamp window: 409 / 422 naming the field, nothing recorded.
        r = _post(c, "/feedback", {**event, "event_id": "ev-1", "quantity": 3}, AUTH)
        assert r.status_code == 409 and "'ev-1'" in r.json()["error"] and r.json()["fields"] == ["event_id"], r.text
        r = _post(c, "/feedback", event, AUTH)  # neither event_id nor timestamp: a retry could not be recognised
        assert r.status_code == 422 and r.json()["fields"] == ["event_id"], r.text
        for ts in ("1970-01-01T00:00:00Z", "2999-01-01T00:00:00Z"):
            r = _post(c, "/feedback", {**event, "event_id": "ev-window", "timestamp": ts}, AUTH)
            assert r.status_code == 422 and r.json()["fields"] == ["timestamp"] and "feedback.max_" in r.text, r.text
        stamped = {**event, "timestamp": "2024-05-30T10:00:00Z"}
        derived = _post(c, "/feedback", stamped, AUTH).json()
        assert derived["event_id"].startswith("fb-") and _post(c, "/feedback", stamped, AUTH).json()["duplicate"]
        assert len(EventLog(settings.paths.event_log).read()) == 2
        _wait(lambda: _post(c, "/status", {}).json()["pending_feedback"] == 0, what="the pending counter to reach 0")

        metrics = c.get("/metrics").text
        assert 'recflow_responses_total{endpoint="recommend",kind="model"}' in metrics
        assert "recflow_stage_seconds_bucket" in metrics
        assert 'recflow_user_cache_total{result="hit"}' in metrics, "a repeated user's query came from the cache"
        # The series the alert rules watch (monitoring/alerts): answers by status class, the model per
        # worker, the pending-feedback gauge.
        assert re.search(r'recflow_http_responses_total\{endpoint="recommend",status="2xx"\} [1-9]', metrics), metrics
        assert re.search(r'recflow_http_responses_total\{endpoint="feedback",status="4xx"\} [1-9]', metrics)
        assert re.search(r'recflow_model_info\{model="[^"]+"(,pid="\d+")?\} 1\.0', metrics), metrics
        assert re.search(r"recflow_feedback_pending(\{[^}]*\})? 0\.0", metrics), metrics

        # Zero-downtime reload: a new champion is swapped in while requests keep flowing.
        second = registry.register(settings, shop_model(settings, seed=1), {"note": "second"})
        registry.set_champion(settings, second, "test reload")
        codes: list[int] = []
        stop, flowing = threading.Event(), threading.Event()

        def hammer() -> None:
            with httpx.Client(base_url=svc.url, timeout=30) as h:
                while not stop.is_set():
                    codes.append(h.post("/recommend", json={"user_id": "a"}).status_code)
                    flowing.set()

        worker = threading.Thread(target=hammer)
        worker.start()
        try:
            assert flowing.wait(30), "no /recommend answer before the reload"
            assert _post(c, "/reload", {}).status_code == 401
            r = _post(c, "/reload", {}, AUTH)
            assert r.status_code == 200, r.text
            assert r.json()["model_version"] == second and r.json()["previous_version"] == first
        finally:
            stop.set()
            worker.join()
        assert codes and set(codes) == {200}, f"{len(codes)} requests during the reload: {set(codes)}"
        assert _post(c, "/recommend", {"user_id": "a"}).json()["model_version"] == second
        # A registry tag (never a path) picks the model to serve.
        r = _post(c, "/reload", {"model_tag": first}, AUTH)
        assert r.status_code == 200 and r.json()["model_version"] == first, r.text
        assert _post(c, "/recommend", {"user_id": "a"}).json()["model_version"] == first
        _fuzz(svc.url, settings.home / "fuzz")

    # The request log: complete parquet files only, ids and features, never the search text.
    files = sorted(Path(settings.paths.request_log).rglob("*.parquet"))
    assert files and not list(Path(settings.paths.request_log).rglob("*.inprogress"))
    log = pq.read_table(files).to_pandas()
    assert pq.read_schema(files[0]).equals(REQUEST_LOG_SCHEMA, check_metadata=False)
    assert log["request_id"].is_unique
    from recflow.privacy import pseudonym, pseudonym_key

    # Keyed pseudonyms, never the raw user ids; no profile attributes (privacy.log_profile is off).
    users = log["user_id"].dropna()
    assert len(users) and users.str.fullmatch(r"u_[0-9a-f]{32}").all(), users.unique()[:5]
    assert not users.isin(["a", "newbie", "nobody"]).any()
    rec = log[(log.endpoint == "recommend") & (log.user_id == pseudonym("a", pseudonym_key(settings))) & ~log.fallback]
    assert len(rec) >= 5 and rec["latency_ms"].gt(0).all()
    features = json.loads(rec["features"].iloc[0])
    assert features["purchases_90d"] is not None and features["history_len"] == 4 and "history_item_ids" not in features
    assert not {"age", "income", "marital_status", "kids_count", "household_size"} & set(features), features
    assert set(log.endpoint) >= {"recommend", "similar", "search"}
    assert all(b"rye bread" not in p.read_bytes() for p in files), "search text must not be logged"
    searched = json.loads(log.loc[log.endpoint == "search", "features"].iloc[0])
    assert searched == {"query_chars": 9, "query_words": 2}


def test_online_store_outage_degrades_and_feedback_is_retried(tiny_features, shop_model) -> None:  # noqa: ANN001
    """Stop the Redis online store mid-run: answers degrade to popularity (200), feedback is kept in
    the event log and pushed once Redis is back."""
    import shutil
    from contextlib import ExitStack

    from recflow.event_log import EventLog
    from recflow.local_services import free_port, redis_server
    from recflow.modeling import save_model
    from serving.launcher import start_local

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    with ExitStack() as stack:
        first_redis = ExitStack()
        address = first_redis.enter_context(redis_server(port))
        stack.callback(first_redis.close)
        settings = tiny_features.model_copy(update={"feast": tiny_features.feast.model_copy(
            update={"online_store": "redis", "redis_connection_string": address})})
        _online(settings)
        folder = save_model(shop_model(settings), settings.paths.models / "tiny", {"model_version": "tiny-1"})
        settings = _serving(settings, model_path=folder, feature_timeout_s=1.0)
        svc = stack.enter_context(start_local(settings))
        c = stack.enter_context(httpx.Client(base_url=svc.url, timeout=30))
        ok = _post(c, "/recommend", {"user_id": "a"}).json()
        assert ok["fallback"] is False and ok["degraded"] is False

        # The store hangs (SIGSTOP): /feedback still acknowledges durably at once, the push waits.
        import signal

        import psutil

        def cmdline(p: psutil.Process) -> str:  # a child left by another test may be a zombie by now
            try:
                return " ".join(p.cmdline())
            except psutil.Error:
                return ""

        redis_proc = next(p for p in psutil.Process().children() if str(port) in cmdline(p))
        log = EventLog(settings.paths.event_log)
        redis_proc.send_signal(signal.SIGSTOP)
        try:
            took = []
            for n in range(6):
                t0 = time.perf_counter()
                r = _post(c, "/feedback", {"user_id": "b", "item_id": "x", "event_type": "view", "event_id": f"hang-{n}"},
                          AUTH)
                took.append(time.perf_counter() - t0)
                assert r.status_code == 200 and r.json()["accepted"] is True, r.text
            assert max(took) < 1.5, f"/feedback waited behind the hung push: {took}"
            assert {f"hang-{n}" for n in range(6)} <= set(log.read().event_id), "durable before acknowledged"
        finally:
            redis_proc.send_signal(signal.SIGCONT)
        _wait(lambda: log.pending_count() == 0, timeout=30, what="the pushes to drain after SIGCONT")

        first_redis.close()  # the online store goes away
        down = _post(c, "/recommend", {"user_id": "a", "k": 3})
        assert down.status_code == 200, down.text
        assert down.json()["degraded"] is True and down.json()["fallback"] is True and len(down.json()["items"]) == 3
        assert _post(c, "/search", {"query": "bread", "user_id": "a"}).json()["degraded"] is True
        event = {"user_id": "a", "item_id": "w", "event_type": "purchase", "event_id": "while-down"}
        r = _post(c, "/feedback", event, AUTH)
        assert r.status_code == 200 and r.json()["accepted"] is True and r.json()["pushed"] is False
        assert log.stats()["pending_push"] == 1
        _wait(lambda: log.pending_push()["push_attempts"].iloc[0] >= 2, what="failed push attempts to be counted")
        assert log.stats()["pending_push"] == 1, "a failed push keeps the event pending"
        assert "online store read failed" in svc.log_text()

        stack.enter_context(redis_server(port))  # back, empty (no persistence)
        _wait(lambda: log.stats()["pending_push"] == 0, timeout=30, what="the pending push to be retried")
        # the circuit closes as soon as a background probe read answers (no request waits the full timeout)
        answers: list[dict] = []
        _wait(lambda: not answers.append(_post(c, "/recommend", {"user_id": "a"}).json()) and not answers[-1]["degraded"],
              timeout=10, what="the service to read the online store again")
        back = answers[-1]
        assert back["degraded"] is False and back["fallback"] is False, back
        assert {i["reason"]["item_id"] for i in back["items"]} == {"w"}, "the retried event is the user's history now"


def test_every_worker_follows_the_champion_pointer(tiny_features, shop_model) -> None:  # noqa: ANN001
    """Two worker processes: a promotion and a rollback reach both without any /reload call."""
    from recflow import registry
    from serving.launcher import start_local

    settings = _serving(tiny_features, workers=2, champion_poll_s=0.5)
    _online(settings)
    first = registry.register(settings, shop_model(settings), {"note": "first"})
    registry.set_champion(settings, first, "test")

    def versions(url: str, calls: int = 24) -> tuple[set[str | None], set[int]]:
        seen, pids = set(), set()
        for _ in range(calls):  # a new connection each time, so the kernel can hand it to either worker
            body = httpx.post(f"{url}/status", json={}, timeout=30).json()
            seen.add(body["model_version"])
            pids.add(body["worker_pid"])
        return seen, pids

    with start_local(settings) as svc:
        _wait(lambda: versions(svc.url)[0] == {first}, what="both workers ready with the first champion")
        _wait(lambda: len(versions(svc.url)[1]) == 2, what="answers from two worker processes")
        second = registry.register(settings, shop_model(settings, seed=1), {"note": "second"})
        registry.set_champion(settings, second, "promotion")
        _wait(lambda: versions(svc.url)[0] == {second}, what="every worker on the new champion")
        assert httpx.post(f"{svc.url}/recommend", json={"user_id": "a"}, timeout=30).json()["model_version"] == second
        registry.rollback(settings, "test rollback")
        _wait(lambda: versions(svc.url)[0] == {first}, what="every worker back on the first champion")
        assert "[ERROR]" not in svc.log_text()

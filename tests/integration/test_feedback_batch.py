"""``/feedback/batch``: a basket recorded at once, durably and online; bad batches record nothing."""

from __future__ import annotations

import time

import httpx
import pytest

pytestmark = pytest.mark.integration

READ_TOKEN = "read-t0ken"


def test_feedback_batch(tiny_champion) -> None:  # noqa: ANN001
    """Also the secure defaults: no token configured, so the service uses the one generated in the
    home (0600 in a 0700 folder) for writes; the read token guards /recommend, /similar and /search."""
    import stat

    from recflow import feature_store as fs
    from recflow.event_log import EventLog
    from recflow.security import serving_token, token_path
    from serving.launcher import start_local

    settings, _tag = tiny_champion
    assert settings.serving.token is None and not token_path(settings).exists()
    settings = settings.model_copy(update={"serving": settings.serving.model_copy(update={"read_token": READ_TOKEN})})
    store = fs.get_store(settings)
    fs.apply(settings, store)
    fs.materialize(settings, *fs.default_window(settings), store=store)
    basket = [{"user_id": "c", "item_id": item, "event_type": "purchase", "quantity": 1, "price": 2.0,
               "basket_id": "checkout-1", "event_id": f"checkout-1:{item}", "timestamp": "2024-05-30T10:00:00Z"}
              for item in ("x", "w")]
    with start_local(settings, ready=False) as svc, httpx.Client(base_url=svc.url, timeout=120) as c:
        # The worker accepts connections only once its model is loaded: the first answer is already ready.
        first = c.get("/readyz")
        assert first.status_code == 200, ("a worker took traffic before it was ready", first.status_code, first.text)
        path = token_path(settings)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        token = serving_token(settings)
        assert token and len(token) >= 40 and token not in svc.log_text(), "the token itself is never logged"
        AUTH = {"Authorization": f"Bearer {token}"}  # noqa: N806
        read = {"Authorization": f"Bearer {READ_TOKEN}"}
        # Reads: the read token (or the write token); writes: only the write token.
        for route, body in (("/recommend", {"user_id": "c"}), ("/similar", {"item_id": "x"}), ("/search", {"query": "oil"})):
            assert c.post(route, json=body).status_code == 401, route
            assert c.post(route, json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401, route
            assert c.post(route, json=body, headers=read).status_code == 200, route
            assert c.post(route, json=body, headers=AUTH).status_code == 200, route
        assert c.post("/feedback/batch", json={"events": basket}, headers=read).status_code == 401
        assert c.post("/reload", json={}, headers=read).status_code == 401
        assert c.post("/feedback/batch", json={"events": basket}).status_code == 401
        bad = c.post("/feedback/batch", json={"events": [*basket, {**basket[0], "item_id": "nope", "event_id": "e-x"}]},
                     headers=AUTH)
        assert bad.status_code == 404 and "events[2].item_id" in bad.text
        assert EventLog(settings.paths.event_log).stats()["logged"] == 0  # all or none
        assert c.post("/feedback/batch", json={"events": []}, headers=AUTH).status_code == 400
        too_many = [{**basket[0], "event_id": f"e{i}"} for i in range(201)]
        assert c.post("/feedback/batch", json={"events": too_many}, headers=AUTH).status_code in (400, 413)
        r = c.post("/feedback/batch", json={"events": basket}, headers=AUTH)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["accepted"] == 2 and body["duplicates"] == 0 and body["event_ids"] == ["checkout-1:x", "checkout-1:w"]
        again = c.post("/feedback/batch", json={"events": basket}, headers=AUTH).json()
        assert again["duplicates"] == 2  # idempotent by event_id
        assert EventLog(settings.paths.event_log).stats()["logged"] == 2
        # The same key with another payload: 409 naming it, and nothing of the batch is recorded.
        changed = [{**basket[0], "event_id": "checkout-1:new"}, {**basket[1], "quantity": 5}]
        r = c.post("/feedback/batch", json={"events": changed}, headers=AUTH)
        assert r.status_code == 409 and "checkout-1:w" in r.text and "quantity" in r.text, r.text
        assert r.json()["fields"] == ["event_id"]
        # A timestamp outside the window: 422 naming the event's field; nothing recorded.
        old = [{**basket[0], "event_id": "checkout-2:x"}, {**basket[1], "event_id": "checkout-2:w",
                                                          "timestamp": "1970-01-02T00:00:00Z"}]
        r = c.post("/feedback/batch", json={"events": old}, headers=AUTH)
        assert r.status_code == 422 and r.json()["fields"] == ["events.1.timestamp"], r.text
        # No key: derived from the content, so a re-sent basket is not recorded twice.
        keyless = [{k: v for k, v in e.items() if k != "event_id"} | {"basket_id": "checkout-3"} for e in basket]
        first_try = c.post("/feedback/batch", json={"events": keyless}, headers=AUTH).json()
        retry = c.post("/feedback/batch", json={"events": keyless}, headers=AUTH).json()
        assert first_try["duplicates"] == 0 and retry["duplicates"] == 2 and retry["event_ids"] == first_try["event_ids"]
        assert all(e.startswith("fb-") for e in retry["event_ids"])
        assert EventLog(settings.paths.event_log).stats()["logged"] == 4
        # The answer comes once the events are durable (feedback.batch_push_wait_s = 0); the push follows.
        deadline = time.monotonic() + 60
        while True:
            online = fs.online_features(settings, [{"user_id": "c"}], store=fs.get_store(settings))
            if {"x", "w"} <= set(online["user_history__history_item_ids"].iloc[0] or []) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert {"x", "w"} <= set(online["user_history__history_item_ids"].iloc[0])  # pushed online

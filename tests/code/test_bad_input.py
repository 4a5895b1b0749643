"""Bad input never gets a 5xx: body limits for chunked bodies, duplicate headers, a bad online row
that costs only its own request, and an unknown category that costs a set lookup."""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from serving.middleware import MAX_BODY, RequestGuard

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_serving_units import _tiny_state  # noqa: E402


def _call(headers: list[tuple[bytes, bytes]], chunks: list[bytes]) -> tuple[int, dict[str, Any], bytes | None]:
    """One POST /recommend through RequestGuard to an app that echoes what it received."""
    seen: dict[str, bytes] = {}

    async def app(scope: dict, receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        seen["body"] = body
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/recommend", "headers": headers}
    asyncio.run(RequestGuard(app)(scope, receive, send))
    status = sent[0]["status"]
    payload = json.loads(sent[1]["body"]) if status != 200 else {}
    return status, payload, seen.get("body")


JSON = (b"content-type", b"application/json")


def test_chunked_body_over_the_limit_is_413_and_never_reaches_the_app() -> None:
    chunk = b"x" * 16_384
    status, payload, got = _call([JSON], [b'{"user_id": "', *[chunk] * (MAX_BODY // len(chunk) + 1), b'"}'])
    assert status == 413 and payload["fields"] == ["body"] and got is None
    status, _, got = _call([JSON], [b'{"user_id": ', b'"a"}'])  # chunked and small: passed on whole
    assert status == 200 and got == b'{"user_id": "a"}'


def test_duplicate_or_conflicting_headers_are_400() -> None:
    status, payload, got = _call([JSON, (b"content-type", b"text/plain")], [b"{}"])
    assert status == 400 and payload["fields"] == ["content-type"] and got is None
    status, payload, _ = _call([JSON, JSON], [b"{}"])
    assert status == 400 and "2 content-type headers" in payload["error"]
    status, payload, _ = _call([JSON, (b"content-length", b"2"), (b"content-length", b"9")], [b"{}"])
    assert status == 400 and payload["fields"] == ["content-length"]
    assert _call([JSON, (b"content-length", b"abc")], [b"{}"])[0] == 413


def _runtime(make_settings, features: dict[str, dict[str, Any]]):  # noqa: ANN001, ANN202
    from serving.runtime import Runtime

    _, state = _tiny_state()
    rt = Runtime(make_settings())
    rt.models.state, rt.online.store = state, object()  # type: ignore[assignment]
    rt.online.fetch = lambda users: {u: features.get(u) for u in users}  # type: ignore[method-assign]
    return rt, state


def _job(user: str, category: str | None = None):  # noqa: ANN202
    from serving.api import RecommendRequest
    from serving.recommend import Job

    return Job(RecommendRequest.model_construct(user_id=user, k=5, exclude_purchased=False, category=category,
                                                 timestamp=None), f"r-{user}", datetime.now(UTC))


def test_one_bad_online_row_fails_only_its_own_request(make_settings) -> None:
    good = {"user_history__history_item_ids": ["i1", "i2"], "user_history__history_ts": [2, 1]}
    bad = {"user_history__history_item_ids": ["i1"], "user_history__history_ts": ["not-a-time"]}
    rt, _ = _runtime(make_settings, {"g1": good, "g2": good, "bad": bad})
    answers = rt.recommender.recommend_batch([_job("g1"), _job("bad"), _job("g2")])
    bodies = [json.loads(a.body) for a in answers]
    assert [b["user_id"] for b in bodies] == ["g1", "bad", "g2"]
    assert [b["fallback"] for b in bodies] == [False, True, False]
    assert [b["degraded"] for b in bodies] == [False, True, False]
    assert len(bodies[1]["items"]) == 5 and {i["reason"]["kind"] for i in bodies[1]["items"]} == {"popular"}
    alone = rt.recommender.recommend_batch([_job("g1")])[0]  # noqa: SLF001
    assert json.loads(alone.body)["items"] == bodies[0]["items"], "the good requests were ranked as usual"


def test_unknown_category_costs_a_set_lookup_not_a_catalogue_scan(make_settings, monkeypatch) -> None:  # noqa: ANN001
    from serving.errors import NotFound
    from serving.serving_state import ItemCatalogue

    rt, _ = _runtime(make_settings, {})
    calls: list[str] = []
    original = ItemCatalogue.category_rows
    monkeypatch.setattr(ItemCatalogue, "category_rows", lambda self, c: calls.append(c) or original(self, c))
    answers = rt.recommender.recommend_batch([_job("u", f"no such aisle {i}") for i in range(200)])
    assert all(isinstance(a, NotFound) and a.field == "category" for a in answers)
    assert calls == [], "an unknown category never scans the catalogue"
    known = rt.recommender.recommend_batch([_job("u", "C")])[0]  # (case-insensitive, as before)
    assert calls == ["C"] and len(json.loads(known.body)["items"]) == 5

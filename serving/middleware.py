"""ASGI middleware in front of the API: clear 4xx answers for bad requests.

- Request bodies must be JSON (``415`` otherwise) and at most ``MAX_BODY`` bytes (``413``), counted
  as they arrive, so a chunked body without ``Content-Length`` is held to the same limit.
- Duplicate ``Content-Type`` or ``Content-Length`` headers are a ``400`` naming the header.
- Every answer of an API endpoint is counted by status class in ``recflow_http_responses_total``
  (the 5xx alert's source; BentoML's own HTTP metrics are off on the hot paths).
- BentoML answers a pydantic validation failure with ``400 {"error": "1 validation error for
  ...IODescriptor", "detail": [...]}``; this rewrites ``error`` to name the fields, e.g.
  ``"k: Input should be less than or equal to 100"``, and adds ``fields``.
"""

from __future__ import annotations

import json
from typing import Any

from serving.metrics import metrics, status_class

MAX_BODY = 64 * 1024
API_PATHS = frozenset({"/recommend", "/similar", "/search", "/feedback", "/feedback/batch", "/reload", "/status"})

Scope = dict[str, Any]
Receive = Any
Send = Any


def _field(loc: list[Any]) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    return ".".join(parts) or "body"


def explain(body: dict[str, Any]) -> dict[str, Any]:
    """Name the offending fields in a BentoML validation-error body."""
    detail = body.get("detail")
    if not isinstance(detail, list) or not detail:
        return body
    fields, parts = [], []
    for err in detail:
        if not isinstance(err, dict):
            continue
        name = _field(list(err.get("loc") or []))
        fields.append(name)
        parts.append(f"{name}: {err.get('msg', 'invalid')}")
    if parts:
        body = {"error": "; ".join(parts), "fields": fields, "detail": detail}
    return body


async def _reply(send: Send, status: int, payload: dict[str, Any]) -> None:
    data = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


class RequestGuard:
    """Content-type and size checks, and field-naming validation errors (see the module docstring)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in API_PATHS:
            await self.app(scope, receive, send)
            return
        endpoint = scope["path"].strip("/").replace("/", "_")
        answered: list[int] = []

        async def counted(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                answered.append(message["status"])
                metrics()["http"].labels(endpoint, status_class(message["status"])).inc()
            await send(message)
        try:
            await self._guarded(scope, receive, counted)
        except Exception:
            if not answered:  # the server's error handler answers 500 outside this middleware
                metrics()["http"].labels(endpoint, "5xx").inc()
            raise

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        types: list[bytes] = []
        lengths: list[str] = []
        for name, v in scope.get("headers", ()):
            k = name.lower()
            if k == b"content-type":
                types.append(v)
            elif k == b"content-length":
                lengths.append(v.decode("latin-1"))
        for header, values in (("content-type", types), ("content-length", lengths)):
            if len(values) > 1:  # duplicate or conflicting: which one the app would read is undefined
                await _reply(send, 400, {"error": f"{len(values)} {header} headers: send exactly one",
                                         "fields": [header]})
                return
        ctype = (types[0] if types else b"application/json").decode("latin-1").split(";")[0].strip().lower()
        if ctype not in ("application/json", ""):
            await _reply(send, 415, {"error": f"content-type {ctype!r} is not supported: send application/json",
                                     "fields": ["content-type"]})
            return
        if lengths and (not lengths[0].strip().isdigit() or int(lengths[0]) > MAX_BODY):
            await _reply(send, 413, {"error": f"request body larger than {MAX_BODY} bytes", "fields": ["body"]})
            return
        # Read the body here, whatever its framing (Content-Length or chunked), so the limit holds for
        # chunked bodies too; the app then gets it in one message.
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body += message.get("body", b"")
            if len(body) > MAX_BODY:
                await _reply(send, 413, {"error": f"request body larger than {MAX_BODY} bytes", "fields": ["body"]})
                return
            if not message.get("more_body"):
                break
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # e.g. http.disconnect
        started: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def capture(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                if message["status"] != 400:
                    started["pass"] = True
                    await send(message)
                else:
                    started["message"] = message
                return
            if started.get("pass"):
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = b"".join(chunks)
            try:
                new = json.dumps(explain(json.loads(body))).encode()
            except (ValueError, AttributeError):
                new = body
            start = dict(started["message"])
            start["headers"] = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            start["headers"].append((b"content-length", str(len(new)).encode()))
            await send(start)
            await send({"type": "http.response.body", "body": new})

        await self.app(scope, replay, capture)

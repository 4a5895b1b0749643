"""Fault benchmark: a real service, started here, under the faults of issue 13; writes benchmarks/results/faults.json.

Everything runs in a scratch home under /tmp (a small synthetic shop, its features and a tiny
champion, built here; never the real home), against ``bentoml serve`` on 127.0.0.1 and free ports
(``serving.launcher.start_local``) with the Redis online store (a ``redis-server`` started here). The
service runs with its default settings, except where a phase says otherwise (``settings`` in its
record). Phases, each with the bounds it must meet (``bounds_met``):

- ``kill``: 2 workers; a stream of ``--events`` /feedback events with unique keys (8 concurrent
  senders, a new connection per request, /recommend traffic alongside); one worker is SIGKILLed
  when 40% of them are sent. Then every event is re-sent, at once (the arbiter restarts
  the worker meanwhile). ``acknowledged`` (200 in the first stream), ``lost`` (acknowledged, not in
  the event log: 0), ``duplicated`` (an event id in the log more than once: 0),
  ``error_rate_after_restart`` (non-200 answers to the re-send: <= 0.01).
- ``battery``: ``requests`` malformed requests (huge and deep JSON, wrong types, NaN, unicode,
  chunked and oversized bodies, duplicate headers, traversal attempts, out-of-range values, broken
  HTTP) over raw sockets: ``server_errors`` (5xx: 0), ``slow_over_2s`` (0); answers that echo a
  server path are counted too.
- ``store_hang``: redis-server frozen with SIGSTOP for ``--hang-s``. /feedback acknowledges durably
  (``feedback_p99_ms`` <= 1000), /recommend answers degraded (``recommend_p99_ms`` <= 100, with
  ``serving.feature_timeout_s=0.05``; ``store_hang_default_settings`` records the same run with the
  default 1.0 s, which meets it too since only a background probe waits on a hung store); after
  SIGCONT the pending pushes drain (``drained``).
- ``promotion``: a promoting process (register + champion pointer swap) SIGKILLed inside the model
  save and inside the pointer swap, then a worker of the service restarted: the previous champion
  serves. A promoted champion whose model file is truncated: the running service, and a new one,
  fall back to the previous champion and ``/metrics`` shows ``recflow_champion_fallback 1``.

    python benchmarks/faults.py [--events 3000] [--keep] [--out benchmarks/results/faults.json]

The CI version (``tests/integration/test_faults.py``) calls the same phase functions with smaller
counts on the tiny test shop.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from recflow.settings import Settings
    from serving.launcher import LocalService

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "faults.json"
BOUNDS = {
    "kill": {"events_min": 3000, "lost": 0, "duplicated": 0, "error_rate_after_restart_max": 0.01},
    "battery": {"requests_min": 150, "server_errors": 0, "slow_over_2s": 0},
    "store_hang": {"feedback_p99_ms_max": 1000.0, "recommend_p99_ms_max": 100.0, "drained": True},
    "promotion": {"previous_champion_after_kill": True, "fallback_after_truncation": True, "alert_metric": True},
}
# The store_hang phase's only setting that differs from the defaults: an online read slower than
# this answers degraded. The default (1.0 s) stalls the batch in flight for that long each time the
# circuit breaker re-probes a hung store, which alone breaks a 100 ms p99 (see docs/operations.md).
STORE_HANG_SETTINGS = {"feature_timeout_s": 0.05}
PROMOTION_SETTINGS = {"champion_poll_s": 0.5}  # the service follows the champion pointer within half a second


def machine() -> dict[str, Any]:
    """CPU, memory and platform of this machine."""
    cpuinfo = Path("/proc/cpuinfo")
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if cpuinfo.exists() else platform.processor()
    return {"cpus": os.cpu_count(), "cpu_model": model, "platform": platform.platform(),
            "python": platform.python_version(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def p99_ms(seconds: list[float]) -> float | None:
    """99th percentile in milliseconds (None without samples)."""
    import numpy as np

    return round(float(np.percentile(np.asarray(seconds) * 1e3, 99)), 1) if seconds else None


# --- the scratch home --------------------------------------------------------------------------------
def write_shop(folder: Path, n_users: int = 120, n_items: int = 60, seed: int = 0) -> dict[str, Path]:
    """A small synthetic shop (interactions, items, users CSV) ending 2024-05-31."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    cats = ["dairy", "bakery", "pantry", "produce", "drinks", "frozen"]
    items = pd.DataFrame({"item_id": [f"i{n:03d}" for n in range(n_items)],
                          "title": [f"{cats[n % len(cats)]} product {n}" for n in range(n_items)],
                          "category": [cats[n % len(cats)] for n in range(n_items)],
                          "brand": [f"brand{n % 7}" for n in range(n_items)],
                          "price": np.round(rng.uniform(0.5, 9.0, n_items), 2)})
    start = pd.Timestamp("2024-01-01", tz="UTC")
    rows = []
    pop = rng.dirichlet(np.full(n_items, 0.5))
    for u in range(n_users):
        favourites = rng.choice(n_items, size=5, replace=False, p=pop)
        for b in range(int(rng.integers(2, 12))):
            ts = (start + pd.Timedelta(days=float(rng.uniform(0, 150)))).floor("s")
            for i in rng.choice(favourites, size=int(rng.integers(1, 4)), replace=False):
                rows.append((f"e{len(rows):06d}", f"u{u:03d}", f"i{i:03d}", ts.isoformat(), "purchase",
                             f"b{u}-{b}", 1, float(items.price[i])))
    events = pd.DataFrame(rows, columns=["event_id", "user_id", "item_id", "timestamp", "event_type", "basket_id",
                                         "quantity", "price"])
    paths = {"interactions": folder / "interactions.csv", "items": folder / "items.csv"}
    events.to_csv(paths["interactions"], index=False)
    items.to_csv(paths["items"], index=False)
    return paths


def tiny_model(settings: Settings, seed: int = 0) -> Any:
    """A tiny random two-tower model over the home's catalogue (as tests/conftest.py's ``shop_model``)."""
    import numpy as np
    import pandas as pd
    import torch

    from recflow.modeling import ModelConfig, new_model, tiny_tokenizer
    from recflow.modeling.build import TINY_BERT

    items = pd.read_parquet(settings.paths.items).sort_values("item_id")
    ids = items["item_id"].astype(str).tolist()
    texts = items.set_index("item_id").loc[ids, "text"].fillna("").tolist()
    torch.manual_seed(seed)
    cfg = ModelConfig(encoder=dict(TINY_BERT), n_ids=len(ids) + 1, text_dim=TINY_BERT["hidden_size"], dim=8,
                      hidden=16, max_length=16, dropout=0.0)
    model = new_model(cfg, ids, texts, id_rows=np.arange(1, len(ids) + 1), tokenizer=tiny_tokenizer())
    with torch.no_grad():
        model.text_emb.copy_(model.encode_texts(model.texts))
    return model.eval()


def build_home(home: Path) -> Settings:
    """A scratch recflow home: the synthetic shop ingested, features built, a tiny champion registered."""
    from recflow import registry
    from recflow.datasets import ingest
    from recflow.features.build import build_feature_tables
    from recflow.settings import DataSettings, load_settings

    shop = write_shop(home.parent / "shop")
    settings = load_settings(home=home, data=DataSettings(
        source="generic", interactions_path=shop["interactions"], items_path=shop["items"],
        now="2024-06-01T00:00:00Z"))
    ingest(settings)
    build_feature_tables(settings)
    tag = registry.register(settings, tiny_model(settings), {"note": "faults benchmark: tiny champion"})
    registry.set_champion(settings, tag, "faults benchmark")
    return settings


def with_serving(settings: Settings, **serving: Any) -> Settings:
    """``settings`` with some serving settings replaced."""
    return settings.model_copy(update={"serving": settings.serving.model_copy(update=serving)})


def with_redis(settings: Settings, address: str) -> Settings:
    """``settings`` on the Redis online store at ``address``, with the feature definitions applied and
    the features materialised into it."""
    from recflow import feature_store as fs

    settings = settings.model_copy(update={"feast": settings.feast.model_copy(
        update={"online_store": "redis", "redis_connection_string": address})})
    store = fs.get_store(settings)
    fs.apply(settings, store)
    fs.materialize(settings, *fs.default_window(settings), store=store)
    return settings


def auth(settings: Settings) -> dict[str, str]:
    """The write token's header (the home's generated token: no token is configured)."""
    from recflow.security import auth_headers

    headers = auth_headers(settings)
    if not headers:
        raise RuntimeError(f"no write token for {settings.home}: start the service first (it creates one)")
    return headers


def catalogue(settings: Settings) -> tuple[list[str], list[str]]:
    """(item ids, user ids with a history) of the home."""
    import pandas as pd

    items = pd.read_parquet(settings.paths.items, columns=["item_id"])["item_id"].astype(str).tolist()
    users = pd.read_parquet(settings.paths.feature_table("user_history"), columns=["user_id"])["user_id"]
    return items, sorted(users.astype(str).unique().tolist())


def worker_pids(url: str, calls: int = 20) -> set[int]:
    """Worker pids seen over ``calls`` fresh connections to /status."""
    import httpx

    pids = set()
    for _ in range(calls):
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
            pids.add(int(httpx.post(f"{url}/status", json={}, timeout=5).json()["worker_pid"]))
    return pids


def wait_until(predicate: Any, timeout: float, what: str, every: float = 0.1) -> float:
    """Poll ``predicate`` until true; returns the seconds it took (raises TimeoutError naming ``what``)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        with contextlib.suppress(Exception):
            if predicate():
                return time.monotonic() - started
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


class RecommendLoad:
    """/recommend at about ``rate`` per second on a background thread, while a phase runs; records
    (latency s, status, degraded) per request."""

    def __init__(self, url: str, users: list[str], rate: float, fresh_connections: bool = False) -> None:
        self.url, self.users, self.rate, self.fresh = url, users, rate, fresh_connections
        self.samples: list[tuple[float, int, bool]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="recommend-load", daemon=True)

    def _run(self) -> None:
        import httpx

        limits = httpx.Limits(max_keepalive_connections=0) if self.fresh else httpx.Limits()
        with httpx.Client(base_url=self.url, timeout=10, limits=limits) as client:
            n, t0 = 0, time.perf_counter()
            while not self._stop.is_set():
                due = t0 + n / self.rate
                if (delay := due - time.perf_counter()) > 0:
                    time.sleep(delay)
                started = time.perf_counter()
                try:
                    r = client.post("/recommend", json={"user_id": self.users[n % len(self.users)], "k": 5})
                    status, degraded = r.status_code, r.status_code == 200 and r.json()["degraded"]
                except httpx.HTTPError:
                    status, degraded = -1, False
                self.samples.append((time.perf_counter() - started, status, degraded))
                n += 1

    def __enter__(self) -> RecommendLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def summary(self) -> dict[str, Any]:
        ok = [s for s in self.samples if s[1] == 200]
        return {"requests": len(self.samples), "errors": len(self.samples) - len(ok),
                "degraded": sum(s[2] for s in ok), "p99_ms": p99_ms([s[0] for s in self.samples])}


# --- phase: kill ---------------------------------------------------------------------------------------
def feedback_events(items: list[str], n: int, run: str) -> list[dict[str, Any]]:
    """``n`` feedback events with unique keys (``<run>-<i>``), timestamps in the last hour."""
    now = datetime.now(UTC).replace(microsecond=0)
    kinds = ("view", "cart", "purchase")
    return [{"event_id": f"{run}-{i:05d}", "user_id": f"kill-u{i % 97:02d}", "item_id": items[i % len(items)],
             "event_type": kinds[i % 3], "quantity": 1 + i % 3, "price": 1.5,
             "timestamp": (now - timedelta(seconds=3600 - i * 3600 / n)).isoformat()} for i in range(n)]


def _send_all(url: str, events: list[dict[str, Any]], headers: dict[str, str], concurrency: int,
              on_progress: Any = None) -> list[tuple[int, bool]]:
    """POST every event to /feedback (``concurrency`` senders, a new connection per request, so the
    kernel spreads them over the workers); returns (status, accepted) per event (-1: no answer)."""
    import httpx

    out: list[tuple[int, bool]] = [(0, False)] * len(events)
    counter = iter(range(len(events)))
    lock = threading.Lock()
    sent = [0]

    def sender() -> None:
        with httpx.Client(base_url=url, timeout=30, headers=headers,
                          limits=httpx.Limits(max_keepalive_connections=0)) as client:
            while True:
                with lock:
                    i = next(counter, None)
                    if i is None:
                        return
                    sent[0] += 1
                    if on_progress is not None:
                        on_progress(sent[0])
                try:
                    r = client.post("/feedback", json=events[i])
                    out[i] = (r.status_code, r.status_code == 200 and bool(r.json().get("accepted")))
                except (httpx.HTTPError, ValueError):
                    out[i] = (-1, False)

    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(sender) for _ in range(concurrency)]:
            f.result()
    return out


def journal_counts(settings: Settings) -> dict[str, int]:
    """How many rows each event id has in the event log (journal and flushed segments)."""
    import sqlite3

    import pyarrow.parquet as pq

    from recflow.event_log import JOURNAL, EventLog

    counts: dict[str, int] = {}
    con = sqlite3.connect(f"file:{settings.paths.event_log / JOURNAL}?mode=ro", uri=True, timeout=30)
    try:
        for (eid,) in con.execute("SELECT event_id FROM events"):
            counts[eid] = counts.get(eid, 0) + 1
    finally:
        con.close()
    for seg in EventLog(settings.paths.event_log).segments():
        for eid in pq.read_table(seg, columns=["event_id"]).column(0).to_pylist():
            counts[eid] = counts.get(eid, 0) + 1
    return counts


def kill_phase(svc: LocalService, settings: Settings, events: int = 3000, kill_at: float = 0.4,
               concurrency: int = 8, run: str = "kill", min_events: int = BOUNDS["kill"]["events_min"]) -> dict[str, Any]:
    """SIGKILL one of the service's workers mid-stream, then re-send every event (see the module docstring)."""
    from recflow.event_log import EventLog

    items, users = catalogue(settings)
    batch = feedback_events(items, events, run)
    headers = auth(settings)
    pids = worker_pids(svc.url)
    if len(pids) < 2:
        raise RuntimeError(f"the kill phase needs 2 worker processes, /status showed {sorted(pids)}")
    victim = min(pids)
    killed_at: list[float] = []

    def on_progress(sent: int) -> None:
        if not killed_at and sent >= int(kill_at * events):
            os.kill(victim, signal.SIGKILL)
            killed_at.append(time.monotonic())

    started = time.monotonic()
    with RecommendLoad(svc.url, users, rate=20, fresh_connections=True) as load:
        first = _send_all(svc.url, batch, headers, concurrency, on_progress)
        stream_s = time.monotonic() - started
        resend_started = time.monotonic()
        second = _send_all(svc.url, batch, headers, concurrency)  # at once: the worker may still be restarting
        resend_s = time.monotonic() - resend_started
    acked = {e["event_id"] for e, (_, ok) in zip(batch, first, strict=True) if ok}
    after = [s for s, ok in second if not ok]
    wait_until(lambda: len(worker_pids(svc.url) - {victim}) >= 2, 180, "a restarted second worker")
    restarted = time.monotonic()  # checked only once the re-send ended: an upper bound on the restart
    log = EventLog(settings.paths.event_log)
    drained = wait_until(lambda: log.pending_count() == 0, 120, "the pending pushes to drain")
    counts = journal_counts(settings)
    ids = [e["event_id"] for e in batch]
    statuses: dict[str, int] = {}
    for s, _ in first:
        statuses[str(s)] = statuses.get(str(s), 0) + 1
    result = {
        "events": events, "workers": len(pids), "concurrency": concurrency, "killed_worker_after_events": int(kill_at * events),
        "acknowledged": len(acked),
        "lost": sum(1 for eid in acked if counts.get(eid, 0) == 0),
        "duplicated": sum(1 for eid in ids if counts.get(eid, 0) > 1),
        "error_rate_after_restart": round(len(after) / len(second), 4),
        "errors_after_restart": len(after),
        "first_stream_status_counts": statuses, "first_stream_s": round(stream_s, 1), "resend_s": round(resend_s, 1),
        "missing_after_resend": sum(1 for eid in ids if counts.get(eid, 0) == 0),
        "second_worker_back_within_s_of_kill": round(restarted - killed_at[0], 1) if killed_at else None,
        "pending_drained_s_after_resend": round(drained, 1),
        "recommend_during": load.summary(),
    }
    b = BOUNDS["kill"]
    result["bounds_met"] = (events >= min_events and result["lost"] == 0 and result["duplicated"] == 0
                            and result["error_rate_after_restart"] <= b["error_rate_after_restart_max"]
                            and result["missing_after_resend"] == 0)
    return result


# --- phase: battery ------------------------------------------------------------------------------------
# Cases whose request is incomplete by design: the client then closes its side (as one that gives up does).
INCOMPLETE = ("length:short-body", "chunked:no-terminator", "http:garbage", "http:h2-preface")


def raw_http(port: int, data: bytes, timeout: float = 10.0, half_close: bool = False) -> tuple[int, float, bytes]:
    """Send ``data`` as is to 127.0.0.1:``port`` and read until the server closes (every request says
    ``Connection: close``): (status, seconds, response). Status 0: closed without an HTTP answer; -1:
    no answer within ``timeout``. ``half_close``: shut the sending side after ``data``. The answer is
    read while ``data`` is still being sent, so an early answer (a 413 before a 10 MB body) is seen."""
    started = time.perf_counter()
    chunks: list[bytes] = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:

        def send() -> None:
            with contextlib.suppress(OSError):  # the server may answer and close before the body is sent
                sock.sendall(data)
                if half_close:
                    sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            return -1, time.perf_counter() - started, b"".join(chunks)
        except OSError:  # reset after the answer
            pass
        seconds = time.perf_counter() - started
        sender.join(timeout=timeout)
    raw = b"".join(chunks)
    status = 0
    if raw.startswith(b"HTTP/"):
        with contextlib.suppress(IndexError, ValueError):
            status = int(raw.split(b" ", 2)[1])
    return status, seconds, raw


def _req(path: str, body: bytes | None, headers: list[tuple[str, str]], method: str = "POST",
         length: bool = True, version: str = "HTTP/1.1") -> bytes:
    lines = [f"{method} {path} {version}", "Host: 127.0.0.1", "Connection: close"]
    names = {k.lower() for k, _ in headers}
    if body is not None and length and "content-length" not in names and "transfer-encoding" not in names:
        lines.append(f"Content-Length: {len(body)}")
    if body is not None and "content-type" not in names:
        lines.append("Content-Type: application/json")
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def _chunked(body: bytes, size: int = 8192) -> bytes:
    parts = [f"{len(body[i:i + size]):x}\r\n".encode() + body[i:i + size] + b"\r\n" for i in range(0, len(body), size)]
    return b"".join(parts) + b"0\r\n\r\n"


def battery_cases(token: str, items: list[str], tag: str) -> list[tuple[str, bytes]]:
    """(name, raw request bytes) of the malformed-request battery."""
    auth_h = [("Authorization", f"Bearer {token}")]
    j = json.dumps
    item = items[0]
    good = {"/recommend": {"user_id": "u000"}, "/similar": {"item_id": item}, "/search": {"query": "dairy"},
            "/feedback": {"user_id": "u000", "item_id": item, "event_type": "view", "event_id": "battery-ok",
                          "timestamp": datetime.now(UTC).isoformat()},
            "/reload": {"model_tag": "no_such_model:v1"}}
    fields = {"/recommend": ["user_id", "k", "exclude_purchased", "category", "timestamp"],
              "/similar": ["item_id", "k"], "/search": ["query", "k", "user_id"],
              "/feedback": ["user_id", "item_id", "event_type", "quantity", "price", "timestamp", "event_id", "basket_id"],
              "/reload": ["model_tag"]}
    wrong = [None, 7, -1, 2**64, 1.5, True, [], {"a": 1}, "", "x" * 600]
    cases: list[tuple[str, bytes]] = []

    def post(name: str, path: str, obj: Any = None, raw: bytes | None = None, headers: list[tuple[str, str]] | None = None,
             **kw: Any) -> None:
        body = raw if raw is not None else j(obj).encode()
        cases.append((name, _req(path, body, auth_h + (headers or []), **kw)))

    # Wrong types (and out-of-range values) in every field of every endpoint.
    for path, names in fields.items():
        for field in names:
            for n, value in enumerate(wrong):
                if path == "/reload" and value in (None, ""):
                    continue  # not malformed: a null or empty tag is a valid request to reload the champion
                post(f"type:{path}:{field}:{n}", path, {**good[path], field: value})
    # Out of range.
    for k in (0, -5, 101, 10**9, 2**63):
        post(f"range:recommend:k={k}", "/recommend", {"user_id": "u000", "k": k})
    for ts in ("0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z", "2024-13-45T00:00:00Z", "1969-12-31T23:59:59Z",
               "-1", "1e20", "2024-02-30", "now"):
        post(f"range:recommend:timestamp={ts}", "/recommend", {"user_id": "u000", "timestamp": ts})
        post(f"range:feedback:timestamp={ts}", "/feedback", {**good["/feedback"], "event_id": f"b-ts-{ts}", "timestamp": ts})
    for q in (-1, 1e7, 1e308, -0.0001):
        post(f"range:feedback:quantity={q}", "/feedback", {**good["/feedback"], "event_id": f"b-q-{q}", "quantity": q})
        post(f"range:feedback:price={q}", "/feedback", {**good["/feedback"], "event_id": f"b-p-{q}", "price": q})
    fb = good["/feedback"]
    post("range:batch:empty", "/feedback/batch", {"events": []})
    post("range:batch:201", "/feedback/batch", {"events": [{**fb, "event_id": f"b{i}"} for i in range(201)]})
    post("range:batch:not-a-list", "/feedback/batch", {"events": fb})
    post("range:batch:one-bad", "/feedback/batch", {"events": [{**fb, "event_id": "bb1"}, {**fb, "quantity": -3}]})
    post("range:batch:nested-wrong", "/feedback/batch", {"events": [[1, 2], "x", None]})
    # NaN and infinities (not JSON, but what json.dumps writes by default).
    for lit in ("NaN", "Infinity", "-Infinity", "1e999", "-1e999"):
        post(f"nan:recommend:k={lit}", "/recommend", raw=f'{{"user_id": "u000", "k": {lit}}}'.encode())
        post(f"nan:feedback:quantity={lit}", "/feedback", raw=(j({**fb, "event_id": f"nan-{lit}"})[:-1]
                                                                 + f', "quantity": {lit}}}').encode())
        post(f"nan:feedback:price={lit}", "/feedback", raw=(j({**fb, "event_id": f"nanp-{lit}"})[:-1]
                                                              + f', "price": {lit}}}').encode())
    post("nan:search:k", "/search", raw=b'{"query": "milk", "k": NaN}')
    # Unicode: emoji, right-to-left, combining marks, NUL and control characters, lone surrogates, invalid UTF-8.
    for n, text in enumerate(["\U0001f6d2\U0001f95b", "\u202eevil\u202c", "e\u0301\u0301\u0301", "a\u0000b", "\x1b[31m",
                              "\ufeffBOM", "\u4e2d\u6587" * 50, "\U0010ffff"]):
        post(f"unicode:recommend:user_id:{n}", "/recommend", {"user_id": text})
        post(f"unicode:search:query:{n}", "/search", {"query": text})
        post(f"unicode:feedback:event_id:{n}", "/feedback", {**fb, "event_id": text})
        post(f"unicode:recommend:category:{n}", "/recommend", {"user_id": "u000", "category": text})
    post("unicode:lone-surrogate", "/recommend", raw=b'{"user_id": "\\ud800"}')
    post("unicode:lone-surrogate-search", "/search", raw=b'{"query": "\\udfff\\ud800"}')
    post("unicode:invalid-utf8", "/recommend", raw=b'{"user_id": "\xff\xfe\xfd"}')
    post("unicode:overlong-utf8", "/search", raw=b'{"query": "\xc0\xaf\xe0\x80\xaf"}')
    post("unicode:utf16-body", "/recommend", raw=j({"user_id": "u000"}).encode("utf-16"))
    post("unicode:bom-body", "/recommend", raw=b"\xef\xbb\xbf" + j({"user_id": "u000"}).encode())
    # Huge and deep JSON.
    post("huge:10MB-content-length", "/recommend", raw=b'{"user_id": "' + b"x" * 10_000_000 + b'"}')
    post("huge:60KB-string", "/search", {"query": "q" * 60_000})
    post("huge:60KB-array", "/recommend", {"user_id": "u000", "k": list(range(12_000))})
    post("huge:number-5000-digits", "/recommend", raw=b'{"user_id": "u000", "k": ' + b"9" * 5000 + b"}")
    post("huge:float-5000-digits", "/feedback", raw=(j({**fb, "event_id": "bigf"})[:-1] + ', "price": 0.'
                                                     + "1" * 5000 + "}").encode())
    post("huge:many-keys", "/recommend", {"user_id": "u000", **{f"k{i}": i for i in range(5000)}})
    post("huge:batch-big-events", "/feedback/batch", {"events": [{**fb, "event_id": f"bg{i}", "basket_id": "b" * 128}
                                                                  for i in range(200)]})
    for depth in (100, 1000, 10_000, 30_000):
        post(f"deep:array:{depth}", "/recommend", raw=b"[" * depth + b"]" * depth)
        post(f"deep:object:{depth}", "/search", raw=b'{"query": ' + b'{"a": ' * depth + b"1" + b"}" * depth + b"}")
    post("deep:unclosed", "/recommend", raw=b"[" * 50_000)
    # Chunked and oversized bodies, lying lengths.
    body = j({"user_id": "u000"}).encode()
    post("chunked:ok", "/recommend", raw=_chunked(body), headers=[("Transfer-Encoding", "chunked")], length=False)
    post("chunked:70KB", "/feedback", raw=_chunked(b'{"user_id": "' + b"x" * 70_000 + b'"}'),
         headers=[("Transfer-Encoding", "chunked")], length=False)
    post("chunked:10MB", "/search", raw=_chunked(b'{"query": "' + b"x" * 10_000_000 + b'"}', 1 << 20),
         headers=[("Transfer-Encoding", "chunked")], length=False)
    post("chunked:bad-size", "/recommend", raw=b"zz\r\n" + body + b"\r\n0\r\n\r\n",
         headers=[("Transfer-Encoding", "chunked")], length=False)
    post("chunked:no-terminator", "/recommend", raw=f"{len(body):x}\r\n".encode() + body + b"\r\n",
         headers=[("Transfer-Encoding", "chunked")], length=False)
    post("chunked:and-content-length", "/recommend", raw=_chunked(body),
         headers=[("Transfer-Encoding", "chunked"), ("Content-Length", "5")], length=False)
    post("length:huge-declared", "/recommend", raw=body, headers=[("Content-Length", "999999999999")])
    post("length:negative", "/recommend", raw=body, headers=[("Content-Length", "-1")])
    post("length:not-a-number", "/recommend", raw=body, headers=[("Content-Length", "ten")])
    post("length:short-body", "/recommend", raw=body, headers=[("Content-Length", str(len(body) + 50))])
    post("length:longer-body", "/recommend", raw=body + b"garbage-after-body", headers=[("Content-Length", str(len(body)))])
    post("length:empty-body", "/feedback", raw=b"")
    # Duplicate and conflicting headers.
    for name, values in (("Content-Type", ("application/json", "text/plain")), ("Content-Type", ("application/json",) * 2),
                         ("Content-Length", (str(len(body)), str(len(body) + 1))), ("Content-Length", (str(len(body)),) * 2),
                         ("Authorization", (f"Bearer {token}", "Bearer wrong")), ("Host", ("a", "b")),
                         ("Transfer-Encoding", ("chunked", "identity"))):
        extra = [(name, v) for v in values]
        is_len = name in ("Content-Length", "Transfer-Encoding")
        cases.append((f"dup:{name}:{'|'.join(values)}", _req("/feedback" if name == "Authorization" else "/recommend",
                                                            body, extra if name == "Authorization" else auth_h + extra,
                                                            length=not is_len)))
    cases.append(("dup:content-type-list", _req("/recommend", body, [("Content-Type", "application/json, text/plain")])))
    cases.append(("ctype:text", _req("/recommend", body, [("Content-Type", "text/plain")])))
    cases.append(("ctype:form", _req("/recommend", b"user_id=u000", [("Content-Type", "application/x-www-form-urlencoded")])))
    cases.append(("ctype:multipart", _req("/feedback", b"--x\r\n\r\n--x--", auth_h + [("Content-Type",
                                                                                        "multipart/form-data; boundary=x")])))
    cases.append(("ctype:json-utf16-charset", _req("/recommend", j({"user_id": "u000"}).encode("utf-16-le"),
                                                   [("Content-Type", "application/json; charset=utf-16")])))
    # Traversal attempts: in paths, tags and ids.
    for path in ("/../../etc/passwd", "/recommend/../reload", "/%2e%2e/%2e%2e/etc/passwd", "//etc/passwd",
                 "/static/../../../etc/passwd", "/docs/..%2f..%2fetc%2fpasswd", "/recommend%00.json", "/reload/..;/status",
                 "/..\\..\\windows\\win.ini", "/" + "a/" * 2000):
        cases.append((f"traversal:path:{path[:40]}", _req(path, body, auth_h)))
        cases.append((f"traversal:get:{path[:40]}", _req(path, None, [], method="GET")))
    for value in ("../../etc/passwd", "/etc/passwd", "recflow:../../x", "..", f"{tag.split(':')[0]}:../../../etc",
                  "file:///etc/passwd", "C:\\Windows\\system32", "%2e%2e%2f"):
        post(f"traversal:reload:model_tag={value}", "/reload", {"model_tag": value})
        post(f"traversal:similar:item_id={value}", "/similar", {"item_id": value})
        post(f"traversal:feedback:item_id={value}", "/feedback", {**fb, "item_id": value, "event_id": f"t-{value}"})
    post("traversal:reload:model_path", "/reload", {"model_path": "/etc"})
    # Broken HTTP, methods.
    cases.append(("http:no-colon-header", b"POST /recommend HTTP/1.1\r\nHost: x\r\nbroken header\r\n\r\n"))
    cases.append(("http:long-header", _req("/recommend", body, [("X-Long", "a" * 100_000)])))
    cases.append(("http:many-headers", _req("/recommend", body, [(f"X-H{i}", "v") for i in range(500)])))
    cases.append(("http:bad-method", _req("/recommend", body, [], method="F@O")))
    cases.append(("http:bad-version", _req("/recommend", body, [], version="HTTP/9.9")))
    cases.append(("http:garbage", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + os.urandom(64)))
    cases.append(("http:h2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"))
    cases.append(("http:lf-only", b"POST /recommend HTTP/1.1\nHost: x\nContent-Length: 2\n\n{}"))
    for method in ("GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"):
        cases.append((f"method:{method}:/recommend", _req("/recommend", body if method != "GET" else None, [],
                                                          method=method)))
    for route in ("/recommend", "/feedback", "/feedback/batch", "/reload"):
        cases.append((f"auth:none:{route}", _req(route, body, [])))
        cases.append((f"auth:malformed:{route}", _req(route, body, [("Authorization", "Bearer")])))
        cases.append((f"auth:basic:{route}", _req(route, body, [("Authorization", "Basic dXNlcjpwYXNz")])))
    return cases


def battery_phase(svc: LocalService, settings: Settings) -> dict[str, Any]:
    """Send the battery over raw sockets; count 5xx, answers over 2 s, server paths echoed, and check the
    service is still ready and answering afterwards."""
    import httpx

    from recflow import registry
    from recflow.security import serving_token

    items, _ = catalogue(settings)
    pointer = registry.get_champion(settings) or {"tag": "recflow_two_tower:x"}
    token = serving_token(settings)
    assert token, "the service creates the write token at start-up"
    port = int(svc.url.rsplit(":", 1)[1])
    cases = battery_cases(token, items, str(pointer["tag"]))
    leaks = [str(settings.home), str(ROOT), "/tmp/", "root:x:0:0", "Traceback"]
    rows = []
    started = time.monotonic()
    for name, data in cases:
        status, seconds, raw = raw_http(port, data, half_close=name.startswith(INCOMPLETE))
        rows.append({"case": name, "status": status, "seconds": seconds,
                     "leak": next((s for s in leaks if s.encode() in raw), None)})
    elapsed = time.monotonic() - started
    counts: dict[str, int] = {}
    by_group: dict[str, dict[str, int]] = {}
    for r in rows:
        counts[str(r["status"])] = counts.get(str(r["status"]), 0) + 1
        group = by_group.setdefault(r["case"].split(":")[0], {})
        group[str(r["status"])] = group.get(str(r["status"]), 0) + 1
    ready_after = httpx.get(f"{svc.url}/readyz", timeout=10).status_code == 200
    ok_after = httpx.post(f"{svc.url}/recommend", json={"user_id": "u000"}, timeout=10).status_code == 200
    server = [r for r in rows if r["status"] >= 500 or r["status"] == -1]
    slow = [r for r in rows if r["seconds"] > 2.0]
    result = {
        "requests": len(rows), "server_errors": sum(1 for r in rows if r["status"] >= 500),
        "slow_over_2s": len(slow), "no_answer_in_10s": sum(1 for r in rows if r["status"] == -1),
        "closed_without_answer": counts.get("0", 0), "path_or_secret_leaks": sum(1 for r in rows if r["leak"]),
        "status_counts": dict(sorted(counts.items())), "max_ms": round(max(r["seconds"] for r in rows) * 1e3, 1),
        "p99_ms": p99_ms([r["seconds"] for r in rows]), "seconds": round(elapsed, 1),
        "ready_after": ready_after, "recommend_ok_after": ok_after,
        "status_by_group": {g: dict(sorted(c.items())) for g, c in sorted(by_group.items())},
        "closed_without_answer_cases": [r["case"] for r in rows if r["status"] == 0],
        "slowest": [{"case": r["case"], "status": r["status"], "ms": round(r["seconds"] * 1e3, 1)}
                    for r in sorted(rows, key=lambda r: -r["seconds"])[:5]],
        "failures": [{k: (round(v, 3) if k == "seconds" else v) for k, v in r.items()}
                     for r in rows if r in server or r in slow or r["leak"]][:50],
    }
    b = BOUNDS["battery"]
    result["bounds_met"] = (len(rows) >= b["requests_min"] and result["server_errors"] == 0 and not slow
                            and result["no_answer_in_10s"] == 0 and result["path_or_secret_leaks"] == 0
                            and ready_after and ok_after)
    return result


# --- phase: store_hang ---------------------------------------------------------------------------------
def redis_process(address: str) -> int:
    """The pid of the redis-server listening on ``address`` (a child of this process)."""
    import psutil

    port = address.rsplit(":", 1)[1]
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "redis-server" in p.name() and port in " ".join(p.cmdline()):
                return p.pid
    raise RuntimeError(f"no redis-server child of this process listens on {address}")


def store_hang_phase(svc: LocalService, settings: Settings, redis_pid: int, seconds: float = 20.0,
                     feedback_every_s: float = 0.1, recommend_rate: float = 20.0, run: str = "hang",
                     overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Freeze redis-server (SIGSTOP) for ``seconds`` while /feedback and /recommend keep coming; then
    SIGCONT and wait for the pending pushes to drain."""
    import httpx

    from recflow.event_log import EventLog

    items, users = catalogue(settings)
    headers = auth(settings)
    log = EventLog(settings.paths.event_log)
    with httpx.Client(base_url=svc.url, timeout=30) as c:
        before = c.post("/recommend", json={"user_id": users[0]}).json()
    fb_lat: list[float] = []
    fb_bad: list[int] = []
    sent: list[str] = []
    pushed_false = 0
    os.kill(redis_pid, signal.SIGSTOP)
    try:
        frozen_at = time.monotonic()
        with RecommendLoad(svc.url, users, recommend_rate) as load, \
                httpx.Client(base_url=svc.url, timeout=30, headers=headers) as c:
            n = 0
            while time.monotonic() - frozen_at < seconds:
                event = {"event_id": f"{run}-{n:05d}", "user_id": users[n % len(users)], "item_id": items[n % len(items)],
                         "event_type": "view", "timestamp": datetime.now(UTC).isoformat()}
                t0 = time.perf_counter()
                r = c.post("/feedback", json=event)
                fb_lat.append(time.perf_counter() - t0)
                if r.status_code != 200 or not r.json().get("accepted"):
                    fb_bad.append(r.status_code)
                else:
                    sent.append(event["event_id"])
                    pushed_false += not r.json()["pushed"]
                n += 1
                time.sleep(max(0.0, feedback_every_s - (time.perf_counter() - t0)))
        in_log = set(log.read().event_id)
        durable = sum(1 for e in sent if e in in_log)
        pending_frozen = log.pending_count()
    finally:
        os.kill(redis_pid, signal.SIGCONT)
        thawed = time.monotonic()
    try:
        drain_s = wait_until(lambda: log.pending_count() == 0, 60, "the pending pushes to drain after SIGCONT", 0.2)
        drained = True
    except TimeoutError:
        drain_s, drained = None, False

    def recovered() -> bool:
        body = httpx.post(f"{svc.url}/recommend", json={"user_id": users[0]}, timeout=10).json()
        return not body["degraded"]

    wait_until(recovered, 60, "/recommend to stop answering degraded", 0.2)
    recover_s = time.monotonic() - thawed
    rec = load.summary()
    result = {
        "settings": overrides if overrides is not None else STORE_HANG_SETTINGS, "frozen_s": round(thawed - frozen_at, 1), "feedback_requests": len(fb_lat),
        "feedback_errors": len(fb_bad), "feedback_p99_ms": p99_ms(fb_lat),
        "feedback_max_ms": round(max(fb_lat) * 1e3, 1) if fb_lat else None,
        "feedback_acknowledged": len(sent), "feedback_durable_while_frozen": durable,
        "feedback_pushed_false": pushed_false, "pending_while_frozen": pending_frozen,
        "recommend_requests": rec["requests"], "recommend_errors": rec["errors"],
        "recommend_degraded": rec["degraded"], "recommend_p99_ms": rec["p99_ms"],
        "recommend_before_degraded": before["degraded"],
        "drained": drained, "drain_s_after_sigcont": round(drain_s, 1) if drain_s is not None else None,
        "recommend_recovered_s_after_sigcont": round(recover_s, 1),
    }
    b = BOUNDS["store_hang"]
    result["bounds_met"] = bool(
        result["feedback_p99_ms"] is not None and result["feedback_p99_ms"] <= b["feedback_p99_ms_max"]
        and rec["p99_ms"] is not None and rec["p99_ms"] <= b["recommend_p99_ms_max"]
        and drained and not fb_bad and durable == len(sent) and rec["errors"] == 0
        and rec["degraded"] >= 0.9 * max(1, rec["requests"]))
    return result


# --- phase: promotion ----------------------------------------------------------------------------------
def _promote_child(home: Path, pause_at: str, marker: Path, seed: int, tag: str | None = None) -> None:
    """(child process) Register a model (or take the registered ``tag``) and make it the champion,
    pausing at ``pause_at`` ("model": the model's files written, not yet in the store; "pointer": the new
    pointer written to its temporary file, not yet renamed) after writing ``marker``, so the parent can
    SIGKILL it there."""
    import recflow.durable
    from recflow import registry
    from recflow.settings import load_settings

    def pause() -> None:
        marker.write_text(str(os.getpid()))
        time.sleep(600)

    if pause_at == "model":
        import recflow.modeling

        original_save = recflow.modeling.save_model

        def save_then_pause(*args: Any, **kwargs: Any) -> Any:
            out = original_save(*args, **kwargs)
            pause()
            return out

        recflow.modeling.save_model = save_then_pause
    elif pause_at == "pointer":
        original_replace = recflow.durable.replace_durably

        def pause_before_rename(tmp: Path, dest: Path) -> None:
            if dest.name == registry.CHAMPION_FILE:
                pause()
            original_replace(tmp, dest)

        recflow.durable.replace_durably = pause_before_rename
    settings = load_settings(home=home)
    tag = tag or registry.register(settings, tiny_model(settings, seed), {"note": f"faults: promotion ({pause_at})"})
    pointer = registry.set_champion(settings, tag, f"faults: promotion ({pause_at})")
    print(json.dumps({"tag": tag, "champion": pointer["tag"]}))


def run_promotion(settings: Settings, pause_at: str, seed: int, timeout: float = 120.0,
                  tag: str | None = None) -> dict[str, Any]:
    """Run a promoting child process (registering a model, or promoting the registered ``tag``); with
    ``pause_at`` ("model" / "pointer") SIGKILL it there. Returns what it reported (no pause) or where it
    was killed."""
    marker = settings.home / f"promote-{pause_at}-{seed}.marker"
    marker.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECFLOW_")}
    env.update({"BENTOML_HOME": str(settings.paths.bentoml_home), "HF_HUB_OFFLINE": "1"})
    cmd = [sys.executable, str(Path(__file__).resolve()), "_promote", "--home", str(settings.home),
           "--pause-at", pause_at, "--marker", str(marker), "--seed", str(seed), *(["--tag", tag] if tag else [])]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if pause_at == "none":
            out, err = proc.communicate(timeout=timeout)
            if proc.returncode != 0:
                raise RuntimeError(f"the promoting process failed (exit {proc.returncode}): {err[-2000:]}")
            return json.loads(out.strip().splitlines()[-1])
        wait_until(lambda: marker.exists() or proc.poll() is not None, timeout, f"the promotion to reach {pause_at}")
        if proc.poll() is not None:
            raise RuntimeError(f"the promoting process exited before {pause_at}: {proc.stderr.read()[-2000:]}")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        return {"killed_at": pause_at, "exit": proc.returncode}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def _served(url: str, calls: int = 8) -> tuple[set[str | None], set[int]]:
    """(model versions in /status, /recommend statuses) over ``calls`` fresh connections (every worker)."""
    import httpx

    versions, codes = set(), set()
    for _ in range(calls):
        versions.add(httpx.post(f"{url}/status", json={}, timeout=10).json()["model_version"])
        codes.add(httpx.post(f"{url}/recommend", json={"user_id": "u000"}, timeout=10).status_code)
    return versions, codes


def _fallback_metric(url: str) -> float | None:
    """The value of ``recflow_champion_fallback`` on /metrics (None when absent)."""
    import httpx

    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(("recflow_champion_fallback ", "recflow_champion_fallback{")):
            return float(line.rsplit(" ", 1)[1])
    return None


def restart_worker(url: str, timeout: float = 180.0) -> float:
    """SIGKILL one worker process of the service (the arbiter starts a new one, which loads the model
    from disk as a restarted service does); returns the seconds until a new worker answers ready."""
    import httpx

    old = worker_pids(url)
    os.kill(min(old), signal.SIGKILL)

    def fresh() -> bool:
        for _ in range(10):
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                body = httpx.post(f"{url}/status", json={}, timeout=5).json()
                if body["ready"] and body["worker_pid"] not in old:
                    return True
        return False

    return wait_until(fresh, timeout, "a restarted worker to answer ready", every=0.3)


def promotion_phase(svc: LocalService, settings: Settings, full_restart: bool = False) -> dict[str, Any]:
    """SIGKILL a promotion inside the model save and inside the pointer swap, restart a worker of the
    service (it reloads from disk), check the previous champion serves; re-run the promotion; promote a
    champion whose model file is truncated: the running workers and restarted ones serve the previous
    champion, with the alert metric. With ``full_restart`` the last restart is a whole new service.
    The service must follow the champion pointer (a small ``serving.champion_poll_s``)."""
    import httpx

    from recflow import registry
    from serving.launcher import start_local

    before = registry.get_champion(settings)
    if not before:
        raise RuntimeError(f"the promotion phase needs a champion in {settings.home}")
    previous = str(before["tag"])
    n_models = len(registry.list_models(settings))
    kills = []
    for seed, where in enumerate(("model", "pointer"), start=11):
        tag = None
        if where == "pointer":  # promote a model registered here: that child needs no torch (a faster start)
            tag = registry.register(settings, tiny_model(settings, seed), {"note": "faults: promotion"})
        run_promotion(settings, where, seed, tag=tag)
        pointer = registry.get_champion(settings)  # parses: never a torn file
        kills.append({"killed_in": where, "champion_after": pointer["tag"] if pointer else None,
                      "models_after": len(registry.list_models(settings)),
                      "stale_pointer_tmp_files": len(list(settings.paths.models.glob(".champion.json.*.tmp")))})
    out: dict[str, Any] = {"previous_champion": previous, "models_before": n_models, "kills": kills,
                           "workers": settings.serving.worker_count()}
    out["restart_s"] = round(restart_worker(svc.url), 1)  # the restart after the crash
    versions, codes = _served(svc.url)
    out["restart_serves"], out["restart_recommend_status"] = sorted(map(str, versions)), sorted(codes)
    retried = registry.register(settings, tiny_model(settings, 21), {"note": "faults: promotion re-run"})
    registry.set_champion(settings, retried, "faults: the promotion, re-run after the crash")
    out["retried_promotion"] = retried
    wait_until(lambda: _served(svc.url)[0] == {retried}, 60, "the service to follow the re-run promotion")
    # A champion whose weights are truncated (a partial copy): every worker keeps the previous one.
    broken = registry.register(settings, tiny_model(settings, 22), {"note": "faults: truncated below"})
    weights = registry.model_path(settings, broken) / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    registry.set_champion(settings, broken, "faults: a champion with a truncated model file")
    out["truncated_champion"], out["truncated_to_bytes"] = broken, weights.stat().st_size
    with contextlib.suppress(TimeoutError):
        wait_until(lambda: (_fallback_metric(svc.url) or 0) >= 1, 60, "the fallback alert metric")
    time.sleep(1.5)  # a few more champion polls: the failed champion is not reloaded on each
    versions, codes = _served(svc.url)
    out["running_serves"], out["running_recommend_status"] = sorted(map(str, versions)), sorted(codes)
    out["running_alert_metric"] = _fallback_metric(svc.url)

    def after_restart(url: str) -> None:
        versions, codes = _served(url)
        out["restart2_serves"], out["restart2_recommend_status"] = sorted(map(str, versions)), sorted(codes)
        out["restart2_alert_metric"] = _fallback_metric(url)
        out["restart2_load_error"] = httpx.post(f"{url}/status", json={}, timeout=10).json()["load_error"]

    if full_restart:  # a whole new service, with the damaged champion still promoted
        out["restart2"] = "a new service (serving.launcher.start_local)"
        with start_local(settings) as fresh:
            after_restart(fresh.url)
            out["error_logged"] = "cannot be loaded" in fresh.log_text()
    else:
        out["restart2"] = "a worker SIGKILLed and restarted by the arbiter"
        out["restart2_s"] = round(restart_worker(svc.url), 1)
        after_restart(svc.url)
        out["error_logged"] = "cannot be loaded" in svc.log_text()
    out["bounds_met"] = bool(
        all(k["champion_after"] == previous for k in kills) and out["restart_serves"] == [previous]
        and out["running_serves"] == [retried] and out["restart2_serves"] == [retried]
        and out["restart_recommend_status"] == out["running_recommend_status"] == out["restart2_recommend_status"] == [200]
        and (out["running_alert_metric"] or 0) >= 1 and (out["restart2_alert_metric"] or 0) >= 1)
    return out


# --- the run -------------------------------------------------------------------------------------------
@contextmanager
def redis(port: int | None = None) -> Iterator[tuple[str, int]]:
    """A redis-server on 127.0.0.1 (no persistence): yields (address, pid)."""
    from recflow.local_services import redis_server

    with redis_server(port) as address:
        yield address, redis_process(address)


def run_phases(settings: Settings, *, events: int, hang_s: float, recommend_rate: float = 20.0,
               phases: tuple[str, ...] = ("kill", "battery", "store_hang", "promotion"),
               hang_with_defaults: bool = False, min_events: int = BOUNDS["kill"]["events_min"],
               shared_service: bool = False) -> dict[str, Any]:
    """Every phase on ``settings``' home (which must have a champion), on a Redis online store started
    here: kill and battery on one 2-worker service, otherwise with the default settings, store_hang on a service of
    its own (``STORE_HANG_SETTINGS``; with ``hang_with_defaults`` also once with the defaults, recorded as
    ``store_hang_default_settings``), promotion with its own restarts. ``shared_service`` (the CI test):
    every phase on one 2-worker service with ``STORE_HANG_SETTINGS`` and ``PROMOTION_SETTINGS`` (three
    starts fewer; the promotion phase's restarts are worker restarts).
    Returns the phases' records, each with ``phase_s``."""
    from serving.launcher import start_local

    out: dict[str, Any] = {}
    with redis() as (address, pid):
        online = with_redis(settings, address)

        def timed(name: str, fn: Any, *args: Any, **kwargs: Any) -> None:
            t = time.monotonic()
            out[name] = fn(*args, **kwargs)
            out[name]["phase_s"] = round(time.monotonic() - t, 1)

        def hang(svc: LocalService, tuned: Settings, name: str, overrides: dict[str, Any]) -> None:
            timed(name, store_hang_phase, svc, tuned, pid, seconds=hang_s, recommend_rate=recommend_rate,
                  overrides=overrides, run=name)

        if {"kill", "battery"} & set(phases) or (shared_service and "store_hang" in phases):
            extra = {**STORE_HANG_SETTINGS, **PROMOTION_SETTINGS} if shared_service else {}
            two = with_serving(online, workers=2, **extra)
            with start_local(two) as svc:
                if "kill" in phases:
                    timed("kill", kill_phase, svc, two, events=events, min_events=min_events)
                if "battery" in phases:
                    timed("battery", battery_phase, svc, two)
                if shared_service and "store_hang" in phases:
                    hang(svc, two, "store_hang", STORE_HANG_SETTINGS)
                    out["store_hang"]["workers"] = 2
                if shared_service and "promotion" in phases:
                    timed("promotion", promotion_phase, svc, two)
        if "store_hang" in phases and not shared_service:
            variants = [("store_hang", STORE_HANG_SETTINGS)]
            if hang_with_defaults:
                variants.append(("store_hang_default_settings", {}))
            for name, overrides in variants:
                tuned = with_serving(online, **overrides)
                with start_local(tuned) as svc:
                    hang(svc, tuned, name, overrides)
                    out[name]["workers"] = tuned.serving.worker_count()
        if "promotion" in phases and not shared_service:
            tuned = with_serving(online, **PROMOTION_SETTINGS)
            with start_local(tuned) as svc:
                timed("promotion", promotion_phase, svc, tuned, full_restart=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd")
    child = sub.add_parser("_promote", help="(internal) a promoting process to be killed")
    child.add_argument("--home", type=Path, required=True)
    child.add_argument("--pause-at", choices=("none", "model", "pointer"), required=True)
    child.add_argument("--marker", type=Path, required=True)
    child.add_argument("--seed", type=int, default=0)
    child.add_argument("--tag", default=None, help="Promote this registered model instead of registering one.")
    parser.add_argument("--events", type=int, default=3000, help="Feedback events of the kill phase (>= 3000).")
    parser.add_argument("--hang-s", type=float, default=20.0, help="Seconds redis-server stays frozen.")
    parser.add_argument("--phases", default="kill,battery,store_hang,promotion")
    parser.add_argument("--no-default-hang", action="store_true",
                        help="Skip the informational store_hang run with the default settings.")
    parser.add_argument("--keep", action="store_true", help="Keep the scratch home (printed) instead of removing it.")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.cmd == "_promote":
        _promote_child(args.home, args.pause_at, args.marker, args.seed, args.tag)
        return
    for name in [n for n in os.environ if n.startswith("RECFLOW_")]:
        del os.environ[name]  # the scratch home's settings only, never the caller's home
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    if shutil.which("redis-server") is None:
        sys.exit("redis-server is not installed: apt-get install redis-server")
    scratch = Path(tempfile.mkdtemp(prefix="recflow-faults-"))
    started, load_before = time.monotonic(), os.getloadavg()
    try:
        print(f"scratch home {scratch / 'home'}: building the synthetic shop and a tiny champion", flush=True)
        settings = build_home(scratch / "home")
        build_s = time.monotonic() - started
        phases = tuple(p for p in args.phases.split(",") if p)
        records = run_phases(settings, events=args.events, hang_s=args.hang_s, phases=phases,
                             hang_with_defaults=not args.no_default_hang)
        result = {
            "measured_at": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine(),
            "load_average": {"before": [round(x, 2) for x in load_before],
                             "after": [round(x, 2) for x in os.getloadavg()],
                             "note": "1/5/15-minute load of the whole machine, shared with other work"},
            "command": "python benchmarks/faults.py " + " ".join(sys.argv[1:]),
            "home": "a scratch home under /tmp: a synthetic shop (120 users, 60 items), a tiny random two-tower champion",
            "service": {"runner": "serving.launcher.start_local (bentoml serve, 127.0.0.1)", "online_store": "redis",
                        "workers": {"kill and battery": 2,
                                    "store_hang and promotion": f"the default ({settings.serving.workers}: "
                                                                f"{settings.serving.worker_count()} here)"},
                        "auth": "the generated write token (<home>/secrets/serving_token)",
                        "settings_not_default": {"store_hang": STORE_HANG_SETTINGS,
                                                 "promotion": PROMOTION_SETTINGS}},
            "bounds": BOUNDS, **records,
            "build_s": round(build_s, 1), "total_s": round(time.monotonic() - started, 1),
        }
        result["bounds_met"] = all(records[p]["bounds_met"] for p in records if p in BOUNDS)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        summary = {p: {k: records[p].get(k) for k in ("acknowledged", "lost", "duplicated", "error_rate_after_restart",
                                                       "requests", "server_errors", "slow_over_2s", "feedback_p99_ms",
                                                       "recommend_p99_ms", "drained", "bounds_met") if k in records[p]}
                   for p in records}
        print(json.dumps(summary, indent=1))
        print(f"wrote {args.out} ({result['total_s']:.0f} s); every bound met: {result['bounds_met']}")
    finally:
        if args.keep:
            print(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    if Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        sys.path[0] = str(ROOT)  # benchmarks/serving.py would shadow the `serving` package
    from recflow.local_services import exit_on_sigterm

    exit_on_sigterm()  # a stopped run stops the services it started
    main()

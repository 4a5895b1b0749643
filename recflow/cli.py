"""The ``recflow`` command line.

Options that change settings (``--home``, the data options) become the overrides of this invocation
(``recflow.settings.flow_settings``), and the flows get them as their ``home`` and ``overrides``
parameters; nothing is written to the environment to pass settings. ``--verbose`` keeps the
libraries' own console output (``recflow.console``).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(
    name="recflow",
    help="Orchestrated MLOps workflow for personalised e-commerce recommendation.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
console = Console(stderr=True)

HomeOpt = Annotated[
    Path | None,
    typer.Option("--home", help="Data, store, model and log folder (RECFLOW_HOME; default ./.recflow).", show_default=False),
]
SourceOpt = Annotated[
    str | None,
    typer.Option("--source", help="'completejourney' (default) or 'generic' (your own files).", show_default=False),
]
InteractionsOpt = Annotated[
    Path | None,
    typer.Option("--interactions", help="Your interactions file (CSV or parquet); implies --source generic.", show_default=False),
]
ItemsOpt = Annotated[Path | None, typer.Option("--items", help="Optional items file (CSV or parquet).", show_default=False)]
UsersOpt = Annotated[Path | None, typer.Option("--users", help="Optional users file (CSV or parquet).", show_default=False)]
UntilOpt = Annotated[
    datetime | None,
    typer.Option("--until", help="Keep events at or after this UTC time out of the canonical table (holdout for replay).",
                 show_default=False),
]
MaxBadOpt = Annotated[
    float | None,
    typer.Option("--max-bad-share", help="Fail when a larger share of rows is rejected (default 0.05).", show_default=False),
]


DEMO_OUT = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "demo.json"  # `recflow demo`'s default


_invocation: dict[str, str | None] = {"home": None}  # the root options of this invocation (set by main)


def _home() -> str | None:
    """The ``--home`` of this invocation (None: ``RECFLOW_HOME`` or the default)."""
    return _invocation["home"]


def _data_options(
    source: str | None,
    interactions: Path | None,
    items: Path | None,
    users: Path | None,
    max_bad_share: float | None,
    until: datetime | None = None,
) -> dict[str, dict[str, Any]]:
    """The data options given on the command line, as settings overrides (``{"data": {...}}``)."""
    if interactions is not None and source is None:
        source = "generic"
    given = {"source": source, "interactions_path": interactions, "items_path": items, "users_path": users,
             "max_bad_share": max_bad_share, "until": until.isoformat() if until else None}
    data = {k: str(v.resolve()) if isinstance(v, Path) else v for k, v in given.items() if v is not None}
    return {"data": data} if data else {}


def _settings(overrides: dict[str, dict[str, Any]] | None = None):  # noqa: ANN202 - returns recflow.settings.Settings
    """Settings of this invocation: ``--home`` and ``overrides`` over the environment and the TOML file,
    loaded the way flows load them (``recflow.settings.flow_settings``); nothing is written to the environment."""
    from pydantic import ValidationError

    from recflow.settings import flow_settings

    try:
        return flow_settings(_home(), overrides)
    except (ValidationError, FileNotFoundError) as exc:
        console.print(f"[red]Invalid settings:[/red] {exc}")
        raise typer.Exit(2) from exc


PLAIN_PROGRESS_EVERY_S = 30.0  # without a terminal: a stage's unchanged step is repeated at most this often


def plain_progress_sink(print_line: Any, clock: Any = time.monotonic) -> Any:
    """A progress sink for output that is not a terminal (a log file, cron, a CI job), where rich
    shows its bars only once they are done: one line per new stage or step, the same step again at
    most every ``PLAIN_PROGRESS_EVERY_S`` seconds with its count, and a line when a stage completes."""
    started = clock()
    shown: dict[str, tuple[str, float, bool]] = {}  # stage -> (message, when, completed)

    def sink(stage: str, completed: float | None, total: float | None, message: str) -> None:
        now = clock()
        done = completed is not None and total is not None and completed >= total
        last = shown.get(stage)
        if last is not None and last[0] == message and last[2] == done and now - last[1] < PLAIN_PROGRESS_EVERY_S:
            return
        shown[stage] = (message, now, done)
        count = f" ({completed:g}/{total:g})" if completed is not None and total is not None else ""
        print_line(f"[{now - started:6.0f}s] {stage:<12} {message or stage}{count}")

    return sink


@contextmanager
def progress_bar() -> Iterator[None]:
    """Show recflow.progress reports as rich progress bars, one per stage (plain lines, rate-limited,
    when the output is not a terminal: :func:`plain_progress_sink`)."""
    from recflow.progress import reporting

    if not console.is_terminal:
        with reporting(plain_progress_sink(lambda line: console.print(line, markup=False, highlight=False))):
            yield
        return
    columns = (SpinnerColumn(), TextColumn("[bold]{task.fields[stage]:<12}"), BarColumn(),
               TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        tasks: dict[str, Any] = {}

        def sink(stage: str, completed: float | None, total: float | None, message: str) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(message or stage, total=total, stage=stage)
            bar.update(tasks[stage], completed=completed, total=total, description=message or stage)

        with reporting(sink):
            yield


def _fail(exc: BaseException, hint: str = "") -> typer.Exit:
    console.print(f"[red]Error:[/red] {exc}")
    if hint:
        console.print(hint)
    return typer.Exit(1)


def _print_ingest(report: dict[str, Any]) -> None:
    table = Table(title=f"Ingest ({report['source']})")
    for col in ("table", "rows", "accepted", "rejected", "reasons", "quarantine"):
        table.add_column(col)
    for name, t in report["tables"].items():
        table.add_row(
            name, f"{t['total_rows']:,}", f"{t['accepted_rows']:,}", f"{t['rejected_rows']:,}",
            ", ".join(f"{k}={v:,}" for k, v in t["rejected"].items()) or "-", t["quarantine_path"] or "-",
        )
    console.print(table)
    if report.get("note"):
        console.print(f"[yellow]source[/yellow]: {report['note']}")
    for name, t in report["tables"].items():
        for reason, rows in t["examples"].items():
            console.print(f"[yellow]{name}[/yellow] {reason}, e.g. row {rows[0].get('_row')}: "
                          f"{ {k: v for k, v in rows[0].items() if k not in ('_row', 'reason')} }")
        for note in t.get("notes", []):
            console.print(f"[yellow]{name}[/yellow] note: {note}")


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        console.print(f"recflow {version('recflow')}")
        raise typer.Exit()


@app.callback()
def main(
    home: HomeOpt = None,
    show_version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                               help="Print recflow's version and exit.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v",
                                          help="Also show the libraries' own logs and warnings (Prefect, Feast, Ray, ...).")] = False,
) -> None:
    """recflow: Prefect flows, a Feast feature store, a fine-tuned MiniLM two-tower model, BentoML, Evidently."""
    if not verbose:
        from recflow.console import quiet_libraries

        quiet_libraries()
    _invocation["home"] = str(home.resolve()) if home is not None else None


@app.command()
def ingest(
    source: SourceOpt = None,
    interactions: InteractionsOpt = None,
    items: ItemsOpt = None,
    users: UsersOpt = None,
    max_bad_share: MaxBadOpt = None,
    until: UntilOpt = None,
) -> None:
    """Validate a source and write the canonical events, items and users tables; bad rows go to quarantine."""
    from recflow.datasets import IngestError
    from recflow.datasets import ingest as run_ingest

    settings = _settings(_data_options(source, interactions, items, users, max_bad_share, until))
    try:
        with progress_bar():
            report = run_ingest(settings)
    except IngestError as exc:
        raise _fail(exc) from exc
    _print_ingest(report.to_dict())
    console.print(f"Canonical tables in {settings.paths.canonical} ({report.seconds:.1f} s)")


@app.command()
def features(
    start: Annotated[datetime | None, typer.Option(help="Materialise from (UTC, inclusive). Default: first feature row.")] = None,
    end: Annotated[datetime | None, typer.Option(help="Materialise until (UTC, exclusive). Default: after the last row.")] = None,
    skip_ingest: Annotated[bool, typer.Option("--skip-ingest", help="Reuse the canonical tables already written.")] = False,
    source: SourceOpt = None,
    interactions: InteractionsOpt = None,
    items: ItemsOpt = None,
    users: UsersOpt = None,
    max_bad_share: MaxBadOpt = None,
    until: UntilOpt = None,
) -> None:
    """Run the build_features flow: ingest, feature tables, feast apply, materialise [start, end)."""
    from recflow.datasets import IngestError

    overrides = _data_options(source, interactions, items, users, max_bad_share, until)
    settings = _settings(overrides)
    from flows.features import build_features

    try:
        with progress_bar():
            summary = build_features(start=start, end=end, skip_ingest=skip_ingest, home=str(settings.home),
                                     overrides=overrides)
    except (IngestError, FileNotFoundError, ValueError) as exc:
        raise _fail(exc) from exc
    if "ingest" in summary:
        _print_ingest(summary["ingest"])
    table = Table(title="Feature tables")
    table.add_column("table")
    table.add_column("rows", justify="right")
    for name, rows in summary["features"]["rows"].items():
        table.add_row(name, f"{rows:,}")
    console.print(table)
    m = summary["materialize"]
    console.print(
        f"Online store holds the latest values in [{m['start']}, {m['end']}) "
        f"({m['rows_in_window']:,} rows read, {m['seconds']:.1f} s). Home: {settings.home}"
    )


@app.command("training-set")
def training_set(
    entities: Annotated[Path, typer.Argument(help="Parquet/CSV with user_id, item_id, event_timestamp.")],
    out: Annotated[Path | None, typer.Option(help="Output parquet (default: <home>/training_sets/).")] = None,
) -> None:
    """Join point-in-time features of the training FeatureService to an entity frame."""
    import pandas as pd

    from recflow.features.training_set import build_training_set

    settings = _settings()
    if not entities.exists():
        raise _fail(FileNotFoundError(f"{entities} does not exist"))
    frame = pd.read_parquet(entities) if entities.suffix in (".parquet", ".pq") else pd.read_csv(entities, dtype="string")
    try:
        with console.status("joining features (point in time)"):
            result = build_training_set(settings, frame, out_path=out)
    except ValueError as exc:
        raise _fail(exc) from exc
    console.print(f"{result.rows:,} rows x {len(result.columns)} columns -> {result.path} ({result.seconds:.1f} s)")


@app.command()
def schedule(
    pool: Annotated[str | None, typer.Option(help="Register the deployments on the Prefect server's work pool.")] = None,
    serve: Annotated[bool, typer.Option("--serve", help="Run the schedules in this process instead.")] = False,
) -> None:
    """Register every flow's deployment (schedules, drift trigger) on a Prefect server, or serve them here."""
    from flows.deployments import deploy_all, deployments, serve_all

    if pool and serve or not (pool or serve):
        raise _fail(ValueError("give exactly one of --pool NAME or --serve"))
    home = str(_settings().home)  # every deployment's runs get this home as a parameter
    if serve:
        console.print(f"Serving {len(deployments(home))} deployment(s) for home {home}; Ctrl-C stops.")
        serve_all(home)
        return
    from prefect.exceptions import ObjectNotFound

    try:
        ids = deploy_all(pool, home)  # type: ignore[arg-type]
    except ObjectNotFound as exc:
        raise _fail(
            ValueError(f"work pool {pool!r} does not exist on the Prefect server"),
            f"Create it: prefect work-pool create {pool} --type process",
        ) from exc
    for d, i in zip(deployments(home), ids, strict=True):
        console.print(f"deployment [bold]{d.flow_name}/{d.name}[/bold] -> {i}")
    console.print(f"Start a worker: prefect worker start --pool {pool}")


@app.command()
def reports(
    serve: Annotated[bool, typer.Option("--serve", help="Serve the reports and the trend dashboard on 127.0.0.1 "
                                        "until Ctrl-C.")] = False,
    port: Annotated[int, typer.Option(help="Port for --serve (0: a free one).")] = 0,
    dashboard_port: Annotated[int, typer.Option(help="Port of the Evidently UI behind /dashboard (0: a free one).")] = 0,
) -> None:
    """Write the on-call index page linking every dated drift and quality report (and optionally serve it,
    with the Evidently workspace's trend dashboard at /dashboard)."""
    from monitoring.index import write_index

    settings = _settings()
    folder = settings.paths.reports
    folder.mkdir(parents=True, exist_ok=True)
    index = write_index(folder)
    runs = sum(1 for p in folder.iterdir() if p.is_dir())
    console.print(f"{runs} report run(s) indexed: {index}")
    if not serve:
        return
    import contextlib
    import signal
    import threading

    from monitoring.oncall import serve_oncall

    def _stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # SIGTERM stops like Ctrl-C: the Evidently UI child is stopped too

    signal.signal(signal.SIGTERM, _stop)
    try:
        with serve_oncall(settings, port=port, dashboard_port=dashboard_port) as urls:
            console.print(f"Reports: {urls['index']}", soft_wrap=True)
            console.print(f"Trend dashboard: {urls['dashboard'] or 'not available: ' + urls['dashboard_error']}",
                          soft_wrap=True)
            console.print("Ctrl-C stops")
            with contextlib.suppress(KeyboardInterrupt):
                threading.Event().wait()
    except OSError as exc:
        raise _fail(exc) from exc
    console.print("stopped")


@app.command()
def train(
    trials: Annotated[int | None, typer.Option(help="Ray Tune trials (default: settings.training.trials).")] = None,
    max_minutes: Annotated[float | None, typer.Option(help="Time budget of the search in minutes.")] = None,
    cutoff: Annotated[str | None, typer.Option(help="Validation start (ISO date, UTC). Default: 2 weeks before the data ends.")] = None,
) -> None:
    """Run the train flow: training set (Feast), Ray Tune search, test-week evaluation, registry, gated promotion."""
    settings = _settings()
    from flows.train import train as train_flow

    try:
        with progress_bar():
            summary = train_flow(trials=trials, max_minutes=max_minutes, cutoff=cutoff, home=str(settings.home))
    except (FileNotFoundError, ValueError) as exc:
        raise _fail(exc) from exc
    table = Table(title=f"Test week ({summary['cutoff'][:10]} cutoff): full-catalogue ranking")
    metrics = ("ndcg@10", "recall@20", "hitrate@10", "coverage", "ndcg@10_new", "ndcg@10_repeat")
    table.add_column("model")
    for m in metrics:
        table.add_column(m, justify="right")
    for name, values in summary["test"].items():
        table.add_row(name, *(f"{values.get(m, float('nan')):.4f}" for m in metrics))
    console.print(table)
    verdict = ("[green]promoted[/green]" if summary["promoted"] else
               f"[cyan]the canary for {summary['canary']['share']:.0%} of users[/cyan]" if summary.get("canary") else
               "[yellow]not promoted[/yellow]")
    console.print(f"Registered [bold]{summary['tag']}[/bold], {verdict}: {summary['promotion']['reason']}")
    console.print(f"Champion: {summary['champion']}; {summary['seconds'].get('total', 0):.0f} s")


@app.command()
def serve(
    port: Annotated[int | None, typer.Option(help="Port (default: settings.serving.port).")] = None,
    host: Annotated[str | None, typer.Option(help="Interface (default 127.0.0.1).")] = None,
    workers: Annotated[int | None, typer.Option(min=1, max=64, help="Worker processes (default: settings.serving.workers; 0 = one per CPU core, at most 4).")] = None,
) -> None:
    """Run the BentoML recommendation service in the foreground with the champion model."""
    from recflow import registry
    from serving.launcher import serve as run_serve

    settings = _settings()
    if workers is not None:
        settings = settings.model_copy(update={"serving": settings.serving.model_copy(update={"workers": workers})})
    if settings.serving.model_path is None and settings.serving.model_tag is None and registry.get_champion(settings) is None:
        raise _fail(FileNotFoundError(f"no champion model under {settings.paths.models}"),
                    "Train one first: recflow train (or recflow demo)")
    try:
        code = run_serve(settings, port=port, host=host, say=lambda m: console.print(m, markup=False, highlight=False, soft_wrap=True))
    except ValueError as exc:  # auth_disabled on a host other than loopback
        raise _fail(exc) from exc
    raise typer.Exit(code)


@app.command()
def deploy(
    model_tag: Annotated[str | None, typer.Option(help="BentoML model tag (default: the champion).")] = None,
    reload_url: Annotated[str | None, typer.Option(help="Also ask the service at this URL to /reload the champion.")] = None,
) -> None:
    """Run the deploy flow: build a bento (service + champion model + text encoder) and print its tag."""
    settings = _settings()
    from flows.deploy import deploy as deploy_flow

    try:
        result = deploy_flow(model_tag=model_tag, reload_url=reload_url, home=str(settings.home))
    except (FileNotFoundError, ValueError, LookupError) as exc:
        raise _fail(exc, "Train a model first: recflow train") from exc
    sys.stdout.write(result["bento"] + "\n")
    console.print(f"Serve it: BENTOML_HOME={settings.paths.bentoml_home} bentoml serve {result['bento']}\n"
                  f"Container: BENTOML_HOME={settings.paths.bentoml_home} bentoml containerize {result['bento']}")


@app.command()
def models() -> None:
    """List registered models and show which one is the champion."""
    from recflow import registry

    settings = _settings()
    champion = registry.get_champion(settings)
    table = Table(title=f"Models in {settings.paths.bentoml_home}")
    for col in ("tag", "created", "champion", "test ndcg@10"):
        table.add_column(col)
    for m in registry.list_models(settings):
        ndcg = ((m.get("metadata") or {}).get("metrics") or {}).get("test", {}).get("ndcg@10")
        table.add_row(str(m.get("tag")), str(m.get("created", ""))[:19],
                      "yes" if champion and champion.get("tag") == str(m.get("tag")) else "",
                      f"{ndcg:.4f}" if isinstance(ndcg, float) else "")
    console.print(table)


@app.command()
def rollback(
    reason: Annotated[str, typer.Option(help="Why (kept in the champion pointer's history).")] = "manual rollback",
    reload_url: Annotated[str | None, typer.Option(help="Ask the service at this URL to /reload afterwards.")] = None,
) -> None:
    """Restore the previous champion (atomic pointer swap); optionally make a running service reload."""
    from recflow import registry

    settings = _settings()
    try:
        pointer = registry.rollback(settings, reason=reason)
    except (LookupError, ValueError, FileNotFoundError) as exc:
        raise _fail(exc) from exc
    console.print(f"champion is now [bold]{pointer['tag']}[/bold]")
    if reload_url:
        import httpx

        from recflow.reload import reload_service

        try:
            answer = reload_service(settings, reload_url)
        except httpx.HTTPError as exc:
            raise _fail(RuntimeError(f"the champion was rolled back, but {reload_url}/reload failed ({exc}); the "
                                     "service picks the pointer up within serving.champion_poll_s, or call /reload "
                                     "again")) from exc
        console.print(f"reload: {answer}")


@app.command()
def canary(
    start: Annotated[str | None, typer.Option(help="Make this registered model (name:version) the canary.")] = None,
    share: Annotated[float | None, typer.Option(help="With --start: the share of users it serves (default: "
                                                 "canary.share, or 0.1 when that is 0).")] = None,
    decide: Annotated[bool, typer.Option("--decide", help="Compare the arms now and promote or roll back on a "
                                         "verdict (what the monitor flow does).")] = False,
    end: Annotated[str | None, typer.Option(help="End it by hand: promote or rollback.")] = None,
    reason: Annotated[str, typer.Option(help="Why (kept in the canary history and the champion pointer).")] = "manual",
) -> None:
    """The canary before promotion: show the running one and how its users fare against the champion's;
    start one, decide now, or end it by hand. Workers that serve the champion follow it within
    serving.champion_poll_s."""
    from monitoring import canary as analysis
    from recflow import canary as pointer_io

    settings = _settings()
    try:
        if start:
            chosen = share if share is not None else (settings.canary.share or 0.1)
            p = pointer_io.start(settings, start, chosen, reason)
            console.print(f"canary [bold]{p['tag']}[/bold] serves {p['share']:.0%} of users (champion {p['champion']})")
            return
        if end:
            if end not in ("promote", "rollback"):
                raise ValueError(f"--end {end!r}: say promote or rollback")
            record = pointer_io.end(settings, end, reason)  # type: ignore[arg-type]
            console.print(f"canary {record['tag']} ended: {end}")
            return
        result = analysis.run(settings, act=decide)
    except (LookupError, ValueError, FileNotFoundError) as exc:
        raise _fail(exc) from exc
    if result is None:
        console.print("No canary is running (start one with --start, or set canary.share so retrain starts one).")
        return
    console.print(f"canary [bold]{result['canary']}[/bold] ({result['share']:.0%} of users) vs champion "
                  f"{result['champion']}: {result['action']}{' (done)' if result['acted'] else ''}\n  {result['reason']}")
    console.print(f"Report: {result['report']}")


@app.command()
def monitor(
    end: Annotated[str | None, typer.Option(help="Window end (ISO date/time, UTC). Default: the end of today.")] = None,
    days: Annotated[int | None, typer.Option(help="Window length in days (default: monitoring.window_days).")] = None,
    emit: Annotated[bool, typer.Option(help="Emit recflow.drift.detected to Prefect on drift.")] = True,
    offline: Annotated[bool, typer.Option("--offline", help="Monitor the champion's answers for the window's baskets "
                                          "computed offline (a control; no service needed, no event).")] = False,
) -> None:
    """Run the monitor flow: Evidently drift and quality reports against the champion's reference, policy decision."""
    settings = _settings()
    from flows.monitor import monitor as monitor_flow

    try:
        with progress_bar():
            result = monitor_flow(end=end, days=days, home=str(settings.home), emit=emit, offline=offline)
    except (FileNotFoundError, ValueError) as exc:
        raise _fail(exc) from exc
    colour = {"drift": "red", "ok": "green"}.get(result["verdict"], "yellow")
    console.print(f"[{colour}]{result['verdict']}[/{colour}] in {result['window']} (champion {result['champion']})")
    for reason in result["reasons"]:
        console.print(f"  - {reason}")
    console.print(f"Reports: {result['run_dir']}\nOn-call page: {result['index']}")


@app.command("refresh-items")
def refresh_items(
    as_of: Annotated[str | None, typer.Option(help="As-of time (ISO date/time, UTC). Default: today 00:00 UTC.")] = None,
    reload_url: Annotated[str | None, typer.Option(help="Ask the service at this URL to /reload at once.")] = None,
) -> None:
    """Run the refresh_items flow: the champion's two-stage item side (popularity, trend, launches,
    co-purchase) recomputed as of a day, weights unchanged; the service loads it at its next poll."""
    settings = _settings()
    from flows.refresh_items import refresh_items as refresh_flow

    try:
        with progress_bar():
            result = refresh_flow(as_of=as_of, home=str(settings.home), service_url=reload_url)
    except (FileNotFoundError, ValueError) as exc:
        raise _fail(exc) from exc
    if result["model"] is None:
        console.print("The champion has no two-stage ranker: nothing to refresh.")
        return
    console.print(f"Item side of {result['model']} as of {result['as_of']} from {result['events']:,} purchase lines "
                  f"in {result['seconds']:.1f} s: {result['folder']}")


@app.command()
def retrain(
    full: Annotated[bool, typer.Option("--full", help="Train a new model from scratch instead of warm-starting.")] = False,
    as_of: Annotated[str | None, typer.Option(help="End of the gate week (ISO date). Default: the day after the newest event.")] = None,
    reload_url: Annotated[str | None, typer.Option(help="Ask the service at this URL to /reload a promoted model.")] = None,
    skip_features: Annotated[bool, typer.Option("--skip-features", help="Do not rebuild features from the event log first.")] = False,
) -> None:
    """Run the retrain flow: features with feedback, warm start from the champion, gate, atomic promotion."""
    settings = _settings()
    from flows.retrain import retrain as retrain_flow

    try:
        with progress_bar():
            r = retrain_flow(full=full, as_of=as_of, refresh_features=not skip_features, reload_url=reload_url,
                             home=str(settings.home))
    except (FileNotFoundError, ValueError, LookupError) as exc:
        raise _fail(exc) from exc
    verdict = ("[green]promoted[/green]" if r["promoted"] else
               f"[cyan]the canary for {r['canary']['share']:.0%} of users[/cyan]" if r.get("canary") else
               "[yellow]rejected[/yellow]")
    console.print(f"challenger {r['challenger']} {verdict}: {r['gate']['reason']}\nchampion: {r['champion_after']}")


@app.command()
def replay(
    url: Annotated[str, typer.Option(help="Base URL of the running service.")] = "http://127.0.0.1:3000",
    from_: Annotated[datetime, typer.Option("--from", help="First day replayed (UTC).")] = datetime(2017, 10, 1),
    days: Annotated[int, typer.Option(help="Days to replay.")] = 7,
    concurrency: Annotated[int, typer.Option(help="Users replayed at once.")] = 8,
) -> None:
    """Feed real events day by day through /recommend and /feedback of a running service, as live traffic."""
    from recflow.replay import replay as run_replay

    settings = _settings()
    try:
        with progress_bar():
            results = run_replay(settings, url, from_, days, concurrency=concurrency)
    except (FileNotFoundError, ValueError) as exc:
        raise _fail(exc) from exc
    table = Table(title=f"Replay through {url}")
    for col in ("day", "users", "recommend", "feedback", "errors", "fallback", "p50 ms", "p99 ms", "s"):
        table.add_column(col, justify="right")
    for r in results:
        s = r.summary()
        table.add_row(s["day"], str(s["users"]), str(s["recommend_calls"]), str(s["feedback_calls"]), str(s["errors"]),
                      str(s["fallback"]), str(s["p50_ms"]), str(s["p99_ms"]), str(s["seconds"]))
    console.print(table)
    if any(r.errors for r in results):
        console.print(f"[red]errors[/red], e.g. {next(r.error_examples for r in results if r.errors)[:2]}")
        raise typer.Exit(1)


@app.command()
def demo(
    out: Annotated[Path | None, typer.Option(help="Where to write the summary JSON.")] = None,
    replay_days: Annotated[int | None, typer.Option(help="Days replayed (default: demo.replay_days).")] = None,
) -> None:
    """The closed loop on the embedded data: features, train, deploy, serve, replay, monitor, retrain, report."""
    from demo.closed_loop import run_demo

    settings = _settings()
    if replay_days:
        settings = settings.model_copy(update={"demo": settings.demo.model_copy(update={"replay_days": replay_days})})
    try:
        summary = run_demo(settings, out=out or DEMO_OUT, say=lambda m: console.print(m, highlight=False, markup=False, soft_wrap=True))
    except (FileNotFoundError, ValueError, LookupError) as exc:
        raise _fail(exc) from exc
    models = summary["models"]
    table = Table(title="recflow demo")
    table.add_column("")
    table.add_column("value")
    table.add_row("first champion", models["first_champion"])
    table.add_row("final champion", models["final_champion"])
    table.add_row("challengers", ", ".join(models["challengers"]) or "none")
    for m in summary["monitor_runs"]:
        table.add_row(f"monitor {m['window']}", f"{m['verdict']}: " + "; ".join(m["reasons"])[:300])
    table.add_row("drift detected", str(summary["drift_detected_on"]))
    for c in summary.get("canary", {}).get("verdicts", []):
        table.add_row(f"canary {c['canary']} at {c['at'][:10]}", f"{c['action']}: {c['reason']}"[:300])
    for g in summary["gate_decisions"]:
        right = {True: "right", False: "WRONG", None: "not judged"}[g["correct"]]
        table.add_row(f"gate decision {g['decided_at'][:10]}", f"{'promoted' if g['promoted'] else 'not promoted'}: {right}")
    table.add_row(f"NDCG@10 week from {summary['next_week']['start']}, first champion", f"{summary['ndcg_next_week_before']:.4f}")
    table.add_row(f"NDCG@10 week from {summary['next_week']['start']}, final champion", f"{summary['ndcg_next_week_after']:.4f}")
    for tag, values in summary["next_week"]["challengers"].items():
        table.add_row(f"NDCG@10 same week, challenger {tag}", f"{values['ndcg@10']:.4f}")
    beat = summary["retraining_beat_no_retraining"]
    table.add_row("retraining beat not retraining", "no retrain promoted" if beat is None else ("yes" if beat else "no"))
    table.add_row("wall time", f"{summary['wall_s']:.0f} s")
    table.add_row("reports", summary["reports_index"])
    console.print(table)


@app.command()
def forget(
    user_id: Annotated[str, typer.Argument(help="The user id to erase, as the shop knows it.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Erase a user: event log, request logs, canonical and feature tables, online store; later ingests leave them out."""
    from recflow.privacy import forget as run_forget
    from recflow.privacy import report_dict
    from recflow.security import InsecureSecret

    settings = _settings()
    try:
        report = run_forget(settings, user_id)
    except (InsecureSecret, OSError, ValueError) as exc:
        raise _fail(exc, "Nothing after the failing step was erased; fix it and run `recflow forget` again.") from exc
    if as_json:
        sys.stdout.write(json.dumps(report_dict(report), indent=2) + "\n")
    else:
        console.print(f"Erased user {user_id!r} (pseudonym {report.user_pseudonym}) from {settings.home}:")
        for line in report.lines():
            console.print(f"  - {line}", markup=False, highlight=False)
        console.print("Later ingests leave this user out (register: <home>/secrets/forgotten_users). Run "
                      "`recflow features` to rebuild and re-materialise without them.")
    if len(report.not_erased) > 1:  # more than the standing note about trained models
        raise typer.Exit(1)


@app.command()
def config() -> None:
    """Print the effective settings (defaults, TOML file and RECFLOW_* environment applied) as JSON."""
    settings = _settings()
    sys.stdout.write(json.dumps(json.loads(settings.model_dump_json()), indent=2) + "\n")


if __name__ == "__main__":  # pragma: no cover
    app()

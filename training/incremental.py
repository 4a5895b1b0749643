"""Incremental retraining: warm start from the champion, a replay sample against forgetting, the gate.

- :func:`warm_start` copies a trained model's weights into a freshly built one. Parameters keyed
  by item id (id embedding, id bias, repeat bias) are copied row by row through the item ids, so a
  changed id vocabulary (new items, items that became frequent) keeps every weight that still
  has a home; everything else is copied where the shapes match.
- :func:`replay_sample` keeps every training example of the most recent weeks and a random share
  of the older ones (experience replay).
- :func:`gate` compares a challenger with the champion on the same held-out days.

Pure torch/numpy: no Feast, Prefect or BentoML.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from recflow.modeling.model import RecModel
from training.train_data import TrainData

if TYPE_CHECKING:
    from recflow.settings import TrainingSettings

ID_KEYED = ("id_emb.weight", "id_bias.weight", "repeat_bias.weight")
# Buffers that describe the catalogue or the data window of the new model, never copied.
CATALOGUE_BUFFERS = ("text_emb", "item_text", "item_id_row", "popularity")


@dataclass
class WarmStartReport:
    """What :func:`warm_start` copied."""

    copied: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    id_rows_copied: int = 0
    id_rows_new: int = 0


def _id_row_map(model: RecModel, init: RecModel) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (new id row, old id row) of items that have an id row in both models."""
    new_rows = model.item_id_row.cpu().numpy()
    old_rows = init.item_id_row.cpu().numpy()
    old_pos = init.positions
    ids = model.item_ids
    old_idx = np.fromiter((old_pos.get(i, -1) for i in ids), dtype=np.int64, count=len(ids))
    ok = (new_rows > 0) & (old_idx >= 0)
    ok[ok] &= old_rows[old_idx[ok]] > 0
    pairs = np.unique(np.stack([new_rows[ok], old_rows[old_idx[ok]]], 1), axis=0) if ok.any() else np.zeros((0, 2), np.int64)
    return pairs[:, 0], pairs[:, 1]


@torch.no_grad()
def warm_start(model: RecModel, init: RecModel) -> WarmStartReport:
    """Copy ``init``'s weights into ``model`` (same architecture, possibly another id vocabulary)."""
    rep = WarmStartReport()
    new_state = model.state_dict()
    old_state = init.state_dict()
    new_rows, old_rows = _id_row_map(model, init)
    same_vocab = init.config.profile_vocab == model.config.profile_vocab
    for name, tensor in new_state.items():
        if name in CATALOGUE_BUFFERS:
            continue
        old = old_state.get(name)
        if name.startswith("profile_emb.") and not same_vocab:
            rep.skipped[name] = "profile vocabulary changed"
        elif old is None:
            rep.skipped[name] = "not in the champion"
        elif name in ID_KEYED:
            if len(new_rows):
                tensor[torch.from_numpy(new_rows)] = old[torch.from_numpy(old_rows)].to(tensor.dtype)
            tensor[0] = old[0].to(tensor.dtype)  # the shared cold-start row
            rep.copied.append(name)
        elif old.shape != tensor.shape:
            rep.skipped[name] = f"shape {tuple(old.shape)} -> {tuple(tensor.shape)}"
        else:
            tensor.copy_(old.to(tensor.dtype))
            rep.copied.append(name)
    model.load_state_dict(new_state)
    rep.id_rows_copied = len(new_rows)
    rep.id_rows_new = int((model.item_id_row.cpu().numpy() > 0).sum()) - len(new_rows)
    return rep


def replay_sample(data: TrainData, recent_weeks: int, replay_share: float, seed: int = 0) -> dict[str, int]:
    """Keep every example of the last ``recent_weeks`` training anchors and ``replay_share`` of the
    older ones (in place on ``data.train``). Returns the counts kept."""
    if not 0.0 <= replay_share <= 1.0:
        raise ValueError(f"replay_share must be in [0, 1], got {replay_share}")
    n_train = len(data.anchors) - 3  # anchors = train..., validation, test, end
    anchor = data.train.anchor
    recent = anchor >= n_train - recent_weeks
    rng = np.random.default_rng(seed)
    keep = recent | (rng.random(len(anchor)) < replay_share)
    data.train = data.train.select(np.flatnonzero(keep))
    return {"recent": int(recent.sum()), "replayed": int((keep & ~recent).sum()), "older_total": int((~recent).sum())}


@dataclass
class GateDecision:
    """Whether the challenger may replace the champion, and why."""

    promote: bool
    metric: str
    champion: float
    challenger: float
    margin: float
    reason: str
    champion_metrics: dict[str, float] = field(default_factory=dict)
    challenger_metrics: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def gate(
    champion: dict[str, float], challenger: dict[str, float], *, metric: str = "ndcg@10", margin: float = 0.01,
    guard_metrics: tuple[str, ...] = ("ndcg@10_new",), guard_tolerance: float = 0.1,
) -> GateDecision:
    """Promote only when ``challenger[metric] >= champion[metric] * (1 + margin)`` and no guard
    metric falls more than ``guard_tolerance`` (relative) below the champion's."""
    ch, cl = float(champion[metric]), float(challenger[metric])
    need = ch * (1 + margin)
    reasons = []
    ok = cl >= need and np.isfinite(cl)
    reasons.append(
        f"{metric} {cl:.4f} vs champion {ch:.4f}: {'+' if cl >= ch else ''}{(cl / ch - 1) if ch else 0:.1%} "
        f"({'meets' if ok else 'misses'} the required +{margin:.1%})"
    )
    for g in guard_metrics:
        if g in champion and g in challenger and champion[g] > 0:
            drop = 1 - challenger[g] / champion[g]
            if drop > guard_tolerance:
                ok = False
                reasons.append(f"{g} fell {drop:.1%} (tolerance {guard_tolerance:.0%})")
    return GateDecision(bool(ok), metric, ch, cl, margin, "; ".join(reasons), dict(champion), dict(challenger))


def promotion_decision(t: TrainingSettings, champion: dict[str, Any] | None,
                       challenger: dict[str, float]) -> dict[str, Any]:
    """Whether the train flow promotes its model: through :func:`gate` (the retrain flow's gate)
    against the champion's figures on the same week; the first model of an empty registry is
    promoted without one. Returns ``{promote, reason, gate}`` (``gate``: the gate's
    figures, None when no gate ran)."""
    if not t.promote:
        return {"promote": False, "reason": "training.promote=false: registered, not promoted", "gate": None}
    if champion is None:
        return {"promote": True, "reason": "first model of an empty registry (no champion yet): promoted without a gate",
                "gate": None}
    if "error" in champion:
        return {"promote": False, "gate": None,
                "reason": f"not promoted: the champion {champion['tag']} could not be evaluated on the test week "
                          f"({champion['error']}), so the gate cannot compare the two; the challenger is registered"}
    decision = gate(champion["metrics"], challenger, metric=t.promotion_metric, margin=t.promotion_margin)
    verdict = "promoted" if decision.promote else "not promoted"
    return {"promote": decision.promote, "gate": decision.to_dict(),
            "reason": f"{verdict}: gate against champion {champion['tag']} ({champion['kind']}) on the "
                      f"{champion['week']} week: {decision.reason}"}


GATE_TABLE_METRICS = ("ndcg@10", "recall@20", "hitrate@10", "ndcg@10_new", "ndcg@10_repeat", "coverage")


def retrain_window(events: pd.DataFrame, as_of: Any, t: TrainingSettings, full: bool
                   ) -> tuple[pd.DataFrame, pd.Timestamp, pd.Timestamp, int]:
    """A retrain's window: the events before the gate week's end (``as_of``, default the day after the
    newest event), that end, the gate week's start, and the weeks of examples (``t.train_weeks`` for a
    full retrain, else the recent plus the replayed weeks)."""
    from recflow.timeutil import to_utc

    end = to_utc(as_of) if as_of else events["event_timestamp"].max().normalize() + pd.Timedelta(days=1)
    weeks = t.train_weeks if full else t.retrain_recent_weeks + t.retrain_replay_weeks
    return events[events["event_timestamp"] < end], end, end - pd.Timedelta(days=t.eval_days), weeks


def retrain_markdown(champion: str, challenger: str, champ: dict[str, float], chall: dict[str, float],
                     decision: GateDecision, gate_week: str, after: str) -> str:
    """The retrain report (a Prefect artifact): both models on the gate week, the decision, the champion now."""
    verdict = "promoted" if decision.promote else "rejected"
    rows = "\n".join(f"| {m} | {champ[m]:.4f} | {chall[m]:.4f} |" for m in GATE_TABLE_METRICS)
    return (f"# Retrain: challenger {verdict}\n\n| | champion `{champion}` | challenger `{challenger}` |\n|---|---:|---:|\n"
            f"{rows}\n\nGate week {gate_week}: {decision.reason}.\n\nChampion now: `{after}`.\n")

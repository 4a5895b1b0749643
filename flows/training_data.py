"""The training data of a temporal window, for the flows that train and evaluate.

It joins the layers, so it lives above them: the point-in-time training set comes from the feature
store (``recflow.features.training_set``), the item texts' MiniLM vectors and the tensors from
``training``. ``recflow/`` itself imports none of ``training``, ``serving``, ``monitoring`` or
``flows`` (``tests/code/test_layering.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pandas as pd

from recflow.features.training_set import build_training_set
from recflow.settings import Settings

if TYPE_CHECKING:
    from feast import FeatureStore

    from training.train_data import TrainData


def window_data(
    settings: Settings,
    *,
    cutoff: pd.Timestamp,
    train_weeks: int,
    events: pd.DataFrame,
    store: FeatureStore | None = None,
    name: str = "window",
    progress: Callable[[str], None] | None = None,
) -> TrainData:
    """The training data of a temporal window: ``train_weeks`` weekly anchors before ``cutoff``,
    the validation week from ``cutoff`` and the test week after it (when ``events`` cover it), with
    point-in-time user features from the training FeatureService and the catalogue's MiniLM text
    embeddings (cached). Used by the train and retrain flows and the demo's evaluations."""
    import pyarrow.parquet as pq

    from training.examples import entity_frame, split_anchors, to_utc
    from training.pipeline import default_encoder_dir, encoder_config, text_embeddings
    from training.train_data import prepare_data

    say = progress or (lambda _m: None)
    t = settings.training
    cut = to_utc(cutoff)
    train_anchors, val_anchor, test_anchor = split_anchors(cut, train_weeks, t.eval_days)
    entities = entity_frame(events, [*train_anchors, val_anchor, test_anchor], t.eval_days)
    ts = build_training_set(settings, entities, out_path=settings.paths.training_sets / f"{name}.parquet", store=store)
    say(f"training set {name}: {ts.rows:,} rows in {ts.seconds:.1f}s")
    items = pd.read_parquet(settings.paths.items)
    emb, info = text_embeddings(items, settings.paths.cache, max_length=t.text_max_length, progress=say)
    enc = default_encoder_dir()
    return prepare_data(
        events=events, items=items, training_set=pq.read_table(ts.path),
        item_popularity=pd.read_parquet(settings.paths.feature_table("item_popularity")), cutoff=cut,
        train_weeks=train_weeks, text_emb=emb, encoder=encoder_config(enc), encoder_dir=str(enc), eval_days=t.eval_days,
    )

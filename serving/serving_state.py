"""What the service serves: a model, its item index and the catalogue, loaded as one snapshot.

:func:`load_state` resolves and reads the model (``serving.model_source``), reads item titles,
categories and current popularity through the Feast ``item_index_v1`` service, adds cold-start
items (in the catalogue, unknown to the model) from their text, builds the item index, its scorers
(``serving.scorers``) and the popularity fallback. The result is immutable: a reload builds a new
:class:`ServingState` and swaps one reference.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from recflow.feature_definitions import ITEM_INDEX_SERVICE
from recflow.settings import Settings
from serving.model_source import ChampionFallback, ModelSource, read_champion, read_model, resolve_model
from serving.scorers import AnnScorer, ExactScorer

if TYPE_CHECKING:
    from feast import FeatureStore

    from recflow.modeling import ItemIndex, RecModel
    from recflow.ranker import TwoStage
    from serving.tower import PositionLookup

log = logging.getLogger("recflow.serving")
ITEM_READ_CHUNK = 5000


@dataclass
class ItemCatalogue:
    """Item attributes aligned with the model's item positions."""

    titles: np.ndarray  # object [N]
    categories: np.ndarray  # object [N]
    departments: np.ndarray  # object [N]
    popularity: dict[str, np.ndarray]  # raw item_popularity features [N] (NaN = unknown)
    pop_order: np.ndarray  # positions, most popular first
    pop_score: np.ndarray  # float32 [N]: purchases_30d (0 when unknown)
    _by_category: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def category_rows(self, category: str) -> np.ndarray | None:
        """Positions of the items whose category or department equals ``category`` (case-insensitive),
        or None when no item has it."""
        key = category.strip().casefold()
        if key not in self._by_category:
            cats = np.char.lower(np.asarray(self.categories, dtype=str))
            deps = np.char.lower(np.asarray(self.departments, dtype=str))
            rows = np.flatnonzero((cats == key) | (deps == key))
            if len(rows) == 0:
                return None
            self._by_category[key] = rows
        return self._by_category[key]

    def popular_rows(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Positions by popularity, most popular first (all items, or only ``rows``)."""
        if rows is None:
            return self.pop_order
        return rows[np.argsort(-self.pop_score[rows], kind="stable")]


@dataclass
class ServingState:
    """One loaded model snapshot (replaced as a whole on reload)."""

    model: RecModel
    index: ItemIndex
    scorer: ExactScorer
    ann: AnnScorer | None
    catalogue: ItemCatalogue
    version: str
    source: ModelSource
    loaded_at: str
    load_seconds: float
    cold_start_items: int = 0
    fallback: ChampionFallback | None = None  # set when a previous champion serves because the champion failed
    two_stage: TwoStage | None = None  # the /recommend ranker (candidates + LightGBM), when the model has one
    two_stage_to_state: np.ndarray | None = None  # [N_ranker] position in this state's index
    state_to_two_stage: np.ndarray | None = None  # [N] position in the ranker's catalogue (-1: unknown to it)

    @property
    def n_items(self) -> int:
        return len(self.index)

    @cached_property
    def lookup(self) -> PositionLookup:
        """Item id -> index position, vectorised (the user tower's history lookup)."""
        from serving.tower import PositionLookup

        return PositionLookup(self.index.item_ids)


def read_item_features(store: FeatureStore, item_ids: list[str]) -> dict[str, list[Any]]:
    """``item_index_v1`` online features for ``item_ids`` (names without the view prefix)."""
    fs = store.get_feature_service(ITEM_INDEX_SERVICE)
    out: dict[str, list[Any]] = {}
    for s in range(0, len(item_ids), ITEM_READ_CHUNK):
        chunk = item_ids[s : s + ITEM_READ_CHUNK]
        got = store.get_online_features(features=fs, entity_rows=[{"item_id": i} for i in chunk]).to_dict()
        for name, values in got.items():
            out.setdefault(name, []).extend(values)
    return out


def _offline_catalogue(settings: Settings) -> tuple[list[str], list[str]] | None:
    """(item ids, texts) of the offline item catalogue table, when this machine has it."""
    path = settings.paths.feature_table("item_catalog")
    if not path.is_file():
        return None
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["item_id", "text", "title"]).to_pandas()
    text = table["text"].fillna(table["title"]).fillna("").astype(str)
    return table["item_id"].astype(str).tolist(), text.tolist()


def _build_catalogue(model: RecModel, feats: dict[str, list[Any]]) -> ItemCatalogue:
    n = len(model.item_ids)

    def col(name: str, dtype: Any = object) -> np.ndarray:
        values = feats.get(name)
        if values is None:
            return np.full(n, None if dtype is object else np.nan, dtype=dtype)
        if dtype is object:
            return np.asarray(values, dtype=object)
        return np.asarray([np.nan if v is None else v for v in values], dtype=dtype)

    pop = {name: col(name, np.float64) for name in model.config.popularity_features}
    score = np.nan_to_num(pop.get("purchases_30d", np.zeros(n)), nan=0.0)
    tie = np.nan_to_num(pop.get("buyers_30d", np.zeros(n)), nan=0.0)
    order = np.lexsort((np.arange(n), -tie, -score))
    titles = col("title")
    missing = np.array([t is None for t in titles], dtype=bool)
    if missing.any():  # fall back to the model's item text
        texts = model.texts
        rows = model.item_text.cpu().numpy()
        titles[missing] = [texts[r] or None for r in rows[missing]]
    return ItemCatalogue(
        titles=titles, categories=col("category"), departments=col("department"),
        popularity=pop, pop_order=order, pop_score=score.astype(np.float32),
    )


def load_state(settings: Settings, store: FeatureStore, model_path: Path | None = None) -> ServingState:
    """Load and index the model to serve (see the module docstring). A champion whose files cannot be
    read is replaced by the previous champion (``ServingState.fallback`` says so). Slow: run it off the
    event loop."""
    from recflow.modeling import build_index

    started = time.perf_counter()
    src = resolve_model(settings, model_path)
    fallback = None
    if src.source == "champion":
        src, model, ts, fallback = read_champion(settings, src)
    else:
        model, ts = read_model(settings, src)
    added = 0
    offline = _offline_catalogue(settings)
    if offline is not None:
        known = model.positions
        new = [(i, t) for i, t in zip(*offline, strict=True) if i not in known]
        if new and model.tokenizer is not None:
            t0 = time.perf_counter()
            added = model.add_items([i for i, _ in new], [t for _, t in new])
            log.info("cold start: %d catalogue item(s) unknown to the model added from their text (%.1f s)",
                     added, time.perf_counter() - t0)
    feats = read_item_features(store, list(model.item_ids))
    catalogue = _build_catalogue(model, feats)
    known_pop = np.isfinite(catalogue.popularity[model.config.popularity_features[0]])
    popularity = catalogue.popularity if known_pop.any() else None  # None: the snapshot saved with the model
    index = build_index(model, popularity)
    scorer = ExactScorer(index, settings.serving.item_dtype)
    ann = AnnScorer(index, settings.serving.ann_nlist, settings.serving.ann_nprobe) if settings.serving.index == "ann" else None
    from datetime import UTC, datetime

    two_stage, to_state, to_ranker = _load_two_stage(ts, src.folder, list(index.item_ids))
    if two_stage is not None and settings.serving.compile_ranker:
        two_stage = _compiled(two_stage, settings)
    state = ServingState(
        model=model, index=index, scorer=scorer, ann=ann, catalogue=catalogue, version=src.version, source=src,
        loaded_at=datetime.now(UTC).isoformat(timespec="seconds"), load_seconds=time.perf_counter() - started,
        cold_start_items=added, fallback=fallback, two_stage=two_stage, two_stage_to_state=to_state,
        state_to_two_stage=to_ranker,
    )
    model.eval()
    _ = state.lookup  # built now, not on the first request
    log.info("model %s loaded from %s (%s): %d items, index %s, /recommend %s, %.1f s", state.version, src.folder,
             src.source, state.n_items, ann.name if ann else scorer.name,
             "two-stage ranker" if two_stage is not None else "two-tower", state.load_seconds)
    return state


def _compiled(ts: TwoStage, settings: Settings) -> TwoStage:
    """``ts`` with its ranker's trees compiled (``serving.compile_ranker``), or ``ts`` as it is, with a
    warning, when they cannot be (LightGBM then predicts the same scores, slower)."""
    import dataclasses

    from recflow.ranker.compiled import CACHE_DIR, compile_ranker

    try:
        ranker, seconds = compile_ranker(ts.ranker, settings.paths.cache / CACHE_DIR)
    except Exception as exc:  # noqa: BLE001 - LightGBM serves the same scores
        log.warning("the ranker's trees could not be compiled (%s: %s); LightGBM predicts (slower). Set "
                    "serving.compile_ranker=false to skip this attempt", type(exc).__name__, str(exc)[:200])
        return ts
    log.info("ranker trees compiled (lleaves) in %.1f s", seconds)
    return dataclasses.replace(ts, ranker=ranker)


def _load_two_stage(
    ts: TwoStage | None, folder: Path, item_ids: list[str]
) -> tuple[TwoStage | None, np.ndarray | None, np.ndarray | None]:
    """The two-stage ranker ``ts`` read from ``folder`` and its position maps to and from the index, or
    Nones without one."""
    from recflow.registry import RANKER_DIR

    if ts is None:
        return None, None, None
    import pandas as pd

    path = Path(folder) / RANKER_DIR
    idx = pd.Index(item_ids)
    to_state = idx.get_indexer(ts.item_index)
    if (to_state < 0).any():
        raise ValueError(f"{path}: {int((to_state < 0).sum())} ranker item(s) are not in the model's catalogue")
    to_ranker = np.full(len(item_ids), -1, np.int64)
    to_ranker[to_state] = np.arange(len(to_state))
    return ts, to_state.astype(np.int64), to_ranker

"""The second stage: a LightGBM ranker over candidate pairs, saved in LightGBM's text format.

``score_users`` is the one implementation of "score a user's candidates": training evaluation,
the quality benchmark and the service call it with a :class:`~recflow.ranker.features.Context`
(the users' purchase lines as of a time) and an :class:`~recflow.ranker.candidates.ItemSide`.

Saved layout (:func:`save_two_stage`, a folder; no pickle)::

    ranker.txt          LightGBM model (text); ranker_1.txt ... the other members of a bag
    ranker_unseen.txt   the never-bought items' booster (ranker_unseen_1.txt ... with a bag)
    ranker_seen.txt     the re-buy candidates' booster (ranker_seen_1.txt ... with a bag)
    ranker.json         RankerConfig, feature names, metrics
    item_stats.parquet  item statistics as of the model's data end (serving's item side)
    item_ids.parquet    catalogue order of the item positions
    arrays.npz          category codes, unique-text MiniLM vectors, each item's text row, items' pooled re-buy gaps
    similarity.npz      item-item co-purchase matrix (scipy sparse, npz)
    user_vectors.npz    every user's decayed purchase vector (the neighbour source), user_ids.parquet
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from recflow.durable import replace_durably
from recflow.ranker.candidates import CANDIDATE_FEATURES, CandidateConfig, Candidates, ItemSide, generate
from recflow.ranker.features import ENGAGEMENT_FEATURES, PAIR_FEATURES, Context, ItemStats, pair_features

# what a shop's views and carts add (training.two_stage.config_for adds them where the events hold any)
ENGAGED_FEATURES: tuple[str, ...] = (*ENGAGEMENT_FEATURES, "src_engaged")
FEATURES: tuple[str, ...] = tuple(f for f in (*PAIR_FEATURES, *CANDIDATE_FEATURES) if f not in ENGAGED_FEATURES)
_PARALLEL_PREDICT_ROWS = 20_000
TEXT_FEATURES: frozenset[str] = frozenset({"cand_text", "cand_text_rel", "src_text", "src_cold", "item_text_pop_30d",
                                           "cand_tgroup", "cand_tgroup_items"})


@dataclass
class RankerConfig:
    """LightGBM and candidate settings; ``features`` are the columns the booster reads, in order."""

    candidates: CandidateConfig = field(default_factory=CandidateConfig)
    features: tuple[str, ...] = FEATURES
    objective: str = "lambdarank"
    num_leaves: int = 31
    learning_rate: float = 0.05
    min_data_in_leaf: int = 100
    feature_fraction: float = 0.8
    bagging_fraction: float = 0.8
    lambda_l2: float = 1.0
    max_bin: int = 63
    max_rounds: int = 500
    early_stopping_rounds: int = 50
    unseen_ranker: bool = True  # a second booster orders the never-bought candidates (new-to-user quality)
    seen_ranker: bool = False  # a third booster orders the re-buy candidates (the user's history) among themselves (opt-in)
    negative_share: float = 0.15
    seed: int = 0
    bag: int = 1  # boosters per stage, seeds seed..seed+bag-1 (own negatives and row/feature samples); scores averaged
    threads: int = 0
    # positions (0-based) of each user's new-to-user list kept for launches: the user's best items
    # (in the never-bought order) among those first sold less than ``launch_days`` ago
    launch_slots: tuple[int, ...] = ()
    launch_days: float = 14.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["features"] = list(self.features)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RankerConfig:
        kw = dict(d)
        kw["candidates"] = CandidateConfig(**kw.get("candidates", {}))
        kw["features"] = tuple(kw.get("features", FEATURES))
        kw["launch_slots"] = tuple(int(p) for p in kw.get("launch_slots", ()))
        return cls(**kw)

    @property
    def ranking(self) -> bool:
        """A learning-to-rank objective (examples grouped per user) rather than pointwise."""
        return self.objective in ("lambdarank", "rank_xendcg")

    def lgb_params(self) -> dict[str, Any]:
        p: dict[str, Any] = {
            "objective": self.objective,
            "num_leaves": self.num_leaves,
            "learning_rate": self.learning_rate,
            "min_data_in_leaf": self.min_data_in_leaf,
            "feature_fraction": self.feature_fraction,
            "bagging_fraction": self.bagging_fraction,
            "bagging_freq": 1 if self.bagging_fraction < 1 else 0,
            "lambda_l2": self.lambda_l2,
            "max_bin": self.max_bin,
            "seed": self.seed,
            "verbosity": -1,
            "deterministic": True,
            "force_col_wise": True,
        }
        if self.threads:
            p["num_threads"] = self.threads
        if self.objective == "lambdarank":
            p.update({"metric": "ndcg", "eval_at": [10], "lambdarank_truncation_level": 20})
        elif self.ranking:
            p.update({"metric": "ndcg", "eval_at": [10]})
        else:
            p.update({"metric": "auc"})
        return p


def feature_matrix(ctx: Context, cands: Candidates, names: tuple[str, ...]) -> np.ndarray:
    """``[C, F]`` float32 features of the candidate pairs, columns in ``names`` order."""
    pf = pair_features(ctx, cands.user, cands.item)
    cols = {**pf, **cands.features}
    missing = [n for n in names if n not in cols]
    if missing:
        raise ValueError(f"ranker features {missing} are not computed by this recflow version")
    return np.stack([cols[n] for n in names], axis=1) if len(cands) else np.zeros((0, len(names)), np.float32)


class BoosterBag:
    """Boosters over the same features trained with different seeds: a booster whose score is their mean.

    Averaging a few seeds' boosters lowers the variance that row, feature and negative sampling put
    into one booster (docs/training.md: bagging). Duck-types the ``lightgbm.Booster`` calls recflow uses.
    """

    def __init__(self, members: list[Any]) -> None:
        if not members:
            raise ValueError("a booster bag needs at least one booster")
        self.members = list(members)

    def predict(self, x: np.ndarray, num_threads: int = 0) -> np.ndarray:
        out = np.zeros(len(x), np.float64)
        for m in self.members:
            out += m.predict(x, num_threads=num_threads)
        return out / len(self.members)

    def num_trees(self) -> int:
        return sum(int(m.num_trees()) for m in self.members)

    def current_iteration(self) -> int:
        return int(self.members[0].current_iteration())

    def feature_importance(self, importance_type: str = "split") -> np.ndarray:
        return np.sum([m.feature_importance(importance_type) for m in self.members], axis=0)


def members(booster: Any) -> list[Any]:
    """The boosters behind ``booster``: a bag's members, or ``[booster]``."""
    return list(booster.members) if isinstance(booster, BoosterBag) else [booster]


def bagged(boosters: list[Any]) -> Any:
    """One booster as is, several as a :class:`BoosterBag`."""
    return boosters[0] if len(boosters) == 1 else BoosterBag(boosters)


def _member_files(folder: Path, stem: str) -> list[Path]:
    """``stem.txt`` and its bag members ``stem_1.txt``, ``stem_2.txt`` ... that exist, in order."""
    out, k = [folder / f"{stem}.txt"], 1
    while (folder / f"{stem}_{k}.txt").exists():
        out.append(folder / f"{stem}_{k}.txt")
        k += 1
    return out


def _save_boosters(booster: Any, folder: Path, stem: str) -> None:
    """Write ``booster`` (or a bag) as ``stem.txt`` + ``stem_1.txt`` ...; remove stale member files."""
    ms = members(booster) if booster is not None else []
    for k, m in enumerate(ms):
        m.save_model(str(folder / (f"{stem}.txt" if k == 0 else f"{stem}_{k}.txt")))
    for path in _member_files(folder, stem)[len(ms):]:
        if path.exists():
            path.unlink()


@dataclass
class Ranker:
    """A trained booster with its config (and the metrics it was saved with).

    ``unseen`` (optional) is a second booster trained on the items the user never bought, against
    the purchases new to the user, and ``seen`` (optional) a third one trained on the user's
    history items, against their re-buys: :meth:`score` lets each order its part of the candidates
    among themselves while the main booster keeps deciding which list positions go to re-buys and
    which to new items.
    """

    config: RankerConfig
    booster: Any  # lightgbm.Booster, or a BoosterBag of them
    metrics: dict[str, Any] = field(default_factory=dict)
    unseen: Any = None  # lightgbm.Booster (or BoosterBag) over the same features, or None
    seen: Any = None  # lightgbm.Booster (or BoosterBag) over the same features, or None

    @staticmethod
    def _predict(booster: Any, x: np.ndarray, threads: int) -> np.ndarray:
        if len(x) == 0:
            return np.zeros(0, np.float64)
        # a request's few hundred rows: one thread (OpenMP's start-up costs more than it saves, and
        # under load the cores are busy with other requests); batch scoring: every core
        t = threads or (1 if len(x) < _PARALLEL_PREDICT_ROWS else 0)
        return np.asarray(booster.predict(x, num_threads=t), dtype=np.float64)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """The main booster's scores of the rows of ``x`` (columns ``config.features``)."""
        return self._predict(self.booster, x, self.config.threads)

    def score(self, x: np.ndarray, users: np.ndarray) -> np.ndarray:
        """Final scores of candidate rows ``x`` of ``users`` (one user code per row).

        Without ``unseen`` and ``seen`` these are :meth:`predict`. With ``unseen``, each user's
        never-bought candidates keep the set of scores the main booster gave them (so the same list
        positions), but are re-assigned to those positions in the unseen booster's order; with
        ``seen``, the same for the user's re-buy candidates in the seen booster's order. With
        ``config.launch_slots``, the never-bought order first gives the listed positions of the
        never-bought part to the user's best launches (items first sold less than
        ``config.launch_days`` ago): exposure for new items.
        """
        main = self.predict(x)
        slots = self.config.launch_slots
        if (self.unseen is None and self.seen is None and not slots) or len(x) == 0:
            return main
        users = np.asarray(users)
        bought = x[:, self.config.features.index("ui_bought")] > 0
        out = main.copy()
        m = np.flatnonzero(bought)
        if self.seen is not None and len(m):
            _hand_out(out, main, m, users[m], -self._predict(self.seen, x[m], self.config.threads))
        m = np.flatnonzero(~bought)
        if (self.unseen is None and not slots) or len(m) == 0:
            return out
        u = users[m]
        order = -(main[m] if self.unseen is None else self._predict(self.unseen, x[m], self.config.threads))
        if slots:
            if "item_age_d" not in self.config.features:
                raise ValueError("ranker launch_slots need the item_age_d feature; add it to the features or set no launch slots")
            order = _with_launches(order, u, x[m, self.config.features.index("item_age_d")], slots, self.config.launch_days)
        _hand_out(out, main, m, u, order)
        return out


def _hand_out(out: np.ndarray, main: np.ndarray, rows: np.ndarray, users: np.ndarray, order: np.ndarray) -> None:
    """Give each user's ``rows`` the main scores those rows hold (the same list positions), the best
    to the lowest ``order`` (an ascending sort key), in place in ``out``."""
    by_order = np.lexsort((order, users))
    by_main = np.lexsort((-main[rows], users))
    out[rows[by_order]] = main[rows[by_main]]


def _rank_within(users: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Each row's 0-based rank by ascending ``key`` among the rows of the same user."""
    o = np.lexsort((key, users))
    us = users[o]
    start = np.r_[0, np.flatnonzero(us[1:] != us[:-1]) + 1] if len(us) else np.zeros(0, np.int64)
    r = np.empty(len(users), np.int64)
    r[o] = np.arange(len(users)) - np.repeat(start, np.diff(np.r_[start, len(users)]))
    return r


def _with_launches(order: np.ndarray, users: np.ndarray, age_d: np.ndarray, slots: tuple[int, ...],
                   days: float) -> np.ndarray:
    """Sort keys (ascending) of never-bought rows that put each user's best ``len(slots)`` launches
    (``age_d`` < ``days``: first sold recently; NaN = never sold) at list positions ``slots`` and the
    other rows, in ``order``, around them. A user with fewer launches keeps their other slots."""
    launch = np.flatnonzero(np.nan_to_num(age_d, nan=np.inf) < days)
    key = np.empty(len(order), np.float64)
    pos = np.asarray(sorted(set(slots)), np.float64)
    picked = np.zeros(len(order), bool)
    if len(launch):
        j = _rank_within(users[launch], order[launch])
        sel = j < len(pos)
        picked[launch[sel]] = True
        # the j-th picked launch lands at pos[j]: just before the (pos[j] - j)-th of the other rows
        key[launch[sel]] = pos[j[sel]] - j[sel] - 0.5
    rest = np.flatnonzero(~picked)
    key[rest] = _rank_within(users[rest], order[rest])
    return key


@dataclass
class Scored:
    """Candidates of some users with the ranker's score of each pair."""

    cands: Candidates
    score: np.ndarray  # [C]
    as_of: int = 0

    def dense(self, users: np.ndarray, n_items: int, fill: np.ndarray | None = None) -> np.ndarray:
        """``[len(users), N]`` scores (non-candidates get ``fill`` far below every candidate)."""
        out = np.full((len(users), n_items), -1e9, np.float32)
        if fill is not None:
            out += fill[None, :].astype(np.float32)
        row = pd.Index(users).get_indexer(self.cands.user)
        ok = row >= 0
        out[row[ok], self.cands.item[ok]] = self.score[ok].astype(np.float32)
        return out


def score_users(
    ranker: Ranker | None, ctx: Context, side: ItemSide, users: np.ndarray, *,
    candidates: CandidateConfig | None = None, order_by: str | None = None,
) -> Scored:
    """Score every candidate of ``users`` as of ``ctx.as_of``: the ranker's score, or with no ranker
    (``recflow_no_ranker``) the single feature ``order_by`` (default ``ui_dec_90d`` + popularity tie-break)."""
    cfg = candidates or (ranker.config.candidates if ranker is not None else CandidateConfig())
    cands = generate(ctx, side, users, cfg)
    if ranker is not None:
        x = feature_matrix(ctx, cands, ranker.config.features)
        return Scored(cands, ranker.score(x, cands.user), ctx.as_of)
    name = order_by or "ui_dec_90d"
    pf = pair_features(ctx, cands.user, cands.item)
    cols = {**pf, **cands.features}
    pop = np.log1p(cols["item_pop_30d"].astype(np.float64))
    return Scored(cands, cols[name].astype(np.float64) * 1e3 + pop, ctx.as_of)


@dataclass
class TwoStage:
    """What ranking needs at serving time: the booster, the item side as of the data end, the
    catalogue ids (position ``p`` is ``item_ids[p]``) and category codes."""

    ranker: Ranker
    side: ItemSide
    item_ids: np.ndarray  # [N] str
    category: np.ndarray | None = None  # [N] int64 (-1 unknown)

    def __post_init__(self) -> None:
        self.item_index = pd.Index(np.asarray(self.item_ids).astype(str))

    @property
    def reads_engagement(self) -> bool:
        """Whether the ranker reads views and carts (features or candidates): the service then hands it
        those entries of the online history too, not only the purchases."""
        cfg = self.ranker.config
        return cfg.candidates.n_engaged > 0 or any(f in ENGAGED_FEATURES for f in cfg.features)


def save_two_stage(model: TwoStage, folder: Path) -> Path:
    """Write ``model`` under ``folder``: LightGBM text, JSON, parquet and npy/npz only (no pickle)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _save_boosters(model.ranker.booster, folder, "ranker")
    _save_boosters(model.ranker.unseen, folder, "ranker_unseen")
    _save_boosters(model.ranker.seen, folder, "ranker_seen")
    side = model.side
    side.stats.to_frame().to_parquet(folder / "item_stats.parquet", index=False)
    pd.DataFrame({"item_id": model.item_index.astype(str)}).to_parquet(folder / "item_ids.parquet", index=False)
    arrays: dict[str, np.ndarray] = {}
    if model.category is not None:
        arrays["category"] = np.asarray(model.category, np.int64)
    if side.text_emb is not None and side.item_text is not None:
        arrays["text_emb"] = np.asarray(side.text_emb, np.float32)
        arrays["item_text"] = np.asarray(side.item_text, np.int64)
    arrays["item_gap_keys"] = np.asarray(side.stats.gap_keys, np.int64)
    np.savez(folder / "arrays.npz", **arrays)
    if side.similarity is not None:
        sp.save_npz(folder / "similarity.npz", side.similarity.tocsr(), compressed=True)
    if side.user_vectors is not None and side.user_ids is not None:
        sp.save_npz(folder / "user_vectors.npz", side.user_vectors.tocsr(), compressed=True)
        pd.DataFrame({"user_id": np.asarray(side.user_ids).astype(str)}).to_parquet(folder / "user_ids.parquet", index=False)
    meta = {"config": model.ranker.config.to_dict(), "metrics": model.ranker.metrics, "item_stats_as_of": side.stats.as_of,
            "format": "recflow.ranker: ranker.txt (LightGBM; ranker_unseen.txt for never-bought items, ranker_seen.txt for re-buys; _1, _2 ... bag members) + ranker.json + item_stats.parquet + item_ids.parquet "
                      "+ arrays.npz + similarity.npz"}
    (folder / "ranker.json").write_text(json.dumps(meta, indent=1, default=float))
    return folder


def forget_user(folder: Path, user_id: str) -> int:
    """Drop ``user_id``'s row from the neighbour snapshot of the ranker saved under ``folder``
    (``user_vectors.npz`` + ``user_ids.parquet``, each replaced atomically and durably); returns rows removed.
    The rest of a saved ranker holds only aggregates over users (item statistics, co-purchase)."""
    folder = Path(folder)
    ids_path, vec_path = folder / "user_ids.parquet", folder / "user_vectors.npz"
    if not (ids_path.is_file() and vec_path.is_file()):
        return 0
    ids = pd.read_parquet(ids_path)["user_id"].astype(str).to_numpy()
    keep = ids != str(user_id)
    if keep.all():
        return 0
    vectors = sp.load_npz(vec_path).tocsr()[np.flatnonzero(keep)]
    tmp_vec, tmp_ids = folder / "user_vectors.forget.npz", folder / "user_ids.forget.parquet"
    sp.save_npz(tmp_vec, vectors, compressed=True)
    pd.DataFrame({"user_id": ids[keep]}).to_parquet(tmp_ids, index=False)
    replace_durably(tmp_vec, vec_path)
    replace_durably(tmp_ids, ids_path)
    return int((~keep).sum())


def load_two_stage(folder: Path) -> TwoStage:
    """The model saved by :func:`save_two_stage` (raises FileNotFoundError naming the missing file)."""
    import lightgbm as lgb

    folder = Path(folder)
    for name in ("ranker.json", "ranker.txt", "item_stats.parquet", "item_ids.parquet", "arrays.npz"):
        if not (folder / name).exists():
            raise FileNotFoundError(f"{folder / name} is missing: not a recflow ranker folder (save_two_stage writes it)")
    meta = json.loads((folder / "ranker.json").read_text())

    def load(stem: str) -> Any:
        files = _member_files(folder, stem)
        return bagged([lgb.Booster(model_file=str(f)) for f in files]) if files[0].exists() else None

    ranker = Ranker(RankerConfig.from_dict(meta["config"]), load("ranker"), meta.get("metrics", {}), load("ranker_unseen"),
                    load("ranker_seen"))
    with np.load(folder / "arrays.npz") as z:
        arrays = {k: z[k] for k in z.files}
    stats = ItemStats.from_frame(pd.read_parquet(folder / "item_stats.parquet"), meta["item_stats_as_of"],
                                 arrays.get("item_gap_keys"))
    sim = sp.load_npz(folder / "similarity.npz").tocsr() if (folder / "similarity.npz").exists() else None
    uv = uid = None
    if (folder / "user_vectors.npz").exists():
        uv = sp.load_npz(folder / "user_vectors.npz").tocsr()
        uid = pd.read_parquet(folder / "user_ids.parquet")["user_id"].astype(str).to_numpy()
    side = ItemSide(stats, sim, arrays.get("text_emb"), arrays.get("item_text"), uv, uid)
    ids = pd.read_parquet(folder / "item_ids.parquet")["item_id"].astype(str).to_numpy()
    return TwoStage(ranker, side, ids, arrays.get("category"))

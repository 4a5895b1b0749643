"""Training loop of the recflow recommender (see :mod:`recflow.modeling` for the model).

Loss: per (user, week) example, a multi-positive sampled softmax. The columns of a batch are the
union of (a) every positive of the batch's users (in-batch negatives for the others), (b) every
user's distinct history items (the re-buy candidates, also hard negatives) and (c) ``n_uniform``
items drawn uniformly from the whole catalogue (mixed negative sampling). Each column's logit is
corrected by ``-log q(item)`` (logQ correction; ``q`` = how often the item is a column, measured
over an epoch's batches) except for the user's own history items, which are always there. Each
positive competes with all non-positive columns; a user's positives are averaged.

Batches hold users of one anchor week, so each column's popularity features are those of that week.
Batches are built in numpy by a background thread; the step itself makes no host sync (losses
are accumulated on the device and read once per log interval). On CUDA: bf16 autocast, fused
AdamW, optional ``torch.compile`` of the scoring function.

Encoder modes: ``frozen`` (text embeddings precomputed), ``top_k`` (the last ``unfrozen_layers``
BERT layers train) and ``full``. When the encoder trains, the texts of at most ``max_fresh_texts``
columns (up to half of them positives, the rest uniform ones) are re-encoded with gradients; the
other columns and the history pooling read a table that is re-encoded after every epoch. In ``top_k`` mode with
:class:`~training.text_cache.TokenStates` (the frozen lower layers' per-token states, cached once
per text: ``data.token_states`` or computed at the start), a step runs only the top layer(s),
pooling and projection on those states, and the per-epoch table costs the top layers only: the
CPU path. Without them (``cache_states=False``, ``full``, or states below the trained layers)
the texts' tokens go through the whole encoder (the GPU path).
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from recflow.modeling.build import new_model
from recflow.modeling.config import ModelConfig
from recflow.modeling.features import (
    HistoryBatch,
    encode_profile,
    history_features,
    popularity_transform,
    user_dense,
)
from recflow.modeling.model import RecModel
from recflow.modeling.serving import build_index, user_tensors
from training.evaluate import EvalSet, Scorer, evaluate
from training.examples import profile_vocabulary
from training.text_cache import TokenStates, embeddings_from_states, encode_states, upper_forward
from training.train_data import TrainData

if TYPE_CHECKING:
    from recflow.settings import Settings

log = logging.getLogger("training")


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (plain dataclass: no settings library here)."""

    dim: int = 64
    hidden: int = 128
    temperature: float = 0.1
    lr: float = 3e-3
    weight_decay: float = 1e-6
    batch_size: int = 128
    epochs: int = 3
    history_length: int = 500
    max_history_items: int = 256
    n_uniform: int = 1024
    id_dropout: float = 0.1
    min_item_count: int = 1
    use_id_embedding: bool = True
    logq: bool = True
    new_loss_weight: float = 1.0
    encoder_mode: str = "frozen"  # frozen | top_k | full
    unfrozen_layers: int = 0
    encoder_lr: float = 3e-5
    max_fresh_texts: int = 4096
    cache_states: bool = True  # top_k: run the trained layers on cached lower-layer token states
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda
    bf16: bool = True  # autocast on CUDA only
    compile: bool = False
    threads: int | None = None
    max_seconds: float | None = None  # stop training (not evaluation) after this long
    deadline: float | None = None  # stop training (not evaluation) at this time.time() (a search's trials)
    max_steps: int | None = None
    log_every: int = 50

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def effective_mode(self) -> str:
        if self.encoder_mode == "top_k" and self.unfrozen_layers <= 0:
            return "frozen"
        return self.encoder_mode


def train_config(settings: Settings, **changes: Any) -> TrainConfig:
    """The :class:`TrainConfig` of ``settings`` (``training`` and ``features``): the one mapping from
    settings to a training run, which the train and retrain flows and the benchmarks share; ``changes``
    replace fields (e.g. an incremental retrain's epochs and learning rate)."""
    t = settings.training
    cfg = TrainConfig(
        epochs=t.epochs, seed=t.seed, encoder_mode=t.encoder_mode, unfrozen_layers=t.unfrozen_layers,
        max_fresh_texts=t.finetune_texts, encoder_lr=t.encoder_lr,
        history_length=min(TrainConfig.history_length, settings.features.history_length),
    )
    return replace(cfg, **changes)


@dataclass
class TrainResult:
    """The trained model, its validation metrics per epoch and timing."""

    model: RecModel
    val_metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    samples: int = 0
    steps: int = 0
    encoded_texts: int = 0  # texts encoded with gradients (trainable encoder only)

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds else 0.0


# --- model construction ------------------------------------------------------------------------
def id_rows(data: TrainData, min_count: int) -> tuple[np.ndarray, int]:
    """Id-embedding row of every item: 1.. for items bought at least ``min_count`` times before the
    cutoff, 0 (shared cold-start row) for the rest."""
    known = data.item_counts >= max(1, min_count)
    rows = np.zeros(len(known), dtype=np.int64)
    rows[known] = np.arange(1, int(known.sum()) + 1)
    return rows, int(known.sum()) + 1


def compute_history(data_rows: Any, cfg: TrainConfig, half_lives: tuple[float, ...]) -> HistoryBatch:
    return history_features(
        data_rows.hist_offsets, data_rows.hist_items, data_rows.hist_ts, data_rows.activity[:, -1],
        history_length=cfg.history_length, half_lives_days=half_lives,
    )


def build_model(
    data: TrainData, cfg: TrainConfig, hist: HistoryBatch, dense: np.ndarray, init: RecModel | None = None
) -> RecModel:
    """A fresh model over ``data``'s catalogue with normalisation statistics from the training rows.

    With ``init`` (warm start), the architecture and the profile vocabulary follow ``init`` and its
    weights are copied in (:func:`training.incremental.warm_start`)."""
    rows, n_ids = id_rows(data, cfg.min_item_count)
    if init is not None:
        ic = init.config
        cfg = replace(cfg, dim=ic.dim, hidden=ic.hidden, use_id_embedding=ic.use_id_embedding,
                      history_length=ic.history_length, max_history_items=ic.max_history_items)
    mc = ModelConfig(
        encoder=dict(data.encoder), n_ids=n_ids, text_dim=data.text_emb.shape[1], dim=cfg.dim, hidden=cfg.hidden,
        use_id_embedding=cfg.use_id_embedding, temperature=cfg.temperature, history_length=cfg.history_length,
        max_history_items=cfg.max_history_items,
        profile_vocab=init.config.profile_vocab if init is not None else profile_vocabulary(data.train.profile),
    )
    tokenizer = None
    state = None
    if data.encoder_dir:
        from recflow.modeling.build import pretrained_encoder

        _, tokenizer, state = pretrained_encoder(data.encoder_dir)
    model = new_model(
        mc, list(data.catalogue.item_ids), data.catalogue.texts, text_emb=data.text_emb, id_rows=rows,
        popularity=np.nan_to_num(data.pop_grid[data.end_anchor_idx], nan=0.0), tokenizer=tokenizer,
    )
    if state is not None:
        model.encoder.load_state_dict(state, strict=False)
    elif tokenizer is None:
        from recflow.modeling.build import tiny_tokenizer

        model.tokenizer = tiny_tokenizer()
    with torch.no_grad():
        n_train = len(data.anchors) - 3
        pop = popularity_transform(data.pop_grid[:n_train].reshape(-1, data.pop_grid.shape[2]))
        model.pop_mean.copy_(torch.from_numpy(pop.mean(0)))
        model.pop_std.copy_(torch.from_numpy(pop.std(0) + 1e-3))
        model.user_mean.copy_(torch.from_numpy(dense.mean(0)))
        model.user_std.copy_(torch.from_numpy(dense.std(0) + 1e-3))
        if len(hist.feats):
            model.hist_mean.copy_(torch.from_numpy(hist.feats.mean(0)))
            model.hist_std.copy_(torch.from_numpy(hist.feats.std(0) + 1e-3))
    if init is not None:
        from training.incremental import warm_start

        report = warm_start(model, init)
        new_texts = carry_text_table(model, init)
        log.info("warm start: %d tensors copied, %d id rows carried over, %d new, %d texts encoded; skipped %s",
                 len(report.copied), report.id_rows_copied, report.id_rows_new, new_texts, report.skipped or "none")
    return model


@torch.no_grad()
def carry_text_table(model: RecModel, init: RecModel) -> int:
    """Give ``model`` the text vectors of ``init``'s (possibly fine-tuned) encoder: rows of texts
    ``init`` knows are copied, the others encoded with the warm-started encoder. Returns how many
    were encoded."""
    known = {t: r for r, t in enumerate(init.texts)}
    rows = [(n, known[t]) for n, t in enumerate(model.texts) if t in known]
    if rows:
        dst, src = (torch.tensor(x, dtype=torch.long) for x in zip(*rows, strict=True))
        model.text_emb[dst] = init.text_emb[src].to(model.text_emb)
    missing = [n for n, t in enumerate(model.texts) if t not in known]
    if missing and model.tokenizer is not None:
        model.text_emb[torch.tensor(missing)] = model.encode_texts([model.texts[n] for n in missing]).to(model.text_emb)
    return len(missing)


# --- batches ------------------------------------------------------------------------------------
@dataclass
class Batch:
    """One step's tensors (numpy until moved to the device)."""

    cols: np.ndarray  # [C] catalogue positions
    col_text: np.ndarray  # [C]
    col_id: np.ndarray  # [C] id rows after id dropout
    col_pop: np.ndarray  # [C, P] log popularity
    col_logq: np.ndarray  # [C]
    fresh_cols: np.ndarray  # [n] columns re-encoded with gradients (trainable encoder only)
    fresh_text: np.ndarray  # [u] their distinct text rows
    fresh_inv: np.ndarray  # [n] row of each fresh column in fresh_text
    fresh_h: np.ndarray  # [u, w, hidden] fp16 cached lower-layer states of fresh_text (states path; else empty)
    fresh_mask: np.ndarray  # [u, w] their attention mask
    hist_col: np.ndarray  # [b, H] column of each history item (0 where padded)
    hist_id: np.ndarray  # [b, H] id rows of history items (no dropout)
    hist_feats: np.ndarray  # [b, H, F]
    hist_mask: np.ndarray  # [b, H]
    dense: np.ndarray  # [b, U]
    profile: np.ndarray  # [b, P]
    pos_row: np.ndarray  # [n_pos]
    pos_col: np.ndarray  # [n_pos]
    size: int
    width: int = 1  # token width of the fresh texts (known on the host: no device sync)

    def to(self, device: torch.device) -> dict[str, torch.Tensor]:
        pin = device.type == "cuda"
        out = {}
        for k, v in ((f.name, getattr(self, f.name)) for f in fields(self)):
            if isinstance(v, np.ndarray):
                t = torch.from_numpy(np.ascontiguousarray(v))
                if pin:
                    t = t.pin_memory()
                out[k] = t.to(device, non_blocking=True)
        return out


class BatchBuilder:
    """Builds batches of one anchor week's users (numpy, vectorised)."""

    def __init__(self, data: TrainData, cfg: TrainConfig, hist: HistoryBatch, dense: np.ndarray,
                 profile: np.ndarray, id_row: np.ndarray, text_len: np.ndarray | None = None,
                 states: TokenStates | None = None) -> None:
        self.data, self.cfg, self.hist, self.dense, self.profile, self.id_row = data, cfg, hist, dense, profile, id_row
        self.text_len = text_len
        self.states = states
        self.n = len(data.catalogue)
        self.pop_log = [popularity_transform(g) for g in data.pop_grid]
        self.logq = np.zeros(self.n, dtype=np.float32)
        self.by_anchor = [np.flatnonzero(data.train.anchor == a) for a in range(int(data.train.anchor.max(initial=-1)) + 1)]

    def plan(self, rng: np.random.Generator) -> list[tuple[int, np.ndarray]]:
        """One epoch: every anchor's users shuffled into batches; batch order shuffled."""
        out = []
        bs = self.cfg.batch_size
        for a, rows in enumerate(self.by_anchor):
            perm = rng.permutation(rows)
            out.extend((a, perm[s : s + bs]) for s in range(0, len(perm), bs))
        order = rng.permutation(len(out))
        return [out[i] for i in order]

    def estimate_logq(self, rng: np.random.Generator) -> None:
        """q(item) = share of an epoch's batches in which the item is a column."""
        seen = np.zeros(self.n, dtype=np.float64)
        plan = self.plan(rng)
        for _, rows in plan:
            seen[self._columns(rows, rng)[0]] += 1
        q = np.clip(seen / max(len(plan), 1), 1.0 / max(len(plan), 1), 1.0)
        self.logq = np.log(q).astype(np.float32)

    def _columns(
        self, rows: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, HistoryBatch, np.ndarray, np.ndarray, np.ndarray]:
        t = self.data.train
        hb = self.hist.take(rows)
        starts, ends = t.target_offsets[rows], t.target_offsets[rows + 1]
        lens = ends - starts
        tidx = np.repeat(starts - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens) + np.arange(lens.sum())
        targets = t.targets[tidx]
        uniform = rng.integers(0, self.n, self.cfg.n_uniform)
        cols = np.unique(np.concatenate([hb.items, targets, uniform]))
        return cols, hb, targets, lens, uniform

    def build(self, anchor: int, rows: np.ndarray, rng: np.random.Generator) -> Batch:
        cfg = self.cfg
        cols, hb, targets, lens, uniform = self._columns(rows, rng)
        items, feats, mask = hb.padded(cfg.max_history_items)
        hist_col = np.searchsorted(cols, np.where(mask, items, cols[0]))
        hist_id = self.id_row[np.where(mask, items, 0)] * mask
        pos_row = np.repeat(np.arange(len(rows)), lens)
        pos_col = np.searchsorted(cols, targets)
        col_id = self.id_row[cols].copy()
        if cfg.id_dropout > 0:
            col_id[rng.random(len(cols)) < cfg.id_dropout] = 0
        fresh_cols = np.zeros(0, dtype=np.int64)
        fresh_text = np.zeros(0, dtype=np.int64)
        fresh_inv = np.zeros(0, dtype=np.int64)
        width = 1
        fresh_h, fresh_mask = np.zeros((0, 1, 1), np.float16), np.zeros((0, 1), np.int64)
        if self.cfg.effective_mode() != "frozen" and self.text_len is not None:
            # up to half positives, the rest uniform negatives: the encoder's gradient pulls and pushes
            pos_u = rng.permutation(np.unique(pos_col))[: max(1, cfg.max_fresh_texts // 2)]
            neg_u = rng.permutation(np.setdiff1d(np.searchsorted(cols, uniform), pos_u))
            fresh_cols = np.sort(np.concatenate([pos_u, neg_u[: max(0, cfg.max_fresh_texts - len(pos_u))]])).astype(np.int64)
            fresh_text, fresh_inv = np.unique(self.data.item_text[cols[fresh_cols]], return_inverse=True)
            width = int(self.text_len[fresh_text].max()) if len(fresh_text) else 1
            if self.states is not None and len(fresh_text):
                fresh_h, fresh_mask = self.states.gather(fresh_text, width)
        return Batch(
            cols=cols, col_text=self.data.item_text[cols], col_id=col_id, col_pop=self.pop_log[anchor][cols],
            col_logq=self.logq[cols] if cfg.logq else np.zeros(len(cols), np.float32),
            fresh_cols=fresh_cols, fresh_text=fresh_text.astype(np.int64), fresh_inv=fresh_inv.astype(np.int64), width=width,
            fresh_h=fresh_h, fresh_mask=fresh_mask,
            hist_col=hist_col.astype(np.int64), hist_id=hist_id.astype(np.int64), hist_feats=feats, hist_mask=mask,
            dense=self.dense[rows], profile=self.profile[rows], pos_row=pos_row.astype(np.int64),
            pos_col=pos_col.astype(np.int64), size=len(rows),
        )


def _prefetch(gen: Iterator[Batch], depth: int = 3) -> Iterator[Batch]:
    """Run a batch generator in a background thread (numpy releases the GIL for most of the work)."""
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    done = object()

    def work() -> None:
        try:
            for b in gen:
                q.put(b)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            q.put(exc)
        q.put(done)

    th = threading.Thread(target=work, daemon=True)
    th.start()
    while True:
        item = q.get()
        if item is done:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


# --- loss ----------------------------------------------------------------------------------------
def batch_loss(
    model: RecModel, b: dict[str, torch.Tensor], text_table: torch.Tensor, fresh_emb: torch.Tensor | None,
    new_weight: float = 0.0,
) -> torch.Tensor:
    """Multi-positive sampled-softmax loss of one batch (see the module docstring). Only
    fixed-shape tensor ops: no data-dependent shapes, so no host sync."""
    text = text_table[b["col_text"]]
    if fresh_emb is not None:
        text = text.index_copy(0, b["fresh_cols"], fresh_emb[b["fresh_inv"]].to(text.dtype))
    v = model.item_vectors(text, b["col_id"])
    bias = model.item_bias(b["col_id"], b["col_pop"])
    hist_vecs = v[b["hist_col"]]
    m = b["hist_mask"]
    u, rep = model.user_forward(hist_vecs, b["hist_feats"], m, b["hist_id"], b["dense"], b["profile"])
    logits = (u @ v.T).float() + bias.float()[None, :]
    bsz, ncol = logits.shape
    mf = m.float()
    own = torch.zeros(bsz, ncol, device=logits.device).scatter_add_(1, b["hist_col"], mf) > 0
    logits = logits - b["col_logq"][None, :] * (~own)
    offset = model.repeat_offset(b["hist_id"], b["col_pop"][b["hist_col"]], bias[b["hist_col"]])
    logits = logits.scatter_add(1, b["hist_col"], (rep + offset).float() * mf)
    pos = torch.zeros(bsz, ncol, dtype=torch.bool, device=logits.device)
    pos[b["pos_row"], b["pos_col"]] = True
    lse_neg = torch.logsumexp(logits.masked_fill(pos, -1e9), dim=1)
    s_pos = logits[b["pos_row"], b["pos_col"]]
    per_pos = torch.logaddexp(s_pos, lse_neg[b["pos_row"]]) - s_pos
    ones = torch.ones_like(s_pos)
    n_pos = torch.zeros(bsz, device=logits.device).scatter_add_(0, b["pos_row"], ones).clamp(min=1)
    loss = (per_pos / n_pos[b["pos_row"]]).sum() / bsz
    if new_weight > 0:
        # exploration: positives new to the user, ranked against non-history columns only
        is_new = (~own[b["pos_row"], b["pos_col"]]).float()
        lse_new = torch.logsumexp(logits.masked_fill(pos | own, -1e9), dim=1)
        per_new = (torch.logaddexp(s_pos, lse_new[b["pos_row"]]) - s_pos) * is_new
        n_new = torch.zeros(bsz, device=logits.device).scatter_add_(0, b["pos_row"], is_new)
        users = (n_new > 0).float().sum().clamp(min=1)
        loss = loss + new_weight * (per_new / n_new.clamp(min=1)[b["pos_row"]]).sum() / users
    return loss


# --- evaluation ----------------------------------------------------------------------------------
def user_inputs(model: RecModel, rows: Any) -> tuple[HistoryBatch, np.ndarray, np.ndarray]:
    """History features, dense features and profile indices of ``rows`` for ``model``."""
    c = model.config
    hist = history_features(
        rows.hist_offsets, rows.hist_items, rows.hist_ts, rows.activity[:, -1],
        history_length=c.history_length, half_lives_days=c.half_lives_days,
    )
    dense = user_dense(rows.activity, hist)
    profile = encode_profile(rows.profile, c.profile_vocab, c.profile_features)
    return hist, dense, profile


def model_scorer(model: RecModel, ev: EvalSet, popularity: np.ndarray) -> Scorer:
    """Scores of ``model`` for ``ev``'s users, through the serving code path (``build_index`` +
    ``user_tensors``), with the item popularity ``[N, P]`` as of the evaluation anchor."""
    names = model.config.popularity_features
    index = build_index(model, {n: popularity[:, j] for j, n in enumerate(names)})
    matrix = torch.from_numpy(index.matrix)
    bias = torch.from_numpy(index.bias)
    hist, dense, profile = user_inputs(model, ev.rows)

    def score(rows: np.ndarray) -> torch.Tensor:
        u, rep, items = user_tensors(model, hist.take(rows), dense[rows], profile[rows])
        s = torch.from_numpy(u) @ matrix.T + bias
        m = items >= 0
        r = np.repeat(np.arange(len(rows))[:, None], items.shape[1], 1)
        bonus = rep[m] + index.repeat_offset[items[m]]
        s.index_put_((torch.from_numpy(r[m]), torch.from_numpy(items[m])), torch.from_numpy(bonus), accumulate=True)
        return s

    return score


def evaluate_model(model: RecModel, data: TrainData, ev: EvalSet, per_user: bool = False) -> dict[str, Any]:
    """Full-catalogue metrics of ``model`` on ``ev`` (popularity as of ``ev``'s anchor; with
    ``per_user``, also the per-user arrays)."""
    a = data.anchors.index(ev.anchor)
    was = model.training
    model.eval()
    try:
        return evaluate(model_scorer(model, ev, data.pop_grid[a]), ev, per_user=per_user)
    finally:
        model.train(was)


# --- the loop ------------------------------------------------------------------------------------
def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


def fit(
    data: TrainData,
    cfg: TrainConfig,
    report: Callable[[int, dict[str, float], RecModel], None] | None = None,
    progress: Callable[[str], None] | None = None,
    init: RecModel | None = None,
) -> TrainResult:
    """Train a model on ``data.train``; evaluate on the validation week after every epoch.

    ``report(epoch, metrics, model)`` is called after each epoch (Ray Tune reports/checkpoints
    there). ``init`` warm-starts from a trained model (incremental retraining). Deterministic for
    a given ``cfg.seed`` on CPU.
    """
    say = progress or (lambda m: log.info(m))
    if init is not None:  # the architecture follows the model we start from
        ic = init.config
        cfg = replace(cfg, dim=ic.dim, hidden=ic.hidden, use_id_embedding=ic.use_id_embedding,
                      history_length=ic.history_length, max_history_items=ic.max_history_items)
    _seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = cfg.resolved_device()
    rng = np.random.default_rng(cfg.seed)
    t0 = time.perf_counter()
    half_lives = ModelConfig(encoder={}, n_ids=1).half_lives_days
    hist = compute_history(data.train, cfg, half_lives)
    dense = user_dense(data.train.activity, hist)
    model = build_model(data, cfg, hist, dense, init=init)
    profile = encode_profile(data.train.profile, model.config.profile_vocab, model.config.profile_features)
    id_row = model.item_id_row.numpy().copy()
    mode = cfg.effective_mode()
    model.encoder.set_trainable(mode, cfg.unfrozen_layers)
    states = training_states(model, data, cfg, say)
    builder = BatchBuilder(data, cfg, hist, dense, profile, id_row, states=states)
    builder.estimate_logq(np.random.default_rng(cfg.seed + 1))
    say(f"prepared {len(data.train)} training examples in {time.perf_counter() - t0:.1f}s")

    model.to(device).train()
    bert = model.encoder.bert
    enc_params = [p for p in model.encoder.parameters() if p.requires_grad]
    other = [p for n, p in model.named_parameters() if not n.startswith("encoder.")]
    groups: list[dict[str, Any]] = [{"params": other, "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
    if enc_params:
        groups.append({"params": enc_params, "lr": cfg.encoder_lr, "weight_decay": 0.01})
    opt = torch.optim.AdamW(groups, fused=device.type == "cuda")
    plan_len = len(builder.plan(np.random.default_rng(0)))
    total = max(1, plan_len * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, plan_len * cfg.epochs))
    warm = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    tokens = None
    if mode != "frozen" and states is None:
        tok = model.tokenizer(model.texts, padding="max_length", truncation=True, max_length=model.config.max_length,
                              return_tensors="pt")
        tokens = (tok["input_ids"].to(device), tok["attention_mask"].to(device))
        builder.text_len = tok["attention_mask"].sum(1).numpy()
    elif states is not None:
        builder.text_len = states.lengths

    def refresh_table() -> None:
        """Re-encode every text with the current encoder into ``model.text_emb`` (the serving table)."""
        with torch.no_grad():
            table = embeddings_from_states(bert, states) if states is not None else model.encode_texts(model.texts)
            model.text_emb.copy_(table.to(model.text_emb.device))

    if mode != "frozen" and not data.encoder_dir and init is None:
        refresh_table()  # a random encoder: the data's vectors are not its own
    text_table = model.text_emb
    loss_fn = torch.compile(batch_loss) if cfg.compile and device.type == "cuda" else batch_loss
    use_amp = device.type == "cuda" and cfg.bf16

    history: list[dict[str, float]] = []
    step, samples, encoded = 0, 0, 0
    train_seconds = 0.0
    stop = False
    for epoch in range(cfg.epochs):
        plan = builder.plan(rng)
        batches = _prefetch(builder.build(a, rows, rng) for a, rows in plan)
        run_loss = torch.zeros((), device=device)
        n_loss = 0
        t_epoch = time.perf_counter()
        for batch in batches:
            b = batch.to(device)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                fresh = None
                if batch.fresh_text.size and states is not None:
                    fresh = upper_forward(bert, b["fresh_h"].float(), b["fresh_mask"], states.layer)
                elif batch.fresh_text.size and tokens is not None:
                    w = batch.width
                    fresh = model.encoder(tokens[0][b["fresh_text"], :w], tokens[1][b["fresh_text"], :w])
                encoded += batch.fresh_text.size
                loss = loss_fn(model, b, text_table, fresh, cfg.new_loss_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
            run_loss += loss.detach()
            n_loss += 1
            step += 1
            samples += batch.size
            if cfg.log_every and step % cfg.log_every == 0:
                say(f"epoch {epoch + 1} step {step}/{total} loss {float(run_loss) / n_loss:.4f}")
            if (cfg.max_steps is not None and step >= cfg.max_steps) or (
                cfg.max_seconds is not None and train_seconds + time.perf_counter() - t_epoch > cfg.max_seconds
            ) or (cfg.deadline is not None and time.time() >= cfg.deadline):
                stop = True
                break
        train_seconds += time.perf_counter() - t_epoch
        if mode != "frozen":
            refresh_table()
        metrics = evaluate_model(model, data, data.val)
        metrics.update(epoch=epoch + 1, train_loss=float(run_loss) / max(n_loss, 1), seconds=time.perf_counter() - t0,
                       samples_per_s=samples / max(train_seconds, 1e-9))
        history.append(metrics)
        say(f"epoch {epoch + 1}: loss {metrics['train_loss']:.4f} val ndcg@10 {metrics['ndcg@10']:.4f} "
            f"new {metrics['ndcg@10_new']:.4f} ({samples / max(train_seconds, 1e-9):.0f} samples/s)")
        if report is not None:
            report(epoch + 1, metrics, model)
        if stop:
            break
    model.eval()
    return TrainResult(model, history[-1] if history else {}, history, train_seconds, samples, step, encoded)


def training_states(
    model: RecModel, data: TrainData, cfg: TrainConfig, say: Callable[[str], None] | None = None
) -> TokenStates | None:
    """The lower-layer token states the ``top_k`` path trains on: ``data.token_states`` when they end
    at or below the first trained layer (the layers in between run frozen), else encoded now with
    the model's own encoder; None for the token path (``frozen``, ``full``, ``cache_states=False``)."""
    if cfg.effective_mode() != "top_k" or not cfg.cache_states:
        return None
    n_layers = len(model.encoder.bert.encoder.layer)
    first = max(0, n_layers - cfg.unfrozen_layers)
    ts = getattr(data, "token_states", None)
    if ts is not None and ts.layer <= first and len(ts) == len(model.texts):
        return ts
    if ts is not None:
        (say or log.info)(f"cached token states end at layer {ts.layer} but layer {first} trains: encoding states now")
    t = time.perf_counter()
    out = encode_states(model.texts, model.encoder.bert, model.tokenizer, first, max_length=model.config.max_length)
    (say or log.info)(f"lower-layer token states of {len(out)} texts in {time.perf_counter() - t:.1f}s (not cached)")
    return out

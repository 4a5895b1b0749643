"""Torch modules of the recflow recommender: text encoder, item tower, user tower, repeat head."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import BertConfig, BertModel

from recflow.modeling.config import ModelConfig
from recflow.modeling.features import popularity_transform


def _mlp(n_in: int, hidden: int, n_out: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, n_out))


class TextEncoder(nn.Module):
    """A BERT encoder with attention-mask mean pooling and L2 normalisation (sentence-transformers style)."""

    def __init__(self, bert_config: dict[str, Any]) -> None:
        super().__init__()
        self.bert = BertModel(BertConfig(**bert_config), add_pooling_layer=False)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
        return F.normalize(pooled.float(), dim=-1)

    def set_trainable(self, mode: str, unfrozen_layers: int = 0) -> None:
        """``frozen``: nothing trains; ``top_k``: the last ``unfrozen_layers`` layers; ``full``: all."""
        if mode not in ("frozen", "top_k", "full"):
            raise ValueError(f"encoder mode {mode!r}: expected frozen, top_k or full")
        full = mode == "full"
        for p in self.parameters():
            p.requires_grad_(full)
        if mode == "top_k":
            layers = self.bert.encoder.layer
            for layer in layers[len(layers) - max(0, unfrozen_layers):]:
                for p in layer.parameters():
                    p.requires_grad_(True)


class RecModel(nn.Module):
    """Two towers over a fixed item catalogue, plus a per-item bias and a repeat (re-buy) head.

    score(user, item) = <u, v_item> / temperature + bias(item)                    (item not in history)
    score(user, item) = <u, v_item> / temperature + repeat_bias(item) + repeat(user, item)   (in history)

    - ``v_item`` = normalise(W · text_embedding(item) + id_embedding(item)); items without an id row
      (never bought in training: cold start) use row 0, so their vector comes from their text.
    - ``bias(item)`` = id_bias(item) + w · standardised log1p(item popularity features).
    - ``u`` = normalise(MLP([attention-pooled history item vectors, dense user features, profile embeddings])),
      the attention weights being computed from each history item's repeat/recency features.
    - ``repeat(user, item)`` = MLP(repeat/recency features); ``repeat_bias(item)`` = learned per-item
      re-buy bias + a linear function of popularity: the two modes (explore, re-buy) have separate
      item priors. Serving adds ``repeat_offset = repeat_bias - bias`` at history items.

    Buffers hold the catalogue: unique-text embeddings, each item's text row and id row, and a
    popularity snapshot (as of the end of the training data) for the default item index.
    """

    def __init__(self, config: ModelConfig, n_items: int, n_texts: int) -> None:
        super().__init__()
        c = config
        self.config = c
        self.encoder = TextEncoder(c.encoder)
        self.text_proj = nn.Linear(c.text_dim, c.dim)
        self.id_emb = nn.Embedding(c.n_ids, c.dim)
        nn.init.normal_(self.id_emb.weight, std=0.01)
        self.id_bias = nn.Embedding(c.n_ids, 1)
        nn.init.zeros_(self.id_bias.weight)
        self.repeat_bias = nn.Embedding(c.n_ids, 1)
        nn.init.zeros_(self.repeat_bias.weight)
        n_pop = len(c.popularity_features)
        self.pop_lin = nn.Linear(n_pop, 1)
        self.repeat_pop = nn.Linear(n_pop, 1)
        nn.init.zeros_(self.repeat_pop.weight)
        nn.init.zeros_(self.repeat_pop.bias)
        nf = c.n_history_features
        self.attention = _mlp(nf, c.hidden, 1, 0.0)
        self.repeat = _mlp(nf, c.hidden, 1, 0.0)
        self.profile_emb = nn.ModuleList(
            [nn.Embedding(len(c.profile_vocab.get(n, [])) + 2, c.profile_dim) for n in c.profile_features]
        )
        n_user_in = c.dim + c.n_user_features + c.profile_dim * len(c.profile_features)
        self.user_mlp = _mlp(n_user_in, c.hidden, c.dim, c.dropout)
        # catalogue and normalisation statistics (buffers: saved with the weights)
        self.register_buffer("text_emb", torch.zeros(n_texts, c.text_dim))
        self.register_buffer("item_text", torch.zeros(n_items, dtype=torch.long))
        self.register_buffer("item_id_row", torch.zeros(n_items, dtype=torch.long))
        self.register_buffer("popularity", torch.zeros(n_items, n_pop))
        self.register_buffer("pop_mean", torch.zeros(n_pop))
        self.register_buffer("pop_std", torch.ones(n_pop))
        self.register_buffer("user_mean", torch.zeros(c.n_user_features))
        self.register_buffer("user_std", torch.ones(c.n_user_features))
        self.register_buffer("hist_mean", torch.zeros(nf))
        self.register_buffer("hist_std", torch.ones(nf))
        self.item_ids: list[str] = [str(i) for i in range(n_items)]
        self.texts: list[str] = [""] * n_texts
        self.tokenizer: Any = None
        self._positions: dict[str, int] | None = None

    @property
    def positions(self) -> dict[str, int]:
        """``item_id -> catalogue position`` (rebuilt when the catalogue changes)."""
        if self._positions is None or len(self._positions) != len(self.item_ids):
            self._positions = {i: n for n, i in enumerate(self.item_ids)}
        return self._positions

    def set_catalogue(self, item_ids: list[str], texts: list[str]) -> None:
        """Attach the catalogue's item ids (one per ``item_text`` row) and unique texts (one per ``text_emb`` row)."""
        if len(item_ids) != len(self.item_text) or len(texts) != len(self.text_emb):
            raise ValueError(
                f"catalogue: {len(item_ids)} ids / {len(texts)} texts for buffers of "
                f"{len(self.item_text)} items / {len(self.text_emb)} texts"
            )
        if len(set(item_ids)) != len(item_ids):
            raise ValueError("catalogue: duplicate item ids")
        self.item_ids = [str(i) for i in item_ids]
        self.texts = list(texts)
        self._positions = None

    @torch.no_grad()
    def add_items(self, item_ids: list[str], texts: list[str], popularity: np.ndarray | None = None) -> int:
        """Add items unseen in training (cold start): their vectors come from their text (id row 0).

        Ids already in the catalogue are skipped. ``popularity`` is ``[n, P]`` raw features (default 0).
        Returns how many items were added; rebuild the item index afterwards.
        """
        if len(item_ids) != len(texts):
            raise ValueError(f"add_items: {len(item_ids)} ids but {len(texts)} texts")
        pos = self.positions
        new = [(n, str(i), t or "") for n, (i, t) in enumerate(zip(item_ids, texts, strict=True)) if str(i) not in pos]
        if not new:
            return 0
        text_row = {t: r for r, t in enumerate(self.texts)}
        unseen = sorted({t for _, _, t in new if t not in text_row})
        if unseen:
            emb = self.encode_texts(unseen).to(self.text_emb.device, self.text_emb.dtype)
            for t in unseen:
                text_row[t] = len(self.texts)
                self.texts.append(t)
            self.text_emb = torch.cat([self.text_emb, emb])
        dev = self.item_text.device
        rows = torch.tensor([text_row[t] for _, _, t in new], dtype=torch.long, device=dev)
        self.item_text = torch.cat([self.item_text, rows])
        self.item_id_row = torch.cat([self.item_id_row, torch.zeros(len(new), dtype=torch.long, device=dev)])
        pop = torch.zeros(len(new), self.popularity.shape[1], device=dev)
        if popularity is not None:
            pop = torch.as_tensor(np.asarray(popularity, dtype=np.float32)[[n for n, _, _ in new]], device=dev)
        self.popularity = torch.cat([self.popularity, pop])
        self.item_ids.extend(i for _, i, _ in new)
        self._positions = None
        return len(new)

    # --- item side -------------------------------------------------------------------------
    def item_vectors(self, text_emb: Tensor, id_rows: Tensor) -> Tensor:
        """Normalised item vectors ``[C, dim]`` from text embeddings ``[C, text_dim]`` and id rows ``[C]``."""
        v = self.text_proj(text_emb)
        if self.config.use_id_embedding:
            v = v + self.id_emb(id_rows)
        return F.normalize(v, dim=-1)

    def item_bias(self, id_rows: Tensor, pop_log: Tensor) -> Tensor:
        """Per-item bias ``[C]`` from id rows and log1p popularity features ``[C, P]``."""
        z = (pop_log - self.pop_mean) / self.pop_std
        return self.id_bias(id_rows).squeeze(-1) + self.pop_lin(z).squeeze(-1)

    def repeat_offset(self, id_rows: Tensor, pop_log: Tensor, bias: Tensor) -> Tensor:
        """Item part of the re-buy bonus ``[C]``: the item's re-buy prior (id + popularity) minus its
        exploration bias, so a history item is scored by its repeat-mode bias, not the explore one."""
        z = (pop_log - self.pop_mean) / self.pop_std
        return self.repeat_bias(id_rows).squeeze(-1) + self.repeat_pop(z).squeeze(-1) - bias

    # --- user side -------------------------------------------------------------------------
    def user_forward(
        self,
        hist_vecs: Tensor,
        hist_feats: Tensor,
        hist_mask: Tensor,
        hist_id_rows: Tensor,
        user_dense: Tensor,
        profile: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """User vectors already divided by the temperature ``[B, dim]`` and the user part of the
        repeat bonuses ``[B, H]`` (add :meth:`repeat_offset` of the items for the full bonus)."""
        f = (hist_feats - self.hist_mean) / self.hist_std
        att = self.attention(f).squeeze(-1).masked_fill(~hist_mask, -1e4)
        w = torch.softmax(att, dim=-1) * hist_mask
        pooled = torch.einsum("bh,bhd->bd", w.to(hist_vecs.dtype), hist_vecs)
        dense = (user_dense - self.user_mean) / self.user_std
        prof = [emb(profile[:, j]) for j, emb in enumerate(self.profile_emb)]
        x = torch.cat([pooled, dense, *prof], dim=-1)
        u = F.normalize(self.user_mlp(x) + pooled, dim=-1) / self.config.temperature
        rep = self.repeat(f).squeeze(-1)
        return u, rep * hist_mask

    # --- catalogue helpers -----------------------------------------------------------------
    def catalogue_text_embeddings(self, positions: Tensor | None = None) -> Tensor:
        rows = self.item_text if positions is None else self.item_text[positions]
        return self.text_emb[rows]

    def catalogue_popularity_log(self, popularity: np.ndarray | None = None) -> Tensor:
        raw = self.popularity.cpu().numpy() if popularity is None else popularity
        return torch.from_numpy(popularity_transform(raw)).to(self.pop_mean.device)

    @torch.no_grad()
    def encode_texts(self, texts: list[str], batch_size: int = 256) -> Tensor:
        """MiniLM embeddings ``[n, text_dim]`` (normalised) of raw texts, in eval mode, sorted by length for speed."""
        if self.tokenizer is None:
            raise RuntimeError("this model has no tokenizer; load it with load_model() or attach one")
        was_training = self.encoder.training
        self.encoder.eval()
        device = next(self.encoder.parameters()).device
        order = np.argsort([len(t) for t in texts], kind="stable")
        out = torch.zeros(len(texts), self.config.text_dim)
        for s in range(0, len(texts), batch_size):
            idx = order[s : s + batch_size]
            tok = self.tokenizer(
                [texts[i] for i in idx], padding=True, truncation=True,
                max_length=self.config.max_length, return_tensors="pt",
            )
            emb = self.encoder(tok["input_ids"].to(device), tok["attention_mask"].to(device))
            out[torch.from_numpy(idx)] = emb.float().cpu()
        self.encoder.train(was_training)
        return out

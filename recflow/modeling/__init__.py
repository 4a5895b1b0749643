"""recflow's recommender model, shared by training (which fits it) and serving (which loads it).

Depends on torch, transformers, numpy and safetensors only.

Model (:class:`RecModel`)::

    score(user, item) = <u, v_item> / temperature + bias(item)                           (explore)
                      = <u, v_item> / temperature + repeat_bias(item) + repeat(user, item)  (history items)

- item tower: MiniLM text embedding -> linear projection (+ id embedding; items never bought in
  training use id row 0, so cold-start items are scored from their text), L2-normalised;
- bias: learned per-item bias + a linear function of the item's popularity features;
- user tower: attention pooling of the history items' vectors (weights from each item's
  repeat/recency features), dense ``user_activity`` features and ``user_profile`` embeddings, MLP;
- repeat head: MLP over per-(user, history item) counts / time-decayed counts / recency /
  inter-purchase intervals (:mod:`recflow.modeling.features`); ``repeat_bias`` is the items'
  re-buy prior (per-item + popularity), separate from the exploration ``bias``.

Save / load (safetensors + JSON, never pickle)::

    save_model(model, folder, metadata)  # config.json, model.safetensors, catalogue.json, tokenizer/
    model = load_model(folder)           # eval mode, CPU by default
    read_metadata(folder)                # metadata only

Serving API::

    index = build_index(model, popularity=None)   # once: ItemIndex(item_ids, matrix [N, dim], bias [N],
                                                   #                 repeat_offset [N])
    q = user_query(model, features)                # one user's serving_v1 dict (Feast to_dict / row)
    scores = index.scores(q)                       # == index.matrix @ q.vector + index.bias, plus
                                                   #    q.bonus + index.repeat_offset[p] at p = q.bonus_positions
    index.top_k(q, k, exclude=(), exclude_history=False) -> [(item_id, score)]
    user_queries(model, [features, ...]); index.scores_batch(queries) -> [B, N]   # batched
    index.similar(item_id, k) -> [(item_id, cosine)]      # /similar: item-vector cosine
    search(model, "greek yogurt", k) / search_scores(model, query)   # /search: MiniLM text cosine
    model.add_items(ids, texts, popularity=None)   # cold-start items from text, then rebuild the index

``features`` keys are ``user_history__history_item_ids``, ``user_history__history_ts``,
``user_activity__<name>``, ``user_profile__<name>`` (prefix optional; values may be one-element
lists). Nothing depends on the wall clock: recency is measured from the user's latest history
timestamp, and the gap to "now" is ``user_activity__days_since_last_purchase``. A user with no
features gets a valid query (no re-buy bonus). ``popularity`` for :func:`build_index` maps
``purchases_7d, purchases_30d, buyers_30d, interactions_30d, trend`` (optionally prefixed
``item_popularity__``) to arrays aligned with ``model.item_ids``; default: the snapshot saved with
the model.

Tests: ``build_tiny_model()`` gives a small random model (tiny BertConfig, in-memory tokenizer).
"""

from recflow.modeling.build import (
    build_tiny_model,
    new_model,
    pretrained_encoder,
    tiny_tokenizer,
    unique_texts,
)
from recflow.modeling.config import ModelConfig
from recflow.modeling.features import HistoryBatch, history_features, user_dense
from recflow.modeling.io import load_model, read_metadata, save_model
from recflow.modeling.model import RecModel, TextEncoder
from recflow.modeling.serving import (
    ItemIndex,
    UserQuery,
    build_index,
    search,
    search_scores,
    user_queries,
    user_query,
    user_tensors,
)

__all__ = [
    "HistoryBatch",
    "ItemIndex",
    "ModelConfig",
    "RecModel",
    "TextEncoder",
    "UserQuery",
    "build_index",
    "build_tiny_model",
    "history_features",
    "load_model",
    "new_model",
    "pretrained_encoder",
    "read_metadata",
    "save_model",
    "search",
    "search_scores",
    "tiny_tokenizer",
    "unique_texts",
    "user_dense",
    "user_queries",
    "user_query",
    "user_tensors",
]

"""recflow's two-stage recommender core: candidates, time-aware features and a LightGBM ranker.

Shared by training (which fits the ranker on weekly anchors), the evaluation harness, the quality
benchmark and the service; depends on numpy, pandas, scipy, torch (top-k only) and lightgbm.

- :mod:`recflow.ranker.log`: :class:`PurchaseLog`, timestamped purchase lines (offline from the
  events, online from a user's pushed history);
- :mod:`recflow.ranker.features`: item, user and (user, item) statistics as of a time, and
  :func:`pair_features`, the ranker's feature function;
- :mod:`recflow.ranker.candidates`: the candidate sources (re-buy history, co-purchase, popular,
  trending, MiniLM text neighbours, cold items by text);
- :mod:`recflow.ranker.model`: :func:`score_users` (the one "score a user's candidates"),
  :class:`TwoStage` and its save / load (LightGBM text format);
- :mod:`recflow.ranker.recommend`: request-level top-k with filters and reason sentences.
"""

from recflow.ranker.candidates import CandidateConfig, ItemSide
from recflow.ranker.features import pair_features, user_context
from recflow.ranker.log import PurchaseLog
from recflow.ranker.model import Ranker, RankerConfig, TwoStage, load_two_stage, save_two_stage, score_users

__all__ = [
    "CandidateConfig",
    "ItemSide",
    "PurchaseLog",
    "Ranker",
    "RankerConfig",
    "TwoStage",
    "load_two_stage",
    "pair_features",
    "save_two_stage",
    "score_users",
    "user_context",
]

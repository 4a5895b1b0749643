"""The monitoring reference: what the model would have served for its validation week.

For the users who bought something in ``[as_of, as_of + eval_days)``, the serving FeatureService's
features as of ``as_of`` come from Feast's point-in-time join (the same feature names and values
the online store held then), go through the serving code path, and come out request-log shaped (``recflow.schemas.REQUEST_LOG_SCHEMA``)
with the features logged the way the service logs them (``recflow.schemas.logged_features``) and
the user ids pseudonymised as the service pseudonymises them (``recflow.privacy.pseudonym``).

The serving code path is the one ``/recommend`` takes for the model: with a two-stage ranker
(and ``serving.two_stage``), the two-stage scoring core (``recflow.ranker.recommend.recommend``)
over each user's point-in-time history, as the service ranks the online history; otherwise the
two-tower model's user tower and item index. So the reference's scores and items are on the same
scale as the served ones, and prediction drift compares like with like.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from recflow.settings import Settings

if TYPE_CHECKING:
    from feast import FeatureStore

    from recflow.modeling.model import RecModel
    from recflow.ranker.model import TwoStage


def validation_users(events: pd.DataFrame, start: pd.Timestamp, days: int) -> np.ndarray:
    """Users with a purchase in ``[start, start + days)``, sorted."""
    ts = pd.to_datetime(events["event_timestamp"], utc=True)
    window = (ts >= start) & (ts < start + pd.Timedelta(days=days)) & (events["event_type"] == "purchase")
    return np.sort(events.loc[window, "user_id"].astype(str).unique())


def build_reference(
    settings: Settings,
    model: RecModel,
    *,
    as_of: pd.Timestamp,
    users: np.ndarray,
    model_version: str,
    k: int = 10,
    store: FeatureStore | None = None,
    batch_size: int = 256,
    two_stage: TwoStage | None = None,
) -> pd.DataFrame:
    """Request-log rows: one ``/recommend`` answer per user, as served at ``as_of`` (by ``two_stage``
    when given, as the service serves a model with a ranker; else by the two-tower ``model``)."""
    from recflow.features.training_set import get_historical
    from recflow.modeling import build_index, user_queries
    from recflow.privacy import pseudonym, pseudonym_key
    from recflow.schemas import logged_features, request_log_row

    key = pseudonym_key(settings)
    profile = settings.privacy.log_profile

    as_of = pd.Timestamp(as_of).tz_convert("UTC") if pd.Timestamp(as_of).tzinfo else pd.Timestamp(as_of, tz="UTC")
    entity = pd.DataFrame({"user_id": pd.array(users, dtype="string"), "event_timestamp": as_of})
    frame, _ = get_historical(settings, entity, service=settings.feast.serving_service, store=store)
    records: list[dict[str, Any]] = frame.drop(columns=["event_timestamp"]).to_dict("records")
    records = [{key: _plain(v) for key, v in r.items()} for r in records]
    if two_stage is not None:
        return _two_stage_reference(two_stage, records, as_of, k, model_version, key, profile, batch_size)
    index = build_index(model)
    rows: list[dict[str, Any]] = []
    for s in range(0, len(records), batch_size):
        chunk = records[s : s + batch_size]
        queries = user_queries(model, chunk)
        scores = index.scores_batch(queries)
        kk = min(k, scores.shape[1])
        top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        order = np.take_along_axis(scores, top, 1).argsort(1)[:, ::-1]
        top = np.take_along_axis(top, order, 1)
        for f, q, t, sc in zip(chunk, queries, top, np.take_along_axis(scores, top, 1), strict=True):
            rows.append(request_log_row(
                request_id=uuid.uuid4().hex, ts=as_of, user_id=pseudonym(str(f["user_id"]), key), k=k,
                model_version=model_version, fallback=q.n_history == 0,
                features=logged_features(f, q.n_history, profile=profile),
                item_ids=[index.item_ids[i] for i in t], scores=sc.astype(np.float32).tolist(),
            ))
    return pd.DataFrame(rows)


def _two_stage_reference(
    model: TwoStage, records: list[dict[str, Any]], as_of: pd.Timestamp, k: int, model_version: str, key: bytes,
    profile: bool, batch_size: int,
) -> pd.DataFrame:
    """The two-stage model's answers for the point-in-time rows, as the service's two-stage path
    gives them: the purchases of the history feature view ranked as of ``as_of``; a user with
    none gets the popularity fallback."""
    from recflow.privacy import pseudonym
    from recflow.ranker.log import history_lines
    from recflow.ranker.recommend import Ask, recommend
    from recflow.schemas import logged_features, request_log_row

    at = int(as_of.value // 10**9)
    rows: list[dict[str, Any]] = []
    for s in range(0, len(records), batch_size):
        chunk = records[s : s + batch_size]
        asks, ranked_of, known = [], {}, {}
        for n, f in enumerate(chunk):
            hist = history_lines(f, model.reads_engagement)
            if hist is not None:
                ranked_of[n], known[n] = len(asks), sum(t == "purchase" for t in hist[2])
                asks.append(Ask(hist[0], hist[1], at, k, user_id=str(f["user_id"]),
                                history_types=hist[2] if model.reads_engagement else None))
        served: list[dict[str, float | None]] = []
        ranked = recommend(model, asks, served)
        for n, f in enumerate(chunk):
            model_features: dict[str, float | None] = {}  # no history: the fallback ranked nothing
            if n in ranked_of:
                positions = [p.position for p in ranked[ranked_of[n]]]
                scores = [p.score for p in ranked[ranked_of[n]]]
                model_features = served[ranked_of[n]]
            else:
                positions, scores = model.side.popular[:k].tolist(), [0.0] * min(k, len(model.side.popular))
            rows.append(request_log_row(
                request_id=uuid.uuid4().hex, ts=as_of, user_id=pseudonym(str(f["user_id"]), key), k=k,
                model_version=model_version, fallback=n not in ranked_of,
                features=logged_features(f, known.get(n, 0), profile=profile, model_features=model_features),
                item_ids=[str(model.item_ids[p]) for p in positions], scores=np.asarray(scores, np.float32).tolist(),
            ))
    return pd.DataFrame(rows)


def visit_reference(model: TwoStage, events: pd.DataFrame, *, start: pd.Timestamp, days: int, k: int,
                    model_version: str, key: bytes, max_rows: int, seed: int = 0, batch_size: int = 64) -> pd.DataFrame:
    """Request-log rows the way traffic arrives: one ``/recommend`` per basket of ``[start, start +
    days)``, at the basket's time, for the shopper, ranked by the two-stage core over their purchases
    before that time (at most ``max_rows`` sampled baskets). A user who shops three times in the week
    is three rows, at checkout moments, exactly as in the request log; a single as-of-week-start row
    per user would weight users and "days since the last purchase" differently from the traffic, and
    the drift tests would see that difference instead of a change in shoppers."""
    from recflow.privacy import pseudonym
    from recflow.ranker.log import epoch_seconds
    from recflow.ranker.recommend import Ask, recommend
    from recflow.schemas import logged_features, request_log_row

    p = events[events["event_type"] == "purchase"] if "event_type" in events.columns else events
    p = p.assign(user_id=p["user_id"].astype(str), item_id=p["item_id"].astype(str), t=epoch_seconds(p["event_timestamp"]))
    lo, hi = int(start.value // 10**9), int((start + pd.Timedelta(days=days)).value // 10**9)
    week = p[(p["t"] >= lo) & (p["t"] < hi)]
    visits = week.groupby(["user_id", "t"], sort=True).size().reset_index()[["user_id", "t"]]  # a basket: one user, one time
    if len(visits) > max_rows:
        visits = visits.sample(n=max_rows, random_state=seed).sort_values(["user_id", "t"], kind="stable")
    past = p[p["user_id"].isin(set(visits["user_id"])) & (p["t"] < hi)].sort_values(["user_id", "t"], kind="stable")
    by_user = {u: (g["item_id"].to_numpy(), g["t"].to_numpy()) for u, g in past.groupby("user_id", sort=False)}
    asks = []
    for u, t in visits.itertuples(index=False):  # one ask per visit (bounded by max_rows)
        ids, ts = by_user.get(u, (np.array([], dtype=object), np.array([], dtype=np.int64)))
        n = int(np.searchsorted(ts, t, side="left"))  # purchases strictly before the visit
        asks.append(Ask(ids[:n][::-1].tolist(), ts[:n][::-1].tolist(), int(t), k, user_id=u))
    rows: list[dict[str, Any]] = []
    for s in range(0, len(asks), batch_size):
        chunk = asks[s : s + batch_size]
        served: list[dict[str, float | None]] = []
        ranked = recommend(model, chunk, served)
        for a, picks, feats in zip(chunk, ranked, served, strict=True):
            has = len(a.history_ids) > 0
            row = {"user_history__history_item_ids": list(a.history_ids)}
            rows.append(request_log_row(
                request_id=uuid.uuid4().hex, ts=pd.Timestamp(a.as_of, unit="s", tz="UTC"),
                user_id=pseudonym(str(a.user_id), key), k=k, model_version=model_version, fallback=not has,
                features=logged_features(row, len(a.history_ids), model_features=feats if has else {}),
                item_ids=[str(model.item_ids[x.position]) for x in picks],
                scores=np.asarray([x.score for x in picks], np.float32).tolist(),
            ))
    return pd.DataFrame(rows)


def _plain(value: Any) -> Any:
    """Online-store-like values: lists for list features, None for missing scalars."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, list):
        return value
    try:
        return None if pd.isna(value) else value
    except (TypeError, ValueError):
        return value


def offline_window(settings: Settings, tag: str, start: pd.Timestamp, end: pd.Timestamp,
                   reference: pd.DataFrame | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Request-log rows and purchases for monitoring ``[start, end)`` without a service: model ``tag``'s
    two-stage answers for every basket from a quality horizon before ``start`` to ``end``, at the baskets'
    times (:func:`visit_reference`, the serving core), and the purchases of that span. When ``reference``
    (the same model's reference rows) lies wholly in the horizon before ``start``, as for the week right
    after the reference week, its rows are those answers already and are reused."""
    from recflow import registry
    from recflow.features.training_set import load_events
    from recflow.privacy import pseudonym_key
    from recflow.ranker import load_two_stage

    folder = registry.model_path(settings, tag) / registry.RANKER_DIR
    if not folder.is_dir():
        raise ValueError(f"model {tag} has no two-stage ranker: an offline window needs one")
    m = settings.monitoring
    events = load_events(settings)
    lists_from = start - pd.Timedelta(days=m.horizon_days)  # the quality report scores lists a horizon back
    ref_ts = pd.to_datetime(reference["ts"], utc=True) if reference is not None and len(reference) else None
    reuse = ref_ts is not None and ref_ts.min() >= lists_from and ref_ts.max() < start
    first = start if reuse else lists_from
    days = int((end - first) / pd.Timedelta(days=1))
    current = visit_reference(load_two_stage(folder), events, start=first, days=days,
                              k=settings.serving.default_k, model_version=tag, key=pseudonym_key(settings),
                              max_rows=2 * m.max_rows, seed=m.seed)
    if reuse:
        current = pd.concat([reference, current], ignore_index=True)
    ts = events["event_timestamp"]
    bought = events[(events["event_type"] == "purchase") & (ts >= lists_from) & (ts < end)]
    return current, bought

"""The service's online-store client: opening Feast, reading users' rows within a timeout, and the
circuit breaker that answers at once (degraded) while the store is down.

Reads run on a small thread pool, each bounded by ``serving.feature_timeout_s``, so a hung store
degrades answers instead of stalling them. After a failed read the circuit opens: requests get
``None`` (popularity, ``degraded``) without waiting, while one background probe read at a time
checks whether the store answers again.
"""

from __future__ import annotations

import contextlib
import logging
import time
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from recflow.settings import Settings
from serving.errors import RateLimitedLog
from serving.metrics import metrics
from serving.model_source import ModelNotFound
from serving.online_reader import OnlineUserReader

if TYPE_CHECKING:
    from feast import FeatureService, FeatureStore

log = logging.getLogger("recflow.serving")
PROBE_WAIT_S = 0.02  # longest a request waits for a probe of an online store that failed (one per cooldown)


@dataclass
class StoreClient:
    """Online features of users for one worker (see the module docstring). :meth:`start` makes the
    read pool; :meth:`open` (on the loader thread) opens the store."""

    settings: Settings
    store: FeatureStore | None = None
    reader: OnlineUserReader | None = None
    _pool: Executor | None = None
    _warn: RateLimitedLog = field(default_factory=RateLimitedLog)
    _down_until: float = 0.0  # 0: the store answers; else the circuit is open (no probe before this time)
    _probe: Future[Any] | None = None
    _probe_started: float = 0.0

    def start(self) -> None:
        self._pool = ThreadPoolExecutor(4, thread_name_prefix="recflow-features")

    def stop(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def open(self) -> None:
        """Open the feature store and the reader of the serving FeatureService (loader thread)."""
        from recflow import feature_store as fs

        store = fs.get_store(self.settings)
        if not self.settings.paths.feast_registry.exists() and self.settings.feast.online_store == "redis":
            log.warning("no Feast registry at %s: applying the bundled feature definitions", self.settings.paths.feast_registry)
            fs.apply(self.settings, store)
        self.reader = OnlineUserReader(store, self.serving_service(store))
        self.store = store

    def refresh(self) -> None:
        """Re-read the Feast registry and rebuild the reader (a reload: new feature views may have landed)."""
        assert self.store is not None
        self.store.refresh_registry()
        self.reader = OnlineUserReader(self.store, self.serving_service(self.store))

    def serving_service(self, store: FeatureStore) -> FeatureService:
        name = self.settings.feast.serving_service
        try:
            return store.get_feature_service(name)
        except Exception as exc:  # noqa: BLE001 - Feast raises several kinds; make it actionable
            raise ModelNotFound(
                f"Feast feature service {name!r} not found in {self.settings.paths.feast_registry}: run `recflow features`"
            ) from exc

    @property
    def stamp_keys(self) -> list[str]:
        """The reader's row-timestamp columns (what says a user's row changed)."""
        return self.reader.stamp_keys if self.reader is not None else []

    def fetch(self, user_ids: list[str]) -> dict[str, dict[str, Any]] | None:
        """Online features of ``user_ids`` (None when the store failed or timed out: degraded)."""
        assert self._pool is not None and self.reader is not None
        if not user_ids:
            return {}
        if self._down_until and not self._back(user_ids[0]):  # circuit open: answer at once, degraded
            return None
        fut = self._pool.submit(self.reader, user_ids)
        try:
            rows = fut.result(timeout=self.settings.serving.feature_timeout_s)
        except Exception as exc:  # noqa: BLE001 - any store failure degrades to popularity
            fut.cancel()
            self._down_until = self._probe_started = time.monotonic()
            self._probe = self._pool.submit(self.reader, user_ids[:1])  # is it back? (off the request path)
            metrics()["store_errors"].labels("read").inc()
            self._warn.warn("online store read failed, serving popularity (degraded) until a background read "
                            "answers again (one every %.1f s): %s: %s", self.settings.serving.store_cooldown_s,
                            type(exc).__name__, str(exc)[:200])
            return None
        return dict(zip(user_ids, rows, strict=True))

    def _back(self, user_id: str) -> bool:
        """Whether the store answers again, while the circuit is open. One probe read at a time runs in
        the background, and the circuit closes as soon as one answers; a request waits for a fresh
        probe at most ``PROBE_WAIT_S`` (a recovered store serves that request at once), never the
        whole ``feature_timeout_s``, and a failed probe is retried after ``store_cooldown_s``. So a
        hung store costs one ``feature_timeout_s`` stall in all, not one per cooldown."""
        assert self._pool is not None and self.reader is not None
        s = self.settings.serving
        probe = self._probe
        if probe is not None and not probe.done() and time.monotonic() - self._probe_started > s.feature_timeout_s:
            # a probe as slow as a failed read: give up on it (its thread ends when the store answers)
            probe = self._probe = None
            self._down_until = self._probe_started + s.store_cooldown_s
        if probe is None:
            if time.monotonic() < self._down_until:
                return False
            self._probe_started = time.monotonic()
            probe = self._probe = self._pool.submit(self.reader, [user_id])
            # still down or still hung: decided below, or by the next request
            with contextlib.suppress(Exception):
                probe.result(timeout=min(PROBE_WAIT_S, s.feature_timeout_s))
        if not probe.done():
            return False
        self._probe = None
        if probe.exception() is None:
            self._down_until = 0.0
            return True
        self._down_until = self._probe_started + s.store_cooldown_s  # a probe per cooldown
        return False

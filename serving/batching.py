"""Adaptive micro-batching for in-process work (one matrix product for many concurrent requests).

:class:`MicroBatcher` queues items from concurrent requests; a single consumer takes everything
that queued while the previous batch ran (up to ``max_batch``, optionally waiting ``wait_s``
for more) and hands it to ``fn`` in a worker thread. At low load a request runs alone at once;
under load batches grow by themselves, so the per-batch costs (feature read, user tower, one
``[B, dim] x [dim, N]`` product) are shared.

Why not ``@bentoml.api(batchable=True)``: BentoML's batchable endpoints take a list as their HTTP
body, and calling one from a single-request endpoint goes through the service's self-proxy (an
in-process HTTP round trip), which here failed under concurrent load with
``ServerDisconnectedError`` -> 500. The queueing policy is the same (natural batching).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class MicroBatcher(Generic[T, R]):
    """Batch concurrent :meth:`submit` calls into calls of ``fn(list_of_items) -> list_of_results``.

    ``fn`` runs in ``executor``; it returns one result per item, or an ``Exception`` instance for
    an item that failed (raised to that caller only). If ``fn`` raises, every caller of the batch
    gets the exception. ``on_batch(size, seconds)`` is called after each batch (metrics).
    """

    def __init__(
        self,
        fn: Callable[[list[T]], Sequence[R | BaseException]],
        executor: Executor,
        *,
        max_batch: int = 64,
        wait_s: float = 0.0,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        self._fn = fn
        self._executor = executor
        self._max_batch = max(1, max_batch)
        self._wait_s = max(0.0, wait_s)
        self._on_batch = on_batch
        self._queue: asyncio.Queue[tuple[T, asyncio.Future[R]]] | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the consumer on the running event loop (idempotent)."""
        if self._task is None or self._task.done():
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="recflow-batcher")

    async def stop(self) -> None:
        """Stop the consumer; queued callers get ``RuntimeError``."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        while self._queue is not None and not self._queue.empty():
            _, fut = self._queue.get_nowait()
            if not fut.done():
                fut.set_exception(RuntimeError("service is shutting down"))

    async def submit(self, item: T) -> R:
        """Queue ``item`` and wait for its result."""
        if self._queue is None:
            self.start()
        assert self._queue is not None
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        await self._queue.put((item, fut))
        return await fut

    async def _run(self) -> None:
        assert self._queue is not None
        queue = self._queue
        loop = asyncio.get_running_loop()
        while True:
            batch = [await queue.get()]
            if self._wait_s > 0:
                deadline = loop.time() + self._wait_s
                while len(batch) < self._max_batch and (left := deadline - loop.time()) > 0:
                    try:
                        batch.append(await asyncio.wait_for(queue.get(), left))
                    except TimeoutError:
                        break
            while len(batch) < self._max_batch and not queue.empty():
                batch.append(queue.get_nowait())
            live = [(item, fut) for item, fut in batch if not fut.done()]  # skip callers that went away
            if not live:
                continue
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self._fn, [item for item, _ in live])
                if len(results) != len(live):
                    raise RuntimeError(f"batch function returned {len(results)} results for {len(live)} items")
            except Exception as exc:  # noqa: BLE001 - delivered to every caller of the batch
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), result in zip(live, results, strict=True):
                if fut.done():
                    continue
                if isinstance(result, BaseException):
                    fut.set_exception(result)
                else:
                    fut.set_result(result)
            if self._on_batch is not None:
                self._on_batch(len(live), time.perf_counter() - started)

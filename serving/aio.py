"""Small asyncio helpers shared by the service's parts."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Iterator
from typing import Any


async def cancel_tasks(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel ``tasks`` and wait until each has ended (whatever it raised)."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


@contextlib.contextmanager
def stop_signals() -> Iterator[asyncio.Event]:
    """An event set when SIGTERM or SIGINT arrives while the block runs (event loop of the main
    thread). The handler in place before (uvicorn's, which starts the shutdown) still gets the
    signal; a default disposition is restored and the signal re-sent, so nothing is swallowed.

    Uvicorn notes a stop signal during start-up but acts on it only once start-up is over, and the
    service's start-up waits for its model (``serving.startup_wait_s``): a start-up hook that waits
    inside this block stops waiting when asked to stop, so a signal ends a loading worker at once."""
    loop = asyncio.get_running_loop()
    event = asyncio.Event()
    sigs = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.getsignal(sig) for sig in sigs}

    def handler(signum: int, frame: Any) -> None:
        loop.call_soon_threadsafe(event.set)
        before = previous[signum]
        if callable(before):
            before(signum, frame)
        elif before == signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    for sig in sigs:
        signal.signal(sig, handler)
    try:
        yield event
    finally:
        for sig in sigs:
            if signal.getsignal(sig) is handler:
                signal.signal(sig, previous[sig])

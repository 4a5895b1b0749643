"""Cross-process file locks (``fcntl.flock``) with a bounded wait, for writers on one machine.

A lock is held by an open file description, so it is released when the holder closes the file or
dies (a SIGKILLed worker never leaves it held). ``flock`` is not reliable over NFS and does not
reach other hosts: it serialises the processes of one machine only.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path


class LockTimeout(TimeoutError):
    """The lock stayed held by another process for longer than the wait allowed."""


@contextlib.contextmanager
def file_lock(path: Path, timeout_s: float, poll_s: float = 0.005) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created, with its folder) for the ``with`` block.

    Waits at most ``timeout_s`` for another holder, then raises :class:`LockTimeout` naming the file,
    so a stuck holder cannot block the caller for longer than that."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockTimeout(f"{path} stayed locked by another process for {timeout_s:.1f} s") from None
                time.sleep(poll_s)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)

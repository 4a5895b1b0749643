"""Cross-process locks with a bounded wait.

- :func:`file_lock`: ``fcntl.flock``, for writers on one machine. A lock is held by an open file
  description, so it is released when the holder closes the file or dies (a SIGKILLed worker never
  leaves it held). ``flock`` is not reliable over NFS and does not reach other hosts.
- :func:`redis_lock`: redis-py's lock (``SET NX PX`` with a random owner token), for writers on
  several machines that share a Redis. It expires after a lease, so a dead holder frees it too; a
  holder that outlives its lease gets :class:`LockLost` on release, and its caller retries.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class LockTimeout(TimeoutError):
    """The lock stayed held by another process for longer than the wait allowed."""


class LockLost(RuntimeError):
    """A lease-based lock expired (or was taken over) before its holder released it."""


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


@contextlib.contextmanager
def redis_lock(client: Any, name: str, timeout_s: float, lease_s: float) -> Iterator[None]:
    """Hold the Redis lock ``name`` on ``client`` (a ``redis.Redis``) for the ``with`` block.

    Waits at most ``timeout_s`` for another holder (then :class:`LockTimeout` naming the lock); the
    lock expires ``lease_s`` seconds after it was taken, whoever holds it, so keep the block well
    under that. Releasing a lock that already expired raises :class:`LockLost` (the block may have
    overlapped another holder's: redo the work if it is not idempotent)."""
    from redis.exceptions import LockError, LockNotOwnedError

    lock = client.lock(name, timeout=lease_s, sleep=0.005, blocking=True, blocking_timeout=timeout_s)
    if not lock.acquire():
        raise LockTimeout(f"Redis lock {name!r} stayed held by another process for {timeout_s:.1f} s")
    try:
        yield
    finally:
        try:
            lock.release()
        except (LockNotOwnedError, LockError) as exc:
            raise LockLost(f"Redis lock {name!r} expired after its {lease_s:.1f} s lease before it was released; "
                           "raise feedback.push_lock_lease_s above the slowest push") from exc

"""The service's error answers: each carries an HTTP status, a message and the request field it is about."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("recflow.serving")


class ServiceError(Exception):
    """An answer other than 200: ``status``, a message, and the request field it is about."""

    status = 500

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class BadRequest(ServiceError):
    status = 400


class NotReady(ServiceError):
    status = 503


class NotFound(ServiceError):
    status = 404


class Unauthorized(ServiceError):
    status = 401


class Conflict(ServiceError):
    status = 409


class Unprocessable(ServiceError):
    status = 422


@dataclass
class RateLimitedLog:
    """A warning at most once per ``every_s``, counting the ones it suppressed in between (a failing
    store must not flood the log with one line per request)."""

    every_s: float = 10.0
    last: float = 0.0
    suppressed: int = 0

    def warn(self, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self.last >= self.every_s:
            extra = f" ({self.suppressed} similar message(s) suppressed)" if self.suppressed else ""
            log.warning(msg + extra, *args)
            self.last, self.suppressed = now, 0
        else:
            self.suppressed += 1

"""Secrets in the recflow home, bearer tokens, and keeping server details out of answers.

- :func:`secret_file` reads a secret from ``<home>/secrets/`` (folder mode 0700, file mode 0600),
  creating it with random contents on first use; several processes may race to create it and all
  read the same value (the file is written aside, then hard-linked into place).
- :func:`serving_token` is the bearer token of the mutating endpoints: ``serving.token`` when set,
  else ``<home>/secrets/serving_token``; :func:`auth_headers` is what clients send.
- :func:`reveal` turns a :class:`pydantic.SecretStr` (or a plain string set with ``model_copy``)
  into its value; ``recflow config`` and logs only ever see ``**********``.
- :func:`redact` takes file-system paths out of a message before it leaves the service.

Nothing happens at import time.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import stat
from pathlib import Path

from pydantic import SecretStr

from recflow.settings import Settings

TOKEN_FILE = "serving_token"
PSEUDONYM_KEY_FILE = "pseudonym_key"
_PATH = re.compile(r"(?<![\w.:/>-])/(?:[^\s'\"`,;:()<>]+/)+[^\s'\"`,;:()<>]*")
_API_ROUTES = ("/feedback/batch",)


class InsecureSecret(RuntimeError):
    """A secret file (or its folder) that other users can read or change."""


def reveal(value: SecretStr | str | None) -> str | None:
    """The plain value of a secret setting (None and empty strings stay None)."""
    if value is None:
        return None
    text = value.get_secret_value() if isinstance(value, SecretStr) else str(value)
    return text or None


def secrets_dir(settings: Settings, create: bool = True) -> Path:
    """``<home>/secrets`` (mode 0700, created when ``create``); refuses a folder others can use."""
    folder = settings.paths.secrets
    if create:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    if folder.exists():
        mode = stat.S_IMODE(folder.stat().st_mode)
        if mode & 0o077:
            raise InsecureSecret(f"{folder} has mode {mode:o}; other users can reach the secrets in it. "
                                 f"Run: chmod 700 {folder}")
    return folder


def _check_file(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise InsecureSecret(f"{path} has mode {mode:o}; other users can read it. Run: chmod 600 {path} "
                             "(and rotate the secret if it may have been read)")


def secret_file(settings: Settings, name: str, *, nbytes: int = 32, create: bool = True) -> tuple[str | None, Path, bool]:
    """``(value, path, created)`` of the secret ``<home>/secrets/<name>``.

    The value is URL-safe text (``nbytes`` random bytes); it is created when missing and ``create``
    is true, else ``None`` is returned for a missing file. Raises :class:`InsecureSecret` when the
    file or folder is readable by others.
    """
    folder = secrets_dir(settings, create=create)
    path = folder / name
    if path.is_file():
        _check_file(path)
        return path.read_text().strip() or None, path, False
    if not create:
        return None, path, False
    tmp = folder / f".{name}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(nbytes) + "\n")
            out.flush()
            os.fsync(out.fileno())
        try:
            os.link(tmp, path)  # atomic, and fails when another process won the race
            created = True
        except FileExistsError:
            created = False
    finally:
        tmp.unlink(missing_ok=True)
    _check_file(path)
    return path.read_text().strip(), path, created


def serving_token(settings: Settings, *, create: bool = False) -> str | None:
    """The write token: ``serving.token`` when set, else ``<home>/secrets/serving_token`` (created
    when ``create``). None when neither exists (a client then sends no token)."""
    configured = reveal(settings.serving.token)
    if configured:
        return configured
    return secret_file(settings, TOKEN_FILE, create=create)[0]


def token_path(settings: Settings) -> Path:
    """Where a generated write token lives."""
    return settings.paths.secrets / TOKEN_FILE


def auth_headers(settings: Settings) -> dict[str, str]:
    """``Authorization: Bearer <write token>`` for clients of /feedback and /reload ({} without one)."""
    token = serving_token(settings)
    return {"Authorization": f"Bearer {token}"} if token else {}


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_auth_setting(settings: Settings, host: str | None = None) -> None:
    """Refuse ``serving.auth_disabled`` on a host other than loopback (``ValueError`` saying what to do)."""
    host = host or settings.serving.host
    if settings.serving.auth_disabled and not is_loopback(host):
        raise ValueError(f"serving.auth_disabled=true is refused on host {host!r}: without auth, only a "
                         "loopback host (127.0.0.1, ::1, localhost) is allowed. Unset "
                         "RECFLOW_SERVING__AUTH_DISABLED, or bind to 127.0.0.1.")


def redact(text: str, settings: Settings | None = None) -> str:
    """``text`` with the recflow home and other absolute paths replaced (``<home>``, ``<path>``)."""
    if settings is not None:
        text = text.replace(str(settings.home), "<home>")

    def sub(match: re.Match[str]) -> str:
        return match.group(0) if match.group(0).startswith(_API_ROUTES) else "<path>"

    return _PATH.sub(sub, text)

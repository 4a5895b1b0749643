"""Durable file replacement: the bytes reach the disk before the new name points at them.

``os.replace`` alone is atomic but not durable: after a power loss the rename can survive while
the file's data does not (an empty or truncated file under the final name). :func:`replace_durably`
fsyncs the temporary file, renames it, then fsyncs the folder so the rename itself is on disk.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_file(path: Path) -> None:
    """Flush ``path``'s data and metadata to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    """Flush ``folder``'s entries (a rename or a new file in it) to the disk."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(tmp: Path, dest: Path) -> None:
    """fsync ``tmp``, rename it to ``dest`` atomically, fsync ``dest``'s folder. Raises ``OSError``
    (``dest`` unchanged when it happens before the rename)."""
    fsync_file(tmp)
    os.replace(tmp, dest)
    fsync_dir(dest.parent)


def write_text_durably(path: Path, text: str, mode: int | None = None) -> None:
    """Replace ``path`` with ``text`` atomically and durably (a temporary file next to it, removed on
    error); with ``mode`` (e.g. 0o600 for a secret) the file is created with it, never wider first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if mode is None:
            tmp.write_text(text)
        else:
            tmp.unlink(missing_ok=True)
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "w") as out:
                out.write(text)
        replace_durably(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

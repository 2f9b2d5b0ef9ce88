"""Crash-safe file writes: write a temp file in the same directory, fsync it, rename it over, fsync the directory.

After ``atomic_write`` returns, the file holds either the old or the new content after any crash, never a mix.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` atomically; ``durable`` also survives power loss (fsync)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if durable:
        fsync_dir(path.parent)


def publish(tmp: Path, path: Path) -> bool:
    """Move an fsynced temp file to ``path`` unless ``path`` exists; True if moved.

    Callers hold the session's lock, so the exists-check and the rename cannot interleave with another upload.
    """
    if path.exists():
        return False
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return True

"""Receive a request body straight into a temp file, enforcing the size limit while it streams.

The body is never held whole in memory: chunks are gathered into ~1 MiB writes that run on a worker thread, so
the event loop keeps serving other requests while a multi-GB state arrives.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request

from .errors import ServiceError

WRITE_BYTES = 1 << 20


def too_large(limit: int) -> ServiceError:
    return ServiceError(413, "body_too_large", f"the body exceeds this server's limit of {limit} bytes "
                        "(NINOCAST_MAX_BODY_BYTES)")


async def receive_to_file(request: Request, tmp_dir: Path, limit: int, quota_left: int) -> tuple[Path, int]:
    """Stream the body into a new fsynced file under ``tmp_dir``; (path, size). The caller owns the file."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit():
        if int(declared) > limit:
            raise too_large(limit)
        if int(declared) > quota_left:
            raise quota_exceeded(quota_left)
    fd, name = tempfile.mkstemp(dir=tmp_dir, prefix="upload-", suffix=".safetensors")
    path = Path(name)
    f = os.fdopen(fd, "wb", buffering=0)
    size, pending, pending_n = 0, [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large(limit)
            if size > quota_left:
                raise quota_exceeded(quota_left)
            pending.append(chunk)
            pending_n += len(chunk)
            if pending_n >= WRITE_BYTES:
                await run_in_threadpool(_write, f, pending)
                pending, pending_n = [], 0
        await run_in_threadpool(_finish, f, pending)
    except ClientDisconnect:
        _discard(f, path)
        raise ServiceError(400, "client_disconnected", "the client closed the connection before the body ended")
    except BaseException:
        _discard(f, path)
        raise
    return path, size


def quota_exceeded(left: int) -> ServiceError:
    return ServiceError(507, "disk_quota_exceeded",
                        f"this API key has {max(left, 0)} bytes of disk quota left (NINOCAST_DISK_QUOTA_PER_KEY); "
                        "delete sessions to free space")


def _write(f, chunks: list[bytes]) -> None:
    for c in chunks:
        view = memoryview(c)
        while view:  # raw writes may be partial
            view = view[f.write(view):]


def _finish(f, chunks: list[bytes]) -> None:
    _write(f, chunks)
    os.fsync(f.fileno())
    f.close()


def _discard(f, path: Path) -> None:
    try:
        f.close()
    finally:
        path.unlink(missing_ok=True)

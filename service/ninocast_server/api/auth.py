"""API keys: bearer tokens of which the server keeps only SHA-256 hashes, one name per key.

Keys are 256-bit random strings (``secrets.token_urlsafe``), so a plain SHA-256 is enough: there is nothing to
brute-force. A session belongs to the key's *owner id* (a prefix of the hash), which names its directory on disk.
The keys file is re-read when it changes, so ``ninocast keys add`` takes effect without a restart.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..sessions.atomic import atomic_write
from ..sessions.errors import ServiceError

log = logging.getLogger("ninocast.auth")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
LOCAL_OWNER = "local"  # the single user of an open-mode server
KEY_PREFIX = "nc_"


@dataclass(frozen=True)
class KeyEntry:
    name: str
    sha256: str
    created: float

    @property
    def owner(self) -> str:
        return "k" + self.sha256[:24]


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def read_keys(path: Path) -> list[KeyEntry]:
    """The entries of a keys file; an absent file holds no keys."""
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as e:
        raise ValueError(f"keys file {path} is unreadable: {e}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("keys"), list):
        raise ValueError(f"keys file {path} must be a JSON object with a 'keys' list")
    return [_entry(k, i, path) for i, k in enumerate(obj["keys"])]


def _entry(raw: object, i: int, path: Path) -> KeyEntry:
    """One checked entry: a file edited by hand must fail here, with its position, not as a 500 later."""
    where = f"keys file {path}: keys[{i}]"
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be an object {{name, sha256, created?}}, got {type(raw).__name__}")
    name, digest, created = raw.get("name"), raw.get("sha256"), raw.get("created", 0)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: 'name' must be a non-empty string, got {name!r}"[:300])
    if not isinstance(digest, str) or not SHA256_HEX.fullmatch(digest):
        raise ValueError(f"{where} ({name!r}): 'sha256' must be 64 lower-case hex digits, got {digest!r}"[:300])
    if isinstance(created, bool) or not isinstance(created, (int, float)):
        raise ValueError(f"{where} ({name!r}): 'created' must be a number, got {created!r}"[:300])
    return KeyEntry(name, digest, float(created))


def write_keys(path: Path, entries: list[KeyEntry]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"version": 1, "keys": [{"name": e.name, "sha256": e.sha256, "created": e.created} for e in entries]}
    atomic_write(path, (json.dumps(body, indent=1) + "\n").encode())
    os.chmod(path, 0o600)


def add_key(path: Path, name: str) -> str:
    """Create a key named ``name``; returns the key itself (shown once, never stored)."""
    entries = read_keys(path)
    if any(e.name == name for e in entries):
        raise ValueError(f"a key named {name!r} exists already in {path}; revoke it first or pick another name")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    write_keys(path, entries + [KeyEntry(name, hash_key(key), time.time())])
    return key


def revoke_key(path: Path, name: str) -> None:
    entries = read_keys(path)
    if not any(e.name == name for e in entries):
        raise ValueError(f"no key named {name!r} in {path}")
    write_keys(path, [e for e in entries if e.name != name])


class Authenticator:
    """Maps an Authorization header to an owner id (or raises 401)."""

    def __init__(self, keys_file: Path | None) -> None:
        self.keys_file = keys_file
        self._by_hash: dict[str, KeyEntry] = {}
        self._mtime: float | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        if keys_file is not None:
            self._reload(force=True)

    @property
    def open(self) -> bool:
        return self.keys_file is None

    def _reload(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked < 1.0:
            return
        with self._lock:
            self._checked = now
            assert self.keys_file is not None
            try:
                mtime = self.keys_file.stat().st_mtime_ns
            except FileNotFoundError:
                mtime = None
            if not force and mtime == self._mtime:
                return
            try:
                self._by_hash = {e.sha256: e for e in read_keys(self.keys_file)}
            except ValueError as e:
                if force:
                    raise
                log.error("%s; keeping the keys read before", e)
                self._mtime = mtime  # say it once per change, not on every request
                return  # keep the last good keys if the file is broken mid-edit
            self._mtime = mtime

    def owner(self, authorization: str | None) -> str:
        if self.keys_file is None:
            return LOCAL_OWNER
        if not authorization:
            raise ServiceError(401, "missing_api_key", "send an API key as 'Authorization: Bearer KEY'",
                               {"WWW-Authenticate": "Bearer"})
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ServiceError(401, "invalid_api_key", "the Authorization header must be 'Bearer KEY'",
                               {"WWW-Authenticate": "Bearer"})
        self._reload()
        entry = self._by_hash.get(hash_key(token.strip()))
        if entry is None:
            raise ServiceError(401, "invalid_api_key", "this API key is not known to the server (revoked?)",
                               {"WWW-Authenticate": "Bearer"})
        return entry.owner


BEARER = HTTPBearer(auto_error=False, scheme_name="apiKey",
                    description="Authorization: Bearer KEY (from `ninocast keys add`); not needed in open mode")


def require_owner(request: Request, _: HTTPAuthorizationCredentials | None = Depends(BEARER)) -> str:
    """FastAPI dependency: the owner id of the request's API key (already checked by api.limits.RequestGuard,
    before any body was read)."""
    owner = request.scope.get("state", {}).get("owner")
    return owner if owner is not None else request.app.state.server.auth.owner(request.headers.get("authorization"))

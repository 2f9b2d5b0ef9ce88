"""The session store: session records and acknowledged states on disk, indexed in memory.

Layout under the data dir (one directory per API key, so isolation and quotas are per directory)::

    owners/<owner>/<session id>/session.json                 settings + nowcast history (atomic rewrite)
    owners/<owner>/<session id>/states/<step>.safetensors     one acknowledged state per step
    tmp/      uploads being received (same filesystem, so publishing is a rename); emptied at start-up
    trash/    deleted sessions on their way out; emptied at start-up

The files are the truth: at start-up the index is rebuilt from them, so a SIGKILL loses nothing acknowledged.
"""

from __future__ import annotations

import filecmp
import json
import logging
import os
import secrets
import shutil
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from ninocast.spec import ModelSpec, SpecError

from .atomic import atomic_write, fsync_dir, publish
from .errors import ServiceError, not_found, quota_exceeded

log = logging.getLogger("ninocast.sessions")
RECORD = "session.json"


@dataclass
class Session:
    id: str
    owner: str
    spec: ModelSpec
    nowcaster: str
    ctx: int
    period: int
    max_train_steps: int
    record: bool
    name: str | None
    created: float
    last_used: float
    dir: Path
    states: dict[int, int] = field(default_factory=dict)  # step -> bytes on disk
    nowcasts: list[dict[str, Any]] = field(default_factory=list)
    reports: list[dict[str, Any]] = field(default_factory=list)  # clients' verification reports, one per step
    n_nowcasts: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def spacing(self) -> int:
        """Optimiser steps between the snapshots a nowcast reads (what a routed nowcaster picks its member by)."""
        return self.period // self.ctx

    @cached_property
    def spec_fingerprint(self) -> str:
        """Hashing a 10,000-tensor spec takes milliseconds: once per session, not once per GET."""
        return self.spec.fingerprint()

    def state_path(self, step: int) -> Path:
        return self.dir / "states" / f"{step}.safetensors"

    def newest_steps(self, n: int) -> list[int]:
        """The newest n steps held, oldest first."""
        return sorted(self.states)[-n:]

    def record_json(self) -> dict[str, Any]:
        return {"id": self.id, "owner": self.owner, "name": self.name, "spec": self.spec.to_json(),
                "nowcaster": self.nowcaster, "ctx": self.ctx, "period": self.period,
                "max_train_steps": self.max_train_steps, "record": self.record, "created": self.created,
                "last_used": self.last_used, "n_nowcasts": self.n_nowcasts, "nowcasts": self.nowcasts,
                "reports": self.reports}


class SessionStore:
    def __init__(self, data_dir: Path, max_sessions_per_key: int, ttl_s: float, max_history: int) -> None:
        self.root = data_dir
        self.owners_dir, self.tmp_dir, self.trash_dir = data_dir / "owners", data_dir / "tmp", data_dir / "trash"
        self.max_sessions_per_key, self.ttl_s, self.max_history = max_sessions_per_key, ttl_s, max_history
        self._sessions: dict[tuple[str, str], Session] = {}
        self._bytes: dict[str, int] = {}
        self._reserved: dict[str, int] = {}  # bytes of uploads in flight, per owner
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ start-up
    def open(self) -> None:
        """Create the layout, drop leftovers of interrupted uploads and deletes, index every session."""
        for d in (self.owners_dir, self.tmp_dir, self.trash_dir):
            d.mkdir(parents=True, exist_ok=True)
        for d in (self.tmp_dir, self.trash_dir):
            for p in d.iterdir():
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        for owner_dir in self.owners_dir.iterdir():
            for sdir in owner_dir.iterdir() if owner_dir.is_dir() else ():
                try:
                    s = self._load(sdir)
                except (OSError, ValueError, KeyError, TypeError, SpecError) as e:
                    log.error("skipping unreadable session %s: %s", sdir, e)
                    continue
                if s is not None:
                    self._sessions[(s.owner, s.id)] = s
                    self._bytes[s.owner] = self._bytes.get(s.owner, 0) + sum(s.states.values())
        log.info("session store %s: %d sessions", self.root, len(self._sessions))

    def _load(self, sdir: Path) -> Session | None:
        rec_path = sdir / RECORD
        if not rec_path.exists():  # created dir but crashed before the record: never acknowledged
            shutil.rmtree(sdir, ignore_errors=True)
            return None
        rec = json.loads(rec_path.read_text())
        s = Session(id=rec["id"], owner=rec["owner"], spec=ModelSpec.from_json(rec["spec"]),
                    nowcaster=rec["nowcaster"], ctx=rec["ctx"], period=rec["period"],
                    max_train_steps=rec["max_train_steps"], record=rec["record"], name=rec.get("name"),
                    created=rec["created"], last_used=rec["last_used"], dir=sdir,
                    nowcasts=rec.get("nowcasts", []), n_nowcasts=rec.get("n_nowcasts", 0),
                    reports=rec.get("reports", []))
        for p in (sdir / "states").glob("*.safetensors"):
            if p.name.startswith("."):
                continue
            st = p.stat()
            s.states[int(p.stem)] = st.st_size
            s.last_used = max(s.last_used, st.st_mtime)
        for pattern in (".tmp-*", ".old-*"):  # interrupted writes; superseded states not yet unlinked
            for p in (sdir / "states").glob(pattern):
                p.unlink(missing_ok=True)
        return s

    # ------------------------------------------------------------------ sessions
    def create(self, owner: str, spec: ModelSpec, nowcaster: str, ctx: int, period: int, max_train_steps: int,
               record: bool, name: str | None) -> Session:
        with self._lock:
            held = sum(1 for o, _ in self._sessions if o == owner)
            if held >= self.max_sessions_per_key:
                raise ServiceError(429, "too_many_sessions",
                                   f"this API key holds {held} sessions, the limit is {self.max_sessions_per_key} "
                                   "(NINOCAST_MAX_SESSIONS_PER_KEY); delete finished sessions first")
            sid = secrets.token_hex(8)
            owner_dir = self.owners_dir / owner
            now = time.time()
            s = Session(sid, owner, spec, nowcaster, ctx, period, max_train_steps, record, name, now, now,
                        owner_dir / sid)
            self._sessions[(owner, sid)] = s  # reserve the slot; removed again if the write fails
        try:
            (s.dir / "states").mkdir(parents=True)
            atomic_write(s.dir / RECORD, json.dumps(s.record_json()).encode())
            fsync_dir(owner_dir)
        except BaseException:
            with self._lock:
                self._sessions.pop((owner, sid), None)
            shutil.rmtree(s.dir, ignore_errors=True)
            raise
        return s

    def get(self, owner: str, sid: str) -> Session:
        s = self._sessions.get((owner, sid))
        if s is None:
            raise not_found(sid)
        return s

    def list(self, owner: str) -> list[Session]:
        return sorted((s for (o, _), s in self._sessions.items() if o == owner), key=lambda s: s.created)

    def delete(self, owner: str, sid: str) -> None:
        with self._lock:
            s = self._sessions.pop((owner, sid), None)
            if s is None:
                raise not_found(sid)
            self._bytes[owner] = self._bytes.get(owner, 0) - sum(s.states.values())
        with s.lock:
            gone = self.trash_dir / f"{owner}-{sid}"
            os.replace(s.dir, gone)
            fsync_dir(s.dir.parent)
        shutil.rmtree(gone, ignore_errors=True)

    def count(self) -> int:
        return len(self._sessions)

    def used_bytes(self, owner: str | None = None) -> int:
        return self._bytes.get(owner, 0) if owner is not None else sum(self._bytes.values())

    def reserve(self, owner: str, quota: int) -> "Reservation":
        """Quota for one upload in flight: parallel uploads cannot together pass ``quota`` (see Reservation)."""
        return Reservation(self, owner, quota)

    # ------------------------------------------------------------------ states
    def commit_state(self, s: Session, step: int, tmp: Path, size: int, garbage: list[Path] | None = None) -> bool:
        """Publish a validated upload as ``step``; True if new, False if the same bytes were already there.

        Not in record mode, only the newest ctx states are kept (older ones are deleted once a newer one lands).
        With ``garbage``, an old state is only renamed to ``.old-<step>.safetensors`` (a cheap metadata change)
        and its path appended, for the caller to unlink after answering; start-up removes any left behind.
        """
        with s.lock:
            if (s.owner, s.id) not in self._sessions:
                raise not_found(s.id)
            final = s.state_path(step)
            if not publish(tmp, final):
                same = final.stat().st_size == size and filecmp.cmp(tmp, final, shallow=False)
                tmp.unlink(missing_ok=True)
                if not same:
                    raise ServiceError(409, "step_conflict", f"step {step} already holds a different state; "
                                       "upload it under a new step or delete the session")
                s.last_used = time.time()
                return False
            s.states[step] = size
            added = size
            if not s.record:
                for old in sorted(s.states)[: -s.ctx]:
                    path = s.state_path(old)
                    if garbage is None:
                        path.unlink(missing_ok=True)
                    else:
                        try:
                            os.replace(path, path.with_name(".old-" + path.name))
                            garbage.append(path.with_name(".old-" + path.name))
                        except FileNotFoundError:
                            pass
                    added -= s.states.pop(old)
            s.last_used = time.time()
        with self._lock:
            self._bytes[s.owner] = self._bytes.get(s.owner, 0) + added
        return True

    def add_nowcast(self, s: Session, entry: dict[str, Any]) -> None:
        """Append to the nowcast history and rewrite the record (atomic; history is not worth an fsync)."""
        with s.lock:
            if (s.owner, s.id) not in self._sessions:
                return
            s.nowcasts.append(entry)
            del s.nowcasts[: -self.max_history]
            s.n_nowcasts += 1
            self._save_history(s)

    def add_report(self, s: Session, report: dict[str, Any]) -> None:
        """Keep a client's verification report (one per step: a repeat replaces it), bounded like the history."""
        with s.lock:
            if (s.owner, s.id) not in self._sessions:
                raise not_found(s.id)
            s.reports = [r for r in s.reports if r["step"] != report["step"]] + [report]
            del s.reports[: -self.max_history]
            self._save_history(s)

    def _save_history(self, s: Session) -> None:
        """Under s.lock: rewrite the record (atomic; history is not worth an fsync)."""
        s.last_used = time.time()
        try:
            atomic_write(s.dir / RECORD, json.dumps(s.record_json()).encode(), durable=False)
        except FileNotFoundError:  # deleted meanwhile
            pass
        except OSError as e:  # e.g. a full disk: the history is kept in memory, the nowcast was answered
            log.warning("cannot rewrite the record of session %s: %s", s.id, e)

    # ------------------------------------------------------------------ expiry
    def expire(self, now: float | None = None) -> list[str]:
        """Delete sessions idle longer than the TTL; their ids."""
        now = time.time() if now is None else now
        old = [(o, sid) for (o, sid), s in list(self._sessions.items()) if now - s.last_used > self.ttl_s]
        for o, sid in old:
            try:
                self.delete(o, sid)
                log.info("expired idle session %s/%s", o, sid)
            except ServiceError:
                pass
        return [sid for _, sid in old]


class Reservation:
    """Bytes an upload may still write, held against its key's quota until the upload ends.

    ``grow(total)`` is called with the declared size and again as the body arrives; it raises 507 when the
    key's stored bytes plus every upload's reservation would pass the quota. Use as a context manager: the
    reservation is released once the state is committed (counted as stored) or the upload failed.
    """

    def __init__(self, store: SessionStore, owner: str, quota: int) -> None:
        self.store, self.owner, self.quota, self.held = store, owner, quota, 0

    def grow(self, total: int) -> None:
        if total <= self.held:
            return
        st = self.store
        with st._lock:
            reserved = st._reserved.get(self.owner, 0)
            left = self.quota - st._bytes.get(self.owner, 0) - reserved + self.held
            if total > left:
                raise quota_exceeded(left)
            st._reserved[self.owner] = reserved + total - self.held
            self.held = total

    def release(self) -> None:
        with self.store._lock:
            self.store._reserved[self.owner] = self.store._reserved.get(self.owner, 0) - self.held
            self.held = 0

    def __enter__(self) -> "Reservation":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

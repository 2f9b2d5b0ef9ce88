"""BackendWorker: the one background thread that talks to a nowcast server for a NowcastOptimizer.

The training thread never waits on the network for an ordinary step: snapshot uploads are queued here, and when
the worker is behind (a slow or hung server) the oldest queued snapshot upload is dropped (the window's snapshots
stay on the training side and a nowcast re-sends what the server lacks; verification reports are never dropped).
A nowcast request waits for its answer at most until a deadline; past it the caller gives up and the job's result,
if it ever comes, is discarded. After a request timed out, the worker counts as *stalled* until some request gets
an answer: a stalled worker is not waited for at all.

Jobs run one at a time, in submission order, so the backend's session bookkeeping needs no more locking than
what a checkpoint read from the training thread needs.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, Callable

from .transport import DeadlineExceeded, ServerUnavailable


class _Job:
    def __init__(self, fn: Callable[[], Any], upload: bool, droppable: bool = False) -> None:
        self.fn, self.upload, self.droppable = fn, upload, droppable
        self.done = threading.Event()
        self.cancelled = False
        self.result: Any = None
        self.error: BaseException | None = None


class BackendWorker:
    """``upload(fn)`` queues a fire-and-forget job; ``call(fn, deadline)`` runs one and waits for it until
    ``deadline`` (``time.monotonic()``); ``on_error(err)`` is told about every failed upload."""

    def __init__(self, max_uploads: int, on_error: Callable[[BaseException], None]) -> None:
        self.max_uploads = max(1, max_uploads)
        self.on_error = on_error
        self.stalled = False  # a request timed out and none has been answered since
        self._jobs: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._running: _Job | None = None
        self._thread: threading.Thread | None = None
        self._stop = False

    # ------------------------------------------------------------------ training-thread side
    def upload(self, fn: Callable[[], Any], droppable: bool = True) -> int:
        """Queue a fire-and-forget job; returns how many older queued jobs were dropped to make room (0 or 1).
        Only droppable ones (snapshots: a nowcast re-sends what the server lacks) count against ``max_uploads``
        and are dropped; a report is sent once and nothing re-sends it, so it is never dropped (one per nowcast)."""
        dropped = 0
        with self._cond:
            if droppable:
                queued = [j for j in self._jobs if j.droppable]
                if len(queued) >= self.max_uploads:
                    self._jobs.remove(queued[0])
                    dropped = 1
            self._jobs.append(_Job(fn, upload=True, droppable=droppable))
            self._ensure_thread()
            self._cond.notify_all()
        return dropped

    def call(self, fn: Callable[[], Any], deadline: float) -> Any:
        """Run ``fn`` after the queued jobs and return its result; DeadlineExceeded when it is not done by
        ``deadline`` (the job is then cancelled if it has not started, and its late result discarded)."""
        job = _Job(fn, upload=False)
        with self._cond:
            self._jobs.append(job)
            self._ensure_thread()
            self._cond.notify_all()
        if not job.done.wait(max(0.0, deadline - time.monotonic())):
            with self._cond:
                job.cancelled = True
                if job in self._jobs:
                    self._jobs.remove(job)
                self.stalled = True
            raise DeadlineExceeded("no answer from the server before the nowcast deadline; the step was skipped")
        if job.error is not None:
            raise job.error
        return job.result

    def drain(self, timeout: float) -> bool:
        """Wait until every queued job has run, at most ``timeout`` seconds; True when the queue is empty."""
        end = time.monotonic() + timeout
        with self._cond:
            while self._jobs or self._running is not None:
                left = end - time.monotonic()
                if left <= 0 or self._thread is None or not self._thread.is_alive():
                    return False
                self._cond.wait(left)
        return True

    def cancel_pending(self) -> int:
        """Drop every queued (not yet started) job; returns how many."""
        with self._cond:
            n = len(self._jobs)
            for job in self._jobs:
                job.cancelled = True
            self._jobs.clear()
            self._cond.notify_all()
        return n

    def stop(self, timeout: float) -> None:
        """End the thread after the running job (waits at most ``timeout``; the thread is a daemon)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        self._thread = None

    # ------------------------------------------------------------------ worker side
    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="ninocast-worker", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._stop:
                    self._cond.wait()
                if not self._jobs:  # stopping, nothing left
                    return
                job = self._running = self._jobs.popleft()
            try:
                job.result = job.fn()
            except BaseException as e:  # noqa: BLE001 - the worker must never die silently
                job.error = e
            with self._cond:
                self._running = None
                if job.error is None or not isinstance(job.error, (ServerUnavailable, DeadlineExceeded)):
                    self.stalled = False  # the server answered (a 4xx is an answer too)
                self._cond.notify_all()
            job.done.set()
            if job.upload and job.error is not None and not job.cancelled:
                self.on_error(job.error)

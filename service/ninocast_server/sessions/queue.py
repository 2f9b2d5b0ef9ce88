"""The compute queue: one worker thread per device, jobs taken round-robin across API keys.

Each key has its own FIFO; workers serve the keys in turn, so one team member submitting 50 nowcasts delays
another's single nowcast by at most one job per worker. Compute never runs on the event loop: the route awaits
the job's future. A full queue or an exhausted memory budget is refused at once with 503 + Retry-After.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import ServiceError

log = logging.getLogger("ninocast.queue")


@dataclass
class Job:
    owner: str
    run: Callable[[str], Any]  # called on a worker thread with the worker's device
    cost: int  # estimated peak bytes, counted against the memory budget until the job ends
    future: Future = field(default_factory=Future)


class ComputeQueue:
    def __init__(self, devices: list[str], max_jobs: int, memory_budget: int) -> None:
        self.devices, self.max_jobs, self.memory_budget = devices, max_jobs, memory_budget
        self._fifos: OrderedDict[str, deque[Job]] = OrderedDict()
        self._cond = threading.Condition()
        self._waiting = 0
        self._running = 0
        self._cost = 0  # of waiting + running jobs
        self._avg_s = 1.0  # moving average of job time, for Retry-After
        self._threads: list[threading.Thread] = []
        self._stop = False

    def start(self) -> None:
        for dev in self.devices:
            t = threading.Thread(target=self._work, args=(dev,), name=f"nowcast-{dev}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout=5)

    @property
    def depth(self) -> int:
        """Jobs waiting (not yet running)."""
        return self._waiting

    def alive(self) -> bool:
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    @property
    def running(self) -> int:
        return self._running

    def check_fits(self, cost: int, code: str = "nowcast_too_large") -> None:
        """422 for a job that exceeds the whole memory budget: it would never run, so 503 (retry) is wrong."""
        if cost > self.memory_budget:
            raise ServiceError(422, code, f"a nowcast of this session needs about {cost} bytes of memory, more "
                               f"than this server's whole budget of {self.memory_budget} bytes "
                               "(NINOCAST_MEMORY_BUDGET_BYTES)")

    def submit(self, owner: str, run: Callable[[str], Any], cost: int) -> Future:
        """Enqueue a job; 422 when it can never fit the memory budget, 503 at once when the queue or the budget
        is full now."""
        self.check_fits(cost)
        job = Job(owner, run, cost)
        with self._cond:
            if self._waiting >= self.max_jobs:
                raise self._busy(f"the nowcast queue is full ({self._waiting} waiting, NINOCAST_QUEUE_SIZE)")
            if self._cost and self._cost + cost > self.memory_budget:
                raise self._busy(f"queued nowcasts would exceed the memory budget of {self.memory_budget} bytes "
                                 "(NINOCAST_MEMORY_BUDGET_BYTES)")
            self._fifos.setdefault(owner, deque()).append(job)
            self._waiting += 1
            self._cost += cost
            self._cond.notify()
        return job.future

    async def run(self, owner: str, run: Callable[[str], Any], cost: int) -> Any:
        """Submit and await the result without blocking the event loop."""
        return await asyncio.wrap_future(self.submit(owner, run, cost))

    def _busy(self, detail: str) -> ServiceError:
        wait = max(1, math.ceil((self._waiting + self._running) * self._avg_s / max(1, len(self.devices))))
        return ServiceError(503, "server_busy", detail + f"; retry in about {wait} s", {"Retry-After": str(wait)})

    def _take(self) -> Job | None:
        with self._cond:
            while not self._fifos and not self._stop:
                self._cond.wait()
            if self._stop:
                return None
            owner, fifo = next(iter(self._fifos.items()))
            job = fifo.popleft()
            if fifo:
                self._fifos.move_to_end(owner)  # the next job goes to the next key in turn
            else:
                del self._fifos[owner]
            self._waiting -= 1
            self._running += 1
            return job

    def _work(self, device: str) -> None:
        while (job := self._take()) is not None:
            t0 = time.perf_counter()
            try:
                if job.future.set_running_or_notify_cancel():
                    job.future.set_result(job.run(device))
            except BaseException as e:  # the worker must outlive any job
                if not job.future.done():
                    job.future.set_exception(e)
            finally:
                with self._cond:
                    self._running -= 1
                    self._cost -= job.cost
                    self._avg_s = 0.8 * self._avg_s + 0.2 * (time.perf_counter() - t0)

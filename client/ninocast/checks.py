"""Run-time verification of nowcasts: the immediate check, the tentative jump with its delayed check and
rollback, and the decisions reported to the server session.

``NowcastOptimizer`` owns one ``RunChecks`` and calls it at each nowcast (``judge``, ``hold``) and after each
step (``after_step``). What a check means lives elsewhere: ``ninocast.verify`` has the ``Verify`` options and
the probe scoring, ``ninocast.rollback`` the copy of the run a failed delayed check restores. Decisions are made
on rank 0 and broadcast, so every rank takes the same branch.

``Verify(delay=D)``: a jump that dips the probe by at most ``max_dip`` is kept tentatively and checked again D
calls later; a failed check restores the model and the base optimizer's state from before the jump. Snapshots
for the next nowcast's window taken on a rolled-back branch are dropped (the window refills, so that nowcast
comes later). ``state_dict()`` while a check is pending saves the tentative point without its copy: a run
resumed from it keeps the jump. ``Verify(shadow=True)``: the copy trains too (``shadow_step``, once per call
from the nowcast call to the check), and the check compares the two branches.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any, Callable

import torch

from .distributed import broadcast_code
from .rollback import RunCopy, Tentative, ordered_params
from .verify import limit_of, report_body, verify_jump

if TYPE_CHECKING:
    from .backends import Snapshot
    from .optimizer import NowcastOptimizer


class RunChecks:
    """The verification state of one run: the jump waiting for its delayed check (``pending``), the rollbacks in
    a row, and ``delayed_off`` (set after ``verify.max_rollbacks`` of them: immediate checks only from then)."""

    def __init__(self, opt: NowcastOptimizer) -> None:
        self.opt = opt
        self.pending: Tentative | None = None
        self.rollbacks_in_a_row = 0
        self.delayed_off = False

    def tentative_allowed(self, step: int) -> bool:
        """A jump at ``step`` may be kept tentatively: delayed checks are on and its check falls inside the budget
        (a check after the last call would leave the run on an unchecked point)."""
        v = self.opt.verify
        return v is not None and v.delay > 0 and not self.delayed_off and self.pending is None \
            and step + v.delay <= self.opt.max_train_steps - 1

    def judge(self, prediction: dict[str, torch.Tensor], window: list[tuple[int, Snapshot]], step: int,
              closure: Callable[[], Any] | None, loss: Any, saved: RunCopy | None, tentative_ok: bool) -> int:
        """Rank 0: score the fetched jump on the probe, record and report the decision; the parameters end at
        the kept point. 2 = kept tentatively (``saved`` is the pre-jump copy), 1 = accepted, 0 = rejected."""
        cfg = self.opt.verify
        assert cfg is not None
        record = self.opt.nowcasts[-1]
        record.update(self._verify(prediction, closure, loss, tentative_ok))
        if record.get("delayed") == "pending":
            record.update(delay=cfg.delay, check_step=step + cfg.delay,
                          snapshot_bytes=saved.nbytes if saved is not None else 0)
            if cfg.baseline == "trend":
                record["probe_expected"] = self._expected_probe(window, record)
            code = 2
        else:
            code = int(record["accepted"])
        self.report(record)
        return code

    def hold(self, step: int, saved: RunCopy) -> None:
        """Every rank: keep the jump made at ``step`` until its delayed check."""
        assert self.opt.verify is not None
        self.pending = Tentative(step, step + self.opt.verify.delay, saved,
                                 self.opt.nowcasts[-1] if self.opt._rank0 else {})
        if self.opt.verify.shadow:  # this call's gradients are theta's: the copy's first step uses them
            saved.grads = {i: p.grad for i, p in enumerate(ordered_params(self.opt.optimizer))}
            self.pending.fresh = True
            record = self.pending.record  # the first look at the race: the dip right after the jump
            if record.get("probe_after") is not None and record.get("probe_before") is not None:
                self.pending.gap = record["probe_after"] - record["probe_before"]

    def branch_snapshot(self, step: int) -> bool:
        """While a shadow race is on, the snapshot just taken (the jump's branch) is provisional: take plain
        training's too, from the copy, and hold both until the check says which branch goes on. True: the caller
        must not upload its snapshot now."""
        pending, opt = self.pending, self.opt
        if pending is None or opt.verify is None or not opt.verify.shadow:
            return False
        pending.saved.swap(opt.model, opt.optimizer)
        try:
            pending.plain_snapshots[step] = opt.read_snapshot()
        finally:
            pending.saved.swap(opt.model, opt.optimizer)
        return True

    def shadow_step(self, closure: Callable[[], Any] | None) -> None:
        """``Verify(shadow=True)``: take this call's base-optimizer step on the pending jump's pre-jump copy too,
        with the same batch (the closure runs on the copy's parameters); the live run is put back after."""
        pending, opt = self.pending, self.opt
        if pending is None or opt.verify is None or not opt.verify.shadow:
            return
        if pending.fresh:  # the nowcast call itself: its gradients at theta were computed before the jump
            pending.fresh, closure_now = False, None
        elif closure is None:
            raise ValueError("Verify(shadow=True) needs step(closure): the pre-jump copy trains on the step's own "
                             "batch, through a closure that computes the loss and its gradients (zero_grad, "
                             "forward, backward, return loss)")
        else:
            closure_now = closure
        pending.saved.swap(opt.model, opt.optimizer)
        try:
            with torch.enable_grad():
                opt.optimizer.step(closure_now)
        finally:
            pending.saved.swap(opt.model, opt.optimizer)
        if opt._rank0:
            pending.record["shadow_steps"] = pending.record.get("shadow_steps", 0) + 1

    def after_step(self, step: int) -> None:
        """Make the pending jump's delayed check when call ``step`` is its check step."""
        if self.pending is not None and self.pending.check_step == step:
            self._delayed_check()

    def drop(self) -> None:
        """Forget a pending check (after a load, or at close): the jump stays."""
        self.pending = None

    def record(self, record: dict[str, Any]) -> None:
        """Keep a decision made without a nowcast (the skipped last one) in ``nowcasts`` and report it."""
        self.opt.nowcasts.append(record)
        self.report(record)

    def report(self, record: dict[str, Any]) -> None:
        """Send a verified or skipped nowcast's decision to the server session's history (rank 0). Remote: queued
        on the worker behind the uploads (so the session exists), never waited for; a lost report is counted
        (``report_*``) and never stops training."""
        opt = self.opt
        if not opt._rank0 or (opt.verify is None and "skipped" not in record):
            return
        backend, body = opt.backend, report_body(record)
        assert backend is not None

        def send() -> None:
            try:
                backend.report(record["step"], body)
            except Exception as e:  # noqa: BLE001 - a lost report never stops training
                opt._note_failure(f"report_{getattr(e, 'kind', 'error')}", e, raise_ok=False)

        if opt._worker is not None and not opt._closed:
            opt._worker.upload(send, droppable=False)  # nothing would re-send it
        else:
            send()

    def _verify(self, result: dict[str, torch.Tensor], closure: Callable[[], Any] | None, loss: Any,
                tentative_ok: bool) -> dict:
        """Score the jump on the probe; the params end at the kept point."""
        opt, cfg = self.opt, self.opt.verify
        assert cfg is not None
        before = loss if cfg.kind == "closure" else None  # the closure's loss at theta
        params = {n: opt._params[n] for n in opt.spec.names}
        return verify_jump(params, result, cfg.scorer(opt.model, closure), cfg, before, tentative_ok)

    def _expected_probe(self, window: list[tuple[int, Snapshot]], record: dict[str, Any]) -> float:
        """Where plain training was heading (``baseline="trend"``): the probe's fall over the window's last
        snapshot interval, scaled to the delay. Scored with the previous snapshot's tensors put in place (buffers
        stay current); the tentative point is put back exactly."""
        opt, cfg = self.opt, self.opt.verify
        assert cfg is not None
        before = record["probe_before"]
        if len(window) < 2:
            return before
        (t_prev, prev), (t_last, _) = window[-2], window[-1]
        held = {n: opt._params[n].detach().clone() for n in prev}
        with torch.no_grad():
            for n, t in prev.items():
                opt._params[n].copy_(t)
        try:
            earlier = cfg.scorer(opt.model, None)()
        finally:
            with torch.no_grad():
                for n, t in held.items():
                    opt._params[n].copy_(t)
        record["probe_passes"] += 1
        record["probe_window"] = earlier
        fall = max(0.0, earlier - before) if math.isfinite(earlier) and math.isfinite(before) else 0.0
        return before - fall * cfg.delay / max(1, t_last - t_prev)

    def _compare_with_plain(self, pending: Tentative, record: dict[str, Any]) -> tuple[int, float]:
        """Score the jump's branch and (swapped in) plain training's on the probe; keep the jump when it wins:
        by the means with one probe batch, batch by batch within ``confidence`` standard errors with several."""
        opt, cfg = self.opt, self.opt.verify
        assert cfg is not None
        per_batch = cfg.kind == "batch" and len(cfg.probe_batches) > 1
        score: Callable[[], Any] = cfg.batch_scorer(opt.model) if per_batch else cfg.scorer(opt.model, None)
        after = score()
        pending.saved.swap(opt.model, opt.optimizer)
        try:
            plain = score()
        finally:
            pending.saved.swap(opt.model, opt.optimizer)
        if not per_batch:
            record["probe_plain"] = plain
            return int(after <= limit_of(plain, cfg.tolerance)), after
        diffs = [a - p for a, p in zip(after, plain)]
        mean_after, mean_plain, mean_diff = (sum(v) / len(v) for v in (after, plain, diffs))
        se = math.sqrt(sum((d - mean_diff) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs)) \
            if all(math.isfinite(d) for d in diffs) else math.inf
        record.update(probe_plain=mean_plain, probe_se=se)
        bound = mean_diff + cfg.confidence * se
        return int(math.isfinite(bound) and bound <= cfg.tolerance * abs(mean_plain)), mean_after

    def _delayed_check(self) -> None:
        """Probe the tentative jump's branch (rank 0); keep it, or restore the pre-jump run on every rank."""
        opt, cfg = self.opt, self.opt.verify
        pending, self.pending = self.pending, None
        assert pending is not None and cfg is not None
        keep = 1
        if opt._rank0:
            t0 = time.perf_counter()
            record = pending.record
            if cfg.shadow:  # the reference is plain training itself: the copy, trained on the same batches
                keep, after = self._compare_with_plain(pending, record)
                gap = after - record["probe_plain"]
                record["patience"] = self.patience()
                record.setdefault("race", []).append([pending.check_step, gap if math.isfinite(gap) else None])
                if not keep and self._races_on(pending, gap):
                    record.update(extended=record.get("extended", 0) + 1, probe_passes=record["probe_passes"] + 2,
                                  verify_s=record["verify_s"] + time.perf_counter() - t0)
                    pending.gap, pending.check_step = gap, pending.check_step + cfg.delay
                    record["check_step"] = pending.check_step
                    self.pending = pending
                    return
            else:
                after = cfg.scorer(opt.model, None)()
                target = record.get("probe_expected", record["probe_before"])
                keep = int(after <= target + cfg.tolerance * abs(record["probe_before"]))
            record.update(probe_delayed=after, delayed="kept" if keep else "rolled_back",
                          probe_passes=record["probe_passes"] + 1 + int(cfg.shadow),
                          verify_s=record["verify_s"] + time.perf_counter() - t0)
            if not keep:
                record.update(accepted=False, alpha=0.0)
        if broadcast_code(keep, opt.param_device):
            self.rollbacks_in_a_row = 0
        else:
            pending.saved.restore(opt.model, opt.optimizer)
            # snapshots of the rolled-back branch must not feed the next nowcast; a shadow took plain training's
            opt.snapshots = [(t, pending.plain_snapshots[t] if t in pending.plain_snapshots else snap)
                             for t, snap in opt.snapshots if t <= pending.step or t in pending.plain_snapshots]
            self.rollbacks_in_a_row += 1
            if self.rollbacks_in_a_row >= cfg.max_rollbacks and not cfg.shadow:  # a shadow rollback costs no step
                self.delayed_off = True
        for t, snap in opt.snapshots:  # the race's snapshots were held back: send the branch that goes on
            if t in pending.plain_snapshots:
                opt.upload_snapshot(t, snap)
        if opt._rank0:
            self.report(pending.record)

    def _races_on(self, pending: Tentative, gap: float) -> bool:
        """``Verify(patience=P)``: a jump behind plain training but closing on it gets another ``delay`` steps,
        at most P times, and never past the budget or the next nowcast's call."""
        opt, cfg = self.opt, self.opt.verify
        assert cfg is not None
        nxt = pending.check_step + cfg.delay
        return (pending.record.get("extended", 0) < self.patience() and math.isfinite(gap) and gap < pending.gap
                and nxt <= opt.max_train_steps - 1 and nxt < pending.step + opt.period)

    def patience(self) -> int:
        """The patience in force: as given; by default 2 with a shadow, but 0 when the nowcaster warned that the
        model is outside its scope (a race extends trust the one-look check would not give, and a short check
        cannot see a jump that slows training down later: measured on GPT-2 with the FM-16-only default)."""
        cfg = self.opt.verify
        assert cfg is not None
        if cfg.patience is None and getattr(self.opt.backend, "out_of_scope", False):
            return 0
        return cfg.patience_asked

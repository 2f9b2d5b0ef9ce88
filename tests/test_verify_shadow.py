"""Shadow branches (``Verify(delay=D, shadow=True)``): while a tentative jump waits for its check, the pre-jump
copy trains on the same batches, and the check keeps the branch with the lower probe. A rejected jump must then
cost no training step at all: the run is plain AdamW, bit for bit. Real models (BatchNorm, tied weights), real
AdamW steps, the real bench command."""

from __future__ import annotations

import json

import pytest
import torch
from ninocast import ModelSpec, NowcastOptimizer, Verify
from ninocast.spec import SpecError
from ninocast.verify import report_body
from ninocast_server.api.schemas import NowcastReport
from test_verify import CTX, PERIOD, PROBE, batch, loss_fn
from test_verify_delayed import LR, Scripted, assert_same_run, bn_model
from torch import nn


class TiedNet(nn.Module):
    """Two layers share one weight: a swap must move the shared tensor once, a rollback copy it once (the graph
    leaves it out, as the spec error for tied weights advises; it still trains)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.mid, self.out, self.head = (nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 16),
                                                   nn.Linear(16, 3))
        self.out.weight = self.mid.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.out(torch.tanh(self.mid(torch.tanh(self.inp(x)))))))


def tied_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TiedNet()


def test_the_tied_weight_refusal_gives_advice_that_works():
    with pytest.raises(SpecError, match=r"used twice \(mid and out\).*leave_out=\['out'\]") as err:
        ModelSpec.from_module(tied_model())
    assert "leave_out" in str(err.value)
    spec = ModelSpec.from_module(tied_model(), leave_out=["out"])
    assert "mid.weight" in spec.names and "out.bias" not in spec.names


def shadow_opt(model: nn.Module, probe, delay: int, steps: int, shadow: bool = True, **kw) -> NowcastOptimizer:
    verify = Verify(probe=probe, delay=delay, shadow=shadow, **kw)
    spec = ModelSpec.from_module(model, leave_out=["out"]) if isinstance(model, TiedNet) else None
    return NowcastOptimizer(torch.optim.AdamW(model.parameters(), lr=LR), model, local=True, nowcaster="linefit",
                            period=PERIOD, ctx=CTX, max_train_steps=steps, verify=verify, final_nowcast="keep",
                            spec=spec)


def train_closure(model: nn.Module, opt, steps: int, start: int = 0) -> None:
    """The training loop with ``step(closure)``: calls start..steps-1 on batches start..steps-1."""
    for s in range(start, steps):
        def closure(b=batch(s)):
            opt.zero_grad()
            loss = loss_fn(model, b)
            loss.backward()
            return loss
        opt.step(closure)


def plain_adamw(make, steps: int):
    ref = make()
    base = torch.optim.AdamW(ref.parameters(), lr=LR)
    for s in range(steps):
        base.zero_grad()
        loss_fn(ref, batch(s)).backward()
        base.step()
    return ref, base


@pytest.mark.parametrize("make", [bn_model, tied_model], ids=["batchnorm", "tied"])
def test_a_rejected_jump_costs_no_step_the_run_is_plain_adamw(make):
    """Nowcast at call 19 kept tentatively (probe 1.0 -> 1.5), checked at 19 + 4: the jump's branch scores 2.0,
    plain training's 1.0, so the plain branch goes on. Claim: right after the check, and again right before the
    next nowcast, the model (BatchNorm buffers and the shared weight too) and AdamW's state equal those of plain
    AdamW on *every* batch so far; nothing of the jump's branch remains."""
    steps, delay = 80, 4
    model, probe = make(), Scripted([1.0, 1.5, 2.0, 1.0])
    opt = shadow_opt(model, probe, delay, steps)
    check = 19 + delay
    train_closure(model, opt, check + 1)
    d = opt.nowcasts[0]
    assert (d["step"], d["delayed"], d["accepted"], d["alpha"]) == (19, "rolled_back", False, 0.0)
    assert (d["probe_delayed"], d["probe_plain"], d["shadow_steps"], d["probe_passes"]) == (2.0, 1.0, delay + 1, 4)
    assert probe.done and opt.checks.pending is None
    assert_same_run(model, opt.optimizer, *plain_adamw(make, check + 1))

    nxt = next(s for s in range(check + 1, steps) if (s + 1) % (PERIOD // CTX) == 0) + (CTX - 1) * (PERIOD // CTX)
    train_closure(model, opt, nxt, start=check + 1)  # plain calls up to the next nowcast
    assert_same_run(model, opt.optimizer, *plain_adamw(make, nxt))
    assert not opt.delayed_off and not opt.failures


def test_a_kept_jump_is_the_branch_plain_delay_would_have_kept():
    """Kept (0.9 against plain training's 1.0): the live run is exactly what the same jump gives without a shadow
    (the copy's steps never touch the live branch), and it is not plain AdamW."""
    steps = 40
    runs = {}
    for shadow in (True, False):
        model = bn_model()
        probe = Scripted([1.0, 1.5, 0.9, 1.0] if shadow else [1.0, 1.5, 0.9])
        opt = shadow_opt(model, probe, 5, steps, shadow=shadow)
        train_closure(model, opt, 30)
        assert probe.done and opt.nowcasts[0]["delayed"] == "kept" and opt.nowcasts[0]["accepted"]
        runs[shadow] = (model, opt)
    assert runs[True][0] is not runs[False][0]
    assert_same_run(runs[True][0], runs[True][1].optimizer, runs[False][0], runs[False][1].optimizer)
    d = runs[True][1].nowcasts[0]
    assert (d["probe_plain"], d["shadow_steps"]) == (1.0, 6) and "probe_plain" not in runs[False][1].nowcasts[0]
    ref, _ = plain_adamw(bn_model, 30)
    assert not torch.equal(runs[True][0][0].weight, ref[0].weight)


def test_a_jump_that_passes_at_once_is_still_compared_with_plain_training():
    """Probe 1.0 -> 0.8 right after the jump passes the immediate check, but 5 calls later plain training (0.7)
    is ahead of the jump's branch (0.75): the shadow rolls it back, where a delay without shadow accepts it at
    once and never looks again."""
    model, probe = bn_model(), Scripted([1.0, 0.8, 0.75, 0.7])
    opt = shadow_opt(model, probe, 5, 40)
    train_closure(model, opt, 25)
    d = opt.nowcasts[0]
    assert (d["tried"], d["delayed"], d["accepted"], d["probe_plain"]) == ([[1.0, 0.8]], "rolled_back", False, 0.7)
    assert probe.done
    assert_same_run(model, opt.optimizer, *plain_adamw(bn_model, 25))
    plain_delay = shadow_opt(bn_model(), Scripted([1.0, 0.8]), 5, 40, shadow=False)
    assert plain_delay.verify.dip_limit == 2.0
    m = plain_delay.model
    train_closure(m, plain_delay, 25)
    assert plain_delay.nowcasts[0]["accepted"] and "delayed" not in plain_delay.nowcasts[0]


class ScriptedLoss:
    """A loss_fn whose values are given in advance, one per (batch) call, in the order the optimizer asks."""

    def __init__(self, values: list[float]) -> None:
        self.values = list(values)

    def __call__(self, model: nn.Module, b) -> torch.Tensor:
        assert self.values, "the optimizer scored the probe more often than expected"
        return torch.tensor(self.values.pop(0))


@pytest.mark.parametrize("after, confidence, kept", [
    ([1.0, 1.0, 1.0, 0.2], 1.0, False),  # ahead by 0.1 on average, but behind on 3 of 4 batches: noise
    ([1.0, 1.0, 1.0, 0.2], 0.0, True),  # the means alone
    ([0.80, 0.81, 0.79, 0.80], 1.0, True),  # ahead on every batch
])
def test_several_probe_batches_make_the_jump_win_by_more_than_noise(after, confidence, kept):
    """Four probe batches: before 1.0 each, the full jump 1.5 each (tentative), then at the check the jump's
    branch ``after`` and plain training 0.9 on each batch. The mean difference plus ``confidence`` standard
    errors decides; the record carries both means and the standard error."""
    script = ScriptedLoss([1.0] * 4 + [1.5] * 4 + after + [0.9] * 4)
    verify = Verify(batches=[batch(10**6 + i) for i in range(4)], loss_fn=script, delay=5, shadow=True,
                    confidence=confidence)
    model = bn_model()
    opt = NowcastOptimizer(torch.optim.AdamW(model.parameters(), lr=LR), model, local=True, nowcaster="linefit",
                           period=PERIOD, ctx=CTX, max_train_steps=40, verify=verify)
    train_closure(model, opt, 25)
    d = opt.nowcasts[0]
    diffs = torch.tensor(after) - 0.9
    assert not script.values and d["delayed"] == ("kept" if kept else "rolled_back")
    assert d["probe_delayed"] == pytest.approx(sum(after) / 4) and d["probe_plain"] == pytest.approx(0.9)
    assert d["probe_se"] == pytest.approx(float(diffs.std() / 2), rel=1e-5)
    if not kept:
        assert_same_run(model, opt.optimizer, *plain_adamw(bn_model, 25))


def test_real_probe_compares_with_plain_training_measured_independently():
    """A real held-out probe and linefit's real jumps: at the first check, ``probe_plain`` is the probe of an
    independent plain AdamW run at the same call (the copy *is* plain training), and every decision follows
    the two numbers; the report a server keeps validates."""
    steps, delay = 60, 6
    verify = Verify(batch=PROBE, loss_fn=loss_fn, delay=delay, shadow=True, max_dip=50.0)
    model = bn_model()
    opt = NowcastOptimizer(torch.optim.AdamW(model.parameters(), lr=LR), model, local=True, nowcaster="linefit",
                           period=PERIOD, ctx=CTX, max_train_steps=steps, verify=verify)
    train_closure(model, opt, steps)
    tentative = [n for n in opt.nowcasts if n.get("delayed")]
    assert tentative, opt.nowcasts
    first = tentative[0]
    assert first["step"] == 19
    ref, _ = plain_adamw(bn_model, first["check_step"] + 1)
    with torch.no_grad():
        assert first["probe_plain"] == pytest.approx(loss_fn(ref.eval(), PROBE).item(), rel=1e-6)
    for n in tentative:
        assert n["delayed"] == ("kept" if n["probe_delayed"] <= n["probe_plain"] else "rolled_back")
        assert n["shadow_steps"] == delay + 1
        body = NowcastReport.model_validate(report_body(n))
        assert body.probe_plain == pytest.approx(n["probe_plain"]) and body.shadow_steps == delay + 1


def test_shadow_needs_a_delay_a_closure_and_one_process():
    with pytest.raises(ValueError, match="needs delay"):
        Verify(probe=lambda m: 0.0, shadow=True)
    with pytest.raises(ValueError, match="does not apply"):
        Verify(probe=lambda m: 0.0, delay=5, shadow=True, baseline="trend")
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="confidence"):
            Verify(probe=lambda m: 0.0, delay=5, shadow=True, confidence=bad)
    # a shadow makes a tentative jump cost no step, so its default max_dip is wider; an explicit one stands
    assert [Verify(probe=lambda m: 0.0, delay=5, **kw).dip_limit for kw in
            ({}, {"shadow": True}, {"shadow": True, "max_dip": 3.0})] == [2.0, 10.0, 3.0]
    model = bn_model()
    opt = shadow_opt(model, Scripted([1.0, 1.5]), 5, 40)
    for s in range(21):  # no closure: the nowcast call's own copy step uses its gradients, the next call cannot
        opt.zero_grad()
        loss_fn(model, batch(s)).backward()
        if s < 20:
            opt.step()
        else:
            with pytest.raises(ValueError, match=r"needs step\(closure\)"):
                opt.step()
    assert opt.nowcasts[0]["shadow_steps"] == 1


def test_hugging_face_callback_refuses_a_shadow_it_cannot_feed():
    pytest.importorskip("transformers")
    from ninocast.integrations.hf import NowcastCallback

    with pytest.raises(ValueError, match="without one"):
        NowcastCallback(probe="eval_batch", verify_options={"delay": 100, "shadow": True}, local=True)


def test_bench_speedup_verify_shadow_smoke(tmp_path):
    from ninocast.cli import main

    out = tmp_path / "b"
    assert main(["bench", "speedup", "--task", "digits", "--nowcasters", "linefit", "--verify", "on",
                 "--verify-delay", "30", "--verify-shadow", "--verify-max-dip", "50", "--seeds", "1000",
                 "--max-steps", "300", "--period", "100", "--no-progress", "--out", str(out)]) == 0
    runs = {r["method"]: r for r in map(json.loads, (out / "runs.jsonl").read_text().splitlines())}
    assert set(runs) == {"adamw", "linefit+vd30s"}
    v = runs["linefit+vd30s"]
    tentative = [d for d in v["decisions"] if d["delayed"]]
    assert v["verify_shadow"] and tentative and v["shadow_steps"] == 31 * len(tentative)
    assert "training batch" in v["probe"]  # digits has no held-out training split: the default probe
    for d in tentative:  # the probe is 8 batches; Verify's default confidence 0 compares the means
        assert d["probe_se"] is not None
        assert (d["delayed"] == "rolled_back") == (d["probe_delayed"] > d["probe_plain"])
    assert main(["bench", "speedup", "--task", "digits", "--nowcasters", "linefit", "--seeds", "1000",
                 "--period", "100", "--no-progress", "--out", str(tmp_path / "x"), "--verify-shadow"]) == 2
    assert "| shadow steps/run | median steps + shadow steps to target |" in (out / "results.md").read_text()


def test_compute_to_target_counts_the_shadow_steps_of_checks_begun_before_it():
    from ninocast_server.bench.speedup import compute_to_target

    run = {"reached": True, "steps_to_target": 250, "max_steps": 300,
           "decisions": [{"step": 99, "shadow_steps": 31}, {"step": 199, "shadow_steps": None},
                         {"step": 240, "shadow_steps": 31}, {"step": 299, "shadow_steps": 31}]}
    assert compute_to_target(run) == 250 + 31 + 31
    assert compute_to_target(run | {"reached": False}) == 600

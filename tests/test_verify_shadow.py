"""Shadow branches (``Verify(delay=D, shadow=True)``): while a tentative jump waits for its check, the pre-jump
copy trains on the same batches, and the check keeps the branch with the lower probe. A rejected jump must then
cost no training step at all: the run is plain AdamW, bit for bit. Real models (BatchNorm, tied weights), real
AdamW steps, the real bench command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from ninocast import ModelSpec, NowcastClient, NowcastOptimizer, Verify
from ninocast.spec import SpecError
from ninocast.verify import limit_of, report_body
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

    # the next nowcast keeps plain training's schedule (call 39): the snapshot taken during the race (call 23)
    # is plain training's, taken from the copy, not the rejected branch's
    nxt = 19 + PERIOD
    train_closure(model, opt, nxt, start=check + 1)  # plain calls up to the next nowcast
    assert_same_run(model, opt.optimizer, *plain_adamw(make, nxt))
    assert [t for t, _ in opt.snapshots] == [23, 27, 31, 35]
    ref, _ = plain_adamw(make, 23)
    for name, value in opt.snapshots[0][1].items():
        assert torch.equal(value, ref.state_dict()[name]), name
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


def first_decision(script: list[float], calls: int = 25, delay: int = 5, **kw):
    """A BatchNorm model trained ``calls`` calls with a shadow check of ``delay`` on a scripted probe; returns the
    model, the optimizer and the first nowcast's decision, once every scripted value was used."""
    model, probe = bn_model(), Scripted(script)
    opt = shadow_opt(model, probe, delay, 40, **kw)
    train_closure(model, opt, calls)
    assert probe.done
    return model, opt, opt.nowcasts[0]


def test_a_jump_that_passes_at_once_is_still_compared_with_plain_training():
    """Probe 1.0 -> 0.8 right after the jump passes the immediate check, but 5 calls later plain training (0.7)
    is ahead of the jump's branch (0.75): the shadow rolls it back, where a delay without shadow accepts it at
    once and never looks again."""
    model, opt, d = first_decision([1.0, 0.8, 0.75, 0.7])
    assert (d["tried"], d["delayed"], d["accepted"], d["probe_plain"]) == ([[1.0, 0.8]], "rolled_back", False, 0.7)
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
                    confidence=confidence, patience=0)  # one look: the race is tested on its own below
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
        looks = n["race"]
        assert len(looks) == n.get("extended", 0) + 1 <= 3 and looks[-1][1] == n["probe_delayed"] - n["probe_plain"]
        assert [t for t, _ in looks] == [n["step"] + delay * (i + 1) for i in range(len(looks))]
        gaps = [n["probe_after"] - n["probe_before"]] + [g for _, g in looks]
        assert all(0 < b < a for a, b in zip(gaps[:-2], gaps[1:-1]))  # raced on only while behind and closing
        assert n["shadow_steps"] == delay * len(looks) + 1
        body = NowcastReport.model_validate(report_body(n))
        assert body.probe_plain == pytest.approx(n["probe_plain"]) and body.shadow_steps == n["shadow_steps"]
        assert body.race == [tuple(x) for x in looks]


def test_shadow_needs_a_delay_a_closure_and_one_process():
    with pytest.raises(ValueError, match="needs delay"):
        Verify(probe=lambda m: 0.0, shadow=True)
    with pytest.raises(ValueError, match="does not apply"):
        Verify(probe=lambda m: 0.0, delay=5, shadow=True, baseline="trend")
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="confidence"):
            Verify(probe=lambda m: 0.0, delay=5, shadow=True, confidence=bad)
    # a shadow makes a tentative jump cost no step, so by default it has no dip limit; an explicit one stands
    assert [Verify(probe=lambda m: 0.0, delay=5, **kw).dip_limit for kw in
            ({}, {"shadow": True}, {"shadow": True, "max_dip": 3.0})] == [2.0, math.inf, 3.0]
    assert Verify(probe=lambda m: 0.0, delay=5, max_dip=math.inf).dip_limit == math.inf
    assert limit_of(0.0, math.inf) == math.inf and limit_of(2.0, 0.5) == 3.0  # no limit even from a zero probe
    with pytest.raises(ValueError, match="max_dip"):
        Verify(probe=lambda m: 0.0, delay=5, shadow=True, max_dip=float("nan"))
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
    assert set(runs) == {"adamw", "linefit+vd30sp2"}  # a shadow races on for 2 more delays by default
    v = runs["linefit+vd30sp2"]
    tentative = [d for d in v["decisions"] if d["delayed"]]
    assert v["verify_shadow"] and v["verify_patience"] == 2 and tentative
    assert v["shadow_steps"] == sum(31 + 30 * (d["extended"] or 0) for d in tentative)
    assert "training batch" in v["probe"]  # digits has no held-out training split: the default probe
    for d in tentative:  # the probe is 8 batches; Verify's default confidence 0 compares the means
        assert d["probe_se"] is not None
        assert (d["delayed"] == "rolled_back") == (d["probe_delayed"] > d["probe_plain"])
    assert main(["bench", "speedup", "--task", "digits", "--nowcasters", "linefit", "--seeds", "1000",
                 "--period", "100", "--no-progress", "--out", str(tmp_path / "x"), "--verify-shadow"]) == 2
    assert main(["bench", "speedup", "--task", "digits", "--nowcasters", "linefit", "--verify", "on",
                 "--verify-delay", "30", "--verify-patience", "1", "--no-progress", "--out",
                 str(tmp_path / "x")]) == 2  # racing on needs the shadow
    md = (out / "results.md").read_text()
    assert "| shadow steps/run | median steps + shadow steps to target |" in md
    raced = [d for d in tentative if d["extended"]]
    row = next(line for line in md.splitlines() if line.startswith("| digits | linefit+vd30sp2 | 1 |"))
    assert f"| {len(raced)} ({sum(d['delayed'] == 'kept' for d in raced)}) |" in row


def test_compute_to_target_counts_the_shadow_steps_of_checks_begun_before_it():
    from ninocast_server.bench.speedup import compute_to_target

    run = {"reached": True, "steps_to_target": 250, "max_steps": 300,
           "decisions": [{"step": 99, "shadow_steps": 31}, {"step": 199, "shadow_steps": None},
                         {"step": 240, "shadow_steps": 31}, {"step": 299, "shadow_steps": 31}]}
    assert compute_to_target(run) == 250 + 31 + 31
    assert compute_to_target(run | {"reached": False}) == 600


# ---------------------------------------------------------------------------- racing on (Verify(patience=P))
def test_a_jump_behind_but_closing_races_on_and_is_kept():
    """Dip 1.0 -> 1.5 (gap +0.5); first look at 19 + 4: jump 1.2, plain 1.0 (+0.2, closing): another 4 calls;
    second look: 0.9 against 0.95, kept. The live run is the one the jump gives with no check at all."""
    model, probe = bn_model(), Scripted([1.0, 1.5, 1.2, 1.0, 0.9, 0.95])
    opt = shadow_opt(model, probe, 4, 80)
    train_closure(model, opt, 30)
    d = opt.nowcasts[0]
    assert probe.done and (d["delayed"], d["accepted"], d["extended"], d["check_step"]) == ("kept", True, 1, 27)
    assert d["race"] == [[23, pytest.approx(0.2)], [27, pytest.approx(-0.05)]]
    assert (d["probe_delayed"], d["probe_plain"], d["shadow_steps"], d["probe_passes"]) == (0.9, 0.95, 9, 6)
    plain = shadow_opt(bn_model(), Scripted([1.0, 1.5]), 4, 80, shadow=False, max_dip=50.0, tolerance=1.0)
    train_closure(plain.model, plain, 30)  # the same jump, accepted at once (tolerance 1.0) and never checked
    assert plain.nowcasts[0]["accepted"] and "delayed" not in plain.nowcasts[0]
    assert_same_run(model, opt.optimizer, plain.model, plain.optimizer)
    assert NowcastReport.model_validate(report_body(d)).extended == 1


@pytest.mark.parametrize("patience, script, looks", [
    (2, [1.0, 1.5, 1.2, 1.0, 1.1, 1.0, 1.05, 1.0], 3),  # closing every time, still behind after 2 more delays
    (2, [1.0, 1.5, 1.2, 1.0, 1.3, 1.0], 2),  # fell back at the second look: rejected there
    (0, [1.0, 1.5, 1.2, 1.0], 1),  # one look
    (5, [1.0, 1.5, 1.4, 1.0, 1.3, 1.0, 1.2, 1.0], 3),  # a fourth look would be the next nowcast's call (39)
])
def test_a_race_that_does_not_overtake_leaves_plain_adamw(patience, script, looks):
    """Rejected after ``looks`` looks: the run, its snapshots and the next nowcast's timing are plain AdamW's."""
    delay = 4 if patience != 5 else 5  # 5: looks at 24, 29 and 34; 39 is the next nowcast's call
    model, probe = bn_model(), Scripted(script)
    opt = shadow_opt(model, probe, delay, 80, patience=patience)
    end = 19 + delay * looks
    train_closure(model, opt, end + 1)
    d = opt.nowcasts[0]
    assert probe.done and (d["delayed"], d["accepted"], d.get("extended", 0)) == ("rolled_back", False, looks - 1)
    assert len(d["race"]) == looks and d["shadow_steps"] == delay * looks + 1
    assert_same_run(model, opt.optimizer, *plain_adamw(bn_model, end + 1))
    ref, _ = plain_adamw(bn_model, 23)
    assert [t for t, _ in opt.snapshots] == [t for t in (23, 27, 31, 35) if t <= end]
    assert all(torch.equal(v, ref.state_dict()[n]) for n, v in opt.snapshots[0][1].items())


def test_patience_is_checked():
    assert [Verify(probe=lambda m: 0.0, delay=5, **kw).patience_asked for kw in
            ({}, {"shadow": True}, {"shadow": True, "patience": 0}, {"shadow": True, "patience": 7})] == [0, 2, 0, 7]
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="patience must be a whole number"):
            Verify(probe=lambda m: 0.0, delay=5, shadow=True, patience=bad)
    with pytest.raises(ValueError, match="needs shadow=True"):
        Verify(probe=lambda m: 0.0, delay=5, patience=1)


def test_the_server_gets_the_snapshots_of_the_branch_that_goes_on(server, api_keys, tmp_path):
    """Remote: the snapshot taken during a race is held back until the check. A rejected jump (19, checked at
    23) leaves plain training's snapshot at 23 on the server (record mode keeps every state); the next nowcast
    comes at 39 from the window 23..39, and the session history shows the race."""
    from safetensors.torch import load_file

    srv, key = server, api_keys["alice"]
    model, probe = bn_model(), Scripted([1.0, 1.5, 2.0, 1.0, 1.0, 1.2, 1.1, 1.0, 1.0, 1.05])
    verify = Verify(probe=probe, delay=4, shadow=True)
    opt = NowcastOptimizer(torch.optim.AdamW(model.parameters(), lr=LR), model, server=srv.url, api_key=key,
                           period=PERIOD, ctx=CTX, max_train_steps=80, retries=0, timeout=20, record=True,
                           verify=verify)
    train_closure(model, opt, 48)
    opt.close()
    assert probe.done and not set(opt.failures) - {"upload_dropped"}, opt.failures
    first, second = opt.nowcasts[0], opt.nowcasts[1]
    assert (first["delayed"], second["step"], second["delayed"], second["extended"]) == ("rolled_back", 39, "kept", 1)
    sid = opt.backend.session_id
    files = [f for f in Path(srv.settings["data_dir"]).rglob("states/23.safetensors") if sid in str(f)]
    assert len(files) == 1
    # one session from the first snapshot on: had the rejected branch's 23 been sent first, plain training's
    # would have met a step conflict and the client would have started a new session without steps 3..19
    assert sorted(int(f.stem) for f in files[0].parent.glob("*.safetensors"))[:6] == [3, 7, 11, 15, 19, 23]
    ref, _ = plain_adamw(bn_model, 23)
    stored = load_file(files[0])
    assert stored and all(torch.equal(v, ref.state_dict()[n]) for n, v in stored.items())
    with NowcastClient(srv.url, api_key=key) as c:
        view = c.get_session(sid)
    reports = {r["step"]: r for r in view["reports"]}
    assert reports[39]["extended"] == 1 and [t for t, _ in reports[39]["race"]] == [43, 47]


@pytest.mark.parametrize("patience, out_of_scope, extended", [(None, False, 1), (None, True, 0), (2, True, 1)])
def test_the_default_race_is_withheld_from_an_out_of_scope_nowcaster(patience, out_of_scope, extended):
    """The same closing gap (+0.5 -> +0.2) races on by default, not when the nowcaster warned that the model is
    outside its scope (the backend's ``out_of_scope``, set from the warning), unless patience is given."""
    script = [1.0, 1.5, 1.2, 1.0] + ([0.9, 0.95] if extended else [])
    model, probe = bn_model(), Scripted(script)
    opt = shadow_opt(model, probe, 4, 80, patience=patience)
    opt.backend.out_of_scope = out_of_scope
    train_closure(model, opt, 19 + 4 * (1 + extended) + 1)
    d = opt.nowcasts[0]
    assert probe.done and d.get("extended", 0) == extended and d["patience"] == (0 if extended == 0 else 2)
    assert d["delayed"] == ("kept" if extended else "rolled_back")


def test_with_a_shadow_any_finite_dip_gets_its_check_and_a_nan_jump_is_shortened():
    """Probe 1.0 -> 40.0 right after the jump (a 39x dip, beyond the old default limit of 10): with a shadow and
    no max_dip the jump is kept tentatively and decided against plain training at the check (0.9 < 1.0: kept),
    with only the full jump scored. An explicit max_dip refuses it at once and tries the shorter jumps; a jump
    whose probe is NaN is never kept tentatively, limit or not: the shorter jumps are tried."""
    _, _, d = first_decision([1.0, 40.0, 0.9, 1.0])
    assert (d["tried"], d["delayed"], d["accepted"], d["probe_plain"]) == ([[1.0, 40.0]], "kept", True, 1.0)

    limited, opt, d = first_decision([1.0, 40.0, 3.0, 2.0], max_dip=10.0)
    assert [a for a, _ in d["tried"]] == [1.0, 0.5, 0.25] and not d["accepted"] and "delayed" not in d
    assert_same_run(limited, opt.optimizer, *plain_adamw(bn_model, 25))

    _, _, d = first_decision([1.0, float("nan"), 0.95, 2.0])
    assert [a for a, _ in d["tried"]] == [1.0, 0.5, 0.25] and math.isinf(d["tried"][0][1])
    assert (d["accepted"], d["alpha"]) == (True, 0.5) and "delayed" not in d

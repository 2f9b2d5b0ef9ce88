"""Delayed checks with rollback (``Verify(delay=D)``): a jump that dips the probe is kept tentatively, probed again
D steps later, and rolled back exactly when it did not recover. Real models, real AdamW steps, a real server."""

from __future__ import annotations

import math

import pytest
import torch
from ninocast import NowcastClient, NowcastOptimizer, Verify
from test_verify import CTX, PERIOD, PROBE, batch, hf_args, loss_fn
from torch import nn

LR = 3e-2


def bn_model(seed: int = 0) -> nn.Module:
    """With BatchNorm: its running statistics move on a branch, so a rollback must put buffers back too."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3))


class Scripted:
    """A probe whose values are given in advance, in the order the optimizer asks: before and tried points at a
    nowcast, one value at a delayed check. Every value must be used (``done``)."""

    def __init__(self, values: list[float]) -> None:
        self.values = list(values)

    def __call__(self, model: nn.Module) -> float:
        assert self.values, "the optimizer asked the probe more often than expected"
        return self.values.pop(0)

    @property
    def done(self) -> bool:
        return not self.values


def wrap(model: nn.Module, probe, delay: int, steps: int, **kw) -> NowcastOptimizer:
    verify = Verify(probe=probe, delay=delay, **kw)
    return NowcastOptimizer(torch.optim.AdamW(model.parameters(), lr=LR), model, local=True, nowcaster="linefit",
                            period=PERIOD, ctx=CTX, max_train_steps=steps, verify=verify, final_nowcast="keep")


def train(model: nn.Module, opt, steps: int, start: int = 0, skip: range = range(0)) -> None:
    """The README's loop over batches start..steps-1 (calls in ``skip`` consume their batch untrained)."""
    for s in range(start, steps):
        if s in skip:
            continue
        opt.zero_grad()
        loss_fn(model, batch(s)).backward()
        opt.step()


def adam_state(opt: torch.optim.Optimizer) -> list[dict]:
    return [{k: v.clone() for k, v in opt.state[p].items()} for g in opt.param_groups for p in g["params"]]


def assert_same_run(model_a: nn.Module, opt_a, model_b: nn.Module, opt_b) -> None:
    for (n, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), n  # parameters and BatchNorm buffers, bit for bit
    for sa, sb in zip(adam_state(opt_a), adam_state(opt_b)):
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k  # moments and the step count (bias correction)


# ---------------------------------------------------------------------------- rollback is exact
@pytest.mark.parametrize("delay", [3, 6])  # snapshots every 4 calls: 6 takes one (call 23) on the branch
def test_a_rolled_back_jump_leaves_the_run_as_if_it_never_happened(delay):
    """Nowcast at call 19, kept tentatively (probe 1.0 -> 1.5), checked at call 19 + D (2.0: worse), rolled back.
    Claim: after call 19 + D the model (buffers too) and AdamW's state equal those of plain AdamW on batches
    0..18 (plus the forward pass of call 19's batch, which the loop ran before the jump: BatchNorm's running
    statistics include it); every later call is a plain AdamW step, so up to the next nowcast the run equals AdamW on batches
    0..18 and 20 + D.. (the jump's call and the D branch calls spent), and no snapshot of the branch is used."""
    steps = 80
    model, probe = bn_model(), Scripted([1.0, 1.5, 2.0])
    opt = wrap(model, probe, delay, steps)
    check = 19 + delay
    train(model, opt, check + 1)
    d = opt.nowcasts[0]
    assert (d["step"], d["delayed"], d["accepted"], d["alpha"]) == (19, "rolled_back", False, 0.0)
    assert (d["check_step"], d["delay"], d["probe_delayed"], d["probe_passes"]) == (check, delay, 2.0, 3)
    assert d["tried"] == [[1.0, 1.5]] and d["snapshot_bytes"] > 0 and probe.done

    ref = bn_model()
    base = torch.optim.AdamW(ref.parameters(), lr=LR)
    train(ref, base, 19)
    with torch.no_grad():  # the loop's forward on the nowcast call's batch ran before the copy (BatchNorm saw it)
        ref(batch(19)[0])
    assert_same_run(model, opt.optimizer, ref, base)  # right after the rollback
    assert opt.snapshots == []  # the branch's snapshot (delay 6: call 23) was dropped, none taken otherwise

    probe.values = [1.0, 0.5]  # the next nowcast passes at once
    nxt = next(s for s in range(check + 1, steps) if (s + 1) % (PERIOD // CTX) == 0) + (CTX - 1) * (PERIOD // CTX)
    train(model, opt, nxt, start=check + 1)  # up to the next nowcast call, exclusive
    train(ref, base, nxt, start=check + 1)
    assert_same_run(model, opt.optimizer, ref, base)
    train(model, opt, nxt + 1, start=nxt)
    assert [n["step"] for n in opt.nowcasts] == [19, nxt] and opt.nowcasts[1]["accepted"]
    assert min(opt.nowcasts[1]["snapshot_steps"]) > check  # its whole window was taken after the rollback
    assert opt.step_count == nxt + 1 and not opt.failures


def test_a_jump_that_dips_then_recovers_is_kept():
    """Kept: the branch goes on (the parameters are not AdamW's), and the record says so."""
    model, probe = bn_model(), Scripted([1.0, 1.5, 0.9])
    opt = wrap(model, probe, 5, 60)
    train(model, opt, 25)
    d = opt.nowcasts[0]
    assert (d["delayed"], d["accepted"], d["alpha"], d["probe_delayed"], d["check_step"]) == ("kept", True, 1.0,
                                                                                             0.9, 24)
    ref = bn_model()
    base = torch.optim.AdamW(ref.parameters(), lr=LR)
    train(ref, base, 19)
    assert not torch.equal(model[0].weight, ref[0].weight)
    assert opt.checks.pending is None and not opt.delayed_off


def test_beyond_max_dip_the_jump_is_checked_at_once():
    """A dip beyond max_dip (1.0 -> 3.5 with max_dip 2) is never kept tentatively: shorter jumps are tried."""
    model, probe = bn_model(), Scripted([1.0, 3.5, 2.0, 0.8])
    opt = wrap(model, probe, 5, 60, max_dip=2.0)
    train(model, opt, 21)
    d = opt.nowcasts[0]
    assert d["accepted"] and d["alpha"] == 0.25 and "delayed" not in d and probe.done and opt.checks.pending is None


def test_real_probe_decisions_match_the_probe_measured_independently():
    """The ordinary probe (the loss on a held-out batch) with a generous max_dip: whatever linefit's jumps do,
    each tentative decision agrees with the probe loss measured at the check by the test itself."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    verify = Verify(batch=PROBE, loss_fn=loss_fn, delay=8, max_dip=50.0, max_rollbacks=10)
    opt = NowcastOptimizer(torch.optim.AdamW(model.parameters(), lr=LR), model, local=True, nowcaster="linefit",
                           period=PERIOD, ctx=CTX, max_train_steps=100, verify=verify)
    measured = {}
    for s in range(100):
        opt.zero_grad()
        loss_fn(model, batch(s)).backward()
        opt.step()
        pending = [n for n in opt.nowcasts if n.get("check_step") == s]
        if pending and pending[0]["delayed"] == "kept":
            with torch.no_grad():
                measured[s] = loss_fn(model.eval(), PROBE).item()
            model.train()
    tentative = [n for n in opt.nowcasts if "delayed" in n]
    assert tentative, opt.nowcasts  # linefit's k = 40 jumps overshoot this model: some dip within 50x
    for n in tentative:
        assert n["delayed"] in ("kept", "rolled_back")
        assert n["tried"][0][1] > n["probe_before"]  # tentative only when the immediate check failed
        if n["delayed"] == "kept":
            assert n["probe_delayed"] <= n["probe_before"]
            assert n["probe_delayed"] == pytest.approx(measured[n["check_step"]], rel=1e-6)
        else:
            assert n["probe_delayed"] > n["probe_before"] and not n["accepted"]


# ---------------------------------------------------------------------------- rollbacks in a row
def test_max_rollbacks_in_a_row_turn_tentative_jumps_off():
    """Two rollbacks in a row (calls 22 and 42): the nowcast at 59 is checked at once (shrunk, rejected), so a
    wrong nowcaster cost at most 2 x D branch steps. The last nowcast (79) could not be checked inside the budget
    anyway."""
    model = bn_model()
    probe = Scripted([1.0, 1.5, 2.0,  # 19: tentative, rolled back at 22
                      1.0, 1.5, 2.0,  # 39: tentative (window 23..39), rolled back at 42
                      1.0, 1.5, 1.4, 1.3])  # 59: immediate only: 1, 1/2, 1/4 all worse -> rejected
    opt = wrap(model, probe, 3, 80, max_rollbacks=2)
    train(model, opt, 60)
    assert [(n["step"], n.get("delayed"), n["accepted"]) for n in opt.nowcasts] == [
        (19, "rolled_back", False), (39, "rolled_back", False), (59, None, False)]
    assert opt.delayed_off and probe.done
    assert [a for a, _ in opt.nowcasts[2]["tried"]] == [1.0, 0.5, 0.25]


def test_a_kept_jump_resets_the_count_and_no_check_runs_past_the_budget():
    model = bn_model()
    probe = Scripted([1.0, 1.5, 2.0,  # 19: rolled back
                      1.0, 1.5, 0.5,  # 39: kept -> the count starts again
                      1.0, 1.5, 2.0,  # 59: rolled back (one in a row: still on)
                      1.0, 1.5, 1.4, 1.3])  # 79 of 80: a check at 82 would be past the budget -> immediate
    opt = wrap(model, probe, 3, 80, max_rollbacks=2)
    train(model, opt, 80)
    assert [n.get("delayed") for n in opt.nowcasts] == ["rolled_back", "kept", "rolled_back", None]
    assert not opt.delayed_off and probe.done and opt.checks.pending is None


def test_delay_arguments_are_checked():
    with pytest.raises(ValueError, match="fixed probe"):
        Verify(closure=True, delay=5)
    for bad in (dict(delay=-1), dict(delay=2.5), dict(max_dip=-0.5), dict(max_dip=math.nan),
                dict(tolerance=0.5, max_dip=0.1), dict(max_rollbacks=0)):
        with pytest.raises(ValueError):
            Verify(probe=lambda m: 0.0, **bad)
    with pytest.raises(ValueError, match="shorter than the period"):
        wrap(bn_model(), lambda m: 0.0, PERIOD, 60)


# ---------------------------------------------------------------------------- the server's view
def test_the_server_session_shows_the_delayed_decisions(server, api_keys):
    srv, key = server, api_keys["alice"]  # the suite's shared server
    model = bn_model()
    probe = Scripted([1.0, 1.5, 2.0, 1.0, 1.5, 0.5])  # 19: rolled back at 22; 39: kept at 42
    opt = NowcastOptimizer(torch.optim.AdamW(model.parameters(), lr=LR), model, server=srv.url, api_key=key,
                           period=PERIOD, ctx=CTX, max_train_steps=60, retries=0, timeout=20, record=True,
                           verify=Verify(probe=probe, delay=3))
    train(model, opt, 45)
    opt.close()
    # a busy machine may drop a queued upload (by design: the nowcast re-sends it); nothing else may fail
    assert not set(opt.failures) - {"upload_dropped"}, opt.failures
    with NowcastClient(srv.url, api_key=key) as c:
        view = c.get_session(opt.backend.session_id)
    reports = {r["step"]: r for r in view["reports"]}
    assert sorted(reports) == [19, 39]
    assert (reports[19]["delayed"], reports[19]["accepted"], reports[19]["probe_delayed"]) == ("rolled_back",
                                                                                               False, 2.0)
    assert (reports[39]["delayed"], reports[39]["accepted"], reports[39]["check_step"]) == ("kept", True, 42)
    assert reports[19]["delay"] == 3 and reports[19]["snapshot_bytes"] == opt.nowcasts[0]["snapshot_bytes"] > 0
    assert view["verification"] == {"reported": 2, "accepted": 1, "rejected": 0, "skipped": 0, "rolled_back": 1,
                                    "pending": 0}


# ---------------------------------------------------------------------------- frameworks
@pytest.mark.filterwarnings("ignore:.*LeafSpec")
def test_lightning_callback_passes_the_delay_and_rolls_back():
    from ninocast.integrations.lightning import NowcastCallback, pl  # pl: the Lightning package it subclasses

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = bn_model()

        def training_step(self, b, i):
            return loss_fn(self.net, (b[0][0], b[1][0]))

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=LR)

    steps = 40
    probe = Scripted([1.0, 1.5, 2.0, 1.0, 0.5])  # 19: rolled back at 22; 39 (the last call): at once, kept
    cb = NowcastCallback(probe=probe, verify_options={"delay": 3}, local=True, nowcaster="linefit", period=PERIOD,
                         ctx=CTX, max_train_steps=steps, final_nowcast="keep")
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[cb])
    trainer.fit(Module(), torch.utils.data.DataLoader([batch(s) for s in range(steps)], batch_size=1))
    opt = cb.optimizer
    assert opt.verify.delay == 3 and not opt.failures and probe.done
    assert [(n["step"], n.get("delayed"), n["accepted"]) for n in opt.nowcasts] == [(19, "rolled_back", False),
                                                                                  (39, None, True)]


# ---------------------------------------------------------------------------- the benchmark
def test_bench_speedup_verify_delay_smoke(tmp_path, capsys):
    import json

    from ninocast.cli import main

    out = tmp_path / "b"
    assert main(["bench", "speedup", "--task", "digits", "--nowcasters", "linefit", "--verify", "on",
                 "--verify-delay", "30", "--verify-max-dip", "50", "--seeds", "1000", "--max-steps", "300",
                 "--period", "100", "--no-progress", "--out", str(out)]) == 0
    runs = {r["method"]: r for r in map(json.loads, (out / "runs.jsonl").read_text().splitlines())}
    assert set(runs) == {"adamw", "linefit+vd30"}
    v = runs["linefit+vd30"]
    assert (v["verify_delay"], v["verify_max_dip"]) == (30, 50.0)
    tentative = [d for d in v["decisions"] if d["delayed"]]
    assert tentative and v["snapshot_bytes_max"] > 0  # linefit's k = 40 jump dips this model within 50x
    for d in tentative:
        assert d["check_step"] == d["step"] + 30 and d["probe_delayed"] is not None
        rolled = d["delayed"] == "rolled_back"
        assert rolled == (d["probe_delayed"] > d["probe_before"])
        assert (d["check_step"] + 1 in v["rollback_steps"]) == rolled
        if rolled:  # the curve is evaluated right after the rollback
            assert d["check_step"] + 1 in {c[0] for c in v["curve"]}
    md = (out / "results.md").read_text()
    assert "| linefit+vd30 |" in md and "tentative (rolled back)" in md
    for bad, msg in ((["--verify-delay", "30"], "needs --verify"),
                     (["--verify", "on", "--verify-delay", "100"], "shorter than"),
                     (["--verify", "on", "--verify-delay", "5", "--verify-max-dip", "-1"], "max_dip")):
        capsys.readouterr()
        assert main(["bench", "speedup", "--task", "digits", "--nowcasters", "linefit", "--seeds", "1000",
                     "--period", "100", "--no-progress", "--out", str(tmp_path / "x"), *bad]) == 2
        assert msg in capsys.readouterr().err


def test_hugging_face_callback_passes_the_delay(tmp_path):
    args = hf_args(tmp_path)
    from ninocast.integrations.hf import NowcastCallback
    from test_integrations import Tokens, tiny_gpt2
    from transformers import Trainer

    trainer = Trainer(model=tiny_gpt2(0), args=args, train_dataset=Tokens(), eval_dataset=Tokens())
    probe = Scripted([1.0, 1.5, 2.0])  # 19: tentative, rolled back at 24 (its snapshot of call 23 dropped, so
    # the window is full again only at call 43: no second nowcast in this 40-step run)
    cb = NowcastCallback(probe=probe, verify_options={"delay": 5}, local=True, nowcaster="linefit", period=PERIOD,
                         ctx=CTX).attach(trainer)
    trainer.train()
    opt = cb.optimizer
    assert opt.verify.delay == 5 and probe.done and not opt.failures
    assert [(n["step"], n.get("delayed"), n["accepted"]) for n in opt.nowcasts] == [(19, "rolled_back", False)]
    assert [t for t, _ in opt.snapshots] == [27, 31, 35, 39]
    bad = Trainer(model=tiny_gpt2(0), args=args, train_dataset=Tokens())
    NowcastCallback(probe=probe, verify_options={"dealy": 5}, local=True, nowcaster="linefit", period=PERIOD,
                    ctx=CTX).attach(bad)
    with pytest.raises(ValueError, match="unknown Verify options"):
        bad.train()


# ---------------------------------------------------------------------------- torch.distributed
def _ddp_rollback_worker(rank: int, init_file: str, out: str) -> None:
    import os

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        model = bn_model()
        ddp = DDP(model)
        probe = Scripted([1.0, 1.5, 2.0, 1.0, 1.5, 0.5])  # rank 0 decides: 19 rolled back at 22, 39 kept at 42
        opt = NowcastOptimizer(torch.optim.AdamW(ddp.parameters(), lr=LR), ddp, local=True, nowcaster="linefit",
                               period=PERIOD, ctx=CTX, max_train_steps=60, verify=Verify(probe=probe, delay=3))
        at = {}
        for s in range(45):
            opt.zero_grad()
            x, y = batch(s + 1000 * rank)  # each rank its own data; DDP averages the gradients
            nn.functional.mse_loss(ddp(x), y).backward()
            opt.step()
            if s in (21, 22, 41, 42):
                at[s] = {n: p.detach().clone() for n, p in model.named_parameters()}
        torch.save({"at": at, "nowcasts": opt.nowcasts, "probe_left": probe.values, "off": opt.delayed_off},
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_roll_back_together(tmp_path):
    """Rank 0 probes and decides; every rank keeps its own pre-jump copy and restores it on the broadcast verdict,
    so the ranks hold the same parameters after a rollback and after a kept jump (DDP syncs gradients only: a
    rank that missed the rollback would stay apart)."""
    import torch.multiprocessing as mp

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    mp.start_processes(_ddp_rollback_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert [(n["step"], n["delayed"]) for n in r0["nowcasts"]] == [(19, "rolled_back"), (39, "kept")]
    assert r0["probe_left"] == [] and r1["nowcasts"] == [] and r1["probe_left"] == [1.0, 1.5, 2.0, 1.0, 1.5, 0.5]
    for s in (21, 22, 41, 42):
        for n in r0["at"][s]:
            assert torch.equal(r0["at"][s][n], r1["at"][s][n]), (s, n)
    assert not torch.equal(r0["at"][21]["0.weight"], r0["at"][22]["0.weight"])  # call 22 did roll back


def test_trend_baseline_asks_the_branch_to_beat_where_plain_training_was_heading():
    """baseline='trend': the probe on the window's previous snapshot (call 15) is 1.3, before the jump 1.0, so
    plain training was falling 0.3 per 4 calls and heads for 1.0 - 0.3 * 3/4 = 0.775 at the check (call 22). A
    branch at 0.9, which "no worse than before" would keep, is rolled back; the probe on the old snapshot leaves
    the tentative point exactly in place."""
    model, probe = bn_model(), Scripted([1.0, 1.5, 1.3, 0.9])
    opt = wrap(model, probe, 3, 60, baseline="trend")
    train(model, opt, 20)
    assert opt.nowcasts[0]["probe_expected"] == pytest.approx(0.775) and opt.nowcasts[0]["probe_passes"] == 3
    kept_run = {n: p.detach().clone() for n, p in model.named_parameters()}
    twin, twin_probe = bn_model(), Scripted([1.0, 1.5, 0.9])  # the same run with baseline 'before'
    twin_opt = wrap(twin, twin_probe, 3, 60)
    train(twin, twin_opt, 20)
    for n, p in twin.named_parameters():
        assert torch.equal(p, kept_run[n]), n  # scoring the old snapshot put the tentative point back exactly
    train(model, opt, 23, start=20)
    train(twin, twin_opt, 23, start=20)
    assert (opt.nowcasts[0]["delayed"], twin_opt.nowcasts[0]["delayed"]) == ("rolled_back", "kept")
    assert probe.done and twin_probe.done
    with pytest.raises(ValueError, match="baseline"):
        Verify(probe=probe, delay=3, baseline="median")

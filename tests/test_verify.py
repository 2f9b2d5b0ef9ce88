"""Verified nowcasts (ninocast.Verify): accept / shrink / reject on a probe, the budget's last nowcast, the reports
a server keeps, and ``bench speedup --verify``. Real models, real training steps, a real server."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import httpx
import pytest
import torch
from torch import nn

from ninocast import NowcastClient, NowcastOptimizer, Verify
from ninocast.verify import verify_jump
from server_utils import Server, assert_error

PERIOD, CTX, STEPS = 20, 5, 60  # snapshots every 4 calls; nowcasts at calls 19, 39, 59 (k = 40, 13, 1)


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))


def batch(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(32, 8, generator=g)
    return x, (x[:, :3] * 2 - x[:, 3:6]).sin()


def loss_fn(model: nn.Module, b) -> torch.Tensor:
    return nn.functional.mse_loss(model(b[0]), b[1])


PROBE = batch(10**6)  # a fixed held-out batch (its step is never trained on)


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def train(model: nn.Module, opt, steps: int = STEPS) -> list[float]:
    """The README's loop; returns the probe loss right before and right after each nowcast call."""
    around = []
    for s in range(steps):
        nowcast_call = (s + 1) % PERIOD == 0
        if nowcast_call:
            around.append(loss_fn(model, PROBE).item())
        if getattr(opt, "need_grads", True):
            opt.zero_grad()
            loss_fn(model, batch(s)).backward()
        opt.step()
        if nowcast_call:
            around.append(loss_fn(model, PROBE).item())
    return around


def wrap(model: nn.Module, **kw) -> NowcastOptimizer:
    args = dict(local=True, nowcaster="linefit", period=PERIOD, ctx=CTX, max_train_steps=STEPS) | kw
    return NowcastOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-2), model, **args)


# ---------------------------------------------------------------------------- the decision itself
def quadratic_setup(scale: float):
    """A Linear layer whose probe is the squared distance of its weights to a target w*; theta = 0 and the
    nowcast is scale * w*, so the best point on the jump is known in closed form."""
    layer = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.zero_()
    w_star = torch.tensor([[1.0, -2.0, 0.5, 3.0]])
    probe = lambda m: float(((m.weight.detach() - w_star) ** 2).sum())  # noqa: E731
    return layer, {"weight": scale * w_star}, probe, w_star


def test_accepts_a_jump_that_helps():
    layer, nowcast, probe, w_star = quadratic_setup(1.0)
    d = verify_jump(dict(layer.named_parameters()), nowcast, lambda: probe(layer), Verify(probe=probe))
    assert d["accepted"] and d["alpha"] == 1.0 and d["probe_passes"] == 2
    assert d["probe_after"] == 0.0 < d["probe_before"]
    assert torch.equal(layer.weight, w_star)


def test_shrinks_an_overshooting_jump_to_the_best_fraction():
    layer, nowcast, probe, w_star = quadratic_setup(2.5)  # a=1 lands at 1.5 w* (worse), a=0.5 at 1.25 w*, a=0.25 ...
    before = probe(layer)
    d = verify_jump(dict(layer.named_parameters()), nowcast, lambda: probe(layer), Verify(probe=probe))
    assert d["accepted"] and d["alpha"] == 0.5 and d["probe_passes"] == 4
    assert [a for a, _ in d["tried"]] == [1.0, 0.5, 0.25]
    assert d["tried"][0][1] > before and d["probe_after"] == pytest.approx(0.0625 * before)
    assert torch.allclose(layer.weight, 1.25 * w_star)


def test_rejects_a_jump_that_hurts_and_restores_the_parameters_exactly():
    layer, _, probe, w_star = quadratic_setup(1.0)
    with torch.no_grad():
        layer.weight.copy_(0.9 * w_star)
    theta = layer.weight.detach().clone()
    d = verify_jump(dict(layer.named_parameters()), {"weight": -w_star}, lambda: probe(layer), Verify(probe=probe))
    assert not d["accepted"] and d["alpha"] == 0.0 and d["probe_after"] == d["probe_before"]
    assert torch.equal(layer.weight, theta)


def test_tolerance_and_non_finite_probes():
    layer, _, probe, w_star = quadratic_setup(1.0)
    worse = {"weight": 1.1 * w_star}  # from theta = w*, the probe + 1 goes 1.0 -> 1.1425
    with torch.no_grad():
        layer.weight.copy_(w_star)
    d = verify_jump(dict(layer.named_parameters()), worse, lambda: probe(layer) + 1.0, Verify(probe=probe))
    assert not d["accepted"]  # 1.0 -> 1.1425: worse
    d = verify_jump(dict(layer.named_parameters()), worse, lambda: probe(layer) + 1.0,
                    Verify(probe=probe, tolerance=0.2))
    assert d["accepted"] and d["alpha"] == 1.0  # within 20 %
    with torch.no_grad():
        layer.weight.copy_(w_star)
    nan_probe = lambda: float("nan") if layer.weight[0, 0] != w_star[0, 0] else 1.0  # noqa: E731
    d = verify_jump(dict(layer.named_parameters()), {"weight": 2 * w_star}, nan_probe, Verify(probe=probe))
    assert not d["accepted"] and torch.equal(layer.weight, w_star) and math.isinf(d["tried"][0][1])


def test_verify_arguments_are_checked():
    for bad in (dict(), dict(batch=PROBE), dict(batch=PROBE, loss_fn=loss_fn, probe=lambda m: 0.0),
                dict(probe=lambda m: 0.0, shrink=(0.25, 0.5)), dict(probe=lambda m: 0.0, shrink=(1.5,)),
                dict(probe=lambda m: 0.0, tolerance=-0.1)):
        with pytest.raises(ValueError):
            Verify(**bad)
    with pytest.raises(ValueError, match="verify must be"):
        wrap(make_model(), verify=42)
    model = make_model()
    mean = Verify(batches=[PROBE, batch(7)], loss_fn=loss_fn).scorer(model, None)()
    assert mean == pytest.approx((loss_fn(model, PROBE).item() + loss_fn(model, batch(7)).item()) / 2)
    assert model.training  # the probe ran in eval mode and put the mode back


def test_closure_probe_puts_back_thetas_gradients_on_reject():
    model = make_model()
    b = batch(0)

    def closure():
        model.zero_grad()
        loss = loss_fn(model, b)
        loss.backward()
        return loss
    before = closure().item()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    bad = {n: p.detach() + 5.0 for n, p in model.named_parameters()}
    cfg = Verify(closure=True)
    d = verify_jump(dict(model.named_parameters()), bad, cfg.scorer(model, closure), cfg, before)
    assert not d["accepted"] and d["probe_passes"] == 3  # the closure's first loss was the "before" score
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n]), n  # the normal step uses the gradients at theta, not the last tried


# ---------------------------------------------------------------------------- inside NowcastOptimizer
def test_verified_run_never_raises_the_probe_loss_at_a_nowcast():
    """linefit with k = 40 overshoots this model: unverified, a nowcast raises the probe loss; verified, never."""
    model = make_model()
    unverified = train(model, wrap(model, final_nowcast="keep"))
    jumps = [after - before for before, after in zip(unverified[::2], unverified[1::2])]
    assert max(jumps) > 0, jumps  # the setting must have a harmful nowcast for this test to mean anything

    model = make_model()
    opt = wrap(model, verify=Verify(batch=PROBE, loss_fn=loss_fn), final_nowcast="keep")
    verified = train(model, opt)
    jumps = [after - before for before, after in zip(verified[::2], verified[1::2])]
    decisions = opt.nowcasts
    assert [d["step"] for d in decisions] == [19, 39, 59] and not opt.failures
    for d, jump in zip(decisions, jumps):
        assert d["probe"] == "batch" and d["probe_passes"] in (2, 4) and d["verify_s"] >= 0
        if d["accepted"]:
            assert 0 < d["alpha"] <= 1 and d["probe_after"] <= d["probe_before"]
            assert jump <= 1e-6  # the probe loss measured independently did not go up
    assert any(not d["accepted"] or d["alpha"] < 1 for d in decisions), decisions  # verification did something


def test_rejected_nowcasts_are_normal_steps_so_the_run_equals_adamw():
    calls: list[int] = []

    def always_worse(model: nn.Module) -> float:  # "before" scores 0, every tried point 1: everything rejected
        calls.append(1)
        return 0.0 if len(calls) % 4 == 1 else 1.0

    ref = make_model()
    base = torch.optim.AdamW(ref.parameters(), lr=3e-2)
    for s in range(STEPS):
        base.zero_grad()
        loss_fn(ref, batch(s)).backward()
        base.step()
    model = make_model()
    opt = wrap(model, verify=always_worse, final_nowcast="keep")
    grads_on_nowcast_calls = []
    for s in range(STEPS):
        grads_on_nowcast_calls.append(opt.need_grads)
        opt.zero_grad()
        loss_fn(model, batch(s)).backward()
        opt.step()
    assert all(grads_on_nowcast_calls)  # verified: every call needs gradients (a rejection steps on them)
    assert [(d["step"], d["accepted"], d["alpha"]) for d in opt.nowcasts] == [(19, False, 0.0), (39, False, 0.0),
                                                                           (59, False, 0.0)]
    assert len(calls) == 12
    for n, p in model.named_parameters():
        assert torch.equal(p, dict(ref.named_parameters())[n]), n


def test_final_nowcast_is_skipped_by_default_and_kept_on_request():
    """The last call of the budget (k = 1, nothing left to recover) is a normal step unless final_nowcast='keep'."""
    ref = make_model()
    base = torch.optim.AdamW(ref.parameters(), lr=3e-2)
    model = make_model()
    opt = wrap(model)
    for s in range(STEPS):
        if opt.need_grads:
            opt.zero_grad()
            loss_fn(model, batch(s)).backward()
        if s == STEPS - 1:
            assert opt.need_grads  # the skipped nowcast's normal step needs the gradients
            ref.load_state_dict(model.state_dict())  # AdamW alone, from the same point, on the same gradients
            base.load_state_dict(copy.deepcopy(opt.optimizer.state_dict()))
            for p, q in zip(ref.parameters(), model.parameters()):
                p.grad = q.grad.clone()
        opt.step()
    base.step()
    assert [(d["step"], d["accepted"], d.get("skipped")) for d in opt.nowcasts] == [(19, True, None),
                                                                                 (39, True, None),
                                                                                 (59, False, "final")]
    for n, p in model.named_parameters():
        assert torch.equal(p, dict(ref.named_parameters())[n]), n  # the last call was AdamW's step

    kept = wrap(make_model(), final_nowcast="keep")
    train(kept.model, kept)
    assert [d["accepted"] for d in kept.nowcasts] == [True, True, True]
    with pytest.raises(ValueError, match="final_nowcast"):
        wrap(make_model(), final_nowcast="maybe")


# ---------------------------------------------------------------------------- reports on a real server
@pytest.fixture(scope="module")
def srv_key(tmp_path_factory):
    from ninocast_server.api.auth import add_key

    keys = tmp_path_factory.mktemp("verify-keys") / "keys.json"
    key = add_key(keys, "vera")
    server = Server(tmp_path_factory.mktemp("verify-server") / "data", keys_file=keys).start()
    yield server, key
    server.stop()


def test_reports_reach_the_server_session_history(srv_key):
    srv, key = srv_key
    model = make_model()
    opt = wrap(model, local=False, nowcaster=None, server=srv.url, api_key=key, retries=0, timeout=20,
               verify=Verify(batch=PROBE, loss_fn=loss_fn), record=True)
    train(model, opt)
    opt.close()
    assert not opt.failures, opt.failures
    with NowcastClient(srv.url, api_key=key) as c:
        view = c.get_session(opt.backend.session_id)
    reports = view["reports"]
    assert [r["step"] for r in reports] == [19, 39, 59]
    for r, d in zip(reports[:2], opt.nowcasts[:2]):
        assert r["accepted"] == d["accepted"] and r["alpha"] == d["alpha"] and r["probe"] == "batch"
        assert r["probe_before"] == pytest.approx(d["probe_before"]) and r["k"] == d["k"]
        assert r["probe_passes"] == d["probe_passes"] and len(r["tried"]) == len(d["tried"])
    assert reports[2]["skipped"] == "final" and not reports[2]["accepted"]
    n_acc = sum(d["accepted"] for d in opt.nowcasts[:2])
    assert view["verification"] == {"reported": 3, "accepted": n_acc, "rejected": 2 - n_acc, "skipped": 1,
                                    "rolled_back": 0, "pending": 0}
    assert view["nowcasts_done"] == 2  # the skipped one never asked the server


def test_report_route_validates_and_is_idempotent(srv_key, tmp_path):
    srv, key = srv_key
    h = {"Authorization": f"Bearer {key}"}
    with NowcastClient(srv.url, api_key=key) as c:
        from ninocast import ModelSpec

        sid = c.create_session(ModelSpec.from_module(make_model()), nowcaster="linefit")["id"]
    url = f"{srv.url}/v1/sessions/{sid}/nowcasts/19/report"
    good = {"k": 40, "accepted": True, "alpha": 0.5, "probe": "batch", "probe_before": 1.0, "probe_after": 0.9,
            "tried": [[1.0, 1.2], [0.5, 0.9]], "probe_passes": 3, "verify_s": 0.01}
    assert httpx.post(url, json=good, headers=h).status_code == 201
    assert httpx.post(url, json=good | {"alpha": 0.25}, headers=h).status_code == 201  # replaces
    view = httpx.get(f"{srv.url}/v1/sessions/{sid}", headers=h).json()
    assert [(r["step"], r["alpha"]) for r in view["reports"]] == [(19, 0.25)]
    for bad, field in ((good | {"alpha": 2.0}, "alpha"), (good | {"extra": 1}, "extra"),
                       (good | {"tried": [[1.0, 1.0]] * 17}, "tried"), ({"k": 3}, "accepted"),
                       (good | {"probe": "oracle"}, "probe"), (good | {"delayed": "maybe"}, "delayed"),
                       (good | {"delay": 0}, "delay"), (good | {"snapshot_bytes": -1}, "snapshot_bytes")):
        body = assert_error(httpx.post(url, json=bad, headers=h), 422)
        assert field in json.dumps(body), body
    inf_body = json.dumps(good).replace("0.9,", "Infinity,", 1)
    assert_error(httpx.post(url, content=inf_body, headers=h | {"Content-Type": "application/json"}), 422)
    assert_error(httpx.post(f"{srv.url}/v1/sessions/nope/nowcasts/19/report", json=good, headers=h), 404)
    assert httpx.post(url, json=good).status_code == 401


# ---------------------------------------------------------------------------- the benchmark
def test_bench_speedup_verify_smoke(tmp_path: Path):
    from ninocast.cli import main

    out = tmp_path / "b"
    assert main(["bench", "speedup", "--task", "digits", "--nowcasters", "linefit", "--verify", "both",
                 "--seeds", "1000", "--max-steps", "300", "--period", "100", "--no-progress",
                 "--out", str(out)]) == 0
    runs = {r["method"]: r for r in map(json.loads, (out / "runs.jsonl").read_text().splitlines())}
    assert set(runs) == {"adamw", "linefit", "linefit+v"}
    v = runs["linefit+v"]
    assert v["verify"] and [d["step"] for d in v["decisions"]][:2] == [99, 199]
    assert all(d["probe_after"] <= d["probe_before"] for d in v["decisions"] if d["accepted"])
    assert v["probe_passes"] >= 4 and set(v["rejected_steps"]) <= {100, 200, 300}
    assert not runs["linefit"]["verify"] and runs["linefit"]["decisions"][0]["probe_before"] is None
    md = (out / "results.md").read_text()
    assert "| linefit+v |" in md and "Nowcast decisions" in md
    assert (out / "plots" / "digits.png").stat().st_size > 0


# ---------------------------------------------------------------------------- framework callbacks
def hf_args(tmp_path: Path):
    """A two-period Hugging Face run on the CPU, nothing logged or saved."""
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(tmp_path), max_steps=2 * PERIOD, per_device_train_batch_size=4,
                             per_device_eval_batch_size=8, learning_rate=1e-2, report_to="none",
                             logging_strategy="no", save_strategy="no", use_cpu=True, disable_tqdm=True)


def test_hugging_face_callback_probes_the_first_eval_batch(tmp_path):
    args = hf_args(tmp_path)
    from transformers import Trainer

    from ninocast.integrations.hf import NowcastCallback
    from test_integrations import Tokens, tiny_gpt2

    trainer = Trainer(model=tiny_gpt2(0), args=args, train_dataset=Tokens(), eval_dataset=Tokens())
    cb = NowcastCallback(probe="eval_batch", local=True, nowcaster="linefit", period=PERIOD, ctx=CTX).attach(trainer)
    trainer.train()
    opt = cb.optimizer
    assert opt.verify is not None and opt.verify.kind == "batch"
    first = next(iter(trainer.get_eval_dataloader()))
    assert torch.equal(opt.verify.batch["input_ids"], first["input_ids"])
    d = opt.nowcasts[0]
    assert d["step"] == PERIOD - 1 and d["probe"] == "batch" and math.isfinite(d["probe_before"])
    assert not d["accepted"] or d["probe_after"] <= d["probe_before"]
    assert opt.nowcasts[-1].get("skipped") == "final" and not opt.failures

    bare = Trainer(model=tiny_gpt2(0), args=args, train_dataset=Tokens())  # no eval_dataset: a clear error
    NowcastCallback(probe="eval_batch", local=True, nowcaster="linefit", period=PERIOD, ctx=CTX).attach(bare)
    with pytest.raises(ValueError, match="eval_dataset"):
        bare.train()


@pytest.mark.filterwarnings("ignore:.*LeafSpec")
@pytest.mark.parametrize("probe", ["eval_batch", "closure"])
def test_lightning_callback_verifies_with_the_val_batch_or_the_closure(tmp_path, probe):
    from ninocast.integrations.lightning import NowcastCallback, pl  # pl: the Lightning package it subclasses

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_model()

        def training_step(self, b, i):
            return loss_fn(self.net, (b[0][0], b[1][0]))

        def validation_step(self, b, i):
            return None

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=3e-2)

    data = [batch(s) for s in range(STEPS)]
    cb = NowcastCallback(probe=probe, local=True, nowcaster="linefit", period=PERIOD, ctx=CTX, max_train_steps=STEPS)
    trainer = pl.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[cb],
                         num_sanity_val_steps=0, limit_val_batches=1, check_val_every_n_epoch=10**6)
    loader = torch.utils.data.DataLoader(data, batch_size=1, shuffle=False)
    trainer.fit(Module(), loader, val_dataloaders=torch.utils.data.DataLoader([PROBE], batch_size=1))
    opt = cb.optimizer
    assert opt.verify is not None and opt.verify.kind == ("batch" if probe == "eval_batch" else "closure")
    verified = [d for d in opt.nowcasts if "probe_before" in d]
    assert [d["step"] for d in verified] == [19, 39] and not opt.failures
    for d in verified:
        assert not d["accepted"] or d["probe_after"] <= d["probe_before"]
    if probe == "eval_batch":
        assert torch.equal(opt.verify.batch[0][0], PROBE[0])  # the val dataloader's first batch

"""NowcastOptimizer in local mode: the wrapper protocol on real training steps, resume, failure policy."""

import copy

import pytest
import torch
from torch import nn

from ninocast import ModelSpec, NowcastOptimizer, k_schedule
from ninocast.flat import flatten
from ninocast_server.engine import nowcast
from ninocast_server.engine.nowcasters.linefit import Linefit

PERIOD, CTX, STEPS = 50, 5, 150  # snapshots every 10 calls, nowcasts at calls 49, 99, 149 (0-based)


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))


def batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(32, 8, generator=g)
    return x, (x[:, :3] * 2 - x[:, 3:6]).sin()


def train_step(model, opt, step):
    if opt.need_grads:
        opt.zero_grad()
        x, y = batch(step)
        nn.functional.mse_loss(model(x), y).backward()
    opt.step()


class CountingAdamW(torch.optim.AdamW):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.calls = []

    def step(self, closure=None):
        self.calls.append(len(self.calls))
        return super().step(closure)


def wrap(model, **kw):
    base = CountingAdamW(model.parameters(), lr=1e-2)
    args = dict(local=True, nowcaster="linefit", period=PERIOD, ctx=CTX, max_train_steps=STEPS,
                final_nowcast="keep") | kw  # the spec protocol, its last nowcast included
    return NowcastOptimizer(base, model, **args)


def test_protocol_snapshots_nowcasts_and_k():
    model = make_model()
    opt = wrap(model)
    spec = ModelSpec.from_module(model)
    no_grad_steps, after = [], {}
    for s in range(STEPS):
        if not opt.need_grads:
            no_grad_steps.append(s)
        window = None
        if (s + 1) % 10 == 0 and len(opt.snapshots) == CTX - 1:
            window = [snap for _, snap in opt.snapshots] + [{n: p.detach().clone() for n, p in model.named_parameters()}]
        train_step(model, opt, s)
        if window is not None:
            after[s] = (window, flatten(dict(model.named_parameters()), spec).clone())
    assert no_grad_steps == [49, 99, 149]
    assert [n["step"] for n in opt.nowcasts] == [49, 99, 149]
    assert [n["k"] for n in opt.nowcasts] == k_schedule(STEPS, PERIOD) == [40, 13, 1]
    assert [n["snapshot_steps"] for n in opt.nowcasts][0] == [9, 19, 29, 39, 49]
    assert len(opt.optimizer.calls) == STEPS - 3  # base optimizer not stepped on nowcast calls
    assert not opt.failures
    for (s, (window, got)), k in zip(sorted(after.items()), [40, 13, 1]):
        states = torch.stack([flatten(w, spec) for w in window], dim=1)
        torch.testing.assert_close(got, nowcast(Linefit(), spec, states, k), rtol=0, atol=0)


def test_resume_after_one_and_a_half_periods_matches_uninterrupted():
    model = make_model()
    opt = wrap(model)
    for s in range(STEPS):
        train_step(model, opt, s)
    reference = copy.deepcopy(model.state_dict())

    model = make_model()
    opt = wrap(model)
    for s in range(75):
        train_step(model, opt, s)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    assert len(saved_opt["ninocast"]["snapshots"]) == 2  # calls 59 and 69 of the second window

    model = make_model(seed=123)  # fresh objects, different init: everything must come from the checkpoint
    opt = wrap(model)
    model.load_state_dict(saved_model)
    opt.load_state_dict(saved_opt)
    for s in range(75, STEPS):
        train_step(model, opt, s)
    assert [n["step"] for n in opt.nowcasts] == [99, 149]
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, reference[name], rtol=0, atol=0)


class Exploding(Linefit):
    def predict(self, states, k, spec, graph=None):
        raise RuntimeError("engine exploded")


def test_failed_nowcast_is_a_skipped_step_and_is_counted():
    model = make_model()
    opt = wrap(model)
    opt.backend.model = Exploding()
    with pytest.warns(RuntimeWarning, match="training continues"):
        for s in range(STEPS):
            train_step(model, opt, s)
    assert opt.failures["error"] == 3
    assert not opt.nowcasts
    assert len(opt.optimizer.calls) == STEPS - 3  # the three failed nowcast calls did not step

    model = make_model()
    opt = wrap(model, on_error="raise")
    opt.backend.model = Exploding()
    with pytest.raises(RuntimeError, match="engine exploded"):
        for s in range(STEPS):
            train_step(model, opt, s)


def test_bf16_model_and_tied_parameters():
    torch.manual_seed(0)
    emb = nn.Embedding(12, 6)
    model = nn.ModuleDict({"emb": emb, "out": nn.Linear(6, 12, bias=False)})
    model.out.weight = emb.weight  # tied: appears once in the spec
    model = model.to(torch.bfloat16)
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = NowcastOptimizer(base, model, local=True, nowcaster="linefit", period=10, ctx=5, max_train_steps=10,
                           final_nowcast="keep")
    assert opt.spec.names == ["emb.weight"]
    for s in range(10):
        if opt.need_grads:
            opt.zero_grad()
            ids = torch.arange(12)
            model.out(model.emb(ids)).float().logsumexp(-1).mean().backward()
        opt.step()
    assert len(opt.nowcasts) == 1 and not opt.failures
    assert model.emb.weight.dtype == torch.bfloat16 and model.emb.weight.requires_grad
    assert model.out.weight is model.emb.weight


def test_wrapper_surface_and_bad_arguments():
    model = make_model()
    opt = wrap(model)
    assert opt.param_groups is opt.optimizer.param_groups
    with pytest.raises(ValueError, match="multiple of ctx"):
        wrap(model, period=12)
    with pytest.raises(ValueError, match="server=URL"):
        NowcastOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    with pytest.raises(ValueError, match="on_error"):
        wrap(model, on_error="ignore")
    other = ModelSpec("generic", (("nope.weight", (3, 3)),))
    with pytest.raises(ValueError, match="not found in the model"):
        wrap(model, spec=other)

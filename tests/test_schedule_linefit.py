"""k schedule against the spec's table; linefit exact on lines; per-tensor scaling."""

import pytest
import torch

from ninocast.schedule import k_at_step, k_schedule
from ninocast.spec import ModelSpec
from ninocast_server.engine import NowcastError, nowcast
from ninocast_server.engine.nowcasters.linefit import Linefit
from ninocast_server.engine.nowcasters.scaling import scale_states, unscale_vector

SPEC_TABLE = {  # NINO_SPEC §5.2, T = 40, p = 2
    1: [40], 2: [40, 1], 3: [40, 13, 1], 4: [40, 21, 8, 1], 5: [40, 25, 13, 5, 1],
    6: [40, 28, 18, 10, 4, 1], 10: [40, 33, 26, 21, 16, 11, 8, 5, 3, 1],
    15: [40, 35, 31, 27, 23, 20, 16, 13, 11, 8, 6, 5, 3, 2, 1],
    20: [40, 37, 33, 30, 27, 24, 22, 19, 17, 14, 12, 11, 9, 7, 6, 4, 3, 2, 2, 1],
}


@pytest.mark.parametrize("n", sorted(SPEC_TABLE))
def test_k_schedule_matches_spec(n):
    assert k_schedule(n * 1000, 1000) == SPEC_TABLE[n]
    assert k_schedule(n * 1000 + 999, 1000) == SPEC_TABLE[n]  # partial periods do not count


def test_k_schedule_linear_and_steps():
    assert k_schedule(10_000, 1000, p=1) == [40, 36, 31, 27, 23, 18, 14, 10, 5, 1]
    assert k_schedule(500, 1000) == [40]
    assert [k_at_step(s, 10_000, 1000) for s in (999, 1999, 9999, 20_000)] == [40, 33, 1, 1]
    with pytest.raises(ValueError):
        k_schedule(1000, 0)


SPEC = ModelSpec("generic", (("a.weight", (3, 4)), ("a.bias", (3,)), ("b.weight", (2, 3))))


def test_linefit_exact_on_lines():
    P = SPEC.n_params
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(P, generator=g), torch.randn(P, generator=g)
    x = torch.arange(5, dtype=torch.float32)
    states = a[:, None] + b[:, None] * x
    for k in (1, 7, 40):
        pred = nowcast(Linefit(), SPEC, states, k)
        torch.testing.assert_close(pred, a + b * (4 + k), rtol=1e-5, atol=1e-5)


def test_linefit_least_squares_on_noise():
    states = torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.0]]).repeat(SPEC.n_params, 1)
    pred = nowcast(Linefit(), SPEC, states, 3)
    torch.testing.assert_close(pred, torch.full((SPEC.n_params,), 0.4), rtol=0, atol=1e-6)  # flat fit


def test_nowcast_request_errors():
    states = torch.zeros(SPEC.n_params, 5)
    with pytest.raises(NowcastError, match="k must be"):
        nowcast(Linefit(), SPEC, states, 0)
    with pytest.raises(NowcastError, match="k must be"):
        nowcast(Linefit(), SPEC, states, 41)
    with pytest.raises(NowcastError, match="needs 5 states"):
        nowcast(Linefit(), SPEC, states[:, :4], 1)
    with pytest.raises(NowcastError, match="shape"):
        nowcast(Linefit(), SPEC, states[:-1], 1)
    bad = states.clone()
    bad[3, 2] = float("inf")
    with pytest.raises(NowcastError, match="NaN or Inf"):
        nowcast(Linefit(), SPEC, bad, 1)


def test_scaling_per_tensor():
    g = torch.Generator().manual_seed(1)
    states = torch.randn(SPEC.n_params, 5, generator=g) * 3 + 1
    scaled, mu, sigma = scale_states(states, SPEC)
    for i, p in enumerate(SPEC.layout):
        block = scaled[p.start:p.stop]
        assert abs(float(block.mean())) < 1e-5
        assert float(block.std()) == pytest.approx(1.0, abs=1e-5)
        assert float(mu[i]) == pytest.approx(float(states[p.start:p.stop].mean()), abs=1e-5)
    back = unscale_vector(scaled[:, -1].clone(), SPEC, mu, sigma)
    torch.testing.assert_close(back, states[:, -1], rtol=1e-4, atol=1e-4)  # 1e-6 asymmetry only

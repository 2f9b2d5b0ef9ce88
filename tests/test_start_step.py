"""The start step: no nowcast in a run's first N optimizer calls, given to the optimizer or advised by the
nowcaster (its config's ``start_step``; a server says it when the session is created). Why: nowcasts in the early
loss plateau of small byte-level language models delay its end (docs/metatrain.md, *Round 8*)."""

from __future__ import annotations

import json
import shutil
import warnings

import httpx
import pytest
import torch

from ninocast import ModelSpec, NowcastOptimizer
from ninocast_server.engine.nowcasters.checkpoint import BUNDLED_DIR, CheckpointError, load_nowcaster
from server_utils import Server, small_model

VISION = BUNDLED_DIR / "ninocast-nino" / "vision"


def advising_copy(tmp_path, start_step: object, name: str = "adv"):
    """The bundled vision member under ``name``, its config advising ``start_step``."""
    out = tmp_path / "models" / name
    shutil.copytree(VISION, out)
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "name": name, "start_step": start_step}))
    return out


def train(opt, model: torch.nn.Module, calls: int, seed: int = 0) -> list[bool]:
    """``calls`` optimizer calls on a fixed regression batch sequence, honouring ``need_grads``; returns it per
    call."""
    g = torch.Generator().manual_seed(seed)
    asked = []
    for _ in range(calls):
        x = torch.randn(16, 8, generator=g)
        need = getattr(opt, "need_grads", True)
        asked.append(need)
        if need:
            opt.zero_grad()
            ((model(x) - x[:, :4]) ** 2).mean().backward()
        opt.step()
    return asked


def test_no_snapshot_and_no_nowcast_before_the_start_step_so_the_run_is_plain_adamw_until_then():
    model, twin = small_model(0), small_model(0)
    opt = NowcastOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, nowcaster="linefit", period=10,
                           ctx=5, max_train_steps=100, start_step=25)
    plain = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    train(opt, model, 29)
    train(plain, twin, 29)
    assert opt.nowcasts == [] and len(opt.snapshots) == 4  # the window ending at call 29 (its 5th at call 29)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    train(opt, model, 21, seed=1)
    assert [n["step"] for n in opt.nowcasts] == [29, 39, 49]  # the first one due after call 25, then every period
    assert opt.start_step == 25


def test_a_local_nowcaster_advises_its_start_step_and_an_explicit_one_wins(tmp_path):
    adv = advising_copy(tmp_path, 30)
    assert load_nowcaster(str(adv)).describe()["start_step"] == 30
    model = small_model(0)
    opt = NowcastOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, nowcaster=str(adv), period=10,
                           max_train_steps=100)
    assert opt.start_step == 30  # known at once: no extra backward pass at the first window
    asked = train(opt, model, 50)
    assert [n["step"] for n in opt.nowcasts] == [39, 49]
    assert [i for i, need in enumerate(asked) if not need] == [39, 49]  # gradients skipped on the nowcast calls only
    assert opt.state_dict()["ninocast"]["start_step"] == 30
    model = small_model(0)
    mine = NowcastOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, nowcaster=str(adv), period=10,
                            max_train_steps=100, start_step=0)
    train(mine, model, 20)
    assert [n["step"] for n in mine.nowcasts] == [9, 19]


@pytest.mark.parametrize("bad", [-1, 2.5, True, "400"])
def test_a_bad_advice_is_a_checkpoint_error_naming_the_config(tmp_path, bad):
    adv = advising_copy(tmp_path, bad)
    with pytest.raises(CheckpointError, match=r"config\.json: start_step must be a non-negative integer"):
        load_nowcaster(str(adv))


@pytest.mark.parametrize("bad", [-5, 1.5, True])
def test_a_bad_start_step_argument_is_refused(bad):
    model = small_model(0)
    with pytest.raises(ValueError, match="start_step"):
        NowcastOptimizer(torch.optim.AdamW(model.parameters()), model, nowcaster="linefit", period=10,
                         start_step=bad)


def test_the_server_advises_at_create_and_the_remote_client_follows(tmp_path):
    advising_copy(tmp_path, 30)
    srv = Server(tmp_path / "data", models_dir=tmp_path / "models").start()
    try:
        spec = ModelSpec.from_module(small_model(0)).to_json()
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            assert c.post("/v1/sessions", json={"spec": spec, "nowcaster": "adv"}).json()["start_step"] == 30
            assert c.post("/v1/sessions", json={"spec": spec}).json()["start_step"] == 0  # linefit advises none
            listed = {n["name"]: n for n in c.get("/v1/nowcasters").json()["nowcasters"]}
            assert listed["adv"]["start_step"] == 30 and listed["linefit"]["start_step"] == 0
            routed = listed["ninocast-nino"]  # the bundled default: each member its own advice
            assert routed["start_step"] is None
            assert [m["start_step"] for m in routed["routes"]["gpt2"]] == [0, 400]
        model, twin = small_model(0), small_model(0)
        opt = NowcastOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, server=srv.url,
                               nowcaster="adv", period=10, max_train_steps=100, timeout=30, retries=0)
        assert opt.start_step is None  # not known before the session exists
        asked = train(opt, model, 39)  # the first full window (call 9) asks the server: it says 30
        # a loaded machine may drop a queued upload (by design: the nowcast re-sends what is missing); nothing else
        harmless = {"upload_dropped"}
        assert opt.start_step == 30 and opt.nowcasts == [] and set(opt.failures) <= harmless and all(asked)
        train(torch.optim.AdamW(twin.parameters(), lr=1e-2), twin, 39)
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
        asked = train(opt, model, 11, seed=1)
        assert [n["step"] for n in opt.nowcasts] == [39, 49] and set(opt.failures) <= harmless
        assert [39 + i for i, need in enumerate(asked) if not need] == [39, 49]
        resumed = NowcastOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, server=srv.url,
                                   nowcaster="adv", period=10, max_train_steps=100, timeout=30, retries=0)
        resumed.load_state_dict(opt.state_dict())  # into the same session: its create answer is not repeated
        assert resumed.start_step == resumed.backend.start_step == 30
        resumed.close()
        opt.close()
    finally:
        srv.stop()


@pytest.mark.parametrize("budget, final, warned", [(450, "skip", True), (500, "skip", True), (500, "keep", False),
                                                   (600, "skip", False)])
def test_a_budget_that_leaves_no_nowcast_after_the_start_step_is_warned(budget, final, warned):
    """start 400 at period 100: the first nowcast would be call 500; the budget's last one is skipped by default."""
    model = small_model(0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        NowcastOptimizer(torch.optim.AdamW(model.parameters()), model, nowcaster="linefit", period=100,
                         max_train_steps=budget, start_step=400, final_nowcast=final)
    lines = [str(w.message) for w in record if "no nowcast in this run" in str(w.message)]
    assert len(lines) == warned, lines
    assert all("start_step=400 (given) the first would be at call 500" in line for line in lines)


def test_a_budget_too_short_for_any_nowcast_is_not_blamed_on_the_start_step():
    model = small_model(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        NowcastOptimizer(torch.optim.AdamW(model.parameters()), model, nowcaster="linefit", period=100,
                         max_train_steps=100, start_step=0)  # only the skipped last call: none, start or not
        NowcastOptimizer(torch.optim.AdamW(model.parameters()), model, nowcaster="linefit", period=100,
                         max_train_steps=100, start_step=50)

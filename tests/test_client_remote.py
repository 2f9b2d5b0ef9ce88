"""NowcastOptimizer and NowcastClient against a real ``ninocast serve`` process (linefit).

A tiny MLP trains for 3 periods (period 20, ctx 5: snapshots every 4 calls, nowcasts at calls 19, 39, 59 with
k = 40, 13, 1); every check compares against something computed independently: the offline ``ninocast step``
CLI, the engine in-process, an uninterrupted run.
"""

from __future__ import annotations

import io
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ninocast import (AuthError, ModelSpec, NotFound, NowcastClient, NowcastOptimizer, RequestRejected,
                      ServerBusy, ServerUnavailable, k_schedule)
from nowcast_checks import assert_same, engine_nowcast, params
from server_utils import Server, cli_cmd, free_port, server_env

PERIOD, CTX, STEPS = 20, 5, 60
Q = PERIOD // CTX
NOWCAST_CALLS = [19, 39, 59]
KS = k_schedule(STEPS, PERIOD)


# ---------------------------------------------------------------------------- a tiny model and its training
def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)


def batch(step: int, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(32, 8, generator=g)
    return x.to(dtype), (x[:, :3] * 2 - x[:, 3:6]).sin().to(dtype)


class CountingAdamW(torch.optim.AdamW):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.calls = 0

    def step(self, closure=None):
        self.calls += 1
        return super().step(closure)


def wrap(model: nn.Module, base: torch.optim.Optimizer | None = None, **kw) -> NowcastOptimizer:
    base = base or CountingAdamW(model.parameters(), lr=1e-2)
    args = dict(period=PERIOD, ctx=CTX, max_train_steps=STEPS, timeout=20, retries=0,
                final_nowcast="keep") | kw  # the spec protocol, its last nowcast included
    return NowcastOptimizer(base, model, **args)


def train(model, opt, start: int, stop: int, before=None, dtype=torch.float32) -> dict:
    """Run calls start..stop-1; record which calls needed grads, stepped the base optimizer, and for each
    nowcast call the window (5 snapshots, the last taken in that call) and the parameters right after."""
    rec = {"no_grads": [], "base": [], "windows": {}}
    for s in range(start, stop):
        if before is not None:
            before(s)
        window = None
        if not opt.need_grads:
            rec["no_grads"].append(s)
            window = [snap for _, snap in opt.snapshots] + [params(model)]
        else:
            opt.zero_grad()
            x, y = batch(s, dtype)
            nn.functional.mse_loss(model(x), y).backward()
        calls = opt.optimizer.calls if hasattr(opt.optimizer, "calls") else None
        opt.step()
        if calls is not None and opt.optimizer.calls > calls:
            rec["base"].append(s)
        if window is not None:
            rec["windows"][s] = (window, params(model))
    return rec






# ---------------------------------------------------------------------------- servers
@pytest.fixture(scope="module")
def api_key(tmp_path_factory) -> tuple[Path, str]:
    from ninocast_server.api.auth import add_key

    path = tmp_path_factory.mktemp("client-keys") / "keys.json"
    return path, add_key(path, "carol")


@pytest.fixture(scope="module")
def srv(tmp_path_factory, api_key):
    server = Server(tmp_path_factory.mktemp("client-server") / "data", keys_file=api_key[0]).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def uninterrupted(srv, api_key):
    """The reference: 3 periods through the server, nobody interrupting."""
    model = make_model()
    opt = wrap(model, server=srv.url, api_key=api_key[1], session_name="uninterrupted", record=True)
    rec = train(model, opt, 0, STEPS)
    opt.close()  # record=True: the session stays
    return {"model": model, "opt": opt, "rec": rec, "final": params(model)}


# ---------------------------------------------------------------------------- the protocol through a server
def test_protocol_through_the_server_matches_offline_cli(uninterrupted, srv, api_key, tmp_path):
    opt, rec = uninterrupted["opt"], uninterrupted["rec"]
    assert rec["no_grads"] == NOWCAST_CALLS
    assert [n["step"] for n in opt.nowcasts] == NOWCAST_CALLS
    assert [n["k"] for n in opt.nowcasts] == KS == [40, 13, 1]
    assert [n["snapshot_steps"] for n in opt.nowcasts] == [[w + Q * i - 1 for i in range(1, CTX + 1)]
                                                           for w in (0, 20, 40)]
    assert rec["base"] == [s for s in range(STEPS) if s not in NOWCAST_CALLS]  # no base step on nowcast calls
    assert opt.optimizer.calls == STEPS - len(NOWCAST_CALLS)
    assert not opt.failures

    with NowcastClient(srv.url, api_key=api_key[1]) as c:
        view = c.get_session(opt.backend.session_id)
    assert view["nowcasts_done"] == 3 and view["name"] == "uninterrupted"
    assert view["states"]["steps"] == list(range(Q - 1, STEPS, Q))  # record=True keeps every state
    assert [n["k"] for n in view["nowcasts"]] == KS
    assert [n["steps"] for n in view["nowcasts"]] == [n["snapshot_steps"] for n in opt.nowcasts]

    # the weights after each nowcast == `ninocast step` run offline on the same 5 snapshots
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(__import__("json").dumps(opt.spec.to_json()))
    procs = {}
    for s, k in zip(NOWCAST_CALLS, KS):
        window, _ = rec["windows"][s]
        files = []
        for i, snap in enumerate(window):
            files.append(str(tmp_path / f"call{s}_{i}.safetensors"))
            save_file({n: t.contiguous() for n, t in snap.items()}, files[-1])
        out = tmp_path / f"nowcast{s}.safetensors"
        procs[s] = (out, subprocess.Popen(cli_cmd("step", "--nowcaster", "linefit", "--spec", str(spec_path),
                                                  "--k", str(k), *files, "--out", str(out)),
                                          env=server_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    for s, (out, proc) in procs.items():
        log = proc.communicate(timeout=120)[0].decode()
        assert proc.returncode == 0, log
        assert_same(rec["windows"][s][1], load_file(out))


def test_local_mode_gives_the_same_weights_as_server_mode(uninterrupted):
    model = make_model()
    opt = wrap(model, local=True, nowcaster="linefit")
    rec = train(model, opt, 0, STEPS)
    assert [n["step"] for n in opt.nowcasts] == NOWCAST_CALLS and not opt.failures
    for s in NOWCAST_CALLS:
        assert_same(rec["windows"][s][1], uninterrupted["rec"]["windows"][s][1])
    assert_same(params(model), uninterrupted["final"])


def test_resume_after_one_and_a_half_periods_matches_uninterrupted(uninterrupted, srv, api_key):
    model = make_model()
    opt = wrap(model, server=srv.url, api_key=api_key[1])
    train(model, opt, 0, 30)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    session = opt.backend.session_id
    assert opt.flush()
    del model, opt  # the run crashed: nobody closed it, its session is still there

    saved = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    assert saved["opt"]["ninocast"]["step_count"] == 30
    assert [s for s, _ in saved["opt"]["ninocast"]["snapshots"]] == [23, 27]
    model = make_model(seed=123)  # fresh objects, another init: everything must come from the checkpoint
    opt = wrap(model, server=srv.url, api_key=api_key[1])
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    rec = train(model, opt, 30, STEPS)
    opt.close()
    assert opt.backend.session_id == session  # the run continued its server session
    assert [n["step"] for n in opt.nowcasts] == [39, 59] and not opt.failures
    assert [n["snapshot_steps"] for n in opt.nowcasts][0] == [23, 27, 31, 35, 39]
    for s in (39, 59):
        assert_same(rec["windows"][s][1], uninterrupted["rec"]["windows"][s][1])
    assert_same(params(model), uninterrupted["final"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_in_server_mode(srv, api_key, dtype):
    results = {}
    for mode in ("server", "local"):
        model = make_model(dtype=dtype)
        base = torch.optim.SGD(model.parameters(), lr=0.05)
        kw = dict(server=srv.url, api_key=api_key[1]) if mode == "server" else dict(local=True, nowcaster="linefit")
        opt = wrap(model, base=base, max_train_steps=40, **kw)
        train(model, opt, 0, 40, dtype=dtype)
        assert [n["step"] for n in opt.nowcasts] == [19, 39] and not opt.failures, opt.failures
        assert all(p.dtype == dtype and p.requires_grad for p in model.parameters())
        results[mode] = params(model)
        if mode == "server":  # snapshots travelled in their own dtype: 2 bytes per parameter
            with NowcastClient(srv.url, api_key=api_key[1]) as c:
                view = c.get_session(opt.backend.session_id)
            n = opt.spec.n_params
            assert 5 * n * 2 <= view["states"]["bytes"] < 5 * (n * 2 + 1000)
        opt.close()
    assert_same(results["server"], results["local"])


# ---------------------------------------------------------------------------- failures
def test_server_killed_mid_run_then_restarted(tmp_path):
    data, port = tmp_path / "data", free_port()
    server = Server(data, port=port).start()
    model = make_model()
    opt = wrap(model, server=server.url)
    session = {}

    def chaos(s):
        nonlocal server
        if s == 25:  # window 2 has its first snapshot (call 23) on the server
            session["id"] = opt.backend.session_id
            server.kill()
        if s == 45:  # window 3's first snapshot (call 43) failed to upload: restart, same data dir and port
            server = Server(data, port=port).start()

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rec = train(model, opt, 0, STEPS, before=chaos)
        opt.close()
    finally:
        server.stop()
    assert [n["step"] for n in opt.nowcasts] == [19, 59]  # the nowcast at 39 failed, the next one worked
    assert opt.failures["unavailable"] == 1
    # calls 27, 31, 35, 39 and 43; on a loaded machine call 23's upload can still be in flight at the kill
    assert opt.failures["upload_unavailable"] in (5, 6)
    assert sorted(opt.failures) == ["unavailable", "upload_unavailable"]
    assert rec["base"] == [s for s in range(STEPS) if s not in NOWCAST_CALLS]  # 39 failed: a skipped step
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len([m for m in msgs if "ninocast: unavailable" in m]) == 1
    assert opt.backend.session_id == session["id"]  # the restarted server still had the session
    # the third window was nowcast from exactly its own snapshots (43 was re-sent), as the engine does it
    window, after = rec["windows"][59]
    assert opt.nowcasts[-1]["snapshot_steps"] == [43, 47, 51, 55, 59]
    assert_same(after, engine_nowcast(opt.spec, window, KS[2]))


UPLOAD_WARNINGS = "ignore:ninocast. upload_:RuntimeWarning"  # the uploader thread's (expected) warnings


@pytest.mark.filterwarnings(UPLOAD_WARNINGS)
def test_wrong_api_key_is_counted_not_a_crash(srv):
    model = make_model()
    opt = wrap(model, server=srv.url, api_key="not-a-key")
    with pytest.warns(RuntimeWarning, match="training continues"):
        rec = train(model, opt, 0, 2 * PERIOD)
    opt.close()
    assert opt.failures == {"auth": 2, "upload_auth": 10}
    assert rec["base"] == [s for s in range(2 * PERIOD) if s not in (19, 39)] and not opt.nowcasts

    model = make_model()
    opt = wrap(model, server=srv.url, api_key="not-a-key", on_error="raise")
    with pytest.raises(AuthError, match="401"):
        train(model, opt, 0, PERIOD)
    opt.close()


@pytest.mark.filterwarnings(UPLOAD_WARNINGS)
def test_server_down_with_on_error_raise():
    model = make_model()
    opt = wrap(model, server=f"http://127.0.0.1:{free_port()}", on_error="raise")
    with pytest.raises(ServerUnavailable):
        train(model, opt, 0, PERIOD)
    assert opt.failures["unavailable"] == 1
    opt.close()


def test_resuming_an_older_checkpoint_into_a_session_that_went_further(uninterrupted, srv, api_key):
    """A run crashed at call 30 and is resumed from its checkpoint at call 12 into the same session: the server
    holds states 11..27 of the crashed run. The nowcast at 19 must use exactly the resumed run's window."""
    model = make_model()
    opt = wrap(model, server=srv.url, api_key=api_key[1])
    train(model, opt, 0, 12)
    checkpoint = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, checkpoint)
    train(model, opt, 12, 30)
    assert opt.flush()  # then it crashed (never closed): its session holds states 11..27
    crashed = opt.backend.session_id

    for perturb in (0.0, 0.01):  # same trajectory (steps mismatch) / another one (409 step_conflict on upload)
        saved = torch.load(io.BytesIO(checkpoint.getvalue()), weights_only=True)
        model = make_model(seed=7)
        opt2 = wrap(model, server=srv.url, api_key=api_key[1])
        model.load_state_dict(saved["model"])
        opt2.load_state_dict(saved["opt"])
        assert opt2.backend.session_id == crashed
        with torch.no_grad():
            for p in model.parameters():
                p.add_(perturb)
        rec = train(model, opt2, 12, 20)
        opt2.close()
        assert [n["step"] for n in opt2.nowcasts] == [19] and not opt2.failures, opt2.failures
        assert opt2.nowcasts[0]["snapshot_steps"] == [3, 7, 11, 15, 19]
        assert opt2.backend.session_id != crashed  # a fresh session got the whole window
        window, after = rec["windows"][19]
        assert_same(after, engine_nowcast(opt2.spec, window, KS[0]))
        if perturb == 0.0:
            assert_same(after, uninterrupted["rec"]["windows"][19][1])


# ---------------------------------------------------------------------------- NowcastClient
def test_client_typed_errors_carry_the_servers_detail(srv, api_key):
    spec = ModelSpec.from_module(make_model())
    with NowcastClient(srv.url, api_key=api_key[1], retries=0) as c:
        cat = c.nowcasters()
        assert set(cat) >= {"default", "devices", "nowcasters"}
        assert "linefit" in [n["name"] for n in cat["nowcasters"]]
        s = c.create_session(spec, nowcaster="linefit", period=PERIOD, max_train_steps=STEPS, name="typed")
        assert s["id"] in [x["id"] for x in c.list_sessions()]

        with pytest.raises(RequestRejected) as e:
            c.nowcast(s["id"], k=3)
        assert (e.value.status, e.value.error) == (409, "too_few_states") and "upload" in e.value.detail
        assert e.value.detail in str(e.value) and e.value.kind == "rejected"

        bad = {n: torch.zeros(3) for n in spec.names}
        with pytest.raises(RequestRejected) as e:
            c.put_state(s["id"], 3, bad)
        assert 400 <= e.value.status < 500 and spec.names[0] in e.value.detail

        with pytest.raises(RequestRejected) as e:
            c.create_session(spec, nowcaster="no-such-nowcaster")
        assert e.value.error == "unknown_nowcaster" and "no-such-nowcaster" in e.value.detail

        c.delete_session(s["id"])
        with pytest.raises(NotFound) as e:
            c.get_session(s["id"])
        assert (e.value.status, e.value.error, e.value.kind) == (404, "session_not_found", "not_found")
        assert s["id"] in e.value.detail

    with NowcastClient(srv.url, api_key="wrong", retries=0) as c:
        with pytest.raises(AuthError) as e:
            c.list_sessions()
        assert e.value.status == 401 and e.value.detail and e.value.kind == "auth"

    with NowcastClient(f"http://127.0.0.1:{free_port()}", retries=1, backoff=0.01) as c:
        with pytest.raises(ServerUnavailable) as e:
            c.health()
        assert e.value.status is None and "ConnectError" in str(e.value)


def test_the_optimizers_session_settings_reach_the_server(srv, api_key):
    """One SessionSettings from the optimizer's arguments; a run length set before the session exists is sent."""
    opt = wrap(make_model(), server=srv.url, api_key=api_key[1], nowcaster="linefit", session_name="opt-settings",
               record=True)
    opt.set_max_train_steps(123)
    opt.check()
    sid = opt.backend.session_id
    opt.close()  # record=True: the session is kept
    with NowcastClient(srv.url, api_key=api_key[1]) as c:
        got = c.get_session(sid)
        c.delete_session(sid)
    want = {"nowcaster": "linefit", "ctx": CTX, "period": PERIOD, "max_train_steps": 123, "name": "opt-settings",
            "record": True}
    assert {key: got[key] for key in want} == want


def test_session_settings_match_the_servers_schema():
    from dataclasses import MISSING, fields

    from ninocast import SessionSettings
    from ninocast_server.api.schemas import CreateSession

    ours = {f.name: (None if f.default is MISSING else f.default) for f in fields(SessionSettings)}
    theirs = {name: f.default for name, f in CreateSession.model_fields.items()}
    theirs["spec"] = None  # required on both sides
    assert ours == theirs


def test_session_settings_reach_the_server_and_float64_states_travel_as_float32(srv, api_key):
    from ninocast import SessionSettings

    model = make_model().double()
    spec = ModelSpec.from_module(model)
    settings = SessionSettings(spec, nowcaster="linefit", ctx=3, period=30, max_train_steps=90, name="settings",
                               record=True)
    with NowcastClient(srv.url, api_key=api_key[1], retries=0) as c:
        sid = c.create_session(settings)["id"]
        got = c.get_session(sid)
        for field in ("nowcaster", "ctx", "period", "max_train_steps", "name", "record"):
            assert got[field] == getattr(settings, field), field
        with pytest.raises(TypeError, match="ctx"):
            c.create_session(settings, ctx=4)
        for step in (10, 20, 30):  # a float64 model's state: the client sends it as float32, as the optimizer does
            c.put_state(sid, step, {n: p.detach() * step for n, p in model.named_parameters()})
        out = c.nowcast(sid, k=1, dtype="uploaded")
        assert {t.dtype for t in out.values()} == {torch.float32}
        c.delete_session(sid)


def test_busy_5xx_and_invalid_answers_fall_back_and_are_counted():
    """Scripted answers (httpx MockTransport): 503 busy, 500, a non-safetensors body, tensors of the wrong
    shape -- one per period; each is counted by kind and the call steps the base optimizer instead."""
    import httpx
    from safetensors.torch import save

    model = make_model()
    answers = iter(["busy", "busy", "error", "error", "garbage", "shape"])  # 503/500 are retried once
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.method == "POST" and path == "/v1/sessions":
            return httpx.Response(201, json={"id": "s1"})
        if request.method == "PUT":
            return httpx.Response(201, json={"stored": True})
        if request.method == "DELETE":  # close() deletes the session
            return httpx.Response(204)
        what = next(answers)
        calls.append(what)
        if what == "busy":
            return httpx.Response(503, headers={"Retry-After": "7"},
                                  json={"error": "busy", "detail": "the nowcast queue is full"})
        if what == "error":
            return httpx.Response(500, json={"error": "internal", "detail": "boom"})
        if what == "garbage":
            return httpx.Response(200, content=b"not safetensors")
        body = save({n: torch.zeros(2) for n, _ in model.named_parameters()})
        return httpx.Response(200, content=body)

    opt = wrap(model, server="http://mock", max_train_steps=4 * PERIOD)
    opt.backend.client = NowcastClient("http://mock", retries=1, backoff=0.001, max_retry_wait=0.01,
                                       transport=httpx.MockTransport(handler))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rec = train(model, opt, 0, 4 * PERIOD)
    opt.close()
    assert calls == ["busy", "busy", "error", "error", "garbage", "shape"]
    assert dict(opt.failures) == {"busy": 1, "unavailable": 1, "invalid_response": 2}
    assert rec["base"] == [s for s in range(4 * PERIOD) if (s + 1) % PERIOD] and not opt.nowcasts  # skipped
    msgs = [str(w.message) for w in caught]
    assert any("the nowcast queue is full" in m for m in msgs)  # the server's detail reaches the user
    assert sum("ninocast: invalid_response" in m for m in msgs) == 1  # once per kind

    busy = httpx.MockTransport(lambda r: httpx.Response(503, headers={"Retry-After": "7"},
                                                        json={"error": "busy", "detail": "full"}))
    with NowcastClient("http://mock", retries=0, transport=busy) as c:
        with pytest.raises(ServerBusy) as e:
            c.health()
    assert (e.value.status, e.value.error, e.value.detail, e.value.retry_after) == (503, "busy", "full", 7.0)

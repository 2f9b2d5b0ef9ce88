"""In-process checks of the server's parts: queue fairness, the safetensors encoder, the key store."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from safetensors.torch import load

from ninocast.spec import ModelSpec
from ninocast_server.sessions.errors import ServiceError
from ninocast_server.sessions.queue import ComputeQueue
from ninocast_server.sessions.safetensors_io import encode
from server_utils import OCTET, training_states
from server_utils import encode as encode_states


def test_queue_is_round_robin_across_keys():
    q = ComputeQueue(["cpu"], max_jobs=100, memory_budget=10**9)
    gate, order = threading.Event(), []
    q.submit("blocker", lambda dev: gate.wait(5), 1)  # hold the worker while the queue fills
    q.start()
    time.sleep(0.05)
    futs = [q.submit("a", lambda dev, i=i: order.append(f"a{i}"), 1) for i in range(4)]
    futs += [q.submit("b", lambda dev, i=i: order.append(f"b{i}"), 1) for i in range(2)]
    futs += [q.submit("c", lambda dev: order.append("c0"), 1)]
    gate.set()
    for f in futs:
        f.result(5)
    q.stop()
    assert order == ["a0", "b0", "c0", "a1", "b1", "a2", "a3"]


def test_queue_full_and_memory_budget_answer_503():
    q = ComputeQueue(["cpu"], max_jobs=2, memory_budget=100)
    q.submit("a", lambda dev: None, 60)
    with pytest.raises(ServiceError) as e:
        q.submit("a", lambda dev: None, 60)
    assert e.value.status == 503 and "memory budget" in e.value.detail and int(e.value.headers["Retry-After"]) >= 1
    q.submit("b", lambda dev: None, 10)
    with pytest.raises(ServiceError) as e:
        q.submit("c", lambda dev: None, 1)
    assert e.value.status == 503 and "queue is full" in e.value.detail


def test_worker_survives_a_failing_job():
    q = ComputeQueue(["cpu"], max_jobs=10, memory_budget=10**9)
    q.start()
    bad = q.submit("a", lambda dev: 1 / 0, 1)
    good = q.submit("a", lambda dev: dev, 1)
    with pytest.raises(ZeroDivisionError):
        bad.result(5)
    assert good.result(5) == "cpu" and q.alive()
    q.stop()


@pytest.mark.parametrize("dtypes", ["F32", "BF16", {"a": "F16", "b": "F32"}])
def test_encode_roundtrip(dtypes):
    spec = ModelSpec.from_json({"params": [["a", [3, 2]], ["b", [5]]]})
    flat = torch.randn(spec.n_params)
    head, data = encode(flat, spec, dtypes, {"ninocast.k": "3"})
    out = load(head + bytes(data))
    assert set(out) == {"a", "b"}
    assert out["a"].shape == (3, 2) and out["b"].shape == (5,)
    back = torch.cat([out["a"].float().reshape(-1), out["b"].float()])
    torch.testing.assert_close(back, flat, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_finite_check_and_load_states(tmp_path, dtype):
    """The upload check (numpy, in pieces) finds NaN/Inf anywhere, accepts the largest finite values, and the
    states matrix equals the files' values in float32."""
    from safetensors.torch import save_file

    from ninocast_server.sessions import safetensors_io as sio

    spec = ModelSpec.from_json({"params": [["a", [300, 7]], ["b", [5]]]})
    g = torch.Generator().manual_seed(0)
    files = []
    for j in range(3):
        t = {"a": torch.randn(300, 7, generator=g).to(dtype), "b": torch.randn(5, generator=g).to(dtype),
             "buffer": torch.zeros(3, dtype=torch.int64)}  # not in the spec: ignored
        t["b"][0] = torch.finfo(dtype).max
        files.append((tmp_path / f"{j}.safetensors", t))
        save_file(t, files[-1][0])
        sio.check_finite(files[-1][0], sio.parse_header(files[-1][0]), spec)
    states = sio.load_states([p for p, _ in files], spec)
    assert states.shape == (spec.n_params, 3) and states.is_contiguous()
    for j, (_, t) in enumerate(files):
        torch.testing.assert_close(states[:, j], torch.cat([t[n].float().reshape(-1) for n in "ab"]),
                                   rtol=0, atol=0)
    old = sio.CHECK_BYTES
    sio.CHECK_BYTES = 64  # many pieces, so a bad value in a later piece is found too
    try:
        for name, pos in (("a", 0), ("a", 1500), ("a", 2099), ("b", 4)):
            for bad in (float("nan"), float("inf"), -float("inf")):
                t = {k: v.clone() for k, v in files[0][1].items()}
                t[name].view(-1)[pos] = bad
                path = tmp_path / "bad.safetensors"
                save_file(t, path)
                with pytest.raises(ServiceError) as e:
                    sio.check_finite(path, sio.parse_header(path), spec)
                assert e.value.status == 422 and repr(name) in e.value.detail
    finally:
        sio.CHECK_BYTES = old


def test_superseded_states_are_renamed_then_removed_at_start_up(tmp_path):
    """A state pushed out of the ctx window is renamed at once (unlinked after the answer); a crash in between
    leaves a .old-* file that the next start-up deletes, never a state it would index."""
    from ninocast_server.sessions.store import SessionStore

    spec = ModelSpec.from_json({"params": [["a", [4]]]})
    store = SessionStore(tmp_path / "data", 10, 3600, 10)
    store.open()
    s = store.create("o", spec, "linefit", 2, 1000, 10000, False, None)
    garbage = []
    for step in (1, 2, 3):
        tmp = store.tmp_dir / f"u{step}"
        tmp.write_bytes(b"x" * 10)
        assert store.commit_state(s, step, tmp, 10, garbage)
    assert sorted(s.states) == [2, 3] and store.used_bytes("o") == 20
    assert [p.name for p in garbage] == [".old-1.safetensors"] and garbage[0].exists()
    again = SessionStore(tmp_path / "data", 10, 3600, 10)
    again.open()
    assert sorted(again.get("o", s.id).states) == [2, 3] and not garbage[0].exists()


def _samples(text: str) -> dict[tuple, float]:
    """{(sample name, sorted label items): value} of a Prometheus text page."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_metrics_count_requests_per_app(make_client):
    a, b = make_client(), make_client()  # two apps in one process: each counts only its own requests
    spec, states = training_states(seed=3, n=1)
    body = encode_states(states[0])
    for _ in range(3):
        assert a.get("/healthz").status_code == 200
    sid = a.post("/v1/sessions", json={"spec": spec}).json()["id"]
    assert a.put(f"/v1/sessions/{sid}/states/1", content=body, headers=OCTET).status_code == 201
    put_route = (("route", "/v1/sessions/{session_id}/states/{step}"),)
    got = _samples(a.get("/metrics").text)
    assert got[("ninocast_requests_total", (("method", "GET"), ("route", "/healthz"), ("status", "200")))] == 3
    assert got[("ninocast_requests_total", (("method", "PUT"),) + put_route + (("status", "201"),))] == 1
    assert got[("ninocast_request_bytes_total", put_route)] == len(body)
    assert got[("ninocast_response_bytes_total", put_route)] > 0
    assert got[("ninocast_sessions_active", ())] == 1 and got[("ninocast_disk_used_bytes", ())] > 0
    assert got[("ninocast_queue_depth", ())] == 0
    other = _samples(b.get("/metrics").text)
    assert not [k for k in other if k[0] == "ninocast_requests_total" and ("route", "/healthz") in k[1]]
    assert other[("ninocast_sessions_active", ())] == 0


def test_metrics_nowcast_histogram():
    from ninocast_server.api.metrics import Metrics

    m = Metrics()
    m.observe_nowcast("linefit", "cpu", 0.3)
    m.observe_nowcast("linefit", "cpu", 7.0)
    got = _samples(m.render())
    lab = (("device", "cpu"), ("nowcaster", "linefit"))
    bucket = {le: got[("ninocast_nowcast_seconds_bucket", tuple(sorted(lab + (("le", le),))))]
              for le in ("0.25", "0.5", "5.0", "10.0", "+Inf")}
    assert bucket == {"0.25": 0, "0.5": 1, "5.0": 1, "10.0": 2, "+Inf": 2}
    assert got[("ninocast_nowcast_seconds_count", lab)] == 2
    assert abs(got[("ninocast_nowcast_seconds_sum", lab)] - 7.3) < 1e-9

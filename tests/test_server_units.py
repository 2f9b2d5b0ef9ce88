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

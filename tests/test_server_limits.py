"""Per-key limits and idle expiry, in process (TestClient): sessions per key (429), disk quota (507), TTL."""

from __future__ import annotations

import time

from server_utils import OCTET, assert_error, encode, training_states


def test_sessions_per_key_and_disk_quota(make_client):
    spec, states = training_states(seed=21, n=3)
    size = len(encode(states[0]))
    c = make_client(max_sessions_per_key=2, disk_quota_per_key=2 * size + 10)
    sids = [c.post("/v1/sessions", json={"spec": spec}).json()["id"] for _ in range(2)]
    assert_error(c.post("/v1/sessions", json={"spec": spec}), 429, "too_many_sessions", "2")
    for step in (1, 2):
        assert c.put(f"/v1/sessions/{sids[0]}/states/{step}", content=encode(states[step]), headers=OCTET).status_code == 201
    assert_error(c.put(f"/v1/sessions/{sids[1]}/states/1", content=encode(states[0]), headers=OCTET), 507,
                 "disk_quota_exceeded")
    assert c.delete(f"/v1/sessions/{sids[0]}").status_code == 204  # frees both the slot and the bytes
    assert c.put(f"/v1/sessions/{sids[1]}/states/1", content=encode(states[0]), headers=OCTET).status_code == 201
    assert c.post("/v1/sessions", json={"spec": spec}).status_code == 201


def test_idle_sessions_expire(make_client):
    spec, _ = training_states(seed=22, n=1)
    c = make_client(session_ttl_s=1.0)
    sid = c.post("/v1/sessions", json={"spec": spec}).json()["id"]
    assert c.get(f"/v1/sessions/{sid}").status_code == 200
    deadline = time.monotonic() + 10
    while c.get(f"/v1/sessions/{sid}").status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.25)
    assert_error(c.get(f"/v1/sessions/{sid}"), 404, "session_not_found")

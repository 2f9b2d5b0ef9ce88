"""SIGKILL in the middle of a session, restart: every acknowledged state is there and the nowcast is the same."""

from __future__ import annotations

import time

import torch
from safetensors.torch import load

from server_utils import OCTET, Server, encode, training_states, upload_all


def test_sigkill_and_restart_resume_sessions(tmp_path, api_keys):
    data = tmp_path / "data"
    spec, states = training_states(seed=11, n=5)
    srv = Server(data, keys_file=api_keys["file"]).start()
    try:
        with srv.client(api_keys["alice"]) as c:
            sid = c.post("/v1/sessions", json={"spec": spec, "name": "survivor"}).json()["id"]
            rec = c.post("/v1/sessions", json={"spec": spec, "record": True}).json()["id"]
            upload_all(c, sid, states[:3])
            upload_all(c, rec, states)
            before = c.post(f"/v1/sessions/{rec}/nowcast", json={"k": 5})
            assert before.status_code == 200
    finally:
        srv.kill()
    # leftovers of an interrupted upload must not confuse the restart
    (data / "tmp" / "upload-partial.safetensors").write_bytes(b"\x00" * 10)

    srv = Server(data, keys_file=api_keys["file"], port=srv.port).start()
    try:
        with srv.client(api_keys["alice"]) as c:
            view = c.get(f"/v1/sessions/{sid}").json()
            assert view["name"] == "survivor" and view["states"]["steps"] == [200, 400, 600]
            again = c.post(f"/v1/sessions/{rec}/nowcast", json={"k": 5})
            assert again.status_code == 200 and again.content == before.content
            # the history entry is written just after the answer is sent: give it a moment
            deadline = time.monotonic() + 5
            while c.get(f"/v1/sessions/{rec}").json()["nowcasts_done"] < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert c.get(f"/v1/sessions/{rec}").json()["nowcasts_done"] >= 1
            # the interrupted session continues where it stopped
            assert c.put(f"/v1/sessions/{sid}/states/600", content=encode(states[2]), headers=OCTET).status_code == 200
            upload_all(c, sid, states[3:], first_step=800)
            r = c.post(f"/v1/sessions/{sid}/nowcast", json={"k": 5})
            assert r.status_code == 200
            a, b = load(r.content), load(before.content)
            for name in a:
                torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
        assert not list((data / "tmp").iterdir())
    finally:
        srv.stop()

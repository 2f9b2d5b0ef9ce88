"""The server's happy paths over real HTTP: sessions, uploads, nowcasts, isolation between keys, concurrency."""

from __future__ import annotations

import threading

import httpx
import pytest
import torch
from safetensors.torch import load

from ninocast.schedule import k_at_step
from server_utils import (OCTET, assert_error, encode, flat_states, flatten_answer, reference_nowcast,
                          training_states, upload_all)
from ninocast_server.engine.nowcasters.linefit import Linefit


@pytest.fixture()
def alice(server, api_keys):
    with server.client(api_keys["alice"]) as c:
        yield c


@pytest.fixture()
def bob(server, api_keys):
    with server.client(api_keys["bob"]) as c:
        yield c


def test_happy_path_linefit_matches_engine(alice):
    spec, states = training_states(seed=1)
    r = alice.post("/v1/sessions", json={"spec": spec, "name": "mlp", "period": 1000, "max_train_steps": 10000})
    assert r.status_code == 201, r.text
    sess = r.json()
    assert sess["nowcaster"] == "linefit" and sess["ctx"] == 5 and r.headers["location"].endswith(sess["id"])
    steps = upload_all(alice, sess["id"], states, first_step=1199)  # 0-based calls 1199..1999
    r = alice.post(f"/v1/sessions/{sess['id']}/nowcast")
    assert r.status_code == 200, r.text
    k = k_at_step(steps[-1], 10000, 1000)
    assert int(r.headers["x-ninocast-k"]) == k == 33
    assert r.headers["x-ninocast-steps"] == ",".join(map(str, steps))
    got = flatten_answer(spec, load(r.content))
    want = reference_nowcast(Linefit(), spec, flat_states(spec, states), k)
    torch.testing.assert_close(got, want, rtol=0, atol=0)

    # explicit k and dtype; the session view records the nowcasts
    r = alice.post(f"/v1/sessions/{sess['id']}/nowcast", json={"k": 3, "dtype": "bfloat16"})
    assert r.status_code == 200 and r.headers["x-ninocast-k"] == "3"
    out = load(r.content)
    assert all(t.dtype == torch.bfloat16 for t in out.values())
    want3 = reference_nowcast(Linefit(), spec, flat_states(spec, states), 3)
    torch.testing.assert_close(flatten_answer(spec, out), want3.bfloat16().float())
    view = alice.get(f"/v1/sessions/{sess['id']}").json()
    assert view["states"]["steps"] == steps and view["ready"]
    assert view["nowcasts_done"] >= 1 and view["nowcasts"][0]["k"] == 33 and "compute_s" in view["nowcasts"][0]


def test_upload_is_idempotent_and_keeps_newest_ctx(alice):
    spec, states = training_states(seed=2, n=7)
    sid = alice.post("/v1/sessions", json={"spec": spec}).json()["id"]
    upload_all(alice, sid, states)
    again = alice.put(f"/v1/sessions/{sid}/states/1400", content=encode(states[-1]), headers=OCTET)
    assert again.status_code == 200 and again.json()["stored"] is False
    other = alice.put(f"/v1/sessions/{sid}/states/1400", content=encode(states[0]), headers=OCTET)
    assert_error(other, 409, "step_conflict", "1400")
    view = alice.get(f"/v1/sessions/{sid}").json()
    assert view["states"]["steps"] == [600, 800, 1000, 1200, 1400]  # not record mode: newest ctx only


def test_record_mode_keeps_every_state_and_uploaded_dtype(alice):
    spec, states = training_states(seed=3, n=6)
    sid = alice.post("/v1/sessions", json={"spec": spec, "record": True, "ctx": 3}).json()["id"]
    half = [{k: v.half() for k, v in s.items()} for s in states]
    upload_all(alice, sid, half)
    view = alice.get(f"/v1/sessions/{sid}").json()
    assert view["states"]["count"] == 6 and view["ctx"] == 3
    r = alice.post(f"/v1/sessions/{sid}/nowcast", json={"k": 2, "dtype": "uploaded"})
    assert r.status_code == 200, r.text
    out = load(r.content)
    assert all(t.dtype == torch.float16 for t in out.values())
    want = reference_nowcast(Linefit(ctx=3), spec, flat_states(spec, half[-3:]), 2)
    torch.testing.assert_close(flatten_answer(spec, out), want.half().float())


def test_list_delete_and_catalogue(alice, server):
    spec, _ = training_states(seed=4, n=1)
    sid = alice.post("/v1/sessions", json={"spec": spec, "name": "to-delete"}).json()["id"]
    assert sid in [s["id"] for s in alice.get("/v1/sessions").json()["sessions"]]
    assert alice.delete(f"/v1/sessions/{sid}").status_code == 204
    assert_error(alice.get(f"/v1/sessions/{sid}"), 404, "session_not_found")
    assert sid not in [s["id"] for s in alice.get("/v1/sessions").json()["sessions"]]
    cat = alice.get("/v1/nowcasters").json()
    lf = next(n for n in cat["nowcasters"] if n["name"] == "linefit")
    assert lf["kind"] == "linefit" and "gpt2" in lf["families"] and "parameters" in lf
    kinds = {n["name"]: n["kind"] for n in cat["nowcasters"]}  # the bundled nowcasters are served by default
    assert kinds.get("ninocast-nino") == "routed" and kinds.get("ninocast-wnn") == "wnn"
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(server.url + "/readyz").json()["status"] == "ready"
    assert "ninocast" in httpx.get(server.url + "/openapi.json").json()["info"]["title"]
    assert httpx.get(server.url + "/docs").status_code == 200
    m = httpx.get(server.url + "/metrics").text
    for name in ("ninocast_requests_total{", "ninocast_request_bytes_total", "ninocast_queue_depth",
                 "ninocast_sessions_active", "ninocast_disk_used_bytes"):
        assert name in m, name
    assert 'route="/v1/sessions/{session_id}/states/{step}"' in m


def test_isolation_between_keys(alice, bob, server):
    spec, states = training_states(seed=5)
    sid = alice.post("/v1/sessions", json={"spec": spec}).json()["id"]
    upload_all(alice, sid, states)
    assert_error(bob.get(f"/v1/sessions/{sid}"), 404, "session_not_found")
    assert_error(bob.put(f"/v1/sessions/{sid}/states/5", content=encode(states[0]), headers=OCTET), 404)
    assert_error(bob.post(f"/v1/sessions/{sid}/nowcast"), 404)
    assert_error(bob.delete(f"/v1/sessions/{sid}"), 404)
    assert sid not in [s["id"] for s in bob.get("/v1/sessions").json()["sessions"]]
    # no key / a wrong key: 401 everywhere under /v1
    with server.client() as anon, server.client("nc_not-a-key") as wrong:
        assert_error(anon.get(f"/v1/sessions/{sid}"), 401, "missing_api_key")
        assert_error(anon.get("/v1/nowcasters"), 401)
        assert_error(wrong.post(f"/v1/sessions/{sid}/nowcast"), 401, "invalid_api_key")
    # alice's session is untouched
    view = alice.get(f"/v1/sessions/{sid}").json()
    assert view["states"]["count"] == 5
    assert alice.post(f"/v1/sessions/{sid}/nowcast").status_code == 200


def test_concurrent_clients(server, api_keys):
    """8 clients (two keys) each run their own session at once; every answer is their own, right nowcast."""
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            key = api_keys["alice" if i % 2 else "bob"]
            spec, states = training_states(seed=100 + i)
            with server.client(key) as c:
                sid = c.post("/v1/sessions", json={"spec": spec}).json()["id"]
                upload_all(c, sid, states)
                for k in (1, 7, 40):
                    r = c.post(f"/v1/sessions/{sid}/nowcast", json={"k": k})
                    assert r.status_code == 200, r.text
                    got = flatten_answer(spec, load(r.content))
                    want = reference_nowcast(Linefit(), spec, flat_states(spec, states), k)
                    torch.testing.assert_close(got, want, rtol=0, atol=0)
                assert c.delete(f"/v1/sessions/{sid}").status_code == 204
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise errors[0]


def test_default_nowcaster_is_the_bundled_nino(tmp_path):
    """Without NINOCAST_DEFAULT_NOWCASTER, a session that names no nowcaster gets our own graph model."""
    from server_utils import Server
    from ninocast_server.engine.nowcasters.checkpoint import load_nowcaster

    server = Server(tmp_path / "data", default_nowcaster=None).start()
    try:
        with server.client() as c:
            assert c.get("/v1/nowcasters").json()["default"] == "ninocast-nino"
            spec, states = training_states(seed=2)
            sess = c.post("/v1/sessions", json={"spec": spec, "period": 1000, "max_train_steps": 10000}).json()
            assert sess["nowcaster"] == "ninocast-nino"
            upload_all(c, sess["id"], states, first_step=199)
            r = c.post(f"/v1/sessions/{sess['id']}/nowcast")
            assert r.status_code == 200, r.text
            k = int(r.headers["x-ninocast-k"])
            want = reference_nowcast(load_nowcaster("ninocast-nino"), spec, flat_states(spec, states), k)
            torch.testing.assert_close(flatten_answer(spec, load(r.content)), want, rtol=1e-5, atol=1e-6)
            assert not torch.allclose(want, reference_nowcast(Linefit(), spec, flat_states(spec, states), k))
    finally:
        server.stop()


def _undocumented(value: object, schema: dict, spec: dict, where: str) -> list[str]:
    """Fields of ``value`` its OpenAPI schema does not declare, and declared required fields it lacks."""
    while "$ref" in schema or "anyOf" in schema:
        if "$ref" in schema:
            schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
        else:  # X | None: the branch that fits the value
            options = [s for s in schema["anyOf"] if (s.get("type") == "null") == (value is None)]
            schema = options[0]
    problems: list[str] = []
    if isinstance(value, dict) and "properties" in schema:
        props = schema["properties"]
        problems += [f"{where}.{k} is not documented" for k in value if k not in props]
        problems += [f"{where}.{k} is required but missing" for k in schema.get("required", []) if k not in value]
        for k, v in value.items():
            if k in props:
                problems += _undocumented(v, props[k], spec, f"{where}.{k}")
    elif isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            problems += _undocumented(v, schema["items"], spec, f"{where}[{i}]")
    return problems


def test_json_answers_hold_exactly_their_documented_fields(alice, server):
    """Every JSON answer is its route's response model: nothing sent that /openapi.json does not show (the
    listing's verification counts and the catalogue's scope and model_args once were), nothing required left out."""
    spec_json, states = training_states(seed=5, n=5)
    oa = httpx.get(server.url + "/openapi.json").json()

    def check(r: httpx.Response, path: str, method: str) -> None:
        schema = oa["paths"][path][method]["responses"][str(r.status_code)]["content"]["application/json"]["schema"]
        assert _undocumented(r.json(), schema, oa, f"{method.upper()} {path}") == []

    r = alice.post("/v1/sessions", json={"spec": spec_json, "ctx": 5})
    check(r, "/v1/sessions", "post")
    sid = r.json()["id"]
    upload_all(alice, sid, states[:4])
    check(alice.put(f"/v1/sessions/{sid}/states/5000", content=encode(states[4]), headers=OCTET),
          "/v1/sessions/{session_id}/states/{step}", "put")
    assert alice.post(f"/v1/sessions/{sid}/nowcast", json={"k": 2}).status_code == 200
    check(alice.post(f"/v1/sessions/{sid}/nowcasts/5000/report", json={"k": 2, "accepted": True, "alpha": 1.0,
                                                                        "tried": [[1.0, 0.5]]}),
          "/v1/sessions/{session_id}/nowcasts/{step}/report", "post")
    check(alice.get("/v1/sessions"), "/v1/sessions", "get")
    r = alice.get(f"/v1/sessions/{sid}")
    assert r.json()["reports"][0]["step"] == 5000 and r.json()["verification"]["accepted"] == 1
    check(r, "/v1/sessions/{session_id}", "get")
    r = alice.get("/v1/nowcasters")
    nino = next(n for n in r.json()["nowcasters"] if n["name"] == "ninocast-nino")
    assert nino["kind"] == "routed" and nino["scope"]["families"] and nino["model_args"] is None
    members = [m for v in nino["routes"].values() for m in (v if isinstance(v, list) else [v])]
    assert len(nino["routes"]["gpt2"]) == 2 and len(members) == 5  # gpt2 / llama: a member per spacing
    assert all(m["kind"] == "nino" and m["model_args"]["gnn"] is True for m in members)
    check(r, "/v1/nowcasters", "get")
    check(httpx.get(server.url + "/readyz"), "/readyz", "get")
    check(httpx.get(server.url + "/healthz"), "/healthz", "get")

"""Hostile and broken requests: each is a 4xx JSON {error, detail} naming the problem, and the server stays up."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from server_utils import OCTET, assert_error, encode, training_states, upload_all


@pytest.fixture()
def alice(server, api_keys):
    with server.client(api_keys["alice"]) as c:
        yield c


@pytest.fixture()
def session(alice):
    spec, states = training_states(seed=7)
    sid = alice.post("/v1/sessions", json={"spec": spec}).json()["id"]
    return sid, spec, states


@pytest.fixture(autouse=True)
def healthy_after(server):
    yield
    assert server.healthy()


def put(c, sid, body, step=1, headers=OCTET):
    return c.put(f"/v1/sessions/{sid}/states/{step}", content=body, headers=headers)


def raw_file(header: dict, data: bytes, header_len: int | None = None) -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob) if header_len is None else header_len) + blob + data


def test_truncated_body(alice, session):
    sid, _, states = session
    body = encode(states[0])
    assert_error(put(alice, sid, body[: len(body) - 10]), 400, "invalid_safetensors", "data_offsets")
    assert_error(put(alice, sid, body[:5]), 400, "invalid_safetensors", "8-byte")
    assert_error(put(alice, sid, body[:40]), 400, "invalid_safetensors", "header length")


def test_header_lies_about_offsets_and_sizes(alice, session):
    sid, spec, _ = session
    name, shape = spec["params"][0]
    n = 4 * shape[0] * shape[1]
    wrong_span = {name: {"dtype": "F32", "shape": shape, "data_offsets": [0, n - 4]}}
    assert_error(put(alice, sid, raw_file(wrong_span, bytes(n))), 400, "invalid_safetensors", "needs")
    beyond = {name: {"dtype": "F32", "shape": shape, "data_offsets": [8, n + 8]}}
    assert_error(put(alice, sid, raw_file(beyond, bytes(n))), 400, "invalid_safetensors", "outside")
    overlap = {name: {"dtype": "F32", "shape": shape, "data_offsets": [0, n]},
               "x": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    assert_error(put(alice, sid, raw_file(overlap, bytes(n))), 400, "invalid_safetensors", "overlap")
    negative = {name: {"dtype": "F32", "shape": [-1, 4], "data_offsets": [0, 0]}}
    assert_error(put(alice, sid, raw_file(negative, b"")), 400, "invalid_safetensors", "shape")
    bad_dtype = {name: {"dtype": "F99", "shape": shape, "data_offsets": [0, n]}}
    assert_error(put(alice, sid, raw_file(bad_dtype, bytes(n))), 400, "invalid_safetensors", "dtype")
    assert_error(put(alice, sid, struct.pack("<Q", 7) + b"{nope!}"), 400, "invalid_safetensors", "JSON")
    assert_error(put(alice, sid, struct.pack("<Q", 2) + b"[]"), 400, "invalid_safetensors", "object")


def test_huge_header_length(alice, session):
    sid, _, _ = session
    assert_error(put(alice, sid, struct.pack("<Q", 2**62) + b"{}"), 400, "invalid_safetensors", "limit")
    assert_error(put(alice, sid, struct.pack("<Q", 10_000) + b"{}"), 400, "invalid_safetensors", "truncated")


def test_wrong_names_shapes_dtypes(alice, session):
    sid, spec, states = session
    s = dict(states[0])
    first = spec["params"][0][0]
    missing = {k: v for k, v in s.items() if k != first}
    assert_error(put(alice, sid, encode(missing)), 422, "missing_tensor", first)
    renamed = {("x" + k if k == first else k): v for k, v in s.items()}
    assert_error(put(alice, sid, encode(renamed)), 422, "missing_tensor", first)
    reshaped = {**s, first: s[first].reshape(-1)}
    assert_error(put(alice, sid, encode(reshaped)), 422, "shape_mismatch", first)
    ints = {**s, first: s[first].to(torch.int32)}
    assert_error(put(alice, sid, encode(ints)), 422, "unsupported_dtype", first)
    doubles = {**s, first: s[first].double()}
    assert_error(put(alice, sid, encode(doubles)), 422, "unsupported_dtype", "F64")
    extra = {**s, "running_mean": torch.zeros(3, dtype=torch.int64)}  # buffers are ignored
    assert put(alice, sid, encode(extra)).status_code == 201


def test_nan_and_inf(alice, session):
    sid, spec, states = session
    last = spec["params"][-1][0]
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = states[0][last].clone()
        t.view(-1)[-1] = bad
        assert_error(put(alice, sid, encode({**states[0], last: t})), 422, "nonfinite_values", last)
    bf = {k: v.bfloat16() for k, v in states[0].items()}
    bf[last].view(-1)[0] = float("nan")
    assert_error(put(alice, sid, encode(bf)), 422, "nonfinite_values", last)
    assert alice.get(f"/v1/sessions/{sid}").json()["states"]["count"] == 0


def test_oversized_body(alice, session):
    sid, _, _ = session
    big = bytes(1_500_000)  # the test server's limit is 1,000,000 bytes
    assert_error(put(alice, sid, big), 413, "body_too_large", "1000000")

    def chunks():  # no Content-Length: the limit holds while streaming
        for _ in range(30):
            yield bytes(100_000)

    assert_error(put(alice, sid, chunks()), 413, "body_too_large")


def test_unknown_session_and_route(alice, session):
    _, _, states = session
    assert_error(alice.get("/v1/sessions/doesnotexist"), 404, "session_not_found", "doesnotexist")
    assert_error(put(alice, "doesnotexist", encode(states[0])), 404, "session_not_found")
    assert_error(alice.post("/v1/sessions/doesnotexist/nowcast"), 404, "session_not_found")
    assert_error(alice.get("/v1/nope"), 404, "not_found")
    assert_error(alice.patch("/v1/sessions"), 405, "method_not_allowed")
    assert_error(put(alice, session[0], encode(states[0]), step=-1), 422, "invalid_request", "step")


def test_invalid_k_and_dtype(alice, session):
    sid, _, states = session
    upload_all(alice, sid, states)
    for k in (0, 41, -3):
        assert_error(alice.post(f"/v1/sessions/{sid}/nowcast", json={"k": k}), 422, "invalid_k", "1..40")
    assert_error(alice.post(f"/v1/sessions/{sid}/nowcast", json={"k": "ten"}), 422, "invalid_request", "k")
    assert_error(alice.post(f"/v1/sessions/{sid}/nowcast", json={"dtype": "int8"}), 422, "invalid_request", "dtype")
    assert_error(alice.post(f"/v1/sessions/{sid}/nowcast", json={"kk": 1}), 422, "invalid_request", "kk")


def test_too_few_states(alice, session):
    sid, _, states = session
    upload_all(alice, sid, states[:3])
    assert_error(alice.post(f"/v1/sessions/{sid}/nowcast"), 409, "too_few_states", "holds 3")


def test_wrong_content_type(alice, session):
    sid, _, states = session
    body = encode(states[0])
    assert_error(put(alice, sid, body, headers={"Content-Type": "application/json"}), 415,
                 "unsupported_media_type", "application/octet-stream")
    assert_error(put(alice, sid, body, headers={}), 415, "unsupported_media_type")


def test_malformed_json(alice, session):
    sid, _, _ = session
    hdr = {"Content-Type": "application/json"}
    assert_error(alice.post("/v1/sessions", content=b'{"spec": {', headers=hdr), 400, "malformed_json")
    assert_error(alice.post(f"/v1/sessions/{sid}/nowcast", content=b"{k: 1}", headers=hdr), 400, "malformed_json")
    assert_error(alice.post("/v1/sessions", json=[1, 2]), 422, "invalid_request")
    assert_error(alice.post("/v1/sessions", json={}), 422, "invalid_request", "spec")
    assert_error(alice.post("/v1/sessions", json={"spec": {"params": "x"}}), 422, "invalid_spec", "params")
    assert_error(alice.post("/v1/sessions", json={"spec": {"params": [["w", [2]]]}, "nowcaster": "nope"}), 422,
                 "unknown_nowcaster", "nope")
    assert_error(alice.post("/v1/sessions", json={"spec": {"params": [["w", [2]]]}, "period": 0}), 422,
                 "invalid_request", "period")


def test_spec_too_large(alice):
    too_many = {"params": [["w", [1000, 1000]]]}  # 1e6 > the test server's 100,000 parameters
    assert_error(alice.post("/v1/sessions", json={"spec": too_many}), 422, "spec_too_large", "100000")
    huge_json = {"params": [[f"layer{i}.weight", [2]] for i in range(20_000)]}  # > 200 kB of JSON
    assert_error(alice.post("/v1/sessions", json={"spec": huge_json}), 413, "body_too_large")

    def chunks():  # a chunked JSON body is cut off as soon as it passes the limit
        yield b'{"spec": {"params": ['
        for i in range(20_000):
            yield f'["w{i}", [2]],'.encode()
        yield b'["last", [2]]]}}'

    r = alice.post("/v1/sessions", content=chunks(), headers={"Content-Type": "application/json"})
    assert_error(r, 413, "body_too_large")


@pytest.mark.parametrize("period, ctx", [(4, 5), (1, 2), (63, 64)])
def test_a_period_shorter_than_ctx_is_refused_at_create(alice, period, ctx):
    """Snapshots come every period // ctx steps: a session whose spacing would be 0 is a 422 naming both numbers,
    not a session that warns "one every 0 steps" later."""
    spec, _ = training_states(seed=7)
    r = alice.post("/v1/sessions", json={"spec": spec, "nowcaster": "linefit", "period": period, "ctx": ctx})
    assert_error(r, 422, "invalid_period", f"period ({period}) must be at least ctx ({ctx})")
    assert alice.post("/v1/sessions", json={"spec": spec, "nowcaster": "linefit", "period": 4 * ctx,
                                            "ctx": ctx}).status_code == 201

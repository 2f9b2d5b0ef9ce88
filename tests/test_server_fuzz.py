"""A third-party fuzzer against a real server: schemathesis follows the OpenAPI links of a created session
(create -> upload -> nowcast -> get -> delete) with generated, mostly hostile, data and runs every built-in
check on each answer: no 5xx, every status and body as documented, invalid data refused, auth not ignored,
405s with Allow, deleted sessions gone. Bounded to a few hundred requests (well under a minute)."""

from __future__ import annotations

import pytest
import torch

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is a dev dependency (pip install -e '.[dev]')")
from hypothesis import HealthCheck, Phase, settings  # noqa: E402  (hypothesis comes with schemathesis)
from hypothesis import strategies as st  # noqa: E402

from server_utils import Server, encode  # noqa: E402

FUZZ_SPEC = {"family": "generic", "params": [["0.weight", [3, 2]], ["0.bias", [3]]]}


def state_bytes() -> st.SearchStrategy[bytes]:
    """Valid states of FUZZ_SPEC (finite float32/bf16 values), broken ones, and arbitrary bytes."""
    values = st.lists(st.floats(-1e3, 1e3, width=32), min_size=9, max_size=9)

    def to_state(xs: list[float], dtype: torch.dtype) -> bytes:
        t = torch.tensor(xs, dtype=torch.float32).to(dtype)
        return encode({"0.weight": t[:6].reshape(3, 2), "0.bias": t[6:]})

    valid = st.builds(to_state, values, st.sampled_from([torch.float32, torch.bfloat16]))
    return st.one_of(valid, valid.map(lambda b: b[: len(b) // 2]), st.binary(max_size=200))


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, api_keys) -> Server:
    data = tmp_path_factory.mktemp("fuzz") / "data"
    s = Server(data, keys_file=api_keys["file"], max_body_bytes=100_000, max_json_bytes=100_000,
               max_params_per_session=100_000, max_sessions_per_key=1000, max_tensors_per_spec=50).start()
    yield s
    s.stop()


def test_stateful_fuzz_passes_every_check(fuzz_server, api_keys):
    config = schemathesis.config.SchemathesisConfig.from_dict({"checks": {
        # The schema cannot say that a state must match its session's spec or that a nowcast needs ctx states:
        # such schema-valid requests are refused with a documented 4xx (400, 404, 409, 422, 429, 507).
        "positive_data_acceptance": {"expected-statuses": ["2xx", "400", "404", "409", "422", "429", "507"]},
    }})
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json", config=config)
    schemathesis.openapi.media_type("application/octet-stream", state_bytes())

    @schema.hook("flatmap_body").apply_to(method="POST", path="/v1/sessions")
    def usable_sessions(context, body):
        """Half of the sessions get a spec, nowcaster and ctx that the generated states can fill."""
        if not isinstance(body, dict):
            return st.just(body)
        usable = {**body, "spec": FUZZ_SPEC, "nowcaster": "linefit", "ctx": 2, "record": False}
        return st.sampled_from([body, usable])

    auth = {"Authorization": f"Bearer {api_keys['alice']}"}

    class Fuzz(schema.as_state_machine()):
        def get_call_kwargs(self, case):
            return {"headers": auth, "timeout": 30}

    Fuzz.run(settings=settings(max_examples=25, stateful_step_count=10, deadline=None, derandomize=True,
                               phases=[Phase.generate], suppress_health_check=list(HealthCheck)))
    with fuzz_server.client(api_keys["alice"]) as c:
        done = [s for s in c.get("/v1/sessions").json()["sessions"] if s["nowcasts_done"]]
        metrics = c.get("/metrics").text
    sent = sum(int(line.split()[-1]) for line in metrics.splitlines() if line.startswith("ninocast_requests_total{"))
    assert sent >= 200, sent
    assert "Traceback" not in fuzz_server.log.read_text()
    # the walk reached the end of the chain at least once (create -> 2 uploads -> nowcast)
    assert done, "no generated session got as far as a nowcast"

"""The product's main job end to end: the golden GPT-2 run, 5 states streamed to a real server that loaded the
official nino_no_posw checkpoint from its models dir; the answer equals the engine's own nowcast."""

from __future__ import annotations

import torch
from safetensors.torch import load

from ninocast.spec import ModelSpec
from ninocast_server.engine import runner
from ninocast_server.engine.nowcasters.checkpoint import load_nowcaster, save_nowcaster
from server_utils import OCTET, Server, encode, flatten_answer
from shared_data import checkpoint, golden


def test_gpt2_nino_no_posw_over_http(tmp_path, api_keys):
    models = tmp_path / "models"
    save_nowcaster(load_nowcaster(str(checkpoint("nino_no_posw")), name="nino_no_posw"), models / "nino_no_posw")
    meta, arrays = golden("gpt2")
    spec_json = meta["spec"]
    spec = ModelSpec.from_json(spec_json)
    states = torch.from_numpy(arrays["states"]).float()
    assert states.shape == (spec.n_params, 5)
    k = 7
    want = runner.nowcast(load_nowcaster(str(models / "nino_no_posw")), spec, states, k)

    srv = Server(tmp_path / "data", keys_file=api_keys["file"], models_dir=models,
                 default_nowcaster="nino_no_posw").start(timeout=120)
    try:
        with srv.client(api_keys["alice"], timeout=300) as c:
            cat = {n["name"]: n for n in c.get("/v1/nowcasters").json()["nowcasters"]}
            assert "gpt2" in cat["nino_no_posw"]["families"]
            sid = c.post("/v1/sessions", json={"spec": spec_json}).json()["id"]
            for j in range(5):
                col = states[:, j]
                body = encode({p.name: col[p.start:p.stop].reshape(p.shape) for p in spec.layout})
                assert c.put(f"/v1/sessions/{sid}/states/{199 + 200 * j}", content=body,
                             headers=OCTET).status_code == 201
            r = c.post(f"/v1/sessions/{sid}/nowcast", json={"k": k})
            assert r.status_code == 200, r.text
            got = flatten_answer(spec_json, load(r.content))
    finally:
        srv.stop()
    # a fresh graph's Laplacian eigenvectors carry random signs: compare the predicted updates loosely
    last = states[:, -1]
    rel = (got - want).norm() / (want - last).norm()
    assert rel < 0.03, float(rel)

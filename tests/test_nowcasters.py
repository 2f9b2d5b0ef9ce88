"""NiNo / WNN+ nowcasters and their checkpoints.

Fixture tests compare against outputs of the reference implementation (NINO_SPEC §8.1) and need the shared
folder (spec fixtures + the published checkpoints); the rest runs on small random graphs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from ninocast.spec import ModelSpec
from ninocast_server.engine.graphs import build_graph
from ninocast_server.engine.nowcasters.base import NowcastError
from ninocast_server.engine.nowcasters.checkpoint import (CheckpointError, load_nowcaster, load_official,
                                                          model_from_args, save_nowcaster)
from ninocast_server.engine.nowcasters.config import NiNoConfig, WNNConfig
from ninocast_server.engine.nowcasters.layers import init_weights
from ninocast_server.engine.nowcasters.linefit import Linefit
from ninocast_server.engine.nowcasters.nino import NiNo, NiNoModel
from ninocast_server.engine.nowcasters.scaling import scale_states
from ninocast_server.engine.nowcasters.wnn import WNN, WNNModel
import shared_data
from shared_data import FIXTURE_FAMILY, checkpoint

CASES = tuple(FIXTURE_FAMILY)
KS = (1, 17, 40)
MLP_CKPTS = ("nino_mlp", "nino_mlp_h32")
EDGE_TOL = {"nino_no_posw": 5e-6, "nino_mlp": 1e-6, "nino_mlp_h32": 1e-6}


@pytest.fixture(autouse=True)
def _one_thread():
    """These graphs are tiny: threads gain nothing, and on a busy 2-core machine OpenMP's spin-waiting makes
    each small op ~20x slower. Restored afterwards so other test modules keep their setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@lru_cache(maxsize=None)
def fixture(case: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(case JSON, arrays as tensors) of a reference fixture."""
    _, meta, arrays = shared_data.fixture(case)
    return meta, {k: torch.from_numpy(v.copy()) for k, v in arrays.items()}


@lru_cache(maxsize=None)
def official(name: str):
    return load_nowcaster(str(checkpoint(name)))


def fixture_spec(case: str) -> ModelSpec:
    return shared_data.fixture(case)[0]


def fixture_graph(case: str):
    """The graph builder's graph with the reference LPE injected; it must reproduce the fixture's arrays."""
    _, t = fixture(case)
    graph = build_graph(fixture_spec(case), pos=t["pos"])
    assert torch.equal(graph.edge_index, t["edge_index"]) and torch.equal(graph.edge_type, t["edge_type"])
    return graph


def random_graph(n_nodes: int = 40, n_edges: int = 300, feat: int = 1, ctx: int = 5, seed: int = 0):
    """Random edges plus self-loops, random types/features/LPE: enough to exercise every code path."""
    g = torch.Generator().manual_seed(seed)
    ei = torch.randint(0, n_nodes, (2, n_edges), generator=g)
    loops = torch.arange(n_nodes).repeat(2, 1)
    edge_index = torch.cat([ei, loops], 1)
    edge_type = torch.cat([torch.randint(1, 12, (n_edges,), generator=g), torch.full((n_nodes,), 13)])
    edge_attr = torch.randn(edge_index.shape[1], feat * ctx, generator=g)
    pos = torch.randn(n_nodes, 8, generator=g)
    pos_w = torch.randint(0, 30, (n_nodes,), generator=g)
    return edge_attr, edge_index, edge_type, pos, pos_w


def random_nino(seed: int = 0, **kw) -> NiNoModel:
    torch.manual_seed(seed)
    model = NiNoModel(NiNoConfig(**{"hid": 16, "vocab_size": 50, **kw}))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


def random_wnn(seed: int = 0, **kw) -> WNNModel:
    torch.manual_seed(seed)
    model = WNNModel(WNNConfig(**{"hid": 16, **kw}))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


# ----------------------------------------------------------------------------- reference numerics
def test_official_checkpoints_load_strictly():
    counts = {"nino_no_posw": (NiNo, 549_992), "nino_mlp": (WNN, 57_384), "nino_mlp_h32": (WNN, 5_160)}
    for name, (cls, n) in counts.items():
        m = official(name)
        assert isinstance(m, cls) and m.name == name and m.num_parameters() == n
        assert m.describe()["parameters"] == n


@pytest.mark.parametrize("case", CASES)
def test_nino_edge_predictions_match_reference(case):
    _, t = fixture(case)
    model = official("nino_no_posw").model
    args = t["edge_attr"], t["edge_index"], t["edge_type"], t["pos"], t["pos_w"]
    few_chunks = t["edge_attr"].shape[0] // 3 + 1  # several chunks, the last one shorter
    for k in KS:
        ref = t[f"nino_no_posw_k{k}_edge_pred"]
        for keep, chunk in [(True, 2**14), (False, few_chunks), (True, few_chunks)]:
            pred = model.nowcast(*args, k, chunk_size=chunk, keep_edge_states=keep)
            assert pred.shape == ref.shape
            assert (pred - ref).abs().max() <= EDGE_TOL["nino_no_posw"], (k, keep)


@pytest.mark.parametrize("ckpt", MLP_CKPTS)
@pytest.mark.parametrize("case", CASES)
def test_wnn_edge_predictions_match_reference(ckpt, case):
    _, t = fixture(case)
    model = official(ckpt).model
    E, f = t["edge_attr"].shape[0], t["edge_attr"].shape[1] // 5
    rows = t["edge_attr"].view(E * f, 5)  # per edge and slot, as the reference runs it
    for k in KS:
        pred = model.nowcast(rows, t["edge_type"].repeat_interleave(f), k).view(E, f)
        ref = t[f"{ckpt}_k{k}_edge_pred"]
        # A few float32 ulps of the largest value: the MLP's matmul kernels differ between CPUs (AVX2/AVX-512).
        assert (pred - ref).abs().max() <= EDGE_TOL[ckpt] * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("ckpt", ("nino_no_posw",) + MLP_CKPTS)
@pytest.mark.parametrize("case", CASES)
def test_full_nowcast_matches_reference_params(ckpt, case):
    """Raw states -> scale -> nowcaster -> unscale; WNN runs per parameter, not per edge."""
    _, t = fixture(case)
    graph, spec, nowcaster = fixture_graph(case), fixture_spec(case), official(ckpt)
    for k in KS:
        pred = nowcaster.predict(t["states"].clone(), k, spec, graph)
        assert (pred - t[f"{ckpt}_k{k}_param_pred"]).abs().max() <= 1e-5, k


@pytest.mark.parametrize("ckpt", MLP_CKPTS)
def test_wnn_per_parameter_equals_per_edge(ckpt):
    _, t = fixture("fm16")
    graph, nowcaster = fixture_graph("fm16"), official(ckpt)
    scaled, _, _ = scale_states(t["states"], fixture_spec("fm16"))
    E, f = graph.num_edges, graph.feat_size
    per_edge = nowcaster.model.nowcast(graph.edge_features(scaled).view(E * f, 5),
                                       graph.edge_type.repeat_interleave(f), 17).view(E, f)
    # equal up to float32 rounding: GEMM blocking depends on how many rows a chunk holds
    torch.testing.assert_close(nowcaster.predict_scaled(scaled, 17, graph), graph.to_vector(per_edge),
                               atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- purity and limits
def test_nino_forward_never_modifies_the_model():
    """The reference truncates edge_proj in place on F_g < F_m; here fm16 (F_g 9) -> gpt2 (F_g 1) -> fm16."""
    nino = official("nino_no_posw")
    before = {k: v.clone() for k, v in nino.model.state_dict().items()}
    runs = []
    for case in ("fm16", "gpt2_tiny", "fm16"):
        _, t = fixture(case)
        runs.append(nino.predict(t["states"].clone(), 17, fixture_spec(case), fixture_graph(case)))
    assert torch.equal(runs[0], runs[2])
    after = nino.model.state_dict()
    assert all(torch.equal(before[k], after[k]) and before[k].shape == after[k].shape for k in before)


def test_kernels_larger_than_max_feat_size_are_refused():
    model = random_nino()
    attr, ei, et, pos, pw = random_graph(feat=25)  # a 5x5 kernel
    with pytest.raises(NowcastError, match="at most 9"):
        model.nowcast(attr, ei, et, pos, pw, 1)
    with pytest.raises(NowcastError, match="at most 9"):
        model(attr, ei, et, pos, pw)
    spec = ModelSpec(family="generic", params=[("c.weight", (4, 2, 5, 5)), ("c.bias", (4,)), ("fc.weight", (3, 4))])
    graph = build_graph(spec, with_lpe=False)
    graph.pos = torch.zeros(graph.num_nodes, 8)
    assert graph.feat_size == 25
    with pytest.raises(NowcastError, match="larger than 3x3"):
        NiNo(model).predict(torch.randn(spec.n_params, 5), 1, spec, graph)


def test_bad_horizon_and_shapes():
    model, wnn = random_nino(), random_wnn()
    attr, ei, et, pos, pw = random_graph()
    for k in (0, 41, 2.0, True):
        with pytest.raises(NowcastError, match="k must be"):
            model.nowcast(attr, ei, et, pos, pw, k)
        with pytest.raises(NowcastError, match="k must be"):
            wnn.nowcast(attr, et, k)
    with pytest.raises(NowcastError, match="edge features"):
        model.nowcast(attr[:, :4], ei, et, pos, pw, 1)
    with pytest.raises(NowcastError, match="token id"):
        model.nowcast(attr, ei, et, pos, pw + 100, 1)
    with pytest.raises(NowcastError, match="outside 0..39"):
        model.nowcast(attr, ei + 1, et, pos, pw, 1)


# ----------------------------------------------------------------------------- inference vs training forward
@pytest.mark.parametrize("feat", [1, 9])
def test_chunking_and_edge_store_do_not_change_nino(feat):
    model = random_nino()
    args = random_graph(feat=feat)
    ref = model.nowcast(*args, 5, chunk_size=10**6)
    for chunk, keep in [(97, True), (97, False), (10**6, False)]:
        torch.testing.assert_close(model.nowcast(*args, 5, chunk_size=chunk, keep_edge_states=keep), ref,
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layers", [2, 3, 4])
def test_nino_training_forward_slices_equal_inference(layers):
    model = random_nino(layers=layers)
    attr, ei, et, pos, pw = random_graph(feat=9)
    out = model(attr, ei, et, pos, pw)
    assert out.shape == (attr.shape[0], 9 * 40)
    per_horizon = out.view(-1, 9, 40)
    for k in (1, 17, 40):
        torch.testing.assert_close(per_horizon[:, :, k - 1], model.nowcast(attr, ei, et, pos, pw, k, chunk_size=97),
                                   atol=1e-5, rtol=1e-5)
    (out.square().mean()).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for name in ("layer_embed.weight", "edge_proj.fc.0.weight", "node_proj.fc.0.weight", "wte_pos_enc_layer.weight",
                 "gnn.convs.0.edge_encoder.weight", "gnn.edge_update.0.lin1.weight", "edge_out.fc.2.weight"):
        assert grads[name] is not None and torch.isfinite(grads[name]).all() and grads[name].abs().sum() > 0, name


def test_nino_training_forward_matches_reference_fixture():
    _, t = fixture("gpt2_tiny")
    model = official("nino_no_posw").model
    out = model(t["edge_attr"], t["edge_index"], t["edge_type"], t["pos"], t["pos_w"]).detach()
    assert out.shape == (t["edge_attr"].shape[0], 40)
    for k in KS:
        assert (out[:, k - 1 : k] - t[f"nino_no_posw_k{k}_edge_pred"]).abs().max() <= 1e-5


def test_wnn_training_forward_slices_equal_inference():
    model = random_wnn()
    attr, _, et, _, _ = random_graph(feat=9)
    out = model(attr, et)
    assert out.shape == (attr.shape[0], 9 * 40)
    rows = attr.view(-1, 5)
    for k in (1, 17, 40):
        ref = model.nowcast(rows, et.repeat_interleave(9), k, chunk_size=1000).view(-1, 9)
        torch.testing.assert_close(out.view(-1, 9, 40)[:, :, k - 1], ref, atol=1e-5, rtol=1e-5)
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ----------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("kind", ["nino", "wnn"])
def test_save_load_roundtrip(tmp_path, kind):
    model = random_nino(upd_scale=0.5) if kind == "nino" else random_wnn(hid=8)
    wrapped = NiNo(model, name="mine") if kind == "nino" else WNN(model, name="mine")
    out = save_nowcaster(wrapped, tmp_path / "ck", source={"trained_on": "unit test"})
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == "ninocast-nowcaster" and config["version"] == 1 and config["kind"] == kind
    assert config["name"] == "mine" and config["source"] == {"trained_on": "unit test"}
    assert config["model_args"] == model.config.model_args()
    loaded = load_nowcaster(str(out))
    assert type(loaded) is type(wrapped) and loaded.name == "mine" and loaded.kind == kind
    assert load_nowcaster(str(out), name="other").name == "other"
    attr, ei, et, pos, pw = random_graph()
    if kind == "nino":
        assert torch.equal(loaded.model.nowcast(attr, ei, et, pos, pw, 3), model.nowcast(attr, ei, et, pos, pw, 3))
    else:
        assert torch.equal(loaded.model.nowcast(attr, et, 3), model.nowcast(attr, et, 3))


NON_DEFAULT = {"nino": NiNoConfig(ctx=3, hid=8, layers=2, seq_len=7, edge_types=6, upd_scale=0.5, residual=False,
                                   max_feat_size=4, wte_pos_enc=False, vocab_size=20, lpe=4),
               "wnn": WNNConfig(ctx=3, hid=8, layers=2, seq_len=7, edge_types=6, upd_scale=0.5, residual=False)}


@pytest.mark.parametrize("kind", ["nino", "wnn"])
def test_every_config_field_survives_both_checkpoint_formats(tmp_path, kind):
    """The architecture is one list (config.py): each field, set away from its default, comes back from our
    directory format and from a reference-style .pt, so a field the checkpoint code forgot would fail here."""
    config = NON_DEFAULT[kind]
    assert all(getattr(config, f.name) != f.default for f in dataclasses.fields(config))
    model = (NiNoModel if kind == "nino" else WNNModel)(config)
    init_weights(model)
    assert load_nowcaster(str(save_nowcaster(model, tmp_path / "dir"))).model.config == config
    pt = _save_pt(tmp_path / "ref.pt", {"state_dict": model.state_dict(), "model_args": config.model_args()})
    loaded = load_official(pt)
    assert loaded.config == config and type(loaded) is type(model)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_nino_config_refuses_one_layer(tmp_path):
    with pytest.raises(ValueError, match="layers >= 2"):
        NiNoConfig(layers=1)
    with pytest.raises(CheckpointError, match="layers >= 2"):
        model_from_args({"gnn": True, "layers": 1})


def test_official_roundtrip_and_name(tmp_path):
    src = checkpoint("nino_mlp_h32")
    out = save_nowcaster(load_nowcaster(str(src)), tmp_path / "h32", source={"sha256": "389e4d51"})
    loaded = load_nowcaster(str(out))
    assert loaded.name == "nino_mlp_h32" and loaded.kind == "wnn"
    ref = torch.load(src, map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.equal(ref[k], v) for k, v in loaded.model.state_dict().items())


def test_linefit_reference():
    m = load_nowcaster("linefit")
    assert isinstance(m, Linefit) and m.name == "linefit"


def _save_pt(path: Path, obj) -> str:
    torch.save(obj, path)
    return str(path)


def test_checkpoint_errors(tmp_path):
    good = random_wnn(hid=8).state_dict()
    with pytest.raises(CheckpointError, match="unknown model_args"):
        load_official(_save_pt(tmp_path / "a.pt", {"state_dict": good, "model_args": {"gnn": False, "hid": 8,
                                                                                      "flux": 3}}))
    with pytest.raises(CheckpointError, match=r"edge_proj.fc.0.weight has shape \(8, 5\)"):
        load_official(_save_pt(tmp_path / "b.pt", {"state_dict": good, "model_args": {"gnn": False, "hid": 9}}))
    with pytest.raises(CheckpointError, match="missing keys"):
        load_official(_save_pt(tmp_path / "c.pt", {"state_dict": good, "model_args": {"hid": 8}}))  # gnn default
    with pytest.raises(CheckpointError, match="'state_dict' and 'model_args'"):
        load_official(_save_pt(tmp_path / "d.pt", {"weights": good}))
    with pytest.raises(CheckpointError, match="towers"):
        load_official(_save_pt(tmp_path / "e.pt", {"state_dict": good, "model_args": {"towers": 4}}))
    with pytest.raises(CheckpointError, match="not a valid int"):
        model_from_args({"hid": "128"})
    with pytest.raises(CheckpointError, match="objects other than tensors"):
        load_official(_save_pt(tmp_path / "f.pt", {"state_dict": good, "model_args": {}, "x": Path("/")}))
    (tmp_path / "g.pt").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_official(tmp_path / "g.pt")
    with pytest.raises(CheckpointError, match="no nowcaster"):
        load_nowcaster(str(tmp_path / "missing"))
    with pytest.raises(CheckpointError, match="needs config.json"):
        load_nowcaster(str(tmp_path))
    out = save_nowcaster(random_wnn(hid=8), tmp_path / "w")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "kind": "nino"}))
    with pytest.raises(CheckpointError, match="disagrees"):
        load_nowcaster(str(out))


_LOAD_UNREADABLE = """
import sys
from ninocast_server.engine.nowcasters.checkpoint import CheckpointError, load_nowcaster
try:
    load_nowcaster(sys.argv[1])
except CheckpointError as e:
    print(e)
"""


def _load_without_root_powers(path: Path) -> str:
    """Load in a child process that file modes apply to: as root (CI), with the capabilities that bypass them
    dropped (util-linux setpriv)."""
    import shutil
    import subprocess
    import sys

    cmd = [sys.executable, "-c", _LOAD_UNREADABLE, str(path)]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: file modes cannot be made to apply")
        drop = "-dac_override,-dac_read_search"
        cmd = ["setpriv", f"--inh-caps={drop}", f"--bounding-set={drop}", *cmd]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ,
                       "PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_unreadable_nowcaster_says_permission_denied(tmp_path):
    out = save_nowcaster(random_wnn(hid=8), tmp_path / "w")
    (out / "config.json").chmod(0)
    assert "config.json: cannot read it (Permission denied)" in _load_without_root_powers(out)
    (out / "config.json").chmod(0o644)
    out.chmod(0)
    try:
        assert "permission denied (this process cannot list" in _load_without_root_powers(out)
    finally:
        out.chmod(0o755)

"""End to end against the reference vectors: the public engine call and `ninocast step` reproduce the
published checkpoints' nowcasts on MLP, ConvNet, GPT-2 and Llama models."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ninocast.flat import unflatten
from ninocast.spec import ModelSpec
from ninocast_server.engine import nowcast
from ninocast_server.engine.graphs import GraphCache, build_graph
from shared_data import CHECKPOINTS, GOLDEN_CASES, golden, need

KS = (1, 7, 40)


@pytest.fixture(scope="module")
def nowcasters():
    from ninocast_server.engine.nowcasters.checkpoint import load_nowcaster

    return {name: load_nowcaster(str(need(CHECKPOINTS / f"{name}.pt"))) for name in ("nino_no_posw", "nino_mlp")}


def _case(case):
    meta, arrays = golden(case)
    spec = ModelSpec.from_json(meta["spec"])
    return spec, torch.from_numpy(arrays["states"]), arrays


def rel_update_error(pred, ref, last):
    return float((pred - ref).norm() / (ref - last).norm())


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_graph_arrays_equal_reference(case):
    spec, _, arrays = _case(case)
    g = build_graph(spec, with_lpe=False)
    assert np.array_equal(g.edge_index.numpy(), arrays["graph.edge_index"])
    assert np.array_equal(g.edge_type.numpy(), arrays["graph.edge_type"])
    assert np.array_equal(g.pos_w.numpy(), arrays["graph.pos_w"])
    feats = g.edge_features(torch.from_numpy(arrays["scaled_states"]))
    assert np.array_equal(feats.numpy(), arrays["graph.edge_attr_in"])


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_nino_with_injected_lpe_matches(case, nowcasters):
    spec, states, arrays = _case(case)
    cache = GraphCache()
    cache.put(spec, build_graph(spec, pos=torch.from_numpy(arrays["graph.pos"])), with_lpe=True)
    for k in KS:
        pred = nowcast(nowcasters["nino_no_posw"], spec, states, k, graph_cache=cache)
        ref = torch.from_numpy(arrays[f"nino_no_posw.k{k}"])
        assert float((pred - ref).abs().max()) < 2e-5, (case, k)
        assert rel_update_error(pred, ref, states[:, -1]) < 1e-4, (case, k)


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_wnn_matches(case, nowcasters):
    spec, states, arrays = _case(case)
    for k in KS:
        pred = nowcast(nowcasters["nino_mlp"], spec, states, k)
        torch.testing.assert_close(pred, torch.from_numpy(arrays[f"nino_mlp.k{k}"]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_nino_with_own_lpe_within_3_percent(case, nowcasters):
    spec, states, arrays = _case(case)
    for k in KS:
        pred = nowcast(nowcasters["nino_no_posw"], spec, states, k, graph_cache=GraphCache())
        ref = torch.from_numpy(arrays[f"nino_no_posw.k{k}"])
        assert rel_update_error(pred, ref, states[:, -1]) < 0.03, (case, k)


def _write_states(spec, states, folder, buffers=None):
    paths = []
    for i in range(states.shape[1]):
        tensors = unflatten(states[:, i].contiguous(), spec)
        tensors.update(buffers or {})
        path = folder / f"step_{(i + 1) * 200}.safetensors"
        save_file(tensors, str(path))
        paths.append(str(path))
    return paths


@pytest.mark.parametrize("case", ["cnn", "gpt2"])
def test_ninocast_step_cli_matches_reference(case, tmp_path):
    spec, states, arrays = _case(case)
    (tmp_path / "spec.json").write_text(__import__("json").dumps(spec.to_json()))
    buffers = {"running_mean": torch.arange(3, dtype=torch.float64)}
    paths = _write_states(spec, states, tmp_path, buffers)
    for ckpt, k, tol in (("nino_mlp", 7, 1e-5), ("nino_no_posw", 40, None)):
        out = tmp_path / f"out_{ckpt}.safetensors"
        res = subprocess.run([sys.executable, "-m", "ninocast", "step", "--nowcaster",
                              str(need(CHECKPOINTS / f"{ckpt}.pt")), "--k", str(k), *paths, "--out", str(out)],
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        got = load_file(str(out))
        assert torch.equal(got["running_mean"], buffers["running_mean"])  # buffers pass through
        pred = torch.cat([got[n].reshape(-1) for n in spec.names])
        ref = torch.from_numpy(arrays[f"{ckpt}.k{k}"])
        if tol:
            torch.testing.assert_close(pred, ref, rtol=0, atol=tol)
        else:
            assert rel_update_error(pred, ref, states[:, -1]) < 0.03

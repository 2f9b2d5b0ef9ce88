"""Streamed graphs (issue #16): the edges of a layout made per chunk must be exactly the assembled graph's, and
a nowcast over them the same computation."""

from __future__ import annotations

import pytest
import torch

from ninocast.spec import ModelSpec
from ninocast_server.engine.graphs import GraphCache, build_graph
from ninocast_server.engine.graphs.cache import held_edges
from ninocast_server.engine.graphs.stream import StreamedGraph, build_streamed, layout_edges
from ninocast_server.engine.nowcasters.linefit import Linefit
from ninocast_server.engine.nowcasters.config import NiNoConfig
from ninocast_server.engine.nowcasters.layers import in_degree, init_weights
from ninocast_server.engine.nowcasters.nino import NiNo, NiNoModel
from ninocast_server.engine.nowcasters.scaling import scale_states
from ninocast_server.engine.nowcasters.wnn import WNN, WNNModel
from ninocast_server.engine.runner import nowcast
from test_graphs import gpt2_spec, llama_spec

CONV = ModelSpec("generic", (("c.weight", (6, 3, 3, 3)), ("c.bias", (6,)), ("n.weight", (6,)),
                             ("f.weight", (10, 6)), ("f.bias", (10,))))
SPECS = {"gpt2": gpt2_spec(layers=2, d=8, heads=2, vocab=11, positions=5, inner=16),
         "llama-gqa": llama_spec(layers=2, heads=6, kv=2, tied=False), "conv": CONV}


@pytest.fixture(autouse=True)
def _one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def random_nino(hid: int = 16) -> NiNoModel:
    torch.manual_seed(0)
    model = NiNoModel(NiNoConfig(hid=hid, vocab_size=50))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


def random_wnn() -> WNNModel:
    """Initialised like a training start (a bare WNNModel's embedding table is left uninitialised for loaders)."""
    torch.manual_seed(0)
    model = WNNModel()
    init_weights(model)
    return model.eval()


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("chunk", [7, 4096])
def test_streamed_edges_are_the_assembled_graph(name, chunk):
    spec = SPECS[name]
    g, s = build_graph(spec), build_streamed(spec)
    assert torch.equal(s.pos, g.pos) and torch.equal(s.pos_w, g.pos_w)
    assert (s.num_nodes, s.num_edges, s.feat_size) == (g.num_nodes, g.num_edges, g.feat_size)
    assert layout_edges(spec) == g.num_edges
    states = torch.randn(spec.n_params, 5)
    parts = list(s.chunks(chunk))
    assert max(c.size for c in parts) <= chunk and parts[0].sl.start == 0 and parts[-1].sl.stop == g.num_edges
    src, dst = zip(*(s.endpoints(c) for c in parts))
    assert torch.equal(torch.stack([torch.cat(src), torch.cat(dst)]), g.edge_index)
    assert torch.equal(torch.cat([s.edge_type(c) for c in parts]), g.edge_type)
    buf = torch.empty(chunk, s.feat_size * 5)
    feats = torch.cat([s.features(states, c, buf).clone() for c in parts])
    assert torch.equal(feats, g.edge_features(states))
    pred = torch.randn(g.num_edges, g.feat_size)
    flat = torch.full((spec.n_params,), float("nan"))
    for c in parts:
        s.scatter(pred[c.sl], c, flat)
    assert torch.equal(flat, g.to_vector(pred))
    assert torch.equal(s.in_degree(), in_degree(g.edge_index[1], g.num_nodes))
    assert torch.equal(s.param_type, g.param_type)
    assert torch.equal(s.materialise().edge_index, g.edge_index)


@pytest.mark.parametrize("name", list(SPECS))
def test_streamed_nowcast_equals_the_array_nowcast(name):
    spec = SPECS[name]
    model = random_nino()
    scaled, _, _ = scale_states(torch.randn(spec.n_params, 5), spec)
    g, s = build_graph(spec), build_streamed(spec)
    full = NiNo(model).predict_scaled(scaled, 7, g)
    for chunk in (5, 64, 8192):  # chunks that split blocks, and one per block
        for keep in (True, False):  # edge states kept between passes, or recomputed from the states
            torch.testing.assert_close(model.nowcast_streamed(s, scaled, 7, chunk_size=chunk, keep_edge_states=keep),
                                       full, rtol=1e-5, atol=1e-5)
    assert torch.equal(NiNo(model).predict_scaled(scaled, 7, s), model.nowcast_streamed(s, scaled, 7))


def test_cache_streams_large_graphs_and_counts_them_by_nodes():
    spec = SPECS["gpt2"]
    small, large = GraphCache(), GraphCache(stream_min_edges=0)
    assert not isinstance(small.get(spec), StreamedGraph)
    s = large.get(spec)
    assert isinstance(s, StreamedGraph) and held_edges(s) == s.num_nodes
    states = torch.randn(spec.n_params, 5)
    for nc in (NiNo(random_nino()), WNN(random_wnn()), Linefit()):
        want = nowcast(nc, spec, states, 3, graph_cache=small)
        torch.testing.assert_close(nowcast(nc, spec, states, 3, graph_cache=large), want, rtol=1e-5, atol=1e-5)


def test_consumed_states_are_scaled_in_place_and_kept_otherwise():
    spec = SPECS["llama-gqa"]
    nc = NiNo(random_nino())
    states = torch.randn(spec.n_params, 5)
    before = states.clone()
    kept = nowcast(nc, spec, states, 3, graph_cache=GraphCache())
    assert torch.equal(states, before)
    consumed = nowcast(nc, spec, states, 3, graph_cache=GraphCache(), consume_states=True)
    assert torch.equal(consumed, kept)
    assert torch.equal(states, scale_states(before, spec)[0])  # the scratch copy was never made


def test_tensor_stats_match_scale_states():
    from ninocast_server.engine.nowcasters.scaling import tensor_stats

    spec = SPECS["gpt2"]
    states = torch.randn(spec.n_params, 5) * 3 + 1
    _, mu, sigma = scale_states(states, spec)
    mu2, sigma2 = tensor_stats(states, spec, rows=7)  # pieces that split tensors
    torch.testing.assert_close(mu2, mu, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sigma2, sigma, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_nowcast_reads_raw_states_of_any_precision(dtype):
    """Per-chunk scaling of raw (16-bit) states gives the float32 array nowcast of the same values, and the
    caller's states are left as they are."""
    spec = SPECS["llama-gqa"]
    nc = NiNo(random_nino())
    states = torch.randn(spec.n_params, 5).to(dtype)
    before = states.clone()
    want = nowcast(nc, spec, states.float(), 3, graph_cache=GraphCache())
    got = nowcast(nc, spec, states, 3, graph_cache=GraphCache(stream_min_edges=0), consume_states=True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(states, before)


def test_runner_uses_the_callers_cache_even_when_empty():
    """An empty GraphCache is falsy (it has __len__): ``graph_cache or default`` silently used the module's
    default cache, so a server's own cache (and its size limit) never filled."""
    cache = GraphCache(stream_min_edges=0)
    spec = SPECS["conv"]
    nowcast(NiNo(random_nino()), spec, torch.randn(spec.n_params, 5), 2, graph_cache=cache)
    assert len(cache) == 1 and cache.misses == 1


@pytest.mark.parametrize("dtypes,held", [("BF16", torch.bfloat16), ("F16", torch.float16), ("F32", torch.float32)])
def test_server_loads_16bit_states_without_widening(tmp_path, dtypes, held):
    from ninocast_server.sessions.safetensors_io import encode, load_states

    spec = SPECS["conv"]
    paths = []
    for i in range(3):
        head, data = encode(torch.randn(spec.n_params), spec, dtypes)
        paths.append(tmp_path / f"s{i}.safetensors")
        paths[-1].write_bytes(head + bytes(data))
    wide = load_states(paths, spec)
    kept = load_states(paths, spec, keep_16bit=True)
    assert wide.dtype == torch.float32 and kept.dtype == held
    assert torch.equal(kept.float(), wide)  # 16-bit -> float32 is exact

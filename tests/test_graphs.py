"""Neural graphs (NINO_SPEC §2): exact structure and features against the reference fixtures and golden cases,
the worked examples of Appendix A, subgraph pieces, the Laplacian encoding and error reporting."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from ninocast.spec import ModelSpec, SpecError
from ninocast.topology import Link, Topology
from ninocast_server.bench.engine import llama_bench_spec
from ninocast_server.engine.graphs import build_graph, split_blocks
from ninocast_server.engine.graphs.lpe import SIGN_TIE_RTOL, laplacian, laplacian_pe, single_threaded_blas
from shared_data import FIXTURE_FAMILY, GOLDEN_CASES, fixture, golden


# ----------------------------------------------------------------------------------------------- helpers
def load_fixture(case: str) -> tuple[ModelSpec, dict, dict]:
    spec, meta, arrays = fixture(case)
    return spec, meta, dict(arrays)


def load_golden(case: str) -> tuple[ModelSpec, dict, dict]:
    meta, arrays = golden(case)
    return ModelSpec.from_json(meta["spec"]), meta, arrays


def scale_per_tensor(spec: ModelSpec, states: torch.Tensor) -> torch.Tensor:
    """§4 'std' scaling, as the reference computes it (float32, Bessel std, +1e-6)."""
    out = torch.empty_like(states)
    for p in spec.layout:
        x = states[p.start:p.stop]
        out[p.start:p.stop] = (x - x.mean()) / (x.std() + 1e-6)
    return out


def gpt2_spec(layers=2, d=6, heads=2, vocab=5, positions=3, inner=24, with_final=True) -> ModelSpec:
    params = [("transformer.wte.weight", (vocab, d)), ("transformer.wpe.weight", (positions, d))]
    for b in range(layers):
        p = f"transformer.h.{b}."
        params += [(p + "ln_1.weight", (d,)), (p + "ln_1.bias", (d,)), (p + "attn.c_attn.weight", (d, 3 * d)),
                   (p + "attn.c_attn.bias", (3 * d,)), (p + "attn.c_proj.weight", (d, d)),
                   (p + "attn.c_proj.bias", (d,)), (p + "ln_2.weight", (d,)), (p + "ln_2.bias", (d,)),
                   (p + "mlp.c_fc.weight", (d, inner)), (p + "mlp.c_fc.bias", (inner,)),
                   (p + "mlp.c_proj.weight", (inner, d)), (p + "mlp.c_proj.bias", (d,))]
    if with_final:
        params += [("transformer.ln_f.weight", (d,)), ("transformer.ln_f.bias", (d,))]
    return ModelSpec("gpt2", tuple(params), heads)


def llama_spec(layers=2, d=12, inner=24, heads=6, kv=2, vocab=15, tied=False) -> ModelSpec:
    return llama_bench_spec(layers, d, heads, kv, inner, vocab, tied=tied)


def edges_of(g, name: str) -> list[tuple[int, int]]:
    a, b = g.edge_ranges[name]
    return [tuple(e) for e in g.edge_index[:, a:b].t().tolist()]


def assert_round_trip(g, n_states: int = 3) -> None:
    """states -> edge features -> to_vector is the identity for every state; constants sit where §2.4 says."""
    x = torch.randn(g.n_params, n_states, generator=torch.Generator().manual_seed(0))
    attr = g.edge_features(x).view(g.num_edges, g.feat_size, n_states)
    for s in range(n_states):
        assert torch.equal(g.to_vector(attr[:, :, s].contiguous()), x[:, s])
    assert torch.unique(g.param_slot).numel() == g.n_params
    assert (attr[g.virtual_edges, 0] == 1).all()
    assert (attr[-g.num_nodes:, 0] == 2).all()
    assert torch.equal(g.edge_index[:, -g.num_nodes:], torch.arange(g.num_nodes).expand(2, -1))
    assert (g.edge_type[-g.num_nodes:] == 13).all()
    assert set(g.edge_type[g.virtual_edges].tolist()) <= {10, 11}


# ----------------------------------------------------------------------------------------------- reference data
@pytest.mark.parametrize("case", list(FIXTURE_FAMILY))
def test_fixture_graph_exact(case):
    spec, meta, ref = load_fixture(case)
    g = build_graph(spec, with_lpe=False)
    assert g.pos is None
    assert g.num_nodes == meta["num_nodes"] and g.feat_size == meta["max_feat_size"]
    assert torch.equal(g.edge_index, torch.from_numpy(ref["edge_index"]))
    assert torch.equal(g.edge_type, torch.from_numpy(ref["edge_type"]))
    assert torch.equal(g.pos_w, torch.from_numpy(ref["pos_w"]))
    assert g.edge_ranges == {k: tuple(v) for k, v in meta["edge_ranges"].items()}
    scaled = scale_per_tensor(spec, torch.from_numpy(ref["states"]))
    # The per-tensor std's float32 reduction order follows torch's thread count (1 ulp apart with one thread or
    # after a test pinned threads); a value in the wrong slot would differ by orders of magnitude more.
    torch.testing.assert_close(g.edge_features(scaled), torch.from_numpy(ref["edge_attr"]), rtol=1e-6, atol=1e-7)
    assert_round_trip(g)


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_golden_graph_exact(case):
    spec, meta, ref = load_golden(case)
    g = build_graph(spec, with_lpe=False)
    assert (g.num_nodes, g.num_edges, g.feat_size) == (
        meta["graph"]["num_nodes"], meta["graph"]["num_edges"], meta["graph"]["max_feat_size"])
    assert torch.equal(g.edge_index, torch.from_numpy(ref["graph.edge_index"]))
    assert torch.equal(g.edge_type, torch.from_numpy(ref["graph.edge_type"]))
    assert torch.equal(g.pos_w, torch.from_numpy(ref["graph.pos_w"]))
    attr = g.edge_features(torch.from_numpy(ref["scaled_states"]))
    assert torch.equal(attr, torch.from_numpy(ref["graph.edge_attr_in"]))
    assert_round_trip(g)


def _reference_pos_cases():
    return [("fixture", c) for c in FIXTURE_FAMILY] + [("golden", c) for c in GOLDEN_CASES]


@pytest.mark.parametrize("kind,case", _reference_pos_cases())
def test_lpe_matches_reference_up_to_sign(kind, case):
    """Ours: exactly the 2nd..9th smallest eigenpairs. The reference's columns are eigenvectors too; where a
    column's eigenvalue is simple and the same on both sides, the vectors agree up to sign (§8 item 4).

    The reference (ARPACK 'SA', one Lanczos vector) can miss a copy of a repeated eigenvalue: for the Llama
    cases its column 7 holds the 10th eigenvalue (0.8123 / 0.8052) instead of the second copy of 0.7889."""
    spec, _, ref = load_fixture(case) if kind == "fixture" else load_golden(case)
    theirs = (ref["pos"] if kind == "fixture" else ref["graph.pos"]).astype(np.float64)
    g = build_graph(spec)
    lap = laplacian(g.edge_index, g.num_nodes).toarray()
    with single_threaded_blas():  # multi-threaded OpenBLAS crawls when the cores are busy
        spectrum = np.linalg.eigvalsh(lap)
    ours = g.pos.double().numpy()
    lam = np.einsum("ij,ij->j", ours, lap @ ours)
    np.testing.assert_allclose(lam, spectrum[1:9], atol=1e-6)
    lam_ref = np.einsum("ij,ij->j", theirs, lap @ theirs)
    assert np.abs(lap @ theirs - theirs * lam_ref).max() < 1e-5
    simple = [c for c in range(8) if np.sort(np.abs(spectrum - lam[c]))[1] > 1e-3]
    assert simple and np.abs(lam_ref[simple] - lam[simple]).max() < 1e-5
    if case == "fm16":
        assert simple == [0, 1, 2]  # §2.5: columns 3..7 span the degenerate eigenvalue 1
    for c in simple:
        diff = min(np.abs(ours[:, c] - theirs[:, c]).max(), np.abs(ours[:, c] + theirs[:, c]).max())
        assert diff < 1e-5, (c, diff)


def test_injected_pos_is_used_verbatim():
    spec, _, ref = load_fixture("fm16")
    pos = torch.from_numpy(ref["pos"])
    assert build_graph(spec, pos=pos).pos is pos
    assert torch.equal(build_graph(spec, pos=ref["pos"]).pos, pos)  # numpy is accepted too
    with pytest.raises(ValueError):
        build_graph(spec, pos=pos[:-1])


# ----------------------------------------------------------------------------------------------- Appendix A
def test_appendix_a1_small_convnet():
    spec = ModelSpec("generic", (("c1.weight", (3, 2, 3, 3)), ("c1.bias", (3,)), ("bn.weight", (3,)),
                                 ("bn.bias", (3,)), ("c2.weight", (2, 3, 2, 2)), ("fc.weight", (2, 2)),
                                 ("fc.bias", (2,))))
    g = build_graph(spec, with_lpe=False)
    assert spec.n_params == 93 and g.feat_size == 9 and g.num_nodes == 13 and g.num_edges == 40
    assert g.edge_ranges == {"c1.weight": (0, 6), "c1.bias": (6, 9), "bn.weight": (9, 12), "bn.bias": (12, 15),
                             "c2.weight": (15, 21), "fc.weight": (21, 25), "fc.bias": (25, 27)}
    assert edges_of(g, "c1.weight") == [(0, 5), (0, 6), (0, 7), (1, 5), (1, 6), (1, 7)]
    assert edges_of(g, "c1.bias") == [(2, 5), (2, 6), (2, 7)]
    assert edges_of(g, "bn.weight") == [(3, 5), (3, 6), (3, 7)]
    assert edges_of(g, "bn.bias") == [(4, 5), (4, 6), (4, 7)]
    assert edges_of(g, "c2.weight") == [(5, 8), (5, 9), (6, 8), (6, 9), (7, 8), (7, 9)]
    assert edges_of(g, "fc.weight") == [(8, 11), (8, 12), (9, 11), (9, 12)]
    assert edges_of(g, "fc.bias") == [(10, 11), (10, 12)]
    assert g.edge_type.tolist() == [3] * 6 + [2] * 3 + [4] * 3 + [2] * 3 + [3] * 6 + [1] * 4 + [2] * 2 + [13] * 13
    assert (g.pos_w == 0).all()

    x = torch.arange(1.0, 94.0)[:, None].repeat(1, 2)
    attr = g.edge_features(x).view(40, 9, 2)
    c1 = x[:54, 0].view(3, 2, 3, 3)
    assert torch.equal(attr[0, :, 0], c1[0, 0].flatten())  # edge 0 -> 5
    assert torch.equal(attr[1, :, 0], c1[1, 0].flatten())  # edge 0 -> 6
    c2 = x[63:87, 0].view(2, 3, 2, 2)
    assert torch.equal(attr[15, :4, 1], c2[0, 0].flatten()) and (attr[15:21, 4:] == 0).all()
    assert (attr[27:, 0] == 2).all() and (attr[27:, 1:] == 0).all()
    assert_round_trip(g)


def test_generic_higher_dim_weights_use_slots():
    """A 3-D weight has its trailing dim in slots; F_g is the largest trailing product (§2.4). Without a topology
    §2.2 would type it as a bias, so such a spec is refused; with one (what from_module traces) it is a conv."""
    params = (("a.weight", (4, 3, 5)), ("a.bias", (4,)), ("b.weight", (2, 4, 2, 3)), ("c.weight", (3, 2)))
    with pytest.raises(SpecError, match="a.weight: a 3-D weight"):
        build_graph(ModelSpec("generic", params), with_lpe=False)
    topo = Topology((("in", 3), ("a", 4), ("b", 2), ("c", 3)),
                    (Link("a.weight", "conv", 0, 1), Link("a.bias", "bias", -1, 1), Link("b.weight", "conv", 1, 2),
                     Link("c.weight", "fc", 2, 3)))
    spec = ModelSpec("generic", params, topology=topo)
    g = build_graph(spec, with_lpe=False)
    assert g.feat_size == 6
    assert [int(g.edge_type[g.edge_ranges[n][0]]) for n in spec.names] == [3, 2, 3, 1]
    x = torch.randn(spec.n_params, 2)
    attr = g.edge_features(x).view(g.num_edges, 6, 2)
    assert torch.equal(attr[1, :5, 0], x[:60, 0].view(4, 3, 5)[1, 0])  # edge 1: input 0 -> output 1
    assert (attr[:12, 5:] == 0).all()
    assert_round_trip(g)


def test_appendix_a2_gpt2():
    g = build_graph(gpt2_spec(), with_lpe=False)
    assert g.num_nodes == 136 and g.num_edges == 1264 and g.feat_size == 1
    assert g.pos_w.tolist() == [1, 2, 3, 4, 5] + [0] * 131
    h, a = "transformer.h.", "attn.c_attn."
    aux = {f"{h}0.ln_1.weight": 8, f"{h}0.ln_1.bias": 9, f"{h}0.{a}k.bias": 10, f"{h}0.{a}q.bias": 19,
           f"{h}0.{a}v.bias": 20, f"{h}0.attn.c_proj.bias": 33, f"{h}0.ln_2.weight": 34, f"{h}0.ln_2.bias": 35,
           f"{h}0.mlp.c_fc.bias": 42, f"{h}0.mlp.c_proj.bias": 67, f"{h}1.ln_1.weight": 68,
           f"{h}1.ln_1.bias": 69, f"{h}1.{a}k.bias": 70, f"{h}1.{a}q.bias": 79, f"{h}1.{a}v.bias": 80,
           f"{h}1.attn.c_proj.bias": 93, f"{h}1.ln_2.weight": 94, f"{h}1.ln_2.bias": 95,
           f"{h}1.mlp.c_fc.bias": 102, f"{h}1.mlp.c_proj.bias": 127, "transformer.ln_f.weight": 128,
           "transformer.ln_f.bias": 129}
    for name, node in aux.items():
        assert {s for s, _ in edges_of(g, name)} == {node}, name
    X = [range(11, 17), range(71, 77), range(130, 136)]
    assert edges_of(g, "transformer.wte.weight") == [(v, 11 + j) for v in range(5) for j in range(6)]
    assert edges_of(g, "transformer.wpe.weight") == [(5 + p, 11 + j) for p in range(3) for j in range(6)]
    assert edges_of(g, f"{h}0.{a}q.head0") == [(17, 21), (17, 22), (17, 23)]
    assert edges_of(g, f"{h}0.{a}v.head1") == [(18, 30), (18, 31), (18, 32)]
    assert edges_of(g, f"{h}0.{a}k.weight")[:4] == [(21, 11), (22, 11), (23, 11), (24, 11)]
    assert edges_of(g, f"{h}0.{a}v.res") == list(zip(range(11, 17), range(36, 42)))
    assert edges_of(g, f"{h}0.mlp.c_fc.res") == list(zip(range(36, 42), X[1]))
    assert {t for _, t in edges_of(g, f"{h}1.mlp.c_proj.weight")} == set(X[2])
    assert {s for s, _ in edges_of(g, f"{h}1.mlp.c_proj.weight")} == set(range(103, 127))
    assert {s for s, _ in edges_of(g, f"{h}1.attn.c_proj.weight")} == set(range(87, 93))
    types = {n: set(g.edge_type[a_:b_].tolist()) for n, (a_, b_) in g.edge_ranges.items()}
    assert types["transformer.wte.weight"] == {5} and types["transformer.wpe.weight"] == {6}
    assert [types[f"{h}0.{a}{p}.weight"] for p in "qkv"] == [{7}, {8}, {9}]
    assert types[f"{h}0.{a}q.head1"] == {11} and types[f"{h}0.{a}v.res"] == {10}
    assert types[f"{h}0.ln_1.weight"] == {4} and types[f"{h}0.ln_1.bias"] == {2}
    assert types[f"{h}0.mlp.c_fc.weight"] == {1}

    # fused c_attn: q/k/v read column slices of the (in, out) Conv1D weight and bias
    spec = gpt2_spec()
    cw = next(p for p in spec.layout if p.name == f"{h}0.attn.c_attn.weight")
    cb = next(p for p in spec.layout if p.name == f"{h}0.attn.c_attn.bias")
    x = torch.randn(spec.n_params, 1)
    attr = g.edge_features(x)[:, 0]
    W, bias = x[cw.start:cw.stop, 0].view(6, 18), x[cb.start:cb.stop, 0]
    for part, k in (("q", 0), ("k", 1), ("v", 2)):
        s, e = g.edge_ranges[f"{h}0.{a}{part}.weight"]
        assert torch.equal(attr[s:e], W[:, 6 * k:6 * k + 6].reshape(-1))  # e = i * d + j
        s, e = g.edge_ranges[f"{h}0.{a}{part}.bias"]
        assert torch.equal(attr[s:e], bias[6 * k:6 * k + 6])
    assert_round_trip(g)


def test_appendix_a3_llama_gqa():
    spec = llama_spec()
    g = build_graph(spec, with_lpe=False)
    assert g.num_nodes == 211 and g.num_edges == 3231
    assert g.pos_w.tolist() == list(range(1, 16)) + [0] * 196
    p0, p1 = "model.layers.0.", "model.layers.1."
    k = edges_of(g, p0 + "self_attn.k_proj.weight")
    assert k[:5] == [(33, 15), (34, 15), (35, 15), (36, 15), (33, 16)] and len(k) == 48
    assert {s for s, _ in k} == set(range(33, 37)) and {t for _, t in k} == set(range(15, 27))
    assert [e for h in range(2) for e in edges_of(g, f"{p0}self_attn.v_proj.head{h}")] == [
        (27, 45), (27, 46), (28, 47), (28, 48)]
    assert f"{p0}self_attn.v_proj.head2" not in g.edge_ranges
    o = edges_of(g, p0 + "self_attn.o_proj.weight")
    assert {s for s, _ in o} == set(range(37, 49)) and {t for _, t in o} == set(range(49, 61))
    up = edges_of(g, p0 + "mlp.up_proj.weight")
    assert {s for s, _ in up} == set(range(61, 73)) and {t for _, t in up} == set(range(73, 97))
    assert edges_of(g, p0 + "mlp.up_proj.res") == list(zip(range(61, 73), range(99, 111)))
    for name, node in ((p0 + "input_layernorm.weight", 97), (p0 + "post_attention_layernorm.weight", 98),
                       (p1 + "input_layernorm.weight", 181), ("model.norm.weight", 183)):
        assert edges_of(g, name) == [(node, t) for t in (range(99, 111) if p0 in name else range(184, 196))]
    assert {t for _, t in edges_of(g, "lm_head.weight")} == set(range(196, 211))
    assert edges_of(g, p1 + "self_attn.q_proj.head0") == [(111, 117), (111, 118)]

    # quirk 6: edge v*d + j of embed_tokens carries embed[e % V, e // V]; Linear weights are read (out, in)
    x = torch.randn(spec.n_params, 1)
    attr = g.edge_features(x)[:, 0]
    emb = x[:180, 0].view(15, 12)
    e = torch.arange(180)
    assert torch.equal(attr[:180], emb[e % 15, e // 15])
    q = next(p for p in spec.layout if p.name == p0 + "self_attn.q_proj.weight")
    s, _ = g.edge_ranges[p0 + "self_attn.q_proj.weight"]
    Wq = x[q.start:q.stop, 0].view(12, 12)
    assert attr[s + 2 * 12 + 5] == Wq[5, 2]  # edge X[2] -> Q[5]
    assert_round_trip(g)


def test_llama_tied_and_without_gqa():
    g = build_graph(llama_spec(layers=1, heads=4, kv=4, tied=True), with_lpe=False)
    # T(15) X0(12) heads(4) Q(12) V(12) M(12) U(12) Hid(24) aux(3) X1(12), no lm_head outputs
    assert g.num_nodes == 15 + 12 + 4 + 12 * 4 + 24 + 3 + 12
    o = edges_of(g, "model.layers.0.self_attn.o_proj.weight")
    assert {s for s, _ in o} == set(range(43, 55))  # exactly the value nodes when dkv = dq
    assert_round_trip(g)


# ----------------------------------------------------------------------------------------------- subgraphs
@pytest.mark.parametrize("spec", [gpt2_spec(layers=3), llama_spec(layers=3), llama_spec(layers=1)],
                         ids=["gpt2", "llama", "llama-1-block"])
def test_split_blocks_pieces(spec):
    pieces = split_blocks(spec)
    n_blocks = len({n.split(".")[2] for n in spec.names if n.split(".")[1] in ("h", "layers")})
    assert len(pieces) == n_blocks
    assert [p for piece in pieces for p in piece.params] == list(spec.params)  # consecutive slices
    assert sum(p.n_params for p in pieces) == spec.n_params
    for i, piece in enumerate(pieces):
        assert (piece.family, piece.num_heads, piece.num_key_value_heads) == (
            spec.family, spec.num_heads, spec.num_key_value_heads)
        g = build_graph(piece)
        assert g.pos.shape == (g.num_nodes, 8)
        assert (g.pos_w > 0).any() == (i == 0)
        assert_round_trip(g)


def test_gpt2_block_piece_layout():
    d, H, F = 6, 2, 24
    middle = split_blocks(gpt2_spec(layers=3))[1]
    g = build_graph(middle, with_lpe=False)
    p, a = "transformer.h.1.", "attn.c_attn."
    # aux [ln_1.w, ln_1.b, k.bias], X_1, heads, aux q/v bias, Q, V, aux x3, M, aux, Hid, aux c_proj.bias, X_2
    for name, node in ((p + "ln_1.weight", 0), (p + "ln_1.bias", 1), (p + a + "k.bias", 2),
                       (p + "mlp.c_proj.bias", 3 + d + H + 2 + 2 * d + 3 + d + 1 + F)):
        assert {s for s, _ in edges_of(g, name)} == {node}
    assert g.num_nodes == 3 + d + H + 2 + 2 * d + 3 + d + 1 + F + 1 + d
    assert {t for _, t in edges_of(g, p + "mlp.c_proj.weight")} == set(range(g.num_nodes - d, g.num_nodes))


def test_llama_block_piece_layout():
    pieces = split_blocks(llama_spec(layers=3))
    g = build_graph(pieces[1], with_lpe=False)
    # X_1(12) first, then heads(6); the aux block holds the two norms only
    assert edges_of(g, "model.layers.1.self_attn.q_proj.head0") == [(12, 18), (12, 19)]
    assert g.num_nodes == 12 + 6 + 12 + 4 + 12 + 12 + 24 + 2 + 12
    last = build_graph(pieces[2], with_lpe=False)
    assert {s for s, _ in edges_of(last, "model.norm.weight")} == {12 + 6 + 12 + 4 + 12 + 12 + 24 + 2}


def test_generic_is_one_piece():
    spec = ModelSpec("generic", (("a.weight", (3, 2)), ("a.bias", (3,))))
    assert split_blocks(spec) == [spec]


# ----------------------------------------------------------------------------------------------- LPE
def _check_lpe(edge_index: torch.Tensor, n: int, pos: torch.Tensor, n_valid: int = 8) -> np.ndarray:
    """Columns are unit eigenvectors of L, mutually orthogonal, ascending, sign rule holds; returns eigenvalues."""
    lap = laplacian(edge_index, n)
    v = pos[:, :n_valid].double().numpy()
    lam = np.einsum("ij,ij->j", v, lap @ v)
    assert np.abs(lap @ v - v * lam).max() < 2e-5
    np.testing.assert_allclose(v.T @ v, np.eye(n_valid), atol=2e-5)
    assert (np.diff(lam) > -1e-6).all()
    assert (pos[:, n_valid:] == 0).all()
    mag = pos.abs()
    for c in range(n_valid):
        first = int(torch.nonzero(mag[:, c] >= mag[:, c].max() * (1 - SIGN_TIE_RTOL))[0])
        assert pos[first, c] > 0
    return lam


def test_lpe_dense_valid_and_deterministic():
    spec, _, _ = load_fixture("fm16")
    g1, g2 = build_graph(spec), build_graph(spec)
    assert g1.pos.dtype == torch.float32 and g1.pos.shape == (95, 8)
    assert torch.equal(g1.pos, g2.pos)
    lam = _check_lpe(g1.edge_index, g1.num_nodes, g1.pos)
    np.testing.assert_allclose(lam[3:], 1.0, atol=1e-6)  # the degenerate eigenvalue of §2.5


def test_lpe_sparse_path_agrees_with_dense():
    """The shift-invert path (forced here) finds the same smallest eigenvalues as dense eigh, repeatably."""
    g = build_graph(gpt2_spec(layers=2, d=16, heads=4, vocab=300, positions=16, inner=64), with_lpe=False)
    dense = laplacian_pe(g.edge_index, g.num_nodes, dense_max_nodes=10**9)
    sparse = laplacian_pe(g.edge_index, g.num_nodes, dense_max_nodes=0)
    assert torch.equal(sparse, laplacian_pe(g.edge_index, g.num_nodes, dense_max_nodes=0))
    lam_d = _check_lpe(g.edge_index, g.num_nodes, dense)
    lam_s = _check_lpe(g.edge_index, g.num_nodes, sparse)
    np.testing.assert_allclose(lam_s, lam_d, atol=1e-6)
    for c in range(8):
        if np.sort(np.abs(lam_d - lam_d[c]))[1] > 1e-3:  # non-degenerate: same vector, same sign
            assert torch.allclose(sparse[:, c], dense[:, c], atol=1e-4)


@pytest.mark.parametrize("dense_max_nodes", [10**9, 0], ids=["dense", "sparse"])
def test_lpe_disconnected_graph(dense_max_nodes):
    # three components (a path of 40, a star of 30, a 20-cycle) and 5 isolated nodes
    path = [(i, i + 1) for i in range(39)]
    star = [(40, 40 + i) for i in range(1, 30)]
    cycle = [(70 + i, 70 + (i + 1) % 20) for i in range(20)]
    n = 95
    ei = torch.tensor(path + star + cycle + [(i, i) for i in range(n)]).t()
    pos = laplacian_pe(ei, n, dense_max_nodes=dense_max_nodes)
    lam = _check_lpe(ei, n, pos)
    np.testing.assert_allclose(lam[:2], 0.0, atol=1e-6)  # 3 components -> 2 zero eigenvalues after the first
    assert lam[2] > 1e-3


def test_lpe_restores_blas_threads():
    import scipy.sparse.linalg  # noqa: F401 - scipy's own OpenBLAS too
    from threadpoolctl import threadpool_info, threadpool_limits

    def blas_threads() -> list[int]:
        return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]

    with threadpool_limits(limits=2, user_api="blas"):  # more than one, so that pinning to one shows
        before = blas_threads()
        assert before and all(t == 2 for t in before), before
        with single_threaded_blas():
            assert all(t == 1 for t in blas_threads())
            with single_threaded_blas():  # nested / concurrent users: only the last one out restores
                pass
            assert all(t == 1 for t in blas_threads())
        assert blas_threads() == before


@pytest.mark.filterwarnings("ignore:.*torch.jit:DeprecationWarning")  # PyG's import, with this torch
def test_pyg_export_carries_the_graph_and_the_states(tmp_path, capsys):
    from ninocast.cli import main

    spec = ModelSpec("generic", (("0.weight", (16, 8)), ("0.bias", (16,)), ("2.weight", (4, 16)), ("2.bias", (4,))))
    g = build_graph(spec)
    states = torch.randn(spec.n_params, 5, generator=torch.Generator().manual_seed(0))
    d = g.to_pyg(states)
    assert d.validate(raise_on_error=True) and (d.num_nodes, d.num_edges) == (g.num_nodes, g.num_edges)
    for name in ("edge_index", "edge_type", "pos", "pos_w", "param_slot", "virtual_edges"):
        assert torch.equal(getattr(d, name), getattr(g, name)), name
    assert int(d.edge_index[0].eq(d.edge_index[1]).sum()) == g.num_nodes  # the self-loops
    assert torch.equal(d.edge_attr, g.edge_features(states))  # what the nowcaster reads (round trip: below)
    assert "pos" not in build_graph(spec, with_lpe=False).to_pyg() and "edge_attr" not in g.to_pyg()

    (tmp_path / "s.json").write_text(json.dumps(spec.to_json()))
    assert main(["graph", str(tmp_path / "s.json"), "--pyg", str(tmp_path / "g.pt")]) == 0
    saved = torch.load(tmp_path / "g.pt", weights_only=False)
    assert torch.equal(saved.edge_index, g.edge_index) and torch.equal(saved.pos, g.pos)
    assert main(["graph", str(tmp_path / "s.json"), "--pyg", str(tmp_path / "no" / "g.pt")]) == 2
    assert "--pyg" in capsys.readouterr().err


def test_lpe_small_graph_is_padded():
    g = build_graph(ModelSpec("generic", (("w", (3, 2)),)))
    assert g.num_nodes == 5 and g.pos.shape == (5, 8)
    _check_lpe(g.edge_index, 5, g.pos, n_valid=4)


# ----------------------------------------------------------------------------------------------- errors
def _without(spec: ModelSpec, name: str) -> ModelSpec:
    return ModelSpec(spec.family, tuple(p for p in spec.params if p[0] != name), spec.num_heads,
                     spec.num_key_value_heads)


@pytest.mark.parametrize("make,match", [
    (lambda: _without(gpt2_spec(), "transformer.h.1.mlp.c_fc.bias"), "missing mlp.c_fc.bias"),
    (lambda: _without(llama_spec(), "model.layers.0.mlp.up_proj.weight"), "missing mlp.up_proj.weight"),
    (lambda: ModelSpec("gpt2", gpt2_spec().params + (("lm_head.weight", (5, 6)),), 2), "lm_head.weight"),
    (lambda: ModelSpec("gpt2", tuple((n, (6, 30)) if n.endswith("0.mlp.c_proj.weight") else (n, s)
                                     for n, s in gpt2_spec().params), 2), "expected shape"),
    (lambda: ModelSpec("llama", llama_spec(layers=1).params + (("model.layers.0.mlp.gate_proj.bias", (24,)),),
                       6, 2), "gate_proj.bias"),
])
def test_unbuildable_specs_raise_spec_error(make, match):
    spec = make()
    with pytest.raises(SpecError, match=match):
        build_graph(spec, with_lpe=False)


def test_block_order_errors():
    p = llama_spec(layers=2).params
    swapped = ModelSpec("llama", p[:1] + p[1:3] + p[10:12] + p[3:10] + p[12:], 6, 2)  # block 1 inside block 0
    with pytest.raises(SpecError, match="not contiguous"):
        build_graph(swapped, with_lpe=False)


# ----------------------------------------------------------------------------------------------- speed
def test_large_graphs_are_vectorised():
    """A 50k-vocabulary GPT-2 structure (~0.8M edges) builds in well under a second; no per-edge Python."""
    spec = gpt2_spec(layers=1, d=16, heads=2, vocab=50257, positions=64, inner=64)
    t = time.perf_counter()
    g = build_graph(spec, with_lpe=False)
    assert time.perf_counter() - t < 3.0
    assert g.num_nodes == 50257 + 64 + 3 + 16 + 2 + 2 + 32 + 3 + 16 + 1 + 64 + 3 + 16
    x = torch.randn(spec.n_params, 1)
    assert torch.equal(g.to_vector(g.edge_features(x)), x[:, 0])


# ----------------------------------------------------------------------------------------------- block LPE
@pytest.mark.parametrize("spec", [gpt2_spec(layers=2, d=16, heads=4, vocab=300, positions=16, inner=64),
                                  llama_spec(layers=2, heads=4, kv=2, tied=False),
                                  ModelSpec("generic", (("a.weight", (40, 30)), ("a.bias", (40,)),
                                                        ("b.weight", (20, 40)), ("b.bias", (20,))))],
                         ids=["gpt2", "llama-gqa", "mlp"])
def test_block_adjacency_is_the_deduplicated_edge_list(spec):
    """Overlapping blocks (GPT-2 q and k weights join the same pairs) and residual pairs count once."""
    from scipy.sparse import coo_array

    from ninocast_server.engine.graphs.blocklap import BlockAdjacency
    from ninocast_server.engine.graphs.build import LAYOUTS
    from ninocast_server.engine.graphs.lpe import _undirected_pairs

    layout = LAYOUTS[spec.family](spec)
    g = build_graph(spec, with_lpe=False)
    adj = BlockAdjacency(layout.blocks, layout.num_nodes)
    lo, hi = _undirected_pairs(g.edge_index, g.num_nodes)
    n = g.num_nodes
    explicit = coo_array((np.ones(2 * lo.size), (np.concatenate([lo, hi]), np.concatenate([hi, lo]))), (n, n))
    assert adj.num_pairs == lo.size
    x = np.random.default_rng(1).standard_normal((n, 3))
    np.testing.assert_allclose(adj.matmat(x), explicit.tocsr() @ x, atol=1e-10)
    np.testing.assert_allclose(adj.matmat(np.eye(n)), explicit.toarray(), atol=0)
    np.testing.assert_array_equal(adj.dense(), explicit.toarray())
    np.testing.assert_array_equal(adj.degrees(), explicit.toarray().sum(axis=1))


def test_block_lpe_equals_edge_lpe():
    """Dense path: bit for bit; iterative path (forced): the same vectors within the solver's tolerance."""
    from ninocast_server.engine.graphs.build import LAYOUTS
    from ninocast_server.engine.graphs.lpe import laplacian_pe_blocks

    spec = gpt2_spec(layers=2, d=16, heads=4, vocab=300, positions=16, inner=64)
    layout = LAYOUTS["gpt2"](spec)
    g = build_graph(spec, with_lpe=False)
    for dense_max in (10**9, 0):
        edges = laplacian_pe(g.edge_index, g.num_nodes, dense_max_nodes=dense_max)
        blocks = laplacian_pe_blocks(layout.blocks, layout.num_nodes, dense_max_nodes=dense_max)
        if dense_max:
            assert torch.equal(blocks, edges)
            continue
        lam_e = _check_lpe(g.edge_index, g.num_nodes, edges)
        np.testing.assert_allclose(_check_lpe(g.edge_index, g.num_nodes, blocks), lam_e, atol=1e-8)
        simple = [c for c in range(8) if np.sort(np.abs(lam_e - lam_e[c]))[1] > 1e-3]
        assert len(simple) >= 4  # columns 6, 7 share an eigenvalue: any basis of their span is valid
        assert torch.allclose(blocks[:, simple], edges[:, simple], atol=1e-5)
    assert torch.equal(build_graph(spec).pos, laplacian_pe_blocks(layout.blocks, layout.num_nodes))


def test_block_lpe_of_a_45m_parameter_gpt2_needs_no_edge_arrays():
    """At ~39M parameters the old sparse LU of an edge-sized matrix ran out of memory; from the blocks, a 45M
    GPT-2 (76k nodes, 4.4e7 edges) is a fraction of a second and a few MB."""
    from ninocast_server.engine.graphs.build import LAYOUTS
    from ninocast_server.engine.graphs.lpe import laplacian_pe_blocks

    spec = gpt2_spec(layers=6, d=512, heads=8, vocab=50257, positions=1024, inner=2048)
    assert spec.n_params > 45_000_000
    layout = LAYOUTS["gpt2"](spec)
    pos = laplacian_pe_blocks(layout.blocks, layout.num_nodes).double().numpy()
    from ninocast_server.engine.graphs.blocklap import BlockAdjacency

    adj = BlockAdjacency(layout.blocks, layout.num_nodes)
    dinv = 1 / np.sqrt(adj.degrees())
    lap_pos = pos - dinv[:, None] * adj.matmat(dinv[:, None] * pos)
    lam = np.einsum("ij,ij->j", pos, lap_pos)
    assert np.abs(lap_pos - pos * lam).max() < 1e-5  # eigenvectors (float32 rounding)
    np.testing.assert_allclose(pos.T @ pos, np.eye(8), atol=1e-5)
    assert 0 < lam[0] and (np.diff(lam) > 0).all()

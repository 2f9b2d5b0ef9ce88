"""Traced neural graphs (ninocast.tracing -> spec topology -> engine/graphs/traced.py): every zoo model gets a
graph that agrees with its real data flow or a clear refusal at spec construction; traced MLP/ConvNet graphs are
the generic graphs edge for edge; the server refuses what the spec cannot describe at session creation."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from graph_zoo import ZOO, ResNet, check_dataflow
from ninocast.spec import ModelSpec, SpecError
from ninocast.topology import Link, Topology, chain_topology, is_plain_chain
from ninocast.tracing import example_input, trace_topology
from ninocast_server.engine.graphs import build_graph, check_spec_for
from ninocast_server.engine.graphs.generic import T_CONV, T_HEAD, T_KEY, T_QUERY, T_RES, T_TOKEN, T_VALUE
from server_utils import assert_error


def _build(name: str):
    torch.manual_seed(0)
    case = ZOO[name]
    model = case.build()
    example = case.example() if case.example else None
    return case, model, example


def same_graph(a, b) -> None:
    assert (a.num_nodes, a.feat_size) == (b.num_nodes, b.feat_size)
    for f in ("edge_index", "edge_type", "param_slot", "pos_w", "virtual_edges"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert a.edge_ranges == b.edge_ranges


# ----------------------------------------------------------------------------------------------- the zoo
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_graph_is_verified_or_refused(name):
    """At least 12 architectures; each gets a graph the data flow confirms, or a refusal naming the layer."""
    case, model, example = _build(name)
    if case.expect == "refused":
        with pytest.raises(SpecError, match=case.refusal) as err:
            ModelSpec.from_module(model, example_input=example, family=case.family)
        assert "leave_out=" in str(err.value)
        return
    spec = ModelSpec.from_module(model, example_input=example, family=case.family)
    graph = build_graph(spec, with_lpe=False)
    assert graph.n_params == spec.n_params == sum(p.numel() for p in model.parameters())
    if case.expect == "family":
        assert spec.family in ("gpt2", "llama") and spec.topology is None
        return
    if case.expect == "reference":  # the reference's layout is not the data flow (Llama quirks, §2.6.4)
        hand = ModelSpec.from_module(model, example_input=example)
        assert spec.topology is not None and hand.topology is None and hand.family != "generic"
        same_graph(graph, build_graph(hand, with_lpe=False))
        return
    assert spec.family == "generic"
    topo = trace_topology(model, example)
    assert (spec.topology is None) == (case.expect == "chain")
    assert check_dataflow(model, topo, example if example is not None else example_input(model)) == []
    again = ModelSpec.from_json(json.loads(json.dumps(spec.to_json())))
    assert again == spec and again.fingerprint() == spec.fingerprint()
    same_graph(build_graph(again, with_lpe=False), graph)


@pytest.mark.parametrize("name", ["mlp", "convnet"])
def test_traced_chains_are_the_generic_graph(name):
    """MLP/ConvNet: the spec is today's (no topology, same JSON) and the traced layout is the generic one."""
    _, model, example = _build(name)
    spec = ModelSpec.from_module(model, example_input=example)
    legacy = ModelSpec("generic", tuple((n, tuple(p.shape)) for n, p in model.named_parameters()))
    assert spec.to_json() == legacy.to_json()
    traced = ModelSpec("generic", legacy.params, topology=trace_topology(model, example))
    assert is_plain_chain(traced.topology, legacy.params)  # same links and group sizes (names are for display)
    same_graph(build_graph(traced, with_lpe=False), build_graph(legacy, with_lpe=False))


def test_oracle_catches_a_chain_graph_of_a_resnet():
    """An identity-skip ResNet has chain-compatible shapes: the old generic graph (no residual edges) is what a
    hand-written spec would get; the oracle sees the missing skips, the traced topology has them."""
    torch.manual_seed(0)
    model, x = ResNet(widths=(8, 8, 8)), torch.randn(2, 3, 8, 8)
    params = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    problems = check_dataflow(model, chain_topology(params), x)
    assert any("the graph does not" in p for p in problems), problems
    topo = trace_topology(model, x)
    assert check_dataflow(model, topo, x) == []
    assert sum(lk.role == "res" for lk in topo.links) == 2
    wrong = Topology(topo.groups, tuple(Link(None, "res", 0 if lk.src == 1 else lk.src, lk.dst) if lk.role == "res"
                                        else lk for lk in topo.links))
    assert check_dataflow(model, wrong, x) != []


def test_attention_edges_and_types():
    _, model, _ = _build("bert")
    spec = ModelSpec.from_module(model)
    g = build_graph(spec, with_lpe=False)
    types = set(g.edge_type.tolist())
    assert {T_QUERY, T_KEY, T_VALUE, T_HEAD, T_RES, T_TOKEN} <= types
    vocab = model.config.vocab_size
    assert sorted(g.pos_w[g.pos_w > 0].tolist()) == list(range(1, vocab + 1))
    q0, q1 = g.edge_ranges["encoder.layer.0.attention.self.query.weight"]
    k0, k1 = g.edge_ranges["encoder.layer.0.attention.self.key.weight"]
    q_dst = set(g.edge_index[1, q0:q1].tolist())
    assert set(g.edge_index[0, k0:k1].tolist()) == q_dst  # keys run backwards from the query neurons (§2.6.1)
    assert set(g.edge_index[1, k0:k1].tolist()) == set(g.edge_index[0, q0:q1].tolist())


def test_multihead_attention_fused_in_proj_is_split():
    _, model, example = _build("transformer-encoder")
    spec = ModelSpec.from_module(model, example_input=example)
    g = build_graph(spec, with_lpe=False)
    d = 16  # the slices are named like the reference's fused GPT-2 parts (c_attn.q.weight...)
    parts = [g.edge_ranges[f"layers.0.self_attn.in_proj.{part}.weight"] for part in "qkv"]
    assert [int(g.edge_type[a]) for a, _ in parts] == [T_QUERY, T_KEY, T_VALUE]
    assert all(b - a == d * d for a, b in parts)
    x = torch.randn(spec.n_params, 1)
    back = g.to_vector(g.edge_features(x).view(g.num_edges, g.feat_size))
    assert torch.equal(back, x[:, 0])  # every entry of the fused tensor lands on exactly one edge


def test_conv1d_weights_are_convolutions_with_kernel_slots():
    _, model, example = _build("conv1d")
    spec = ModelSpec.from_module(model, example_input=example)
    g = build_graph(spec, with_lpe=False)
    a, b = g.edge_ranges["body.0.weight"]
    assert g.feat_size == 3 and set(g.edge_type[a:b].tolist()) == {T_CONV}
    x = torch.randn(spec.n_params, 2)
    attr = g.edge_features(x).view(g.num_edges, 3, 2)
    w = x[:36, 0].view(6, 2, 3)
    assert torch.equal(attr[a + 1, :, 0], w[1, 0])  # edge 1: input channel 0 -> output channel 1


# ----------------------------------------------------------------------------------------------- refusals
class Tied(nn.Module):
    def __init__(self, head_first: bool = False) -> None:
        super().__init__()
        self.emb, self.out = nn.Embedding(12, 6), nn.Linear(6, 12, bias=False)
        self.out.weight = self.emb.weight
        self.head_first = head_first

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.head_first:  # the same weight read as a layer, then as an embedding: two roles
            return self.emb(self.out(torch.randn(2, 6)).argmax(-1))
        return self.out(self.emb(ids))


class Flattens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 4, 3), nn.Linear(4 * 6 * 6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).flatten(1))


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.fc(x)))


class CrossAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.b(x)
        return self.attn(self.a(x), k, k)[0]


class CopiesIntoABuffer(nn.Module):
    """An op that writes into another tensor: tracing must not push its probe through it (it would write into
    the model's buffer)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.c = nn.Linear(3, 4), nn.Linear(4, 2)
        self.register_buffer("last", torch.zeros(2, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        self.last.copy_(y.detach())
        return self.c(y)


def test_tracing_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = CopiesIntoABuffer().train()
    x = torch.randn(2, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ModelSpec.from_module(model, example_input=x)
    assert model.training
    expected = model.a(x).detach()
    assert torch.equal(model.last, expected)  # the real value (not a probe of neuron ids) was copied
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if k != "last")


class Overwrites(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        y[:, 0] = self.b(x)[:, 0]
        return self.c(y)


@pytest.mark.parametrize("model, x, words", [
    (Overwrites(), torch.randn(2, 3), "c reads a value the graph cannot describe: __setitem__"),
    (Flattens(), torch.randn(2, 1, 8, 8), "fc reads a value the graph cannot describe: flatten mixes"),
    (Shared(), torch.randn(2, 5), "parameter fc.weight is used twice (fc and fc)"),
    (Tied(head_first=True), torch.arange(4)[None], "emb.weight is used twice"),
    (nn.Sequential(nn.Conv2d(4, 4, 3, groups=4)), torch.randn(1, 4, 5, 5), "grouped convolution"),
    (nn.Sequential(nn.ConvTranspose2d(2, 3, 3)), torch.randn(1, 2, 5, 5), "transposed convolution"),
    (CrossAttention(), torch.randn(2, 3, 4), "attn is cross-attention"),
    (Flattens(), None, "on a guessed example input [[2, 1, 32, 32]] failed"),
])
def test_refusals_name_the_layer(model, x, words):
    with pytest.raises(SpecError) as err:
        ModelSpec.from_module(model, example_input=x)
    assert words in str(err.value)


class Unused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used, self.extra = nn.Linear(3, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.used(x))


def test_unused_parameters_are_refused():
    model = Unused()
    with pytest.raises(SpecError, match=r"extra.weight.*not used by the forward pass"):
        ModelSpec.from_module(model)
    spec = ModelSpec.from_module(model, leave_out=["extra"])
    assert spec.names == ["used.weight", "used.bias"] and spec.topology is not None
    assert [n for n, _ in spec.topology.left_out] == ["extra.weight", "extra.bias"]


def test_leave_out_must_match_something():
    with pytest.raises(SpecError, match="leave_out 'nope' matches no parameter"):
        ModelSpec.from_module(Unused(), leave_out=["nope"])


def test_tied_output_layer_is_placed_once_as_the_embedding():
    spec = ModelSpec.from_module(Tied(), example_input=torch.arange(5)[None])
    assert spec.names == ["emb.weight"]
    assert [(lk.param, lk.role) for lk in spec.topology.links] == [("emb.weight", "token")]


@pytest.mark.parametrize("name, leave_out, kept_from", [("lstm", ["rnn"], "head"),
                                                        ("resnet-7x7-stem", ["conv1"], "bn1")])
def test_leave_out_what_was_refused(name, leave_out, kept_from):
    """The refusal's advice works: a spec without those tensors, the layers after them read new input nodes."""
    _, model, example = _build(name)
    spec = ModelSpec.from_module(model, example_input=example, leave_out=leave_out)
    assert not any(n.startswith(leave_out[0] + ".") for n in spec.names) and kept_from + ".weight" in spec.names
    left = [n for n, _ in spec.topology.left_out]
    assert left and all(n.startswith(leave_out[0] + ".") for n in left)
    build_graph(spec, with_lpe=False)
    assert check_dataflow(model, trace_topology(model, example, leave_out), example) == []


# ----------------------------------------------------------------------------------------------- spec checks
GENERIC_BAD = [
    ([["a.weight", [4, 3]], ["b.weight", [2, 5]]], "b.weight: 5 inputs, but a.weight has 4 outputs"),
    ([["a.weight", [4, 3]], ["a.bias", [3]]], "a.bias: 3 entries, but a.weight has 4 outputs"),
    ([["a.bias", [3]], ["a.weight", [4, 3]]], "a.bias: a 1-D tensor before any weight"),
    ([["a.weight", [4, 3, 5]]], "a 3-D weight"),
]


@pytest.mark.parametrize("params, message", GENERIC_BAD)
def test_generic_specs_without_topology_must_be_chains(params, message):
    """Such a spec is fine for nowcasters that read no graph (linefit), never built into a wrong graph."""
    spec = ModelSpec.from_json({"family": "generic", "params": params})
    for check in (lambda: build_graph(spec, with_lpe=False), lambda: check_spec_for(spec, _NeedsGraph())):
        with pytest.raises(SpecError, match=message):
            check()
    check_spec_for(spec, object())  # a nowcaster without a graph


class _NeedsGraph:
    needs_graph = True


def test_kernels_the_nowcaster_cannot_read_are_refused_before_any_nowcast():
    spec = ModelSpec.from_json({"family": "generic", "params": [["stem.weight", [8, 3, 7, 7]], ["fc.weight", [2, 8]]]})
    build_graph(spec, with_lpe=False)  # the graph itself exists (WNN+ reads it)
    from ninocast_server.engine.nowcasters.checkpoint import BUNDLED_DIR, load_nowcaster

    with pytest.raises(SpecError, match="stem.weight: a 7x7 kernel has 49 values per edge; this nowcaster reads "
                                        "at most 9"):
        check_spec_for(spec, load_nowcaster(str(BUNDLED_DIR / "ninocast-nino")))


def _resnet_spec() -> dict:
    torch.manual_seed(0)
    return ModelSpec.from_module(ResNet(), example_input=torch.randn(2, 3, 8, 8)).to_json()


def _tamper(obj: dict, edit) -> dict:
    obj = json.loads(json.dumps(obj))
    edit(obj["topology"])
    return obj


TAMPERED = [
    (lambda t: t.update(version=2), "version must be 1"),
    (lambda t: t["links"][0].__setitem__(1, "conv5"), "unknown role"),
    (lambda t: t["links"][0].__setitem__(3, 99), "not a group index"),
    (lambda t: t["links"].pop(0), "conv1.weight: no topology link"),
    (lambda t: t["links"].append(t["links"][0]), "conv1.weight: topology links place its rows twice"),
    (lambda t: t["groups"][1].__setitem__(1, 9), "do not connect group"),
    (lambda t: t["links"].append([None, "res", 1, 0]), "do not fit the groups"),
    (lambda t: t.update(extra=1), "unknown keys"),
    (lambda t: t["groups"].append(["huge", 10 ** 12]), "neurons for"),
    (lambda t: t["links"].extend([[None, "head", 1, 3]] * 80), "virtual edges for"),
]


@pytest.mark.parametrize("edit, message", TAMPERED)
def test_tampered_topologies_are_refused(edit, message):
    with pytest.raises(SpecError, match=message):
        ModelSpec.from_json(_tamper(_resnet_spec(), edit))


def test_topology_only_with_the_generic_family():
    obj = _resnet_spec()
    obj["family"] = "llama"
    with pytest.raises(SpecError, match="topology is for family generic"):
        ModelSpec.from_json(obj)


def test_server_refuses_untraceable_specs_at_session_creation(server, api_keys):
    good = _resnet_spec()
    legacy = {"family": "generic", "params": good["params"]}  # the ResNet without its topology: not a chain
    stem7 = {"family": "generic", "params": [["stem.weight", [8, 3, 7, 7]], ["fc.weight", [2, 8]]]}
    nino = {"nowcaster": "ninocast-nino"}
    with server.client(api_keys["alice"]) as c:
        assert_error(c.post("/v1/sessions", json={"spec": legacy, **nino}), 422, "invalid_spec",
                     "layer1.1.downsample.0.weight: 8 inputs")
        assert_error(c.post("/v1/sessions", json={"spec": stem7, **nino}), 422, "invalid_spec", "7x7 kernel")
        r = c.post("/v1/sessions", json={"spec": legacy, "nowcaster": "linefit"})  # reads no graph
        assert r.status_code == 201, r.text
        c.delete(f"/v1/sessions/{r.json()['id']}")
        assert_error(c.post("/v1/sessions", json={"spec": _tamper(good, TAMPERED[3][0])}), 422, "invalid_spec",
                     "no topology link")
        r = c.post("/v1/sessions", json={"spec": good, "nowcaster": "ninocast-nino"})
        assert r.status_code == 201, r.text
        c.delete(f"/v1/sessions/{r.json()['id']}")


# ----------------------------------------------------------------------------------------------- use
@pytest.mark.parametrize("name", ["resnet", "transformer-encoder"])
def test_nino_nowcasts_through_a_traced_graph(name):
    """The bundled graph nowcaster runs on traced graphs (kernels <= 3x3, LPE, attention edge types)."""
    from ninocast_server.engine import nowcast
    from ninocast_server.engine.nowcasters.checkpoint import BUNDLED_DIR, load_nowcaster

    _, model, example = _build(name)
    spec = ModelSpec.from_module(model, example_input=example)
    nino = load_nowcaster(str(BUNDLED_DIR / "ninocast-nino"))
    w = torch.cat([p.detach().flatten() for p in model.parameters()])
    states = torch.stack([w * (1 + 0.01 * i) for i in range(nino.ctx)], 1)
    out = nowcast(nino, spec, states, 5)
    assert out.shape == (spec.n_params,) and torch.isfinite(out).all() and not torch.equal(out, w)


def test_graph_command_summary_and_refusal(tmp_path, capsys):
    from ninocast.cli import main

    assert main(["graph", "graph_zoo:ResNet", "--input", "2,3,8,8", "--spec-out", str(tmp_path / "s.json")]) == 0
    text = capsys.readouterr().out
    assert "traced topology v1" in text and "res from conv1" in text and "left out: nothing" in text
    spec = ModelSpec.load(str(tmp_path / "s.json"))
    g = build_graph(spec, with_lpe=False)
    assert f"{g.num_nodes} nodes, {g.num_edges:,} edges" in text
    assert main(["graph", str(tmp_path / "s.json"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["nodes"] == g.num_nodes
    assert main(["graph", "graph_zoo:LSTMClassifier", "--input", "2,4,3"]) == 2
    assert "rnn (LSTM) is a recurrent layer" in capsys.readouterr().err
    assert main(["graph", "graph_zoo:LSTMClassifier", "--input", "2,4,3", "--leave-out", "rnn"]) == 0
    assert "rnn.weight_hh_l0: leave_out 'rnn'" in capsys.readouterr().out


def test_auto_family_with_a_topology_is_generic():
    """Qwen2 names look like Llama's; a spec that carries its traced topology is generic whatever the names."""
    _, model, _ = _build("qwen2-gqa")
    obj = ModelSpec.from_module(model).to_json()
    obj["family"] = "auto"
    assert ModelSpec.from_json(obj).family == "generic"

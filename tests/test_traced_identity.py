"""Graphs built from a *traced* topology are the hand-written ones: for the golden cases' models (MLP, ConvNet,
GPT-2, Llama, built locally to the golden spec JSONs) and for other sizes, ``from_module(graph="traced")`` sends
the topology and the server's traced builder gives the same nodes, edge_index, edge_type, per-state edge
features, pos_w and LPE as the hand-written layouts (compared exactly)."""

import json

import pytest
import torch
import transformers as tf
from torch import nn

from graph_zoo import ResNet
from ninocast.spec import ModelSpec
from ninocast.topology import Topology, TopologyError, check_topology
from ninocast_server.engine.graphs import build_graph
from ninocast_server.engine.graphs.stream import build_streamed, layout_edges
from server_utils import assert_error
from shared_data import CHECKPOINTS, golden, need


def gpt2(d: int = 16, layers: int = 2, heads: int = 2, vocab: int = 50, positions: int = 8) -> nn.Module:
    return tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=d, n_layer=layers, n_head=heads, vocab_size=vocab,
                                            n_positions=positions))


def llama(d: int = 16, inner: int = 32, layers: int = 2, heads: int = 4, kv: int = 2, vocab: int = 50,
          tied: bool = False) -> nn.Module:
    return tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=d, intermediate_size=inner, num_hidden_layers=layers,
                                              num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                                              tie_word_embeddings=tied))


def golden_model(case: str) -> tuple[nn.Module, torch.Tensor | None]:
    """The model each golden case was made from (its JSON's ``model`` line), with fresh weights."""
    torch.manual_seed(0)
    if case == "mlp":
        return nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 5)), None
    if case == "cnn":
        from ninocast_server.tasks.vision import Net

        return Net((4, 6, 6), in_channels=1, num_classes=10), torch.randn(2, 1, 12, 12)
    return (gpt2() if case == "gpt2" else llama()), None


def assert_same_graph(traced: ModelSpec, hand: ModelSpec, states: torch.Tensor | None = None, prefix: str = "") \
        -> None:
    """Every array of the two graphs equal, LPE included (each computed from its own layout); ``prefix``: the
    wrapper's name prefix, which the hand-written layouts strip from their edge-block names."""
    a, b = build_graph(traced), build_graph(hand)
    assert (a.num_nodes, a.feat_size, a.num_edges) == (b.num_nodes, b.feat_size, b.num_edges)
    for f in ("edge_index", "edge_type", "pos_w", "param_slot", "virtual_edges", "pos"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert list(a.edge_ranges.items()) == [(prefix + n, r) for n, r in b.edge_ranges.items()]
    states = torch.randn(hand.n_params, 3) if states is None else states
    assert torch.equal(a.edge_features(states), b.edge_features(states))


@pytest.mark.parametrize("case", ["mlp", "cnn", "gpt2", "llama"])
def test_traced_golden_models_give_the_hand_written_graphs(case):
    meta, arrays = golden(case)
    hand = ModelSpec.from_json(meta["spec"])
    model, example = golden_model(case)
    traced = ModelSpec.from_module(model, example_input=example, graph="traced")
    assert traced.family == "generic" and traced.topology is not None and traced.params == hand.params
    again = ModelSpec.from_json(json.loads(json.dumps(traced.to_json())))  # what the server receives
    assert again == traced
    assert_same_graph(again, hand, torch.from_numpy(arrays["scaled_states"]))
    g = build_graph(again, pos=torch.from_numpy(arrays["graph.pos"]))
    assert torch.equal(g.edge_index, torch.from_numpy(arrays["graph.edge_index"]))
    assert torch.equal(g.edge_features(torch.from_numpy(arrays["scaled_states"])),
                       torch.from_numpy(arrays["graph.edge_attr_in"]))


@pytest.mark.parametrize("build", [
    lambda: gpt2(d=8, layers=1, heads=1, vocab=7, positions=4),
    lambda: gpt2(d=24, layers=3, heads=3, vocab=31, positions=16),
    lambda: llama(d=12, inner=24, layers=2, heads=6, kv=2, vocab=15),  # the spec's Appendix A.3 shape
    lambda: llama(d=8, inner=16, layers=3, heads=2, kv=2, vocab=11),  # no grouped-query attention
    lambda: llama(d=16, inner=20, layers=1, heads=4, kv=1, vocab=9, tied=True),  # tied lm_head: absent
], ids=["gpt2-8x1", "gpt2-24x3", "llama-gqa-6-2", "llama-mha", "llama-tied-kv1"])
def test_traced_transformers_of_other_sizes_give_the_hand_written_graphs(build):
    torch.manual_seed(1)
    model = build()
    hand = ModelSpec.from_module(model)
    traced = ModelSpec.from_module(model, graph="traced")
    assert hand.family in ("gpt2", "llama") and traced.params == hand.params
    assert_same_graph(traced, hand)


def test_traced_gpt2_inside_a_wrapper_keeps_its_layout():
    """A LightningModule-style wrapper (``self.model``): the names carry the prefix, the graph is the same."""
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = gpt2(d=8, layers=2, heads=2, vocab=11)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.model(input_ids=input_ids).logits

    w = Wrapper()
    traced = ModelSpec.from_module(w, example_input=torch.randint(0, 11, (1, 6)), graph="traced")
    hand = ModelSpec.from_module(w)
    assert traced.params == hand.params and hand.family == "gpt2"
    assert_same_graph(traced, hand, prefix="model.")


def test_transposed_and_reference_options_are_checked():
    """The link options the transformer layouts need are validated like the rest of a topology."""
    model = gpt2(d=8, layers=1, heads=2, vocab=7, positions=4)
    spec = ModelSpec.from_module(model, graph="traced")
    obj = spec.topology.to_json()
    c_attn = next(i for i, lk in enumerate(obj["links"]) if lk[0] and lk[0].endswith("c_attn.weight"))
    assert obj["links"][c_attn][7] == {"name": "transformer.h.0.attn.c_attn.q.weight", "stored": "in_out"}
    for options, words in (({"stored": "sideways"}, "stored must be"), ({"colour": 1}, "unknown options"),
                           ({"at": -3}, "non-negative"), ({"name": ""}, "non-empty")):
        bad = json.loads(json.dumps(obj))
        bad["links"][c_attn][7] = options
        with pytest.raises(TopologyError, match=words):
            Topology.from_json(bad)
    bad = json.loads(json.dumps(obj))
    del bad["links"][c_attn][7]["stored"]  # read as (out, in): 24 x 8 does not fit 8 -> 8
    with pytest.raises(TopologyError, match="do not connect"):
        check_topology(Topology.from_json(bad), spec.params)
    bad = json.loads(json.dumps(obj))
    bad["links"][c_attn + 2][7] = {"name": "transformer.h.0.attn.c_attn.q.weight"}  # q.bias named as q.weight
    with pytest.raises(TopologyError, match="second edge block named"):
        check_topology(Topology.from_json(bad), spec.params)


def test_streamed_graph_of_a_traced_spec_is_its_graph():
    """Large graphs are streamed (node-sized memory); a spec with a topology streams its traced layout."""
    model = ResNet()
    spec = ModelSpec.from_module(model, example_input=torch.randn(2, 3, 8, 8))
    assert spec.topology is not None
    g, s = build_graph(spec), build_streamed(spec)
    assert layout_edges(spec) == g.num_edges
    assert s.num_nodes == g.num_nodes and torch.equal(s.pos, g.pos)
    assert torch.equal(s.materialise().edge_index, g.edge_index)


@pytest.mark.parametrize("case", ["gpt2", "llama"])
def test_nino_nowcasts_through_traced_graphs_are_the_hand_written_ones(case):
    """Same graph, same nowcast: the official checkpoint on the golden states, bit for bit (LPE injected as
    test_golden does, so the reference's numbers apply too)."""
    from ninocast_server.engine import nowcast
    from ninocast_server.engine.graphs import GraphCache
    from ninocast_server.engine.nowcasters.checkpoint import load_nowcaster

    meta, arrays = golden(case)
    hand = ModelSpec.from_json(meta["spec"])
    traced = ModelSpec.from_module(golden_model(case)[0], graph="traced")
    nino = load_nowcaster(str(need(CHECKPOINTS / "nino_no_posw.pt")))
    states = torch.from_numpy(arrays["states"])
    pos = torch.from_numpy(arrays["graph.pos"])
    outs = []
    for spec in (hand, traced):
        cache = GraphCache()
        cache.put(spec, build_graph(spec, pos=pos), with_lpe=True)
        outs.append(nowcast(nino, spec, states, 7, graph_cache=cache))
    assert torch.equal(outs[0], outs[1])
    assert float((outs[1] - torch.from_numpy(arrays["nino_no_posw.k7"])).abs().max()) < 2e-5


def test_bench_speedup_traced_graph_runs_equal_the_hand_written(tmp_path):
    """``--graph both``: NAME and NAME@traced train identically (digits-cnn, official NiNo, a short budget)."""
    from ninocast.cli import main

    need(CHECKPOINTS / "nino_no_posw.pt")
    out = tmp_path / "bench"
    assert main(["bench", "speedup", "--task", "digits-cnn", "--nowcasters", "nino", "--seeds", "1000",
                 "--max-steps", "300", "--no-early-stop", "--graph", "both", "--no-progress", "--out", str(out)]) == 0
    runs = {r["method"]: r for r in map(json.loads, (out / "runs.jsonl").read_text().splitlines())}
    assert set(runs) == {"adamw", "nino", "nino@traced"}
    hand, traced = runs["nino"], runs["nino@traced"]
    assert (hand["graph"], traced["graph"]) == ("auto", "traced") and hand["n_nowcasts"] >= 2
    assert traced["curve"] == hand["curve"] and traced["nowcast_steps"] == hand["nowcast_steps"]
    assert traced["curve"] != runs["adamw"]["curve"]


def test_server_takes_traced_transformer_specs_and_checks_their_options(server, api_keys):
    """The topology travels in the spec JSON: a traced GPT-2 opens a NiNo session; a bad link option is a 422."""
    spec = ModelSpec.from_module(gpt2(d=8, layers=1, heads=2, vocab=7, positions=4), graph="traced").to_json()
    bad = json.loads(json.dumps(spec))
    next(lk for lk in bad["topology"]["links"] if len(lk) == 8 and "stored" in lk[7])[7]["stored"] = "sideways"
    with server.client(api_keys["alice"]) as c:
        r = c.post("/v1/sessions", json={"spec": spec, "nowcaster": "ninocast-nino"})
        assert r.status_code == 201, r.text
        c.delete(f"/v1/sessions/{r.json()['id']}")
        assert_error(c.post("/v1/sessions", json={"spec": bad, "nowcaster": "ninocast-nino"}), 422, "invalid_spec",
                     "stored must be 'in_out' or 'out_in'")


def test_graph_command_traces_gpt2_on_request(tmp_path, capsys, monkeypatch):
    """``ninocast graph --traced`` shows (and writes) the traced spec of a GPT-2; without it, the family's."""
    from ninocast.cli import main

    (tmp_path / "small_gpt2.py").write_text("import transformers as tf\n\ndef build():\n    return tf.GPT2LMHeadModel("
                                            "tf.GPT2Config(n_embd=8, n_layer=1, n_head=2, vocab_size=11, "
                                            "n_positions=8))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["graph", "small_gpt2:build", "--json"]) == 0
    hand = json.loads(capsys.readouterr().out)
    assert main(["graph", "small_gpt2:build", "--traced", "--json", "--spec-out", str(tmp_path / "s.json")]) == 0
    traced = json.loads(capsys.readouterr().out)
    assert hand["family"] == "gpt2" and traced["family"] == "generic" and "traced" in traced["graph"]
    assert (traced["nodes"], traced["edges"]) == (hand["nodes"], hand["edges"])
    assert ModelSpec.load(str(tmp_path / "s.json")).topology is not None

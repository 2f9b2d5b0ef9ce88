"""ModelSpec: JSON round trip, detection from modules and names, and every validation error."""

import json

import pytest
import torch
from torch import nn

from ninocast.spec import ModelSpec, SpecError, detect_family

MLP = {"family": "generic", "params": [["0.weight", [16, 20]], ["0.bias", [16]], ["2.weight", [5, 16]]]}


def test_json_round_trip_and_layout():
    spec = ModelSpec.from_json(json.dumps(MLP))
    assert spec.to_json() == MLP
    assert spec.n_params == 16 * 20 + 16 + 5 * 16
    assert [(p.start, p.stop) for p in spec.layout] == [(0, 320), (320, 336), (336, 416)]
    assert ModelSpec.from_json(spec.to_json()).fingerprint() == spec.fingerprint()
    other = dict(MLP, params=MLP["params"][:2])
    assert ModelSpec.from_json(other).fingerprint() != spec.fingerprint()


def test_from_module_generic_with_tied_weights_once():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "mid": nn.Linear(4, 4), "head": head})
    spec = ModelSpec.from_module(model)
    assert spec.family == "generic"
    assert spec.names == ["emb.weight", "mid.weight", "mid.bias"]


def test_from_hf_configs():
    import transformers

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=8, n_layer=1, n_head=2, vocab_size=11,
                                                                n_positions=4))
    spec = ModelSpec.from_module(gpt2)
    assert (spec.family, spec.num_heads) == ("gpt2", 2)
    assert "lm_head.weight" not in spec.names  # tied to wte: once
    cfg = transformers.LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=11)
    spec = ModelSpec.from_module(transformers.LlamaForCausalLM(cfg))
    assert (spec.family, spec.num_heads, spec.num_key_value_heads) == ("llama", 4, 2)


def test_auto_family_from_names():
    gpt = {"family": "auto", "num_heads": 2, "params": [["transformer.h.0.attn.c_attn.weight", [4, 12]]]}
    assert ModelSpec.from_json(gpt).family == "gpt2"
    llama = {"family": "auto", "num_heads": 2,
             "params": [["model.layers.0.self_attn.q_proj.weight", [4, 4]]]}
    assert ModelSpec.from_json(llama).family == "llama"
    assert ModelSpec.from_json(dict(MLP, family="auto")).family == "generic"
    assert detect_family(["encoder.weight"]) == "generic"


@pytest.mark.parametrize("bad, message", [
    ({"family": "resnet", "params": MLP["params"]}, "unknown family"),
    ({"family": "generic", "params": []}, "empty"),
    ({"family": "generic", "params": [["a", []]]}, "scalar"),
    ({"family": "generic", "params": [["a", [3]], ["a", [3]]]}, "duplicate"),
    ({"family": "generic", "params": [["a", [3, 0]]]}, "positive"),
    ({"family": "generic", "params": [["a", "3x3"]]}, "shape must be a list"),
    ({"family": "generic", "params": [[3, [3]]]}, "name must be a string"),
    ({"family": "generic", "params": [["a"]]}, "pair"),
    ({"family": "generic", "params": "nope"}, "must be a list"),
    ({"family": "generic", "params": MLP["params"], "heads": 2}, "unknown keys"),
    ({"family": "gpt2", "params": [["transformer.h.0.attn.c_attn.weight", [4, 12]]]}, "needs num_heads"),
    ({"family": "gpt2", "num_heads": 3, "params": [["transformer.h.0.attn.c_attn.weight", [4, 12]]]},
     "not divisible"),
    ({"family": "gpt2", "num_heads": 2, "params": [["x.weight", [4, 12]]]}, "c_attn"),
    ({"family": "llama", "params": [["model.layers.0.self_attn.q_proj.weight", [4, 4]]]}, "needs num_heads"),
    ({"family": "llama", "num_heads": 4, "num_key_value_heads": 3,
      "params": [["model.layers.0.self_attn.q_proj.weight", [4, 4]]]}, "not divisible"),
    ({"family": "llama", "num_heads": 3, "params": [["model.layers.0.self_attn.q_proj.weight", [4, 4]]]},
     "not divisible"),
    ({"family": "llama", "num_heads": 2, "params": [["model.layers.0.self_attn.q_proj.weight", [4, 4]],
                                                    ["model.layers.0.self_attn.q_proj.bias", [4]]]}, "biases"),
    ({"family": "generic", "num_heads": 0, "params": MLP["params"]}, "positive"),
    ({"family": "generic", "num_heads": "2", "params": MLP["params"]}, "integer"),
])
def test_validation_errors(bad, message):
    with pytest.raises(SpecError, match=message):
        ModelSpec.from_json(bad)


def test_not_json():
    with pytest.raises(SpecError, match="not valid JSON"):
        ModelSpec.from_json("{params: ")
    with pytest.raises(SpecError, match="JSON object"):
        ModelSpec.from_json("[1, 2]")


def test_flat_round_trip_and_checks():
    from ninocast.flat import StateError, check_state, flatten, unflatten

    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 5, bias=False))
    spec = ModelSpec.from_module(model)
    sd = {k: v.to(torch.bfloat16) if k == "0.bias" else v for k, v in model.state_dict().items()}
    check_state(sd, spec)
    vec = flatten(sd, spec)
    back = unflatten(vec, spec, dtypes={k: v.dtype for k, v in sd.items()})
    assert back["0.bias"].dtype == torch.bfloat16
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    with pytest.raises(StateError, match="missing parameters"):
        check_state({"0.weight": sd["0.weight"]}, spec)
    with pytest.raises(StateError, match=r"2.weight has shape \[16, 5\]"):
        check_state(dict(sd, **{"2.weight": sd["2.weight"].T}), spec)
    with pytest.raises(StateError, match="NaN or Inf"):
        check_state(dict(sd, **{"0.bias": torch.full((16,), float("nan"))}), spec)
    with pytest.raises(StateError, match="dtype"):
        check_state(dict(sd, **{"0.bias": torch.zeros(16, dtype=torch.int64)}), spec)


def test_nested_hugging_face_models_under_any_prefix_and_left_out_parameters():
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=11)

    class Lit(nn.Module):  # a LightningModule's layout: the HF model under `net`, its own head and a scalar
        def __init__(self):
            super().__init__()
            self.net = transformers.LlamaForCausalLM(cfg)
            self.scale = nn.Parameter(torch.tensor(1.0))
            self.probe = nn.Linear(8, 2)

    with pytest.warns(UserWarning, match=r"3 parameter\(s\) left out.*scale, probe.weight, probe.bias") as caught:
        spec = ModelSpec.from_module(Lit(), include=None)
    assert len([w for w in caught if "left out" in str(w.message)]) == 1
    bare = ModelSpec.from_module(transformers.LlamaForCausalLM(cfg))
    assert (spec.family, spec.num_heads, spec.num_key_value_heads) == ("llama", 4, 2)
    assert spec.names == [f"net.{n}" for n in bare.names]
    assert detect_family(spec.names) == "llama"
    assert ModelSpec.from_json(dict(spec.to_json(), family="auto")).family == "llama"

    # a scalar in a generic model: left out with the warning, not a SpecError
    model = nn.Sequential(nn.Linear(3, 3))
    model.register_parameter("t", nn.Parameter(torch.tensor(0.5)))
    with pytest.warns(UserWarning, match="left out.*: t$"):
        assert ModelSpec.from_module(model).names == ["0.weight", "0.bias"]


def test_prefixed_transformer_specs_build_the_bare_models_graph():
    import transformers

    from ninocast_server.engine.graphs.build import build_graph, split_blocks

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=8, n_layer=2, n_head=2, vocab_size=11,
                                                                n_positions=4))
    bare = ModelSpec.from_module(gpt2)
    wrapped = ModelSpec("gpt2", tuple((f"model.{n}", s) for n, s in bare.params), bare.num_heads)
    a, b = build_graph(bare, with_lpe=False), build_graph(wrapped, with_lpe=False)
    for field in ("edge_index", "edge_type", "param_slot", "pos_w"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert [len(p.params) for p in split_blocks(wrapped)] == [len(p.params) for p in split_blocks(bare)] == [14, 14]

"""Out-of-distribution honesty (issue 11): a nowcaster declares what it was meta-trained on; a model outside that
gets one warning line naming the nowcaster and the family, in the create-session answer, from the client (remote
and local), and GET /v1/nowcasters shows the scope.

The shipped default is routed (routed.py): its vision member is the FM-16-only model, its language member was
fine-tuned on GPT-2 and Llama runs, so every family is inside it; ``ninocast-wnn`` (FM-16 only) is the nowcaster
these tests take outside its scope."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from torch import nn

from ninocast import ModelSpec, NowcastOptimizer
from ninocast_server.engine.nowcasters.checkpoint import BUNDLED_DIR, CheckpointError, load_nowcaster, save_nowcaster
from ninocast_server.engine.nowcasters.scope import OFFICIAL_SCOPE, Scope
from server_utils import Server
from shared_data import CHECKPOINTS, need


def official_pt() -> str:
    return str(need(CHECKPOINTS / "nino_no_posw.pt"))


def tiny_gpt2() -> nn.Module:
    """The shape of kjv-gpt2-2-32 (35,712 parameters): inside the size range of the default's language member."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=256, n_positions=64,
                                      resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def scope_warnings(record) -> list[str]:
    return [str(w.message) for w in record
            if issubclass(w.category, RuntimeWarning) and "meta-trained" in str(w.message)]


# ---------------------------------------------------------------------------- declared scopes
VISION = str(BUNDLED_DIR / "ninocast-nino" / "vision")  # the default's FM-16-only member (the round-3 default)


def test_shipped_default_routes_vision_and_language_and_official_checkpoints_declare_the_papers_tasks(tmp_path):
    nino = load_nowcaster("default")
    assert nino.kind == "routed" and nino.scope.families == ("generic", "gpt2", "llama")
    assert nino.routes["generic"][0].scope == Scope(("generic",), ("fm-16",))
    gpt2 = nino.routes["gpt2"][0]  # round 9: its own member, fine-tuned on a second text, at full scale
    llama = nino.routes["llama"][0]  # round 5's language member, its update at full scale (round 7)
    for member in (gpt2, llama):
        assert {"gpt2", "llama"} <= set(member.scope.families) and member.model.config.upd_scale == 1.0
        assert {"kjv-gpt2-3-24-10k", "kjv-llama-2-32-10k"} <= set(member.scope.tasks)
        held_out = {"fortunes-gpt2-3-24-10k", "devil-gpt2-3-24-10k", "kjv-gpt2-3-64-10k", "kjv-llama-3-24-10k"}
        assert not set(member.scope.tasks) & held_out  # neither the held-out text nor the validation text
        assert member.scope.params == (18272, 49312) and member.scope.spacing == (200, 200)
    assert {"jargon-gpt2-3-24-10k", "jargon-gpt2-2-32-10k"} <= set(gpt2.scope.tasks)
    assert not any(t.startswith("jargon") for t in llama.scope.tasks)
    assert next(gpt2.model.parameters()).data_ptr() != next(llama.model.parameters()).data_ptr()
    described = nino.describe()
    assert described["scope"]["families"] == ["generic", "gpt2", "llama"]
    assert described["routes"]["generic"]["scope"] == {"families": ["generic"], "tasks": ["fm-16"]}
    assert load_nowcaster("ninocast-wnn").scope.families == ("generic",)
    assert load_nowcaster("linefit").scope is None  # nothing learned, nothing claimed
    official = load_nowcaster(official_pt())
    assert official.scope == OFFICIAL_SCOPE and official.scope.families == ("generic", "gpt2")
    # importing an official checkpoint into our directory form keeps what it was trained on
    imported = load_nowcaster(str(save_nowcaster(official, tmp_path / "imported")))
    assert imported.scope == OFFICIAL_SCOPE


def test_a_traced_attention_model_is_outside_a_generic_only_scope():
    """graph='traced' gives GPT-2 the family 'generic'; an FM-16-only model must still warn (the official
    checkpoints, trained on GPT-2s too, must not), and a traced plain chain stays inside 'generic'."""
    traced = ModelSpec.from_module(tiny_gpt2(), graph="traced")
    assert traced.family == "generic" and traced.topology is not None
    line = load_nowcaster(VISION).scope.warning("ninocast-nino", traced)
    assert line is not None and "attention" in line and "'ninocast-nino'" in line
    assert OFFICIAL_SCOPE.warning("nino", traced) is None
    chain = ModelSpec.from_module(tiny_mlp(), graph="traced")
    assert load_nowcaster(VISION).scope.warning("ninocast-nino", chain) is None
    # the routed default sends the traced transformer to its language member, which was trained on attention
    assert load_nowcaster("default").scope_warning(traced) is None


def test_warning_names_nowcaster_and_family_and_checks_a_declared_size_range():
    gpt2, mlp = ModelSpec.from_module(tiny_gpt2()), ModelSpec.from_module(tiny_mlp())
    wnn = load_nowcaster("ninocast-wnn")
    line = wnn.scope_warning(gpt2)
    assert line is not None and "'ninocast-wnn'" in line and "'gpt2'" in line and "\n" not in line
    assert wnn.scope_warning(mlp) is None
    assert load_nowcaster("default").scope_warning(gpt2) is None
    official = load_nowcaster(official_pt())
    assert official.scope_warning(gpt2) is None
    assert mlp.n_params == 58
    below = Scope(("generic",), ("fm-16",), (100, 1000)).warning("x", mlp)
    assert below is not None and "'x'" in below and "58" in below and "100-1,000" in below
    assert Scope(("generic",), (), (10, 100)).warning("x", mlp) is None


@pytest.mark.parametrize("scope, mentions", [
    ({"families": ["resnet"]}, "scope.families"), ({"families": []}, "scope.families"), ("generic", "object"),
    ({"families": ["generic"], "params": [10]}, "scope.params"), ({"families": ["gpt2"], "params": [9, 3]},
                                                                  "scope.params"),
    ({"families": ["gpt2"], "tasks": "fm-16"}, "scope.tasks"), ({"families": ["gpt2"], "size": 3}, "unknown"),
    ({"families": ["gpt2"], "spacing": [200]}, "scope.spacing"), ({"families": ["gpt2"], "spacing": [0, 5]},
                                                                    "scope.spacing")])
def test_a_malformed_scope_is_a_clear_checkpoint_error(tmp_path, scope, mentions):
    d = tmp_path / "nc"
    shutil.copytree(BUNDLED_DIR / "ninocast-wnn", d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["scope"] = scope
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=mentions) as e:
        load_nowcaster(str(d))
    assert "config.json" in str(e.value)


# ---------------------------------------------------------------------------- through a real server and the client
@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("scope-server") / "data", default_nowcaster=None).start()
    yield server
    server.stop()


def test_server_warns_on_create_and_lists_scopes(srv):
    with srv.client() as c:
        cat = c.get("/v1/nowcasters").json()
        by_name = {n["name"]: n for n in cat["nowcasters"]}
        assert cat["default"] == "ninocast-nino"
        assert by_name["ninocast-wnn"]["scope"] == {"families": ["generic"], "tasks": ["fm-16"]}
        assert by_name["ninocast-nino"]["routes"]["generic"]["scope"] == {"families": ["generic"], "tasks": ["fm-16"]}
        assert by_name["linefit"]["scope"] is None
        gpt2 = ModelSpec.from_module(tiny_gpt2()).to_json()
        r = c.post("/v1/sessions", json={"spec": gpt2, "nowcaster": "ninocast-wnn"})
        assert r.status_code == 201, r.text
        assert len(r.json()["warnings"]) == 1
        assert "'ninocast-wnn'" in r.json()["warnings"][0] and "'gpt2'" in r.json()["warnings"][0]
        r = c.post("/v1/sessions", json={"spec": gpt2})  # the default routes GPT-2 to its language member
        assert r.status_code == 201 and r.json()["warnings"] == [], r.text
        r = c.post("/v1/sessions", json={"spec": gpt2, "nowcaster": "linefit"})
        assert r.status_code == 201 and r.json()["warnings"] == []
        r = c.post("/v1/sessions", json={"spec": ModelSpec.from_module(tiny_mlp()).to_json()})
        assert r.status_code == 201 and r.json()["warnings"] == []


def _train_gpt2(opt: NowcastOptimizer, model: nn.Module, steps: int) -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, 16, (2, 8), generator=g)
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()


def test_remote_optimizer_warns_once_for_a_family_outside_the_nowcasters_scope(srv):
    model = tiny_gpt2()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        opt = NowcastOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), model, server=srv.url,
                               nowcaster="ninocast-wnn", period=20, ctx=5, max_train_steps=100, timeout=20, retries=0)
        _train_gpt2(opt, model, 12)  # three snapshots uploaded into one session, no nowcast yet
        opt.flush()
        opt.close()
    lines = scope_warnings(record)
    assert len(lines) == 1 and "'ninocast-wnn'" in lines[0] and "'gpt2'" in lines[0], lines
    assert opt.failures == {} and opt.backend.out_of_scope  # verification reads it (Verify's patience)


def test_local_optimizer_warns_once_outside_the_scope_and_not_inside():
    model = tiny_gpt2()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        opt = NowcastOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), model, local=True,
                               nowcaster="ninocast-wnn", period=20, ctx=5, max_train_steps=100)
        _train_gpt2(opt, model, 3)
        opt.close()
    lines = scope_warnings(record)
    assert len(lines) == 1 and "'ninocast-wnn'" in lines[0] and "'gpt2'" in lines[0], lines
    assert opt.backend.out_of_scope
    mlp = tiny_mlp()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        inside = NowcastOptimizer(torch.optim.AdamW(mlp.parameters()), mlp, local=True, period=20)
        # the official model was trained on GPT-2, the default's language member on GPT-2 and Llama with
        # snapshots 200 steps apart (period 1000 / ctx 5)
        official = NowcastOptimizer(torch.optim.AdamW(model.parameters()), model, nowcaster=official_pt(), period=20)
        default = NowcastOptimizer(torch.optim.AdamW(model.parameters()), model, local=True, period=1000)
    assert scope_warnings(record) == []
    assert not (inside.backend.out_of_scope or official.backend.out_of_scope or default.backend.out_of_scope)
    inside.close(), official.close(), default.close()


def test_a_declared_snapshot_spacing_picks_the_member_and_warns_a_run_outside_every_member(srv):
    """The default's language members declare the spacing they were trained on: 200 steps (period 1000) and 20
    (period 100). A GPT-2 run at either is served by its member without a word; at period 500 (100 steps apart,
    where neither was trained) it gets the first member and a warning. The vision member declares none (it speeds
    digits up at 20 steps apart), so an MLP at period 500 is not warned."""
    gpt2, mlp = tiny_gpt2(), tiny_mlp()
    language, short = load_nowcaster("default").routes["gpt2"]
    assert language.scope.spacing == (200, 200) and short.scope.spacing == (20, 20)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        at100 = NowcastOptimizer(torch.optim.AdamW(gpt2.parameters()), gpt2, local=True, period=100)
        at500 = NowcastOptimizer(torch.optim.AdamW(gpt2.parameters()), gpt2, local=True, period=500)
        vision = NowcastOptimizer(torch.optim.AdamW(mlp.parameters()), mlp, local=True, period=500)
    lines = scope_warnings(record)
    assert len(lines) == 1 and "200 steps apart" in lines[0] and "every 100 steps" in lines[0], lines
    assert at500.backend.out_of_scope and not (at100.backend.out_of_scope or vision.backend.out_of_scope)
    spec = ModelSpec.from_module(gpt2)
    assert at100.backend.model.member_for(spec, at100.backend.spacing).name == "ninocast-nino/short"
    at100.close(), at500.close(), vision.close()
    with srv.client() as c:
        for period, warned in [(100, False), (500, True), (1000, False)]:
            r = c.post("/v1/sessions", json={"spec": spec.to_json(), "period": period})
            assert r.status_code == 201 and len(r.json()["warnings"]) == warned, (period, r.text)
            assert all("every 100 steps" in line for line in r.json()["warnings"])
        routes = {n["name"]: n for n in c.get("/v1/nowcasters").json()["nowcasters"]}["ninocast-nino"]["routes"]
        assert [m["scope"]["spacing"] for m in routes["gpt2"]] == [[200, 200], [20, 20]]
        assert all(m["scope"]["params"] == [18272, 49312] for m in routes["llama"])


def test_the_default_warns_a_language_model_larger_than_its_training_runs():
    """The language members were trained on 18k-49k parameter models, and the default was slower than AdamW on a
    170k one (GPT-2 3-64) at period 100: a model outside that range is warned; one inside is not."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    big = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=64, n_head=4, vocab_size=256, n_positions=64))
    small = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=24, n_head=3, vocab_size=256, n_positions=64))
    nino = load_nowcaster("default")
    line = nino.scope_warning(ModelSpec.from_module(big), spacing=200)
    assert line is not None and "'ninocast-nino'" in line and "18,272-49,312" in line, line
    assert nino.scope_warning(ModelSpec.from_module(small), spacing=200) is None


def test_the_default_advises_its_start_step_only_where_it_was_chosen():
    """`short/` (period 100 language runs) advises 400 calls before the first nowcast, chosen on validation runs
    (docs/metatrain.md, *Round 8*); the period-1000 language member and the vision member advise none."""
    from transformers import LlamaConfig, LlamaForCausalLM

    default = load_nowcaster("default")
    gpt2, mlp = ModelSpec.from_module(tiny_gpt2()), ModelSpec.from_module(tiny_mlp())
    llama = ModelSpec.from_module(LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, hidden_size=8, intermediate_size=16,
                                                               num_attention_heads=2, vocab_size=32)))
    assert [default.advised_start(s, 20) for s in (gpt2, llama, mlp)] == [400, 400, 0]
    assert [default.advised_start(s, 200) for s in (gpt2, llama, mlp)] == [0, 0, 0]
    model = tiny_gpt2()
    opt = NowcastOptimizer(torch.optim.AdamW(model.parameters()), model, local=True, period=100)
    assert opt.start_step == 400
    opt.close()

"""A routed nowcaster (issue 11): one name, a member per graph family. Each model must get its family's member,
the warning must come from that member's scope under the routed name, and a bad routed directory must be a
clear error naming its config."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, load_file, save_file
from torch import nn

from ninocast import ModelSpec
from ninocast_server.engine.nowcasters.checkpoint import (BUNDLED_DIR, CheckpointError, load_directory,
                                                              load_nowcaster)
from ninocast_server.engine.runner import nowcast
from server_utils import Server, flatten_answer, upload_all
from test_nowcaster_scope import tiny_gpt2, tiny_mlp


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, hidden_size=8, intermediate_size=16,
                                        num_attention_heads=2, num_key_value_heads=2, vocab_size=16))


def _member(dst: Path, src: str, scale: float, scope: dict) -> None:
    """A copy of a bundled nowcaster with its weights scaled (so members predict differently) and a scope."""
    shutil.copytree(BUNDLED_DIR / src, dst, ignore=shutil.ignore_patterns("*.png"))
    weights = {k: v * scale for k, v in load_file(str(dst / "model.safetensors")).items()}
    save_file(weights, str(dst / "model.safetensors"))
    cfg = json.loads((dst / "config.json").read_text())
    cfg["scope"] = scope
    (dst / "config.json").write_text(json.dumps(cfg))


def make_routed(root: Path, routes: dict | None = None, name: str | None = None) -> Path:
    root.mkdir(parents=True)
    _member(root / "vision", "ninocast-nino/vision", 1.0, {"families": ["generic"], "tasks": ["fm-16"]})
    _member(root / "language", "ninocast-nino/vision", 0.9, {"families": ["gpt2"], "tasks": ["kjv-gpt2-3-24-10k"]})
    routes = routes or {"generic": "vision", "gpt2": "language", "llama": "language"}
    (root / "config.json").write_text(json.dumps({"format": "ninocast-nowcaster", "version": 1, "kind": "routed",
                                                  "name": name or root.name, "routes": routes}))
    return root


def _states(spec: ModelSpec) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    base = torch.randn(spec.n_params, 1, generator=g) * 0.1
    return base + torch.linspace(0, 0.01, 5) * torch.randn(spec.n_params, 1, generator=g)


@pytest.fixture(scope="module")
def routed_dir(tmp_path_factory) -> Path:
    return make_routed(tmp_path_factory.mktemp("routed") / "duo")


def test_each_family_gets_its_members_prediction(routed_dir):
    duo = load_nowcaster(str(routed_dir))
    vision, language = load_nowcaster(str(routed_dir / "vision")), load_nowcaster(str(routed_dir / "language"))
    assert duo.kind == "routed" and duo.families == ("generic", "gpt2", "llama")
    for module, member, other in [(tiny_mlp(), vision, language), (tiny_gpt2(), language, vision),
                                  (tiny_llama(), language, vision)]:
        spec = ModelSpec.from_module(module)
        x = _states(spec)
        got = nowcast(duo, spec, x, 3)
        assert torch.equal(got, nowcast(member, spec, x, 3)), spec.family
        assert not torch.allclose(got, nowcast(other, spec, x, 3)), spec.family
    traced = ModelSpec.from_module(tiny_gpt2(), graph="traced")  # a transformer whatever its family says
    assert traced.family == "generic" and duo.member_for(traced) is duo.routes["gpt2"][0]
    assert duo.member_for(ModelSpec.from_module(tiny_mlp(), graph="traced")) is duo.routes["generic"][0]


def test_scope_is_the_union_and_the_warning_is_the_serving_members(routed_dir, tmp_path):
    duo = load_nowcaster(str(routed_dir))
    assert duo.scope.families == ("generic", "gpt2")
    assert duo.scope.tasks == ("fm-16", "kjv-gpt2-3-24-10k")
    assert duo.scope_warning(ModelSpec.from_module(tiny_mlp())) is None
    assert duo.scope_warning(ModelSpec.from_module(tiny_gpt2())) is None
    line = duo.scope_warning(ModelSpec.from_module(tiny_llama()))  # routed to a member not trained on Llama
    assert line is not None and "'duo'" in line and "'llama'" in line and "kjv-gpt2-3-24-10k" in line
    crossed = load_nowcaster(str(make_routed(tmp_path / "crossed", {"generic": "vision", "gpt2": "vision",
                                                                     "llama": "language"})))
    assert "gpt2" in crossed.scope.families  # the union has it, the member that serves GPT-2 does not
    line = crossed.scope_warning(ModelSpec.from_module(tiny_gpt2()))
    assert line is not None and "'crossed'" in line and "'gpt2'" in line
    d = duo.describe()
    assert d["kind"] == "routed" and set(d["routes"]) == {"generic", "gpt2", "llama"}
    assert d["routes"]["gpt2"]["scope"]["families"] == ["gpt2"] and d["routes"]["gpt2"]["model_args"]["hid"] == 128
    assert d["parameters"] == 2 * d["routes"]["generic"]["parameters"]  # two members, each counted once


@pytest.mark.parametrize("routes, mentions", [
    ({}, "routes must be"), ({"generic": 3}, "routes must be"), ({"resnet": "vision"}, "unknown families"),
    ({"generic": "../vision"}, "subdirectory"), ({"generic": "missing"}, "needs config.json"),
    ({"generic": "wnn"}, "differ in"), ({"generic": "inner"}, "itself routed"), ({"generic": []}, "routes must be"),
    ({"gpt2": ["vision", "vision"]}, "listed twice"), ({"gpt2": ["vision", "language"]}, "no scope.spacing")])
def test_a_bad_routed_directory_is_a_clear_checkpoint_error(tmp_path, routes, mentions):
    root = make_routed(tmp_path / "duo", routes={"generic": "vision", "gpt2": "vision"})
    shutil.copytree(BUNDLED_DIR / "ninocast-wnn", root / "wnn")
    make_routed(root / "inner")
    cfg = json.loads((root / "config.json").read_text())
    cfg["routes"] = {**routes, "gpt2": "vision"} if routes.get("generic") == "wnn" else routes
    (root / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=mentions) as e:
        load_nowcaster(str(root))
    assert "config.json" in str(e.value)


def test_a_routed_directory_has_no_weights_to_fine_tune(routed_dir):
    """metatrain --init reads weights with load_directory: a routed one points at its members instead."""
    with pytest.raises(CheckpointError, match="routed nowcaster has no weights of its own.*language, vision"):
        load_directory(str(routed_dir))


def test_server_serves_and_lists_a_routed_nowcaster(tmp_path):
    models = tmp_path / "models"
    make_routed(models / "duo")
    srv = Server(tmp_path / "data", models_dir=models, default_nowcaster="duo").start()
    try:
        with srv.client() as c:
            cat = c.get("/v1/nowcasters").json()
            duo = {n["name"]: n for n in cat["nowcasters"]}["duo"]
            assert cat["default"] == "duo" and duo["kind"] == "routed"
            assert duo["routes"]["llama"]["name"] == "duo/language"
            r = c.post("/v1/sessions", json={"spec": ModelSpec.from_module(tiny_gpt2()).to_json()})
            assert r.status_code == 201 and r.json()["warnings"] == [], r.text
            r = c.post("/v1/sessions", json={"spec": ModelSpec.from_module(tiny_llama()).to_json()})
            assert r.status_code == 201 and len(r.json()["warnings"]) == 1 and "'duo'" in r.json()["warnings"][0]
    finally:
        srv.stop()


def test_route_command_writes_a_routed_nowcaster_and_refuses_bad_members(routed_dir, tmp_path, capsys):
    from ninocast.cli import main

    out = tmp_path / "team"
    assert main(["route", "-o", str(out), "--member", f"generic={routed_dir / 'vision'}",
                 "--member", f"gpt2,llama={routed_dir / 'language'}"]) == 0
    assert "'team'" in capsys.readouterr().out
    team, duo = load_nowcaster(str(out)), load_nowcaster(str(routed_dir))
    spec = ModelSpec.from_module(tiny_gpt2())
    assert torch.equal(nowcast(team, spec, _states(spec), 2), nowcast(duo, spec, _states(spec), 2))
    assert json.loads((out / "config.json").read_text())["routes"] == {"generic": "vision", "gpt2": "language",
                                                                       "llama": "language"}
    card = (out / "MODEL_CARD.md").read_text()
    assert "| gpt2 | [language/](language/MODEL_CARD.md) | any | 1 | 0 | kjv-gpt2-3-24-10k |" in card
    other = tmp_path / "other" / "vision"  # a second member with the same directory name gets its own copy
    shutil.copytree(routed_dir / "language", other)
    assert main(["route", "-o", str(tmp_path / "two"), "--member", f"generic={routed_dir / 'vision'}",
                 "--member", f"gpt2={other}"]) == 0
    assert json.loads((tmp_path / "two" / "config.json").read_text())["routes"] == {"generic": "vision",
                                                                                    "gpt2": "vision-2"}
    capsys.readouterr()
    wnn = BUNDLED_DIR / "ninocast-wnn"
    for argv, mentions in [(["--member", "generic"], "FAMILIES=DIR"),
                           (["--member", f"generic={wnn}", "--member", f"generic={wnn}"], "listed twice"),
                           (["--member", f"generic={routed_dir / 'vision'}", "--member",
                             f"generic={routed_dir / 'language'}"], "declares no scope.spacing"),
                           (["--member", f"resnet={wnn}"], "unknown families"),
                           (["--member", f"generic={routed_dir / 'vision'}", "--member", f"gpt2={wnn}"], "differ in"),
                           (["--member", f"generic={tmp_path / 'nowhere'}"], "needs config.json"),
                           (["--member", f"generic={routed_dir}"], f"{routed_dir}: is itself routed")]:
        assert main(["route", "-o", str(tmp_path / "bad"), *argv]) == 2, argv
        assert mentions in capsys.readouterr().err, argv
        assert not (tmp_path / "bad").exists(), argv  # nothing half-written
    assert main(["route", "-o", str(out), "--member", f"generic={wnn}"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_a_member_may_have_its_own_update_scale_per_family_sharing_its_weights(routed_dir, tmp_path, capsys):
    from ninocast.cli import main

    out = tmp_path / "scaled"
    assert main(["route", "-o", str(out), "--member", f"generic={routed_dir / 'vision'}",
                 "--member", f"gpt2,llama={routed_dir / 'language'}", "--upd-scale", "llama=0.5"]) == 0
    assert json.loads((out / "config.json").read_text())["routes"]["llama"] == {"member": "language",
                                                                                "upd_scale": 0.5}
    assert "| llama | [language/](language/MODEL_CARD.md) | any | 0.5 |" in (out / "MODEL_CARD.md").read_text()
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["language", "vision"]  # weights not copied twice
    routed, language = load_nowcaster(str(out)), load_nowcaster(str(routed_dir / "language"))
    gpt2, llama = routed.routes["gpt2"][0], routed.routes["llama"][0]
    assert gpt2 is not llama and llama.name == "scaled/language@upd_scale=0.5"
    assert llama.model.config.upd_scale == 0.5 and gpt2.model.config.upd_scale == 1.0
    first = lambda m: next(m.model.parameters())  # noqa: E731
    assert first(llama).data_ptr() == first(gpt2).data_ptr()  # one set of weights in memory, counted once
    assert routed.num_parameters() == load_nowcaster(str(routed_dir)).num_parameters()
    spec = ModelSpec.from_module(tiny_llama())
    x = _states(spec)
    own = nowcast(language, spec, x, 3) - x[:, -1]
    got = nowcast(routed, spec, x, 3) - x[:, -1]
    assert (got - 0.5 * own).abs().max() < 1e-3 * own.abs().max()  # the update, halved (float32 rounding)
    spec = ModelSpec.from_module(tiny_gpt2())
    assert torch.equal(nowcast(routed, spec, _states(spec), 3), nowcast(language, spec, _states(spec), 3))
    assert routed.describe()["routes"]["llama"]["model_args"]["upd_scale"] == 0.5
    capsys.readouterr()
    for argv, mentions in [(["--upd-scale", "llama"], "FAMILY=X"), (["--upd-scale", "llama=big"], "FAMILY=X"),
                           (["--upd-scale", "llama=-1"], "positive finite"),
                           (["--upd-scale", "llama=inf"], "positive finite"),
                           (["--upd-scale", "generic=2"], "no member serves")]:
        assert main(["route", "-o", str(tmp_path / "bad"), "--member", f"gpt2,llama={routed_dir / 'language'}",
                     *argv]) == 2, argv
        assert mentions in capsys.readouterr().err, argv
        assert not (tmp_path / "bad").exists(), argv
    cfg = json.loads((out / "config.json").read_text())
    for entry in ({"member": "language", "upd_scale": 0.5, "hid": 64}, {"member": "language"},
                  {"member": "language", "upd_scale": True}):
        cfg["routes"]["llama"] = entry
        (out / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(CheckpointError, match=r"config.json: routes\['llama'\] member 'language': a member "
                                                  "object takes 'member' and 'upd_scale'"):
            load_nowcaster(str(out))


# ----------------------------------------------------------------------------- several members for one family,
# chosen by the run's snapshot spacing (period / ctx)
def make_spaced(root: Path) -> Path:
    """duo with a GPT-2 member per spacing: ``language`` (200 steps apart, listed first) and ``short`` (20)."""
    make_routed(root, routes={"generic": "vision", "gpt2": ["language", "short"], "llama": "language"})
    _member(root / "short", "ninocast-nino/vision", 0.8, {"families": ["gpt2"], "tasks": ["kjv-gpt2-3-24"],
                                                            "spacing": [20, 20]})
    cfg = json.loads((root / "language" / "config.json").read_text())
    cfg["scope"]["spacing"] = [200, 200]
    (root / "language" / "config.json").write_text(json.dumps(cfg))
    return root


@pytest.fixture(scope="module")
def spaced_dir(tmp_path_factory) -> Path:
    return make_spaced(tmp_path_factory.mktemp("spaced") / "trio")


def _member_predictions(root: Path, spec: ModelSpec, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    long, short = (nowcast(load_nowcaster(str(root / m)), spec, x, 2) for m in ("language", "short"))
    assert not torch.equal(long, short)
    return long, short


def test_a_family_with_several_members_is_served_by_the_one_whose_spacing_holds_the_runs(spaced_dir):
    from ninocast.backends import LocalBackend
    from ninocast.flat import unflatten

    trio = load_nowcaster(str(spaced_dir))
    language, short = trio.routes["gpt2"]
    assert trio.routes["llama"] == (language,) and short.scope.spacing == (20, 20)
    spec = ModelSpec.from_module(tiny_gpt2())
    x = _states(spec)
    long_pred, short_pred = _member_predictions(spaced_dir, spec, x)
    assert torch.equal(nowcast(trio, spec, x, 2, spacing=20), short_pred)
    for spacing in (200, None, 100):  # 100: no member declares it -> the first listed, and its warning
        assert torch.equal(nowcast(trio, spec, x, 2, spacing=spacing), long_pred), spacing
    assert trio.scope_warning(spec, 20) is None and trio.scope_warning(spec, 200) is None
    line = trio.scope_warning(spec, 100)
    assert "'trio'" in line and "200 steps apart" in line and "one every 100 steps" in line
    assert trio.member_for(ModelSpec.from_module(tiny_llama()), 20) is language  # llama lists only that one
    d = trio.describe()
    assert [m["scope"]["spacing"] for m in d["routes"]["gpt2"]] == [[200, 200], [20, 20]]
    assert d["routes"]["generic"]["name"] == "trio/vision"  # a single member stays an object

    window = [(i, unflatten(x[:, i].contiguous(), spec)) for i in range(5)]
    local = LocalBackend(spec, str(spaced_dir), spacing=20)  # what NowcastOptimizer passes: its snapshot interval
    assert not local.out_of_scope
    assert torch.equal(flatten_answer(spec.to_json(), local.nowcast(window, 2)), short_pred)
    with pytest.warns(RuntimeWarning, match="one every 100 steps"):
        local = LocalBackend(spec, str(spaced_dir), spacing=100)
    assert torch.equal(flatten_answer(spec.to_json(), local.nowcast(window, 2)), long_pred)


def test_a_server_session_is_served_by_the_member_for_its_period(tmp_path):
    from ninocast.flat import unflatten

    models = tmp_path / "models"
    root = make_spaced(models / "trio")
    spec = ModelSpec.from_module(tiny_gpt2())
    x = _states(spec)
    long_pred, short_pred = _member_predictions(root, spec, x)
    states = [unflatten(x[:, i].contiguous(), spec) for i in range(5)]
    srv = Server(tmp_path / "data", models_dir=models, default_nowcaster="trio").start()
    try:
        with srv.client() as c:
            listed = {n["name"]: n for n in c.get("/v1/nowcasters").json()["nowcasters"]}["trio"]
            assert [m["name"] for m in listed["routes"]["gpt2"]] == ["trio/language", "trio/short"]
            for period, want in [(100, short_pred), (1000, long_pred)]:  # ctx 5: snapshots 20 / 200 steps apart
                r = c.post("/v1/sessions", json={"spec": spec.to_json(), "period": period})
                assert r.status_code == 201 and r.json()["warnings"] == [], r.text
                sid = r.json()["id"]
                upload_all(c, sid, states, first_step=period // 5, every=period // 5)
                r = c.post(f"/v1/sessions/{sid}/nowcast", json={"k": 2})
                assert r.status_code == 200, r.text
                assert torch.equal(flatten_answer(spec.to_json(), load(r.content)), want), period
            r = c.post("/v1/sessions", json={"spec": spec.to_json(), "period": 500})
            assert r.status_code == 201 and "one every 100 steps" in r.json()["warnings"][0]
    finally:
        srv.stop()


def test_route_command_lists_a_family_named_twice_in_order(spaced_dir, tmp_path, capsys):
    from ninocast.cli import main

    out = tmp_path / "team"
    assert main(["route", "-o", str(out), "--member", f"generic={spaced_dir / 'vision'}",
                 "--member", f"gpt2,llama={spaced_dir / 'language'}", "--member", f"gpt2={spaced_dir / 'short'}"]) == 0
    assert "gpt2 -> team/language | team/short" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["routes"] == {
        "generic": "vision", "gpt2": ["language", "short"], "llama": "language"}
    card = (out / "MODEL_CARD.md").read_text()
    assert "| gpt2 | [short/](short/MODEL_CARD.md) | 20 | 1 | 0 | kjv-gpt2-3-24 |" in card

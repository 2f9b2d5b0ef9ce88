"""Meta-training: trajectory store, collect (deterministic, resumable), windows, metatrain (NaN-safe, resumable),
the nowcaster it writes, export of recorded server sessions. Everything runs on tiny tasks in seconds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pytest
import torch
from torch import nn

from ninocast.spec import ModelSpec
from ninocast_server.engine.graphs import build_graph
from ninocast_server.engine.nowcasters.checkpoint import load_nowcaster
from ninocast_server.metatrain.collect import collect
from ninocast_server.metatrain.dataset import F_PAD, WindowSampler, baseline_predictions, masked_l1
from ninocast_server.metatrain.store import StoreError, TrajectoryStore
from ninocast_server.metatrain.train import MetaTrainConfig, metatrain
from ninocast_server.tasks.base import Task


class TinyTask(Task):
    """A tiny classifier on fixed random data: an MLP (F_g = 1) or a small ConvNet (F_g = 9)."""

    kind, metric, lr, budget, batch_size = "tabular", "test_acc", 1e-2, 40, 16

    def __init__(self, name: str = "tiny-mlp", conv: bool = False) -> None:
        self.name, self.conv = name, conv
        g = torch.Generator().manual_seed(123)
        shape = (64, 1, 6, 6) if conv else (64, 6)
        self.x, self.y = torch.randn(*shape, generator=g), torch.randint(0, 3, (64,), generator=g)

    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        if self.conv:
            return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
        return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))

    def batches(self, seed: int) -> Iterator:
        epoch = 0
        while True:
            order = torch.randperm(64, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
            for i in range(0, 64, self.batch_size):
                idx = order[i:i + self.batch_size]
                yield self.x[idx], self.y[idx]
            epoch += 1

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(model(x), y)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        model.eval()
        with torch.no_grad():
            acc = (model(self.x).argmax(1) == self.y).float().mean().item() * 100
        return {"test_acc": acc}


def _collect(path: Path, tasks=None, seeds=(0, 1, 2), **kw) -> TrajectoryStore:
    kw.setdefault("steps", 40)
    kw.setdefault("interval", 2)
    kw.setdefault("shard_snapshots", 6)
    return collect(tasks or [TinyTask()], list(seeds), path, progress=False, log=lambda s: None, **kw)


def _cfg(stores, out, **kw) -> MetaTrainConfig:
    base = dict(stores=[str(s) for s in stores], out=str(out), iters=6, spacing=2, hid=16, layers=2,
                batch_trajectories=2, windows=2, val_batches=2, val_every=3, ckpt_every=2)
    base.update(kw)
    return MetaTrainConfig(**base)


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("traj") / "store"
    _collect(path, tasks=[TinyTask(), TinyTask("tiny-conv", conv=True)])
    return path


# ----------------------------------------------------------------------------- store
def test_store_round_trip_and_manifest(tiny_store):
    store = TrajectoryStore.open(tiny_store)
    assert len(store.runs) == 6 and all(r.complete for r in store.runs.values())
    run = store.runs["tiny-mlp-seed0-lr0.01"]
    assert run.steps == list(range(0, 41, 2)) and len(run.shards) == 4  # 21 snapshots in shards of 6
    assert len(run.metrics) == 21 and "test_acc" in run.metrics[0]
    steps, states = store.load(run.id)
    assert states.dtype == torch.float16 and states.shape == (21, run.n_params)
    model = TinyTask().build_model(0)
    first = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.allclose(states[0].float(), first, atol=1e-3)
    store.validate(deep=True)
    manifest = json.loads((tiny_store / "manifest.json").read_text())
    assert manifest["format"] == "ninocast-trajectories" and manifest["dtype"] == "float16"
    assert manifest["runs"][run.id]["spec"]["family"] == "generic"


def _copy_store(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_truncated_shard_gives_clear_error(tiny_store, tmp_path):
    path = _copy_store(tiny_store, tmp_path / "s")
    shard = path / "runs" / "tiny-mlp-seed1-lr0.01" / "00001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    store = TrajectoryStore.open(path)
    with pytest.raises(StoreError, match=r"00001\.safetensors.*truncated.*manifest says"):
        store.validate()
    with pytest.raises(StoreError, match="truncated"):
        store.load("tiny-mlp-seed1-lr0.01")
    store.validate(runs=["tiny-mlp-seed0-lr0.01"])  # the other runs are fine


def test_bad_shards_and_manifests_give_clear_errors(tiny_store, tmp_path):
    path = _copy_store(tiny_store, tmp_path / "s")
    rdir = path / "runs" / "tiny-mlp-seed0-lr0.01"
    (rdir / "00002.safetensors").unlink()
    with pytest.raises(StoreError, match=r"00002\.safetensors.*missing"):
        TrajectoryStore.open(path).validate()
    # same size, garbage header
    shard = rdir / "00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:20] = b"not json !!!"
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"00000\.safetensors.*corrupt safetensors header"):
        TrajectoryStore.open(path).validate(runs=["tiny-mlp-seed0-lr0.01"])
    # manifest problems
    man = json.loads((path / "manifest.json").read_text())
    man["runs"]["tiny-mlp-seed1-lr0.01"]["steps"].append(99)
    (path / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(StoreError, match="shards hold 21 snapshots but it lists 22 steps"):
        TrajectoryStore.open(path)
    (path / "manifest.json").write_text("{trunc")
    with pytest.raises(StoreError, match="not valid JSON"):
        TrajectoryStore.open(path)
    with pytest.raises(StoreError, match="not a trajectory store"):
        TrajectoryStore.open(tmp_path / "nowhere")


def test_validate_cli(tiny_store, tmp_path, capsys):
    from ninocast.cli import main

    assert main(["validate-trajectories", str(tiny_store), "--deep"]) == 0
    assert "ok" in capsys.readouterr().out
    path = _copy_store(tiny_store, tmp_path / "s")
    shard = path / "runs" / "tiny-conv-seed2-lr0.01" / "00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:50])
    assert main(["validate-trajectories", str(path)]) == 1
    assert "truncated" in capsys.readouterr().err


# ----------------------------------------------------------------------------- collect
def test_collect_is_deterministic_and_resumes(tiny_store, tmp_path):
    ref = TrajectoryStore.open(tiny_store)
    path = tmp_path / "s"
    task = TinyTask()
    _collect(path, [task], seeds=(0, 1), stop_after=55)  # run 0 done (40 steps), run 1 stopped at step 15
    store = TrajectoryStore.open(path)
    assert store.runs["tiny-mlp-seed0-lr0.01"].complete
    partial = store.runs["tiny-mlp-seed1-lr0.01"]
    assert not partial.complete and partial.steps == list(range(0, 11, 2))  # one shard written (step 10)
    assert (path / "runs" / partial.id / "resume.pt").is_file()
    msgs = []
    collect([task], [0, 1], path, steps=40, interval=2, shard_snapshots=6, progress=False, log=msgs.append)
    assert any("resuming at step 10" in m for m in msgs) and any("1 already complete" in m for m in msgs)
    store = TrajectoryStore.open(path)
    for rid in ("tiny-mlp-seed0-lr0.01", "tiny-mlp-seed1-lr0.01"):
        assert store.runs[rid].complete and store.runs[rid].steps == ref.runs[rid].steps
        assert torch.equal(store.load(rid)[1], ref.load(rid)[1]), rid
        assert store.runs[rid].metrics == ref.runs[rid].metrics
    assert not (path / "runs" / "tiny-mlp-seed1-lr0.01" / "resume.pt").exists()
    # a partial run without its resume point restarts and still gives the same trajectory
    _collect(tmp_path / "t", [task], seeds=(1,), stop_after=15)
    (tmp_path / "t" / "runs" / "tiny-mlp-seed1-lr0.01" / "resume.pt").unlink()
    st = _collect(tmp_path / "t", [task], seeds=(1,))
    assert torch.equal(st.load("tiny-mlp-seed1-lr0.01")[1], ref.load("tiny-mlp-seed1-lr0.01")[1])


def test_collect_refuses_dtype_change(tiny_store):
    with pytest.raises(StoreError, match="float16"):
        _collect(tiny_store, dtype="float32")


def test_collect_stops_diverged_run(tmp_path):
    task = TinyTask()
    task.lr = 1e30
    store = _collect(tmp_path / "s", [task], seeds=(0,))
    run = next(iter(store.runs.values()))
    assert run.complete and run.info.get("diverged") and len(run.steps) < 21
    assert torch.isfinite(store.load(run.id)[1].float()).all()


# ----------------------------------------------------------------------------- windows
def test_windows_scaling_padding_and_masks(tiny_store):
    store = TrajectoryStore.open(tiny_store)
    sampler = WindowSampler.from_stores([store], runs=lambda r: r.task == "tiny-conv", spacing=2, windows=2)
    traj = sampler.trajectories[0]
    gen = torch.Generator().manual_seed(0)
    exs = sampler.trajectory_examples(traj, gen)
    assert len(exs) == 2
    spec = traj.run.spec
    graph = build_graph(spec, with_lpe=True)
    E = graph.num_edges
    ex = exs[0]
    assert ex["x"].shape == (E, F_PAD * 5) and ex["y"].shape == (E, F_PAD * 40) and ex["mask"].shape == (E, F_PAD * 40)
    # masked-in entries: exactly the real parameters times the existing horizons; never virtual edges or loops
    m = ex["mask"].view(E, F_PAD, 40)
    n_targets = int(m[:, :, 0].sum())
    assert n_targets == spec.n_params
    assert not m[E - graph.num_nodes:].any()
    n_h = int(m.any(dim=(0, 1)).sum())
    assert int(ex["mask"].sum()) == spec.n_params * n_h
    # the newest input slot 0 of the self-loops is 2; per tensor the scaled inputs have mean 0, std 1
    x = ex["x"].view(E, F_PAD, 5)
    assert torch.all(x[E - graph.num_nodes:, 0] == 2)
    flat = x.reshape(-1, 5)[torch.cat([(graph.param_slot // graph.feat_size) * F_PAD + graph.param_slot % graph.feat_size])]
    for p in spec.layout:
        block = flat[p.start:p.stop]
        assert abs(float(block.mean())) < 1e-4 and abs(float(block.std()) - 1) < 1e-3
    # the scaled target at horizon 1 equals the next state scaled with the input statistics
    assert graph.feat_size == 9  # 3x3 convs: no padding needed here; the MLP graph (F_g = 1) is padded
    mlp = WindowSampler.from_stores([store], runs=lambda r: r.task == "tiny-mlp", spacing=2, windows=2)
    ex2 = mlp.trajectory_examples(mlp.trajectories[0], gen)[0]
    m2 = ex2["mask"].view(-1, F_PAD, 40)
    assert not m2[:, 1:].any()  # padded slots 1..8 never count
    # LPE signs: random per trajectory, so two draws differ by column signs only
    b1 = sampler.sample(torch.Generator().manual_seed(1), 1)
    assert b1.pos is not None and torch.allclose(b1.pos.abs()[: graph.num_nodes], graph.pos.abs())


def test_baselines_on_exact_lines():
    """A trajectory moving on a straight line: linefit is exact, and the loss helper ignores masked entries."""
    from ninocast_server.metatrain.dataset import Batch

    t = torch.arange(45.0)
    x = (2.0 + 0.5 * t[:5]).expand(3, 5)
    y = (2.0 + 0.5 * t[5:]).expand(3, 40)
    mask = torch.ones(3, 40, dtype=torch.bool)
    b = Batch(x.clone(), torch.zeros(3, dtype=torch.long), y.clone(), mask)
    assert float(masked_l1(baseline_predictions(b, 40, "linefit"), b.target, mask)) < 1e-4
    assert float(masked_l1(baseline_predictions(b, 40, "last"), b.target, mask)) > 1


# ----------------------------------------------------------------------------- metatrain
@pytest.mark.parametrize("kind", ["nino", "wnn"])
def test_collect_metatrain_nowcast_end_to_end(tiny_store, tmp_path, kind):
    out = tmp_path / f"ninocast-{kind}"
    summary = metatrain(_cfg([tiny_store], out, model=kind), progress=False, log=lambda s: None)
    assert summary["iterations"] == 6 and summary["skipped_steps"] == 0
    assert summary["val_runs"] == 2 and summary["train_runs"] == 4  # the last seed of each task is held out
    for f in ("config.json", "model.safetensors", "MODEL_CARD.md", "loss_curve.png"):
        assert (out / f).is_file(), f
    card = (out / "MODEL_CARD.md").read_text()
    assert "tiny-conv" in card and "linefit" in card and "Speedup benchmark" in card
    nc = load_nowcaster(str(out))
    assert nc.kind == kind and nc.name == f"ninocast-{kind}"
    assert nc.scope.families == ("generic",) and nc.scope.tasks == ("tiny-conv", "tiny-mlp")  # what it saw
    assert nc.scope.spacing == (2, 2)  # its windows' states were 2 optimiser steps apart
    store = TrajectoryStore.open(tiny_store)
    run = store.runs["tiny-conv-seed2-lr0.01"]
    states = store.load(run.id)[1][-5:].float().T.contiguous()
    graph = build_graph(run.spec)
    pred = nc.predict(states, 3, run.spec, graph)
    assert pred.shape == (run.n_params,) and torch.isfinite(pred).all()


def test_metatrain_cli_and_finetune(tiny_store, tmp_path, capsys):
    from ninocast.cli import main

    out = tmp_path / "base"
    assert main(["metatrain", str(tiny_store), "-o", str(out), "--iters", "3", "--spacing", "2", "--hid", "8",
                 "--layers", "2", "--batch-trajectories", "1", "--windows", "1", "--val-batches", "1", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["iterations"] == 3
    tuned = tmp_path / "tuned"
    base_cfg = json.loads((out / "config.json").read_text())
    base_cfg["scope"]["spacing"] = [200, 200]  # as if its --init was tuned elsewhere
    base_cfg["model_args"]["upd_scale"] = 0.5  # ... and served with a halved update
    (out / "config.json").write_text(json.dumps(base_cfg))
    logged: list[str] = []
    summary = metatrain(_cfg([tiny_store], tuned, init=str(out), iters=2, tasks=["tiny-mlp"], spacing=3),
                        progress=False, log=logged.append)
    assert any("trains the unscaled update" in line for line in logged)
    assert summary["tasks"] == ["tiny-mlp"]
    scope = load_nowcaster(str(tuned)).scope
    assert scope.tasks == ("tiny-conv", "tiny-mlp")  # its --init saw both tasks
    assert scope.spacing == (2, 2)  # ... but the spacing is the fine-tune's own windows' (stride 1 of a store
    #                                   collected every 2 steps, whatever --spacing 3 asked), not its --init's
    cfg = json.loads((tuned / "config.json").read_text())
    assert cfg["model_args"]["hid"] == 8 and cfg["source"]["init"] == str(out)
    assert cfg["model_args"]["upd_scale"] == 1.0 and cfg["source"]["init_upd_scale"] == 0.5
    from safetensors.torch import load_file

    a, b = load_file(str(out / "model.safetensors")), load_file(str(tuned / "model.safetensors"))
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)  # fine-tuning moved the weights
    assert main(["metatrain", str(tmp_path / "missing"), "-o", str(tmp_path / "x"), "-q"]) == 2
    assert "not a trajectory store" in capsys.readouterr().err


def test_metatrain_skips_non_finite_steps(tiny_store, tmp_path):
    def fault(it: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if it in (1, 3) else loss

    out = tmp_path / "m"
    summary = metatrain(_cfg([tiny_store], out), progress=False, log=lambda s: None, fault=fault)
    assert summary["iterations"] == 6 and summary["skipped_steps"] == 2
    hist = json.loads((out / "train" / "history.json").read_text())
    assert hist["skipped_at"] == [2, 4] and len(hist["train"]) == 4
    nc = load_nowcaster(str(out))
    assert all(torch.isfinite(p).all() for p in nc.model.parameters())


def test_metatrain_survives_nan_in_data(tmp_path):
    """A trajectory holding NaN (e.g. exported from a diverging run) only costs skipped steps."""
    store = TrajectoryStore.create(tmp_path / "s", "float32")
    spec = ModelSpec.from_module(TinyTask().build_model(0))
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        states = torch.randn(25, spec.n_params, generator=g).cumsum(0)
        if i == 0:
            states[3:, :5] = float("nan")
        store.begin_run(f"r{i}", "noisy", spec, i, 0.1, 200)
        store.append(f"r{i}", list(range(0, 25 * 200, 200)), states)
    summary = metatrain(_cfg([tmp_path / "s"], tmp_path / "m", spacing=200, val_fraction=0, iters=8,
                             batch_trajectories=1), progress=False, log=lambda s: None)
    assert 0 < summary["skipped_steps"] < 8
    assert load_nowcaster(str(tmp_path / "m")) is not None


def test_metatrain_resumes_exactly(tiny_store, tmp_path):
    full = tmp_path / "full"
    metatrain(_cfg([tiny_store], full), progress=False, log=lambda s: None)

    class Crash(Exception):
        pass

    def crash(it: int, loss: torch.Tensor) -> torch.Tensor:
        if it == 3:
            raise Crash
        return loss

    part = tmp_path / "part"
    with pytest.raises(Crash):
        metatrain(_cfg([tiny_store], part), progress=False, log=lambda s: None, fault=crash)
    assert not (part / "model.safetensors").exists() and (part / "train" / "checkpoint.pt").is_file()
    msgs: list[str] = []
    metatrain(_cfg([tiny_store], part), progress=False, log=msgs.append)
    assert any("resuming at iteration 2" in m for m in msgs)
    from safetensors.torch import load_file

    a, b = load_file(str(full / "model.safetensors")), load_file(str(part / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="different run"):
        metatrain(_cfg([tiny_store], part, iters=9), progress=False, log=lambda s: None)


@pytest.mark.parametrize("keep", ["best", "last"])
def test_metatrain_keeps_the_best_validated_weights(tiny_store, tmp_path, keep):
    """lr 1.0 makes the validation loss bounce, so the best weights are not the last ones."""
    out = tmp_path / keep
    summary = metatrain(_cfg([tiny_store], out, lr=1.0, iters=8, val_every=1, keep=keep), progress=False,
                        log=lambda s: None)
    hist = json.loads((out / "train" / "history.json").read_text())
    vals = dict((it, v) for it, v in hist["val"])
    best_it = min(vals, key=vals.get)
    assert best_it != 8 and tuple(hist["best"]) == (best_it, vals[best_it])
    from safetensors.torch import load_file

    written = load_file(str(out / "model.safetensors"))
    last = torch.load(out / "train" / "checkpoint.pt", weights_only=True)["model"]
    same_as_last = all(torch.equal(written[k], last[k]) for k in written)
    if keep == "best":
        assert not same_as_last and summary["kept_iteration"] == best_it and summary["val_loss"] == vals[best_it]
        assert f"weights kept: iteration {best_it} (lowest validation loss)" in (out / "MODEL_CARD.md").read_text()
    else:
        assert same_as_last and summary["kept_iteration"] == 8 and summary["val_loss"] == vals[8]


# ----------------------------------------------------------------------------- export
def test_export_recorded_sessions(tmp_path):
    from ninocast_server.metatrain.export import export_sessions
    from ninocast_server.sessions.safetensors_io import encode
    from ninocast_server.sessions.store import SessionStore

    data = tmp_path / "data"
    ss = SessionStore(data, max_sessions_per_key=10, ttl_s=1e9, max_history=10)
    ss.open()
    model = TinyTask().build_model(0)
    spec = ModelSpec.from_module(model)
    g = torch.Generator().manual_seed(0)
    flats = torch.randn(7, spec.n_params, generator=g).cumsum(0)
    sessions = {}
    for record in (True, False):
        s = ss.create("alice", spec, "linefit", 5, 1000, 10000, record, "my-run" if record else None)
        sessions[record] = s.id
        for i, flat in enumerate(flats):
            head, body = encode(flat, spec, "F32")
            tmp = ss.tmp_dir / f"up-{record}-{i}.safetensors"
            tmp.write_bytes(head + bytes(body))
            ss.commit_state(s, 200 * (i + 1), tmp, tmp.stat().st_size)
    msgs: list[str] = []
    store = export_sessions(data, tmp_path / "store", dtype="float32", log=msgs.append)
    assert list(store.runs) == [f"alice-{sessions[True]}"]
    run = store.runs[f"alice-{sessions[True]}"]
    assert run.task == "my-run" and run.interval == 200 and run.steps == [200 * (i + 1) for i in range(7)]
    assert torch.equal(store.load(run.id)[1], flats)
    assert any("record=true" in m for m in msgs)
    store.validate(deep=True)
    # a team fine-tunes on it (short trajectories need a small spacing)
    assert TrajectoryStore.open(tmp_path / "store").runs[run.id].info["source"] == "session"


def test_export_cli_errors(tmp_path, capsys):
    from ninocast.cli import main

    assert main(["export-trajectories", "--data-dir", str(tmp_path), "-o", str(tmp_path / "o")]) == 2
    assert "not a ninocast data directory" in capsys.readouterr().err


def test_gpt2_vocabulary_subsampling_and_global_scaling(tmp_path):
    """§6.2 step 5 and §4's training mode: GPT-2 windows keep wte_size random token rows (pos_w = id + 1) and
    are scaled with one mean/std from wte on."""
    import transformers

    cfg = transformers.GPT2Config(vocab_size=50, n_positions=6, n_embd=8, n_layer=1, n_head=2)
    torch.manual_seed(0)
    spec = ModelSpec.from_module(transformers.GPT2LMHeadModel(cfg))
    assert spec.family == "gpt2" and spec.params[0][0] == "transformer.wte.weight"
    store = TrajectoryStore.create(tmp_path / "s", "float32")
    states = (torch.randn(25, spec.n_params, generator=torch.Generator().manual_seed(0)) * 0.1).cumsum(0)
    store.begin_run("lm", "tiny-lm", spec, 0, 1e-3, 200)
    store.append("lm", list(range(0, 5000, 200)), states)
    sampler = WindowSampler.from_stores([store], wte_size=10, windows=1)
    ex = sampler.trajectory_examples(sampler.trajectories[0], torch.Generator().manual_seed(3))[0]
    small = ModelSpec("gpt2", tuple((n, (10, 8) if n.endswith("wte.weight") else s) for n, s in spec.params), 2)
    graph = build_graph(small, with_lpe=False)
    E = graph.num_edges
    assert ex["x"].shape == (E, F_PAD * 5)
    tok = ex["pos_w"][ex["pos_w"] > 0]
    assert tok.numel() == 10 and bool((tok[1:] > tok[:-1]).all()) and int(tok.max()) <= 50
    x = ex["x"].view(-1, 5)
    slot = (graph.param_slot // graph.feat_size) * F_PAD + graph.param_slot % graph.feat_size
    real = x[slot]  # (P_small, 5): one group for the whole vector, since wte is the first tensor
    assert abs(float(real.mean())) < 1e-4 and abs(float(real.std()) - 1) < 1e-3
    wte = real[: 10 * 8]
    assert abs(float(wte.mean())) > 1e-3 or abs(float(wte.std()) - 1) > 1e-3  # not scaled per tensor
    # the kept rows are the sampled token ids' rows of the original wte
    ids = tok - 1
    keep = torch.cat([(ids[:, None] * 8 + torch.arange(8)).reshape(-1), torch.arange(50 * 8, spec.n_params)])

    def scaled_at(t0: int) -> torch.Tensor:
        win = states[t0:t0 + 5].T[keep]
        return (win - win.mean()) / (win.std() + 1e-6)

    assert any(torch.allclose(real, scaled_at(t0), atol=1e-4) for t0 in range(25 - 5))


def test_metatrain_time_limit_writes_a_resumable_model(tiny_store, tmp_path):
    out = tmp_path / "m"
    summary = metatrain(_cfg([tiny_store], out, max_minutes=1e-9), progress=False, log=lambda s: None)
    assert summary["iterations"] == 0 and (out / "model.safetensors").is_file()
    card = (out / "MODEL_CARD.md").read_text()
    assert "stopped by --max-minutes" in card and "{cfg." not in card
    assert metatrain(_cfg([tiny_store], out), progress=False, log=lambda s: None)["iterations"] == 6


# ----------------------------------------------------------------------------- per-task sampling weights
def test_task_weights_set_the_task_mix(tiny_store):
    store = TrajectoryStore.open(tiny_store)
    draw = lambda weights: [WindowSampler.from_stores([store], spacing=2, windows=2, task_weights=weights)  # noqa: E731
                            .pick_task(g) for g in [torch.Generator().manual_seed(0)] for _ in range(600)]
    uniform, weighted = draw(None), draw({"tiny-conv": 4})
    assert 0.42 < uniform.count("tiny-conv") / 600 < 0.58
    assert 0.74 < weighted.count("tiny-conv") / 600 < 0.86  # 4 : 1 -> 80 %
    gen = torch.Generator().manual_seed(0)  # no weights: exactly the draws of the uniform sampler before weights
    assert uniform[:20] == [["tiny-conv", "tiny-mlp"][int(torch.randint(0, 2, (1,), generator=gen))]
                            for _ in range(20)]
    with pytest.raises(ValueError, match="positive"):
        WindowSampler.from_stores([store], spacing=2, windows=2, task_weights={"tiny-mlp": 0})


def test_metatrain_task_weight_option_and_its_errors(tiny_store, tmp_path, capsys):
    from ninocast.cli import main

    args = [str(tiny_store), "--iters", "2", "--spacing", "2", "--hid", "8", "--layers", "2",
            "--batch-trajectories", "1", "--windows", "1", "--val-batches", "1", "-q"]
    out = tmp_path / "weighted"
    assert main(["metatrain", *args, "-o", str(out), "--task-weight", "tiny-conv=3"]) == 0
    assert json.loads((out / "config.json").read_text())["source"]["config"]["task_weights"] == {"tiny-conv": 3.0}
    assert "tiny-conv x3 (other tasks x1)" in (out / "MODEL_CARD.md").read_text()
    capsys.readouterr()
    for bad, mentions in [("fm-16=2", "without training trajectories"), ("tiny-conv", "TASK=WEIGHT"),
                          ("tiny-conv=-1", "positive"), ("tiny-conv=nan", "positive")]:
        assert main(["metatrain", *args, "-o", str(tmp_path / "x"), "--task-weight", bad]) == 2, bad
        assert mentions in capsys.readouterr().err, bad


def test_validation_is_per_task_and_kept_by_the_mean_ratio_to_last(tiny_store, tmp_path):
    """With several tasks each one is validated on its own windows; the kept weights minimise the mean of
    L1 / last-state L1, so a task with large graphs cannot decide alone."""
    store = TrajectoryStore.open(tiny_store)
    sampler = WindowSampler.from_stores([store], spacing=2, windows=2)
    gen = torch.Generator().manual_seed(0)
    conv_edges = sampler.sample(gen, 2, task="tiny-conv").edge_attr.shape[0]
    mlp_edges = sampler.sample(gen, 2, task="tiny-mlp").edge_attr.shape[0]
    assert conv_edges != mlp_edges  # each batch holds one task's graphs only
    with pytest.raises(KeyError, match="no trajectories of task 'nope'"):
        sampler.sample(gen, 1, task="nope")

    out = tmp_path / "per-task"
    summary = metatrain(_cfg([tiny_store], out, val_every=2), progress=False, log=lambda s: None)
    assert summary["val_metric"] == "mean over tasks of L1 / last-state L1"
    per = summary["val_tasks"]
    assert set(per) == {"tiny-conv", "tiny-mlp"}
    ratios = [v["l1"] / v["last"] for v in per.values()]
    assert all(v["l1"] > 0 and v["last"] > 0 and v["linefit"] > 0 for v in per.values())
    assert summary["val_loss"] == pytest.approx(sum(ratios) / 2)
    hist = json.loads((out / "train" / "history.json").read_text())
    assert [it for it, _ in hist["val_tasks"]] == [it for it, _ in hist["val"]]
    card = (out / "MODEL_CARD.md").read_text()
    assert "| tiny-conv |" in card and "L1 / last" in card

    one = tmp_path / "one-task"  # a single task keeps the plain L1 (and the earlier rounds' validation draws)
    summary = metatrain(_cfg([tiny_store], one, tasks=["tiny-mlp"]), progress=False, log=lambda s: None)
    assert summary["val_metric"] == "L1" and "val_tasks" not in summary


def test_unused_padding_slots_are_dropped_without_changing_the_loss(tiny_store):
    """MLP edges hold one weight: training on the first slot only gives the loss of the padded batch."""
    from ninocast_server.engine.nowcasters.config import NiNoConfig
    from ninocast_server.engine.nowcasters.layers import init_weights
    from ninocast_server.engine.nowcasters.nino import NiNoModel
    from ninocast_server.metatrain.train import forward, trim_unused_slots

    torch.manual_seed(0)
    model = NiNoModel(NiNoConfig(ctx=5, hid=16, layers=2, seq_len=6))
    init_weights(model)
    sampler = WindowSampler.from_stores([TrajectoryStore.open(tiny_store)], spacing=2, windows=2, horizon=6)
    gen = torch.Generator().manual_seed(1)
    mlp, conv = sampler.sample(gen, 2, task="tiny-mlp"), sampler.sample(gen, 2, task="tiny-conv")
    small = trim_unused_slots(mlp, 6)
    assert small.edge_attr.shape == (mlp.edge_attr.shape[0], 5) and small.target.shape[1] == 6
    full_loss = masked_l1(forward(model, mlp), mlp.target, mlp.mask)
    assert float(masked_l1(forward(model, small), small.target, small.mask)) == pytest.approx(float(full_loss),
                                                                                             rel=1e-5)
    assert trim_unused_slots(conv, 6) is conv  # 3x3 kernels fill all nine slots


def test_early_fraction_starts_that_share_of_windows_in_the_first_ctx_snapshots(tiny_store):
    """The first nowcast (k = 40) jumps from the first ctx snapshots; --early-fraction makes that many windows start
    there. At 0 the draws are exactly those of the uniform sampler (old runs resume with the same batches)."""
    store = TrajectoryStore.open(tiny_store)
    starts = lambda frac: [WindowSampler.from_stores([store], spacing=2, windows=2, early_fraction=frac)  # noqa: E731
                           .window_start(60, 1, g) for g in [torch.Generator().manual_seed(0)] for _ in range(800)]
    uniform, half, early = starts(0.0), starts(0.5), starts(1.0)
    hi = 60 - (5 + 10 + 2)
    assert max(early) == 5 and min(early) == 0  # ctx = 5: starts 0..5
    assert max(uniform) == hi - 1 and sum(s <= 5 for s in uniform) / 800 < 0.2
    assert 0.5 < sum(s <= 5 for s in half) / 800 < 0.65  # 50 % early + the uniform draws that land there
    gen = torch.Generator().manual_seed(0)
    assert uniform[:20] == [int(torch.randint(0, hi, (1,), generator=gen)) for _ in range(20)]
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="early_fraction"):
            WindowSampler.from_stores([store], spacing=2, windows=2, early_fraction=bad)


def test_metatrain_early_fraction_option_and_its_error(tiny_store, tmp_path, capsys):
    from ninocast.cli import main

    args = [str(tiny_store), "--iters", "2", "--spacing", "2", "--hid", "8", "--layers", "2",
            "--batch-trajectories", "1", "--windows", "1", "--val-batches", "1", "-q"]
    out = tmp_path / "early"
    assert main(["metatrain", *args, "-o", str(out), "--early-fraction", "0.3"]) == 0
    assert json.loads((out / "config.json").read_text())["source"]["config"]["early_fraction"] == 0.3
    assert "30% of trajectories with windows from their first 5 snapshots" in (out / "MODEL_CARD.md").read_text()
    capsys.readouterr()
    assert main(["metatrain", *args, "-o", str(tmp_path / "x"), "--early-fraction", "2"]) == 2
    assert "--early-fraction must be a number in [0, 1]" in capsys.readouterr().err

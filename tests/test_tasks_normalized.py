"""fm-16-bn and fm-mlp-ln: Fashion-MNIST tasks with BatchNorm / LayerNorm models (issue 11, docs/tasks.md).

Their settings and models, their batches (FM-16's), real AdamW steps, their neural graphs (traced = name order,
norm edges placed), nowcasts through the local engine (linefit and the official checkpoint) and ``ninocast
collect`` on them. Tests that need the real Fashion-MNIST skip where it is absent, like the FM tests."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from nowcast_checks import assert_same, engine_nowcast, params
from ninocast import ModelSpec, NowcastOptimizer
from ninocast.flat import flatten
from ninocast_server.engine.graphs import build_graph
from ninocast_server.engine.graphs.generic import T_BIAS, T_NORM
from ninocast_server.tasks import TASKS, get_task
from ninocast_server.tasks.normalized import BatchNormNet, LayerNormMLP
from ninocast_server.tasks.vision import DEFAULT_FASHION_MNIST_DIR, FashionMNISTTask, Net, _load_dir, fm16
from shared_data import checkpoint
from test_traced_identity import assert_same_graph

NORM_TASKS = ("fm-16-bn", "fm-mlp-ln")


def need_fashion_mnist() -> None:
    d = os.environ.get("NINOCAST_FASHION_MNIST_DIR", DEFAULT_FASHION_MNIST_DIR)
    if not any(os.path.exists(os.path.join(d, "train-images-idx3-ubyte" + ext)) for ext in (".gz", "")):
        pytest.skip(f"Fashion-MNIST idx files absent from {d} (apt-get install dataset-fashion-mnist)")
    _load_dir.cache_clear()


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_and_settings():
    fm = fm16()
    for name in NORM_TASKS:
        assert name in TASKS
        task = get_task(name.upper().replace("-", "_"))
        assert isinstance(task, FashionMNISTTask) and task.name == name
        info = task.info()
        assert {k: info[k] for k in ("kind", "metric", "higher_is_better", "budget", "period", "ctx", "eval_every",
                                     "in_distribution", "batch_size", "weight_decay")} == \
            {"kind": "vision", "metric": "test_acc", "higher_is_better": True, "budget": 10_000, "period": 1000,
             "ctx": 5, "eval_every": 50, "in_distribution": True, "batch_size": fm.batch_size, "weight_decay": 0.0}
        assert 50.0 < task.target < 100.0 and 0 < task.lr < 0.1
        assert f"lr {task.lr}" in task.description and f"target {task.target}%" in task.description
        assert isinstance(task.make_optimizer(task.build_model(0)), torch.optim.AdamW)


def test_batchnorm_net_layers_and_parameter_count():
    model = get_task("fm-16-bn").build_model(0)
    assert isinstance(model, BatchNormNet)
    layers = list(model.fc)
    convs = [i for i, m in enumerate(layers) if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3
    for i in convs:  # conv (no bias) -> BatchNorm of its channels -> ReLU
        conv, bn, act = layers[i:i + 3]
        assert conv.bias is None and isinstance(bn, nn.BatchNorm2d) and bn.num_features == conv.out_channels
        assert bn.affine and bn.track_running_stats and isinstance(act, nn.ReLU)
    assert [n for n, _ in model.named_parameters()] == [
        "fc.0.weight", "fc.1.weight", "fc.1.bias", "fc.3.weight", "fc.4.weight", "fc.4.bias",
        "fc.6.weight", "fc.7.weight", "fc.7.bias", "fc.11.weight", "fc.11.bias"]
    # FM-16's Net less its conv biases plus a scale and a shift per BatchNorm channel
    net = Net((16, 32, 32))
    conv_biases = sum(m.bias.numel() for m in net.modules() if isinstance(m, nn.Conv2d))
    bn_params = sum(2 * m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert n_params(model) == n_params(net) - conv_biases + bn_params == 14_458  # docs/tasks.md
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), get_task("fm-16-bn").build_model(0).parameters()))


def test_layernorm_mlp_layers_and_parameter_count():
    model = get_task("fm-mlp-ln").build_model(0)
    assert isinstance(model, LayerNormMLP)
    linears = [m for m in model.fc if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 128), (128, 128), (128, 10)]
    layers = list(model.fc)
    assert isinstance(layers[0], nn.Flatten)
    for i, m in enumerate(layers[:-1]):
        if isinstance(m, nn.Linear):  # every hidden Linear -> LayerNorm of its width -> ReLU
            assert isinstance(layers[i + 1], nn.LayerNorm) and layers[i + 1].normalized_shape == (m.out_features,)
            assert isinstance(layers[i + 2], nn.ReLU)
    assert [n for n, _ in model.named_parameters()] == [f"fc.{i}.{w}" for i in (1, 2, 4, 5, 7)
                                                        for w in ("weight", "bias")]
    expected = sum(m.in_features * m.out_features + m.out_features for m in linears) + \
        sum(2 * m.normalized_shape[0] for m in layers if isinstance(m, nn.LayerNorm))
    assert n_params(model) == expected == 118_794  # docs/tasks.md
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)


@pytest.mark.parametrize("name", NORM_TASKS)
def test_graph_places_norm_parameters_and_tracing_agrees(name):
    model = get_task(name).build_model(0)
    spec = ModelSpec.from_module(model)
    assert spec.family == "generic" and spec.n_params == n_params(model)
    traced = ModelSpec.from_module(model, graph="traced")
    assert_same_graph(traced, spec)  # the traced topology gives the paper's name-order graph exactly
    graph = build_graph(spec)
    norm_shapes = {n: p.shape for n, p in model.named_parameters()
                   if any(n.startswith(f"fc.{i}.") for i, m in enumerate(model.fc)
                          if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)))}
    assert norm_shapes and graph.n_params == n_params(model)
    for n, shape in norm_shapes.items():  # scales are norm edges, shifts bias edges, one per channel
        lo, hi = graph.edge_ranges[n]
        assert hi - lo == shape[0]
        assert set(graph.edge_type[lo:hi].tolist()) == {T_NORM if n.endswith("weight") else T_BIAS}


def _train_wrapped(task, nowcaster: str, steps: int, period: int):
    """``steps`` real steps of the task's AdamW wrapped by a local NowcastOptimizer; returns the model, the
    wrapper, and per nowcast (the snapshots it saw, parameters and buffers just before and after it)."""
    model = task.build_model(0)
    spec = ModelSpec.from_module(model)
    opt = NowcastOptimizer(task.make_optimizer(model), model, local=True, nowcaster=nowcaster, period=period, ctx=5,
                           max_train_steps=steps, final_nowcast="keep")
    batches, seen = task.batches(0), []
    for step in range(steps):
        nowcast_call = not opt.need_grads
        if nowcast_call:
            window = [snap for _, snap in opt.snapshots]
            before, buffers = params(model), {n: b.clone() for n, b in model.named_buffers()}
        else:
            opt.zero_grad()
            task.loss(model, next(batches)).backward()
        opt.step()
        if nowcast_call:
            seen.append((window, before, buffers, params(model)))
    return model, spec, opt, seen


@pytest.mark.parametrize("name", NORM_TASKS)
def test_linefit_nowcast_through_the_local_engine(name):
    need_fashion_mnist()
    task = get_task(name)
    model, spec, opt, seen = _train_wrapped(task, "linefit", steps=20, period=10)
    assert [n["step"] for n in opt.nowcasts] == [9, 19] and not opt.failures and len(seen) == 2
    for (window, before, buffers, after), record in zip(seen, opt.nowcasts):
        assert {n: p.shape for n, p in after.items()} == {n: p.shape for n, p in before.items()}
        assert any(not torch.equal(before[n], after[n]) for n in after)  # the nowcast moved the weights
        # exactly the engine's linefit of the window: ctx - 1 snapshots and the parameters at the call
        assert len(window) == 4
        expected = engine_nowcast(spec, [*window, before], k=record["k"])
        assert_same(after, expected)
    # a nowcast never touches BatchNorm's running statistics: only parameters are in the spec
    if name == "fm-16-bn":
        assert {n for n, _ in model.named_buffers()} == {f"fc.{i}.{b}" for i in (1, 4, 7)
                                                        for b in ("running_mean", "running_var",
                                                                  "num_batches_tracked")}
        _, _, buffers, _ = seen[-1]
        assert all(torch.equal(buffers[n], b) for n, b in model.named_buffers())


@pytest.mark.parametrize("name", NORM_TASKS)
def test_official_checkpoint_nowcasts_them(name):
    need_fashion_mnist()
    ckpt = checkpoint("nino_no_posw")
    model, spec, opt, seen = _train_wrapped(get_task(name), str(ckpt), steps=10, period=10)
    assert [n["step"] for n in opt.nowcasts] == [9] and not opt.failures
    (_, before, _, after), = seen
    assert {n: p.shape for n, p in after.items()} == {n: p.shape for n, p in before.items()}
    assert all(torch.isfinite(p).all() for p in after.values())
    assert any(not torch.equal(before[n], after[n]) for n in after)


@pytest.mark.parametrize("name", NORM_TASKS)
def test_fm16_batches_and_adamw_learns(name):
    need_fashion_mnist()
    task, ref = get_task(name), fm16()
    for seed in (0, 1000):
        (x, y), (rx, ry) = next(task.batches(seed)), next(ref.batches(seed))
        assert x.shape == (128, 1, 28, 28) and torch.equal(x, rx) and torch.equal(y, ry)
    probes, ref_probes = task.probe_batches(3), ref.probe_batches(3)
    assert len(probes) == len(ref_probes) == 8
    for (px, py), (rx, ry) in zip(probes, ref_probes):
        assert torch.equal(px, rx) and torch.equal(py, ry)
    model = task.build_model(0)
    opt = task.make_optimizer(model)
    batches = task.batches(0)
    probe = next(task.batches(12345))
    with torch.no_grad():
        start = float(task.loss(model, probe))
    before = task.evaluate(model)
    for _ in range(40):
        opt.zero_grad()
        task.loss(model, next(batches)).backward()
        opt.step()
    with torch.no_grad():
        assert float(task.loss(model, probe)) < 0.7 * start
    after = task.evaluate(model)
    assert model.training and after["test_loss"] < before["test_loss"] and after["test_acc"] > before["test_acc"]


def test_collect_smoke(tmp_path):
    need_fashion_mnist()
    from ninocast.cli import main

    out = tmp_path / "store"
    assert main(["collect", "-o", str(out), "--tasks", ",".join(NORM_TASKS), "--seeds", "0", "--steps", "6",
                 "--interval", "3", "--threads", "1", "-q"]) == 0
    runs = json.loads((out / "manifest.json").read_text())["runs"]
    assert sorted(r["task"] for r in runs.values()) == sorted(NORM_TASKS)
    for r in runs.values():
        task = get_task(r["task"])
        assert r["steps"] == [0, 3, 6] and r["lr"] == task.lr and r["info"]["in_distribution"] is True
        assert [tuple(s) for _, s in r["spec"]["params"]] == [tuple(p.shape) for p in task.build_model(0).parameters()]
        assert all(0 <= m["test_acc"] <= 100 for m in r["metrics"])

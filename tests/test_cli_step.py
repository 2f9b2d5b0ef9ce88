"""`ninocast step` and `ninocast import-checkpoint`: real files in, real files out, every user error a clear
one-line message with exit status 2."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ninocast.cli import main
from ninocast.flat import flatten
from ninocast.spec import ModelSpec
from ninocast_server.engine import nowcast
from ninocast_server.engine.nowcasters.checkpoint import load_nowcaster
from shared_data import CHECKPOINTS, need


@pytest.fixture()
def run(tmp_path):
    """Five state files of a small ConvNet with BatchNorm trained for real, a spec.json beside them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    spec = ModelSpec.from_module(model)
    (tmp_path / "spec.json").write_text(json.dumps(spec.to_json()))
    paths = []
    for step in range(10):
        x = torch.randn(16, 1, 8, 8)
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 2 == 1:
            path = tmp_path / f"s{step}.safetensors"
            sd = model.state_dict()
            sd["5.weight"] = sd["5.weight"].to(torch.bfloat16)  # dtypes must survive the round trip
            save_file(sd, str(path))
            paths.append(str(path))
    return tmp_path, spec, paths


def test_step_writes_nowcast_with_buffers_and_dtypes(run, capsys):
    folder, spec, paths = run
    out = folder / "out.safetensors"
    assert main(["step", "--nowcaster", "linefit", "--k", "3", *paths, "--out", str(out)]) == 0
    got = load_file(str(out))
    newest = load_file(paths[-1])
    assert set(got) == set(newest)  # buffers (running stats, num_batches_tracked) pass through
    assert torch.equal(got["1.running_mean"], newest["1.running_mean"])
    assert got["1.num_batches_tracked"].dtype == torch.int64
    assert got["5.weight"].dtype == torch.bfloat16
    states = torch.stack([flatten(load_file(p), spec) for p in paths], dim=1)
    expected = nowcast(load_nowcaster("linefit"), spec, states, 3)
    torch.testing.assert_close(flatten(got, spec), expected, rtol=0, atol=1e-2)  # bf16 rounding on one tensor
    assert "linefit" in capsys.readouterr().out
    # the output carries its spec: a second step needs no --spec and no spec.json
    (folder / "spec.json").unlink()
    out2 = folder / "sub" / "again.safetensors"
    meta_paths = paths[1:] + [str(out)]
    assert main(["step", "--nowcaster", "linefit", "--k", "1", "--in-given-order", *meta_paths,
                 "--out", str(out2)]) == 0


@pytest.mark.parametrize("case, message", [
    ("count", "needs exactly 5 state files"),
    ("missing_file", "no such file"),
    ("not_safetensors", "not a readable safetensors file"),
    ("missing_name", "missing parameters ['0.bias']"),
    ("shape", "0.weight has shape"),
    ("nan", "contains NaN or Inf"),
    ("int", "dtype"),
    ("k", "k must be an integer in 1..40"),
    ("nowcaster", "cannot load nowcaster"),
    ("bad_spec", "invalid spec"),
    ("no_spec", "no spec"),
    ("cuda", "CUDA is not available"),
])
def test_step_errors(run, capsys, case, message):
    folder, spec, paths = run
    args = ["step", "--nowcaster", "linefit", "--k", "2", "--out", str(folder / "o.safetensors")]
    files = list(paths)
    if case == "count":
        files = files[:4]
    elif case == "missing_file":
        files[2] = str(folder / "nope.safetensors")
    elif case == "not_safetensors":
        (folder / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
        files[0] = str(folder / "junk.safetensors")
    elif case in ("missing_name", "shape", "nan", "int"):
        sd = load_file(files[3])
        if case == "missing_name":
            del sd["0.bias"]
        elif case == "shape":
            sd["0.weight"] = torch.zeros(4, 1, 2, 2)
        elif case == "nan":
            sd["0.bias"][1] = float("nan")
        else:
            sd["0.bias"] = torch.zeros(4, dtype=torch.int32)
        save_file(sd, files[3])
    elif case == "k":
        args[4] = "0"
    elif case == "nowcaster":
        args[2] = str(folder / "missing.pt")
    elif case == "bad_spec":
        (folder / "spec.json").write_text('{"family": "resnet", "params": [["a", [1]]]}')
    elif case == "no_spec":
        (folder / "spec.json").unlink()
    elif case == "cuda":
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA: the error path cannot be reached")
        args += ["--device", "cuda"]
    assert main(args + files) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert len(err.strip().splitlines()) == 1  # one line, no traceback
    assert not (folder / "o.safetensors").exists()  # nothing half-written


def test_import_checkpoint_round_trip(tmp_path, capsys):
    src = need(CHECKPOINTS / "nino_mlp.pt")
    out = tmp_path / "models" / "wnn"
    assert main(["import-checkpoint", str(src), "-o", str(out)]) == 0
    assert (out / "model.safetensors").stat().st_mode & 0o044 == 0o044  # readable by a server of another user
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["kind"], cfg["name"]) == ("wnn", "nino_mlp")
    a, b = load_nowcaster(str(src)), load_nowcaster(str(out))
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    bad = tmp_path / "evil.pt"
    bad.write_bytes(b"not a zip at all")
    assert main(["import-checkpoint", str(bad), "-o", str(tmp_path / "x")]) == 2
    assert "not a readable PyTorch checkpoint" in capsys.readouterr().err


def test_help_lists_every_subcommand():
    res = subprocess.run([sys.executable, "-m", "ninocast", "--help"], capture_output=True, text=True)
    assert res.returncode == 0
    for cmd in ("step", "spec", "import-checkpoint", "serve", "keys", "bench"):
        assert cmd in res.stdout
    res = subprocess.run([sys.executable, "-m", "ninocast", "step", "--help"], capture_output=True, text=True)
    assert "--nowcaster" in res.stdout and "buffers" in res.stdout


# ---------------------------------------------------------------------------- the order of the state files
def test_step_orders_files_by_step_not_by_the_shells_text_order(run, capsys, tmp_path):
    folder, spec, paths = run
    steps = [200, 400, 600, 800, 1000]
    named = []
    for step, path in zip(steps, paths):
        named.append(str(tmp_path / f"step_{step}.safetensors"))
        save_file(load_file(path), named[-1])
    (tmp_path / "spec.json").write_text(json.dumps(spec.to_json()))
    glob_order = sorted(named)  # what `step_*.safetensors` expands to: step_1000 first
    assert glob_order[0].endswith("step_1000.safetensors")
    right, shuffled = tmp_path / "right.safetensors", tmp_path / "shuffled.safetensors"
    assert main(["step", "--nowcaster", "linefit", "--k", "3", *named, "--out", str(right)]) == 0  # oldest first
    assert main(["step", "--nowcaster", "linefit", "--k", "3", *glob_order, "--out", str(shuffled)]) == 0
    assert "numbers in the file names" in capsys.readouterr().out
    a, b = load_file(str(right)), load_file(str(shuffled))
    assert all(torch.equal(a[n], b[n]) for n in a)

    # the step in the metadata wins over names that say nothing
    meta = []
    for i, (step, path) in enumerate(zip(steps, paths)):
        meta.append(str(tmp_path / f"ckpt-{'edcba'[i]}.safetensors"))
        save_file(load_file(path), meta[-1], metadata={"ninocast.step": str(step)})
    by_meta = tmp_path / "meta.safetensors"
    assert main(["step", "--nowcaster", "linefit", "--k", "3", *reversed(meta), "--out", str(by_meta)]) == 0
    c = load_file(str(by_meta))
    assert all(torch.equal(a[n], c[n]) for n in a)

    # no step anywhere: refused, unless the user vouches for the order
    plain = []
    for i, path in enumerate(paths):
        plain.append(str(tmp_path / f"ckpt-{'edcba'[i]}-plain.safetensors"))
        save_file(load_file(path), plain[-1])
    capsys.readouterr()
    assert main(["step", "--nowcaster", "linefit", "--k", "3", *plain, "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "cannot tell the order" in err and "--in-given-order" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.safetensors").exists()


# ---------------------------------------------------------------------------- ninocast spec
def test_spec_command_from_a_factory_and_from_a_hugging_face_config(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_models.py").write_text(
        "import torch\n"
        "def make():\n"
        "    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))\n"
        "    m[0].requires_grad_(False)  # frozen: not nowcast, not in the spec\n"
        "    return m\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["spec", "my_models:make", "-o", "spec.json"]) == 0
    assert json.loads((tmp_path / "spec.json").read_text()) == {
        "family": "generic", "params": [["2.weight", [2, 8]], ["2.bias", [2]]]}

    import transformers

    cfg = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=2, n_head=4)
    cfg.save_pretrained(tmp_path / "gpt")
    assert main(["spec", str(tmp_path / "gpt" / "config.json"), "-o", "gpt.json"]) == 0
    got = ModelSpec.load(str(tmp_path / "gpt.json"))
    assert got == ModelSpec.from_module(transformers.GPT2LMHeadModel(cfg))
    assert (got.family, got.num_heads) == ("gpt2", 4) and "gpt2 spec" in capsys.readouterr().out

    for bad, message in (("my_models", "MODULE:FACTORY"), ("my_models:nope", "cannot import"),
                         ("missing.json", "no such file")):
        assert main(["spec", bad, "-o", "x.json"]) == 2
        assert message in capsys.readouterr().err


def test_bench_speedup_help_names_every_registered_task():
    """The task list in ``bench speedup --help`` is written by hand (the client does not import the server);
    this keeps it in step with the registry."""
    from ninocast_server.tasks import TASKS

    res = subprocess.run([sys.executable, "-m", "ninocast", "bench", "speedup", "--help"], capture_output=True,
                         text=True, env={**os.environ, "COLUMNS": "400"})
    assert res.returncode == 0
    text = " ".join(res.stdout.replace("-\n", "-").split())  # argparse may wrap a name at a hyphen
    missing = [name for name in TASKS if f" {name}," not in text and f" {name}." not in text]
    assert not missing, f"bench speedup --help does not name {missing}"

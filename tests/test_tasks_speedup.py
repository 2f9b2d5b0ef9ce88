"""Tasks (FM idx loader, KJV bytes + split, digits, registry) and a seconds-long smoke run of `bench speedup`."""

from __future__ import annotations

import csv
import gzip
import json
import shutil
import statistics
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from ninocast_server.tasks import TASKS, get_task
from ninocast_server.tasks.vision import (DEFAULT_FASHION_MNIST_DIR, DatasetMissing, FashionMNISTTask, _load_dir,
                                          fm16, fm32, load_fashion_mnist, read_idx, shuffled_batches)


# ------------------------------------------------------------------------------------------ Fashion-MNIST
def write_idx(path, arr: np.ndarray, compress: bool) -> None:
    code = {np.uint8: 0x08, np.int32: 0x0C}[arr.dtype.type]
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}i", *arr.shape)
    data = header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.fixture
def tiny_fm(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (24, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, 24).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (10, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, 10).astype(np.uint8),
    }
    for i, (name, arr) in enumerate(arrays.items()):
        write_idx(tmp_path / name, arr, compress=i % 2 == 0)  # both .gz and plain files are read
    _load_dir.cache_clear()
    yield tmp_path, arrays
    _load_dir.cache_clear()


def test_idx_reader_and_loader_on_tiny_files(tiny_fm, monkeypatch):
    d, arrays = tiny_fm
    assert np.array_equal(read_idx(d / "train-images-idx3-ubyte.gz"), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(read_idx(d / "train-labels-idx1-ubyte"), arrays["train-labels-idx1-ubyte"])
    monkeypatch.setenv("NINOCAST_FASHION_MNIST_DIR", str(d))
    task = fm16()
    x, y = next(task.batches(1))
    assert x.shape == (22, 1, 28, 28) and y.dtype == torch.int64  # 24 - 24 // 12 = 22 training images, batch 128
    first = torch.from_numpy(arrays["train-images-idx3-ubyte"][:22]).float() / 255
    assert torch.allclose(((x * 0.3081 + 0.1307).squeeze(1)).sort(0).values, first.sort(0).values, atol=1e-5)
    m = task.evaluate(task.build_model(0))
    assert set(m) >= {"test_acc", "test_loss"} and 0 <= m["test_acc"] <= 100
    assert m["test_acc"] * 10 / 100 == pytest.approx(round(m["test_acc"] * 10 / 100))  # 10 test images


def test_idx_reader_rejects_truncated_file(tmp_path):
    p = tmp_path / "bad-idx1-ubyte"
    p.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">i", 5) + b"\x00\x01")
    with pytest.raises(ValueError, match="expected 5"):
        read_idx(p)


def test_missing_files_say_how_to_get_them(tmp_path):
    _load_dir.cache_clear()
    with pytest.raises(DatasetMissing) as e:
        FashionMNISTTask("fm-16", (16, 32, 32), 89.5, True, data_dir=str(tmp_path)).evaluate(fm16().build_model(0))
    msg = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "NINOCAST_FASHION_MNIST_DIR" in msg


def test_real_fashion_mnist_and_nets():
    import os

    d = os.environ.get("NINOCAST_FASHION_MNIST_DIR", DEFAULT_FASHION_MNIST_DIR)
    if not os.path.exists(os.path.join(d, "train-images-idx3-ubyte.gz")) and \
            not os.path.exists(os.path.join(d, "train-images-idx3-ubyte")):
        pytest.skip(f"Fashion-MNIST idx files absent from {d} (apt-get install dataset-fashion-mnist)")
    _load_dir.cache_clear()
    data = load_fashion_mnist()
    assert data["train_images"].shape == (60000, 28, 28) and data["test_images"].shape == (10000, 28, 28)
    assert set(data["train_labels"].tolist()) == set(range(10))
    for task, p in ((fm16(), 14_378), (fm32(), 56_394)):
        model = task.build_model(1000)
        assert sum(q.numel() for q in model.parameters()) == p
        assert [n for n, _ in model.named_parameters()] == [f"fc.{i}.{w}" for i in (0, 2, 4, 8)
                                                            for w in ("weight", "bias")]
        assert torch.equal(next(task.build_model(1000).parameters()), next(model.parameters()))
        assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    t = fm16()
    x, y = next(t.batches(1000))
    assert x.shape == (128, 1, 28, 28) and len(t._train()[0]) == 55_000


def test_shuffled_batches_epochs_and_seeds():
    it = shuffled_batches(10, 4, seed=7)
    epoch0 = [next(it) for _ in range(3)]
    assert [len(b) for b in epoch0] == [4, 4, 2]  # remainder kept
    assert sorted(torch.cat(epoch0).tolist()) == list(range(10))
    assert torch.equal(torch.cat(epoch0), torch.randperm(10, generator=torch.Generator().manual_seed(7)))
    epoch1 = torch.cat([next(it) for _ in range(3)])
    assert torch.equal(epoch1, torch.randperm(10, generator=torch.Generator().manual_seed(8)))


def test_batches_are_deterministic_per_seed():
    task = get_task("digits")
    a, b, c = task.batches(1000), task.batches(1000), task.batches(2000)
    for _ in range(50):  # crosses an epoch boundary (45 batches per epoch)
        xa, ya = next(a)
        xb, yb = next(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(next(a)[0], next(c)[0])
    m1, m2 = task.build_model(3), task.build_model(3)
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))


def test_digits_cnn_is_the_fm_convnet_on_8x8_images_and_learns():
    from ninocast_server.engine.graphs.build import build_graph
    from ninocast import ModelSpec

    task = get_task("digits-cnn")
    assert (task.kind, task.lr, task.target, task.in_distribution) == ("vision", 3e-3, 90.0, True)
    model = task.build_model(1000)
    assert [tuple(p.shape) for p in model.parameters()] == [(8, 1, 3, 3), (8,), (16, 8, 3, 3), (16,), (16, 16, 3, 3),
                                                          (16,), (10, 16), (10,)]
    graph = build_graph(ModelSpec.from_module(model), with_lpe=False)
    assert graph.n_params == sum(p.numel() for p in model.parameters()) == 3738
    x, y = next(task.batches(1000))
    assert x.shape == (32, 1, 8, 8) and y.shape == (32,)
    before = task.evaluate(model)
    opt = task.make_optimizer(model)
    batches = task.batches(1000)
    for _ in range(150):
        opt.zero_grad()
        task.loss(model, next(batches)).backward()
        opt.step()
    after = task.evaluate(model)
    assert model.training and after["test_loss"] < before["test_loss"] and after["test_acc"] > before["test_acc"] + 20


# ------------------------------------------------------------------------------------------ KJV
def test_byte_tokenizer_and_block_split():
    from ninocast_server.tasks.language import decode, encode, split_blocks

    ids = encode("In the beginning\n")
    assert ids.dtype == torch.int64 and ids.tolist()[:2] == [73, 110] and decode(ids) == "In the beginning\n"
    data = bytes(range(256)) * 40  # 10,240 bytes: blocks of 100 bytes
    train, val = split_blocks(data, block=100, val_every=20, val_offset=10)
    assert len(train) + len(val) == len(data)
    assert val[:100] == data[1000:1100] and val[100:200] == data[3000:3100]
    assert train[:1000] == data[:1000] and train[1000:1100] == data[1100:1200]


def test_kjv_text_split_and_batches():
    if shutil.which("bible") is None:
        pytest.skip("the `bible` command is absent (apt-get install bible-kjv)")
    from ninocast_server.tasks.language import kjv_split, kjv_text

    text = kjv_text()
    assert text.startswith(b"In the beginning God created the heaven and the earth.\n")
    assert text.count(b"\n") == 31_102 and b"Ge1:1" not in text and max(text) < 128
    train, val = kjv_split()
    assert len(train) + len(val) == len(text) and 0.04 < len(val) / len(text) < 0.06
    task = get_task("kjv-gpt2-3-24")
    b1, b2 = next(task.batches(5)), next(task.batches(5))
    assert b1.shape == (task.batch_size, task.seq_len + 1) and torch.equal(b1, b2)
    assert torch.equal(task.val_windows(), get_task("kjv-gpt2-3-24").val_windows())


def test_language_models_and_specs():
    from ninocast import ModelSpec

    expected = {"kjv-gpt2-3-24": ("gpt2", 3), "kjv-gpt2-2-32": ("gpt2", 2), "kjv-gpt2-3-64": ("gpt2", 4),
                "kjv-llama-3-24": ("llama", 3)}
    for name, (family, heads) in expected.items():
        task = get_task(name)
        model = task.build_model(0)
        spec = ModelSpec.from_module(model)
        assert (spec.family, spec.num_heads) == (family, heads), name
        assert task.target > 1.0 and task.metric == "val_ppl" and not task.higher_is_better
        batch = torch.randint(0, 256, (2, task.seq_len + 1))
        assert torch.isfinite(task.loss(model, batch))


def test_larger_meta_training_variants_bracket_the_held_out_gpt2_without_its_width():
    from ninocast import ModelSpec

    held_out = ModelSpec.from_module(get_task("kjv-gpt2-3-64").build_model(0)).n_params
    sizes = {}
    for name, family in {"kjv-gpt2-4-48": "gpt2", "kjv-gpt2-2-80": "gpt2", "kjv-llama-2-64": "llama"}.items():
        task = get_task(name)
        assert (task.budget, task.period, task.eval_every, task.in_distribution) == (1_000, 100, 20, True), name
        assert 4.0 < task.target < 6.5, name  # AdamW's seed-1000 perplexity after 1,000 steps, rounded up
        spec = ModelSpec.from_module(task.build_model(0))
        assert (spec.family, spec.num_heads) == (family, 4), name
        sizes[name] = spec.n_params
    assert sizes["kjv-gpt2-4-48"] < held_out < sizes["kjv-gpt2-2-80"]
    assert all(get_task(n).cfg.d_model != 64 for n in ("kjv-gpt2-4-48", "kjv-gpt2-2-80"))


@pytest.fixture
def text_caches():
    """The corpus readers cache per process: clear them around a test that points them at its own files."""
    from ninocast_server.tasks import language

    readers = (language.fortunes_text, language.jargon_text, language.devil_text, language.corpus_split)
    for read in readers:
        read.cache_clear()
    yield language
    for read in readers:
        read.cache_clear()


def _assert_missing(monkeypatch, language, read, env: str, path: str, package: str) -> None:
    monkeypatch.setenv(env, path)
    read.cache_clear()
    with pytest.raises(language.TextMissing, match=f"apt-get install {package}"):
        read()


def test_fortunes_text_parsing(tmp_path, monkeypatch, text_caches):
    language = text_caches
    (tmp_path / "people").write_bytes(b"First cookie,\n\ttwo lines.\n%\nB_\x08o_\x08ld and plain.\n%\n")
    (tmp_path / "ascii-art").write_bytes(b"  /\\_/\\\n%\n")
    (tmp_path / "people.dat").write_bytes(b"\x00\x01binary index")
    monkeypatch.setenv(language.ENV_FORTUNES, str(tmp_path))
    assert language.fortunes_text() == b"First cookie,\n\ttwo lines.\nBold and plain.\n"
    _assert_missing(monkeypatch, language, language.fortunes_text, language.ENV_FORTUNES, str(tmp_path / "absent"),
                    "fortunes")


def test_jargon_and_devil_text_parsing(tmp_path, monkeypatch, text_caches):
    import gzip

    language = text_caches
    jargon = ("   Table of Contents\n\n   1. Hacker Slang\n\nChapter\u00a01. Hacker Slang\n\n   Hackers talk.\n"
              "\n\n\n\nGlossary\n\n   0\n\n   /dev/null\n\n   :/dev/null: n.\n\n   The bit bucket.\n"
              "      Indented quote.\n").encode()
    (tmp_path / "jargon.txt.gz").write_bytes(gzip.compress(jargon))
    (tmp_path / "devil.dict").write_bytes(b"00-database-short\n     The Devil's Dictionary\n\n"
                                          b"            THE DEVIL'S DICTIONARY\n\n\n\nABSURDITY, n. A statement.\n")
    monkeypatch.setenv(language.ENV_JARGON, str(tmp_path / "jargon.txt.gz"))  # gzipped
    monkeypatch.setenv(language.ENV_DEVIL, str(tmp_path / "devil.dict"))  # plain
    assert language.jargon_text() == ("Chapter\u00a01. Hacker Slang\n\nHackers talk.\n\nGlossary\n"
                                      ":/dev/null: n.\n\nThe bit bucket.\n   Indented quote.\n").encode()
    assert language.devil_text() == b"            THE DEVIL'S DICTIONARY\n\nABSURDITY, n. A statement.\n"
    _assert_missing(monkeypatch, language, language.devil_text, language.ENV_DEVIL, str(tmp_path / "absent.dz"),
                    "dict-devil")
    _assert_missing(monkeypatch, language, language.jargon_text, language.ENV_JARGON, str(tmp_path / "absent.gz"),
                    "jargon-text")


def test_text_roles_of_the_10k_gpt2_tasks():
    """Two in-distribution texts, one validation text (never meta-trained on), one held-out text."""
    roles = {"kjv-gpt2-3-24-10k": ("kjv", True), "jargon-gpt2-3-24-10k": ("jargon", True),
             "jargon-gpt2-2-32-10k": ("jargon", True), "devil-gpt2-3-24-10k": ("devil", False),
             "fortunes-gpt2-3-24-10k": ("fortunes", False)}
    for name, (corpus, in_distribution) in roles.items():
        t = get_task(name)
        assert (t.cfg.corpus, t.in_distribution, t.budget, t.period) == (corpus, in_distribution, 10_000, 1000), name
        assert 3.0 < t.target < 12.0, name


@pytest.mark.parametrize("corpus, package, size", [("jargon", "jargon-text", (1_400_000, 1_700_000)),
                                                   ("devil", "dict-devil", (350_000, 400_000))])
def test_packaged_texts_split(corpus, package, size):
    from ninocast_server.tasks import language

    try:
        train, val = language.corpus_split(corpus)
    except language.TextMissing:
        pytest.skip(f"Debian's {package} is absent (apt-get install {package}); the parsing test covers the rules")
    assert size[0] < len(train) + len(val) < size[1] and 0.04 < len(val) / (len(train) + len(val)) < 0.06


def test_missing_task_data_is_a_one_line_cli_error(tmp_path, monkeypatch, capsys, text_caches):
    from ninocast.cli import main

    language = text_caches
    monkeypatch.setenv(language.ENV_DEVIL, str(tmp_path / "absent.dz"))
    monkeypatch.setenv(language.ENV_JARGON, str(tmp_path / "absent.gz"))
    assert main(["bench", "speedup", "--task", "devil-gpt2-3-24-10k", "--nowcasters", "", "--seeds", "1",
                 "--max-steps", "2", "--no-progress", "--out", str(tmp_path / "bench")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "apt-get install dict-devil" in err and "Traceback" not in err
    assert main(["collect", "-o", str(tmp_path / "store"), "--tasks", "jargon-gpt2-3-24-10k", "--seeds", "0",
                 "--steps", "2", "--interval", "1", "-q"]) == 2
    assert "apt-get install jargon-text" in capsys.readouterr().err


def test_fortunes_corpus_and_10k_language_tasks():
    from ninocast import k_schedule
    from ninocast_server.tasks.language import FORTUNES_DIR, corpus_split

    old = get_task("kjv-gpt2-3-24")  # the first round's tasks are unchanged (stored benchmark runs refer to them)
    assert (old.budget, old.period, old.eval_every, old.target) == (1_000, 100, 20, 6.94)
    held_out = {"kjv-gpt2-3-64-10k", "kjv-llama-3-24-10k", "fortunes-gpt2-3-24-10k"}
    for name in ("kjv-gpt2-3-24-10k", "kjv-gpt2-2-32-10k", "kjv-gpt2-4-16-10k", "kjv-llama-2-32-10k", *sorted(held_out)):
        t = get_task(name)
        assert (t.budget, t.period, t.eval_every, t.ctx, t.eval_before_nowcast) == (10_000, 1000, 100, 5, True), name
        assert t.in_distribution == (name not in held_out) and 3.0 < t.target < 8.0, name
        assert k_schedule(t.budget, t.period) == [40, 33, 26, 21, 16, 11, 8, 5, 3, 1]
    if not Path(FORTUNES_DIR, "fortunes").is_file():
        pytest.skip("the fortunes package is absent (apt-get install fortunes)")
    train, val = corpus_split("fortunes")
    assert 2_000_000 < len(train) + len(val) < 3_500_000 and 0.04 < len(val) / (len(train) + len(val)) < 0.06
    task = get_task("fortunes-gpt2-3-24-10k")
    b1, b2 = next(task.batches(5)), next(task.batches(5))
    assert torch.equal(b1, b2) and b1.shape == (16, 65)
    kjv = get_task("kjv-gpt2-3-24-10k")
    assert not torch.equal(task.val_windows(), kjv.val_windows())
    if shutil.which("bible"):  # the same KJV split and validation windows as the 1,000-step tasks
        assert torch.equal(kjv.val_windows(), old.val_windows())


def test_registry():
    assert {"fm-16", "fm-32", "digits", "digits-cnn", "kjv-gpt2-3-24", "kjv-gpt2-2-32", "kjv-gpt2-3-64",
            "kjv-llama-3-24"} <= set(TASKS)
    assert get_task("FM_16").name == "fm-16"
    with pytest.raises(KeyError, match="known tasks"):
        get_task("cifar-10")
    t = get_task("fm-32")
    assert (t.lr, t.budget, t.batch_size, t.period, t.target, t.in_distribution) == (0.006, 10_000, 128, 1000, 90.5,
                                                                                    False)
    assert get_task("fm-16").target == 89.5 and get_task("fm-16").in_distribution


# ------------------------------------------------------------------------------------------ bench speedup
def test_eval_points():
    from ninocast_server.bench.speedup import eval_points

    assert eval_points(100, 50, 30, False) == {0, 30, 50, 60, 90, 100}
    assert eval_points(100, 50, 30, True) == {0, 30, 49, 50, 60, 90, 99, 100}


def test_bench_speedup_quick_smoke(tmp_path, capsys):
    from ninocast.cli import main

    out = tmp_path / "bench"
    assert main(["bench", "speedup", "--quick", "--no-progress", "--out", str(out)]) == 0
    for f in ("results.md", "summary.csv", "runs.csv", "runs.jsonl", "config.json", "plots/digits.png"):
        assert (out / f).stat().st_size > 0, f
    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert sorted((r["method"], r["seed"]) for r in runs) == [("adamw", 1000), ("adamw", 2000),
                                                              ("linefit", 1000), ("linefit", 2000)]
    for r in runs:
        assert r["max_steps"] == 1000 and r["period"] == 100
        steps = [c[0] for c in r["curve"]]
        assert steps == sorted(steps) and steps[0] == 0 and steps[-1] == r["steps_run"]
        if r["reached"]:  # the first evaluated step at the target, where the run stopped
            first = next(c for c in r["curve"] if c[1] >= r["target"])
            assert first[0] == r["steps_to_target"] == r["steps_run"]
        else:
            assert r["steps_run"] == 1000 and all(c[1] < r["target"] for c in r["curve"])
        if r["method"] == "linefit":
            # the budget's last nowcast (call 1000) is skipped: final_nowcast="skip"
            assert r["nowcast_steps"] == [s for s in range(100, 1000, 100) if s <= r["steps_run"]]
            assert r["nowcast_k"] == [40, 33, 26, 21, 16, 11, 8, 5, 3, 1][:len(r["nowcast_steps"])]
            assert not r["failures"]
        else:
            assert r["nowcaster"] is None and r["n_nowcasts"] == 0
    # identical data and init per seed: AdamW and linefit agree until the first nowcast (step 100)
    for seed in (1000, 2000):
        a, b = (next(r for r in runs if r["method"] == m and r["seed"] == seed) for m in ("adamw", "linefit"))
        assert [c for c in a["curve"] if c[0] < 100] == [c for c in b["curve"] if c[0] < 100]
    rows = {r["method"]: r for r in csv.DictReader(open(out / "summary.csv"))}
    eff = {m: [r["steps_to_target"] if r["reached"] else 2 * r["max_steps"] for r in runs if r["method"] == m]
           for m in ("adamw", "linefit")}
    for m in ("adamw", "linefit"):
        assert float(rows[m]["median_steps"]) == statistics.median(eff[m])
        assert int(rows[m]["reached"]) == sum(r["reached"] for r in runs if r["method"] == m)
    assert float(rows["linefit"]["speedup"]) == pytest.approx(statistics.median(eff["adamw"]) /
                                                              statistics.median(eff["linefit"]), rel=1e-3)
    per_run = list(csv.DictReader(open(out / "runs.csv")))
    assert len(per_run) == 4
    md = (out / "results.md").read_text()
    assert "| adamw |" in md and "| linefit |" in md and f"{float(rows['linefit']['speedup']):.2f}x" in md
    # --resume keeps finished runs and does nothing more
    assert main(["bench", "speedup", "--quick", "--no-progress", "--resume", "--out", str(out)]) == 0
    assert len((out / "runs.jsonl").read_text().splitlines()) == 4

    # --report-only --target: steps to a looser target read off the stored curves, into their own folder
    adamw = [r for r in runs if r["method"] == "adamw"]
    loose = min(max(c[1] for c in r["curve"]) for r in adamw) - 5.0
    assert main(["bench", "speedup", "--report-only", "--target", f"{loose:g}", "--out", str(out)]) == 0
    retargeted = {(r["method"], r["seed"]): r for r in csv.DictReader(open(out / f"target-{loose:g}" / "runs.csv"))}
    for r in runs:
        first = next((c[0] for c in r["curve"] if c[1] >= float(f"{loose:g}")), None)
        row = retargeted[(r["method"], str(r["seed"]))]
        assert row["steps_to_target"] == ("" if first is None else str(first))
        assert float(row["target"]) == float(f"{loose:g}")
    assert all(retargeted[("adamw", str(r["seed"]))]["reached"] == "True" for r in adamw)
    if any(r["reached"] for r in runs):  # a run stopped at 97 % says nothing about 99.9 %
        assert main(["bench", "speedup", "--report-only", "--target", "99.9", "--out", str(out)]) == 2
        assert "stopped at its target 97.0" in capsys.readouterr().err
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "runs.jsonl").write_text(json.dumps({**runs[0], "task": "no-such-task"}) + "\n")
    assert main(["bench", "speedup", "--report-only", "--target", "50", "--out", str(tmp_path / "odd")]) == 2
    assert "unknown task 'no-such-task'" in capsys.readouterr().err
    assert main(["bench", "speedup", "--report-only", "--retarget-out", str(tmp_path / "x"), "--out", str(out)]) == 2
    assert "--retarget-out only applies with --report-only --target" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

    # bench suite: the same runs twice (duplicates dropped), a method renamed, one task re-scored
    suite = tmp_path / "suite"
    assert main(["bench", "suite", str(out), str(out / "runs.jsonl"), "--label", "linefit=lf", "--out", str(suite)]) == 0
    assert "4 duplicate runs dropped" in capsys.readouterr().err
    cells = {r["method"]: r for r in csv.DictReader(open(suite / "suite.csv"))}
    assert set(cells) == {"adamw", "lf"} and cells["lf"]["speedup"] == rows["linefit"]["speedup"]
    md = (suite / "suite.md").read_text()
    assert f"{float(rows['linefit']['speedup']):.2f}x over 1" in md  # the geometric mean of one task
    assert main(["bench", "suite", str(out), "--target", f"digits={loose:g}", "--out", str(suite)]) == 0
    lf = next(r for r in csv.DictReader(open(suite / "suite.csv")) if r["method"] == "linefit")
    assert float(lf["median_steps"]) == statistics.median(
        int(retargeted[("linefit", str(s))]["steps_to_target"] or 2000) for s in (1000, 2000))
    capsys.readouterr()
    (tmp_path / "broken.jsonl").write_text('{"task": "digits"}\n')
    assert main(["bench", "suite", str(tmp_path / "broken.jsonl"), "--out", str(suite)]) == 2
    assert "broken.jsonl: not a bench speedup runs.jsonl" in capsys.readouterr().err
    for bad, says in [(["--label", "linefit"], "OLD=NEW"), (["--target", "digits=x"], "TASK=NUMBER"),
                      (["--target", "=90"], "TASK=NUMBER"), (["--target", "digits=inf"], "TASK=NUMBER"),
                      (["--target", "fm-16=90"], "without runs"), (["--methods", "nino"], "no runs of method")]:
        assert main(["bench", "suite", str(out), *bad, "--out", str(suite)]) == 2, bad
        assert says in capsys.readouterr().err, bad


def test_bench_start_step_labels_the_runs_and_keeps_them_plain_adamw_until_then(tmp_path, capsys):
    from ninocast.cli import main

    out = tmp_path / "bench"
    assert main(["bench", "speedup", "--quick", "--seeds", "1000", "--no-early-stop", "--start-step", "450",
                 "--no-progress", "--out", str(out)]) == 0
    runs = {r["method"]: r for r in map(json.loads, (out / "runs.jsonl").read_text().splitlines())}
    assert set(runs) == {"adamw", "linefit@start=450"}
    late = runs["linefit@start=450"]
    assert late["start_step"] == 450 and late["nowcast_steps"] == [500, 600, 700, 800, 900]
    assert [c for c in late["curve"] if c[0] < 500] == [c for c in runs["adamw"]["curve"] if c[0] < 500]
    assert json.loads((out / "config.json").read_text())["start_step"] == 450
    assert main(["bench", "speedup", "--quick", "--start-step", "-1", "--out", str(tmp_path / "bad")]) == 2
    assert "--start-step must be >= 0" in capsys.readouterr().err


def test_bench_run_through_server_matches_local(server, api_keys):
    """--server mode: the same run through a real server gives the same curve as the local engine (linefit)."""
    from ninocast_server.bench.speedup import run_one

    task = get_task("digits")
    kw = dict(max_steps=200, period=100, eval_every=20, early_stop=False, progress=False, final_nowcast="keep")
    local = run_one(task, "linefit", "linefit", 1000, **kw)
    remote = run_one(task, "linefit", "linefit", 1000, server=server.url, api_key=api_keys["alice"], **kw)
    assert remote["n_nowcasts"] == local["n_nowcasts"] == 2 and not remote["failures"]
    assert remote["curve"] == local["curve"]

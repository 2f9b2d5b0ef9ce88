"""Integrations, each with a tiny model: Hugging Face Trainer, PyTorch Lightning, DistributedDataParallel (2 CPU
processes on gloo, a real server). Period 20, ctx 5: snapshots every 4 optimizer steps, nowcasts at steps 19, 39.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ninocast import ModelSpec, NowcastClient, NowcastOptimizer, k_schedule
from nowcast_checks import assert_same, engine_nowcast, params
from ninocast.integrations import find_nowcast_optimizer

PERIOD, CTX, STEPS = 20, 5, 40
KS = k_schedule(STEPS, PERIOD)  # [40, 1]


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))


def batch(step: int, rank: int = 0):
    g = torch.Generator().manual_seed(1000 + step + 100_000 * rank)
    x = torch.randn(32, 8, generator=g)
    return x, (x[:, :3] * 2 - x[:, 3:6]).sin()


# ---------------------------------------------------------------------------- Hugging Face Trainer
def tiny_gpt2(seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


class Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        ids = torch.randint(0, 32, (16,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


def hf_trainer(out: Path, seed: int, probe):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=4,
                             learning_rate=1e-2, lr_scheduler_type="constant", weight_decay=0.0, report_to="none",
                             logging_strategy="no", save_strategy="steps", save_steps=30, use_cpu=True,
                             disable_tqdm=True, seed=0, dataloader_num_workers=0)
    return Trainer(model=tiny_gpt2(seed), args=args, train_dataset=Tokens(), callbacks=[probe])


def hf_probe():
    from transformers import TrainerCallback

    class Probe(TrainerCallback):
        """Records, for each nowcast step, the window (the wrapper's snapshots + the parameters right before
        the step) and the parameters right after it."""

        def __init__(self):
            self.after, self.pending = {}, None

        def on_pre_optimizer_step(self, args, state, control, optimizer=None, model=None, **kw):
            opt = find_nowcast_optimizer(optimizer)
            if not opt.need_grads:
                self.pending = (state.global_step, [s for _, s in opt.snapshots] + [params(model)])

        def on_optimizer_step(self, args, state, control, model=None, **kw):
            if self.pending is not None:
                step, window = self.pending
                self.after[step] = (window, params(model))
                self.pending = None

    return Probe()


def test_hugging_face_trainer_callback_and_resume(tmp_path):
    from ninocast.integrations.hf import NowcastCallback

    # max_train_steps: the Trainer's
    nowcast_kw = dict(local=True, nowcaster="linefit", period=PERIOD, ctx=CTX, final_nowcast="keep")
    probe = hf_probe()
    trainer = hf_trainer(tmp_path / "run", 0, probe)
    cb = NowcastCallback(**nowcast_kw).attach(trainer)
    trainer.train()
    opt = cb.optimizer
    assert find_nowcast_optimizer(trainer.optimizer) is opt  # accelerate's wrapper around ours
    assert opt.max_train_steps == STEPS and opt.spec.family == "gpt2"
    assert [n["step"] for n in opt.nowcasts] == [19, 39] and not opt.failures
    assert [n["k"] for n in opt.nowcasts] == KS
    adam_steps = {int(s["step"]) for s in opt.optimizer.state.values()}
    assert adam_steps == {STEPS - 2}  # the base optimizer did not step on the two nowcast steps
    assert sorted(probe.after) == [19, 39]
    for (step, (window, after)), k in zip(sorted(probe.after.items()), KS):
        assert_same(after, engine_nowcast(opt.spec, window, k))
    final = params(trainer.model)

    # resume from the checkpoint at step 30 (mid-window: snapshots 23 and 27) into fresh objects
    assert (tmp_path / "run" / "checkpoint-30" / "optimizer.pt").exists()
    probe2 = hf_probe()
    trainer2 = hf_trainer(tmp_path / "run", 123, probe2)
    cb2 = NowcastCallback(**nowcast_kw).attach(trainer2)
    trainer2.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-30"))
    assert [n["step"] for n in cb2.optimizer.nowcasts] == [39] and not cb2.optimizer.failures
    assert cb2.optimizer.nowcasts[0]["snapshot_steps"] == [23, 27, 31, 35, 39]
    assert_same(probe2.after[39][1], probe.after[39][1])
    assert_same(params(trainer2.model), final)


def test_hugging_face_callback_with_a_user_built_optimizer(tmp_path):
    from transformers import Trainer, TrainingArguments

    from ninocast.integrations.hf import NowcastCallback

    model = tiny_gpt2(0)
    opt = NowcastOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, local=True, nowcaster="linefit",
                           period=PERIOD, ctx=CTX, max_train_steps=PERIOD, final_nowcast="keep")
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=PERIOD, per_device_train_batch_size=4,
                             report_to="none", logging_strategy="no", save_strategy="no", use_cpu=True,
                             disable_tqdm=True, gradient_accumulation_steps=2)
    cb = NowcastCallback()
    Trainer(model=model, args=args, train_dataset=Tokens(), optimizers=(opt, None), callbacks=[cb]).train()
    assert cb.optimizer is opt
    # gradient accumulation: the wrapper counts optimizer steps, not micro-batches
    assert opt.step_count == PERIOD and [n["step"] for n in opt.nowcasts] == [19] and not opt.failures
    assert {int(s["step"]) for s in opt.optimizer.state.values()} == {PERIOD - 1}

    with pytest.raises(RuntimeError, match="not a NowcastOptimizer"):
        Trainer(model=tiny_gpt2(0), args=args, train_dataset=Tokens(), callbacks=[NowcastCallback()]).train()


# ---------------------------------------------------------------------------- PyTorch Lightning
@pytest.mark.filterwarnings("ignore:.*LeafSpec")  # Lightning's own deprecation warning with this torch
def test_lightning_callback_matches_the_plain_loop_and_resumes(tmp_path):
    from ninocast.integrations.lightning import NowcastCallback, pl  # pl: the Lightning package it subclasses

    class Module(pl.LightningModule):
        def __init__(self, seed=0):
            super().__init__()
            self.net = mlp(seed)

        def training_step(self, b, i):
            x, y = b
            return nn.functional.mse_loss(self.net(x[0]), y[0])

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def fit(module, data, max_steps, ckpt=None):
        cb = NowcastCallback(local=True, nowcaster="linefit", period=PERIOD, ctx=CTX, max_train_steps=STEPS,
                             final_nowcast="keep")
        trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[cb])
        loader = torch.utils.data.DataLoader(data, batch_size=1, shuffle=False)  # one (x, y) per step
        trainer.fit(module, loader, ckpt_path=ckpt)
        return trainer, cb.optimizer

    def plain_loop(data):
        """The reference: the README's loop, same model, data and base optimizer."""
        ref = Module()
        opt = NowcastOptimizer(torch.optim.AdamW(ref.parameters(), lr=1e-2), ref, local=True, nowcaster="linefit",
                               period=PERIOD, ctx=CTX, max_train_steps=STEPS, final_nowcast="keep")
        for s in range(STEPS):
            if opt.need_grads:
                opt.zero_grad()
                x, y = data[s % len(data)]
                nn.functional.mse_loss(ref.net(x), y).backward()
            opt.step()
        assert [n["step"] for n in opt.nowcasts] == [19, 39]
        return params(ref)

    data = [batch(s) for s in range(STEPS)]
    module = Module()
    trainer, lopt = fit(module, data, STEPS)
    assert [n["step"] for n in lopt.nowcasts] == [19, 39] and [n["k"] for n in lopt.nowcasts] == KS
    assert not lopt.failures and lopt.step_count == STEPS
    assert {int(s["step"]) for s in lopt.optimizer.state.values()} == {STEPS - 2}
    assert_same(params(module), plain_loop(data))

    # stop at step 30 (mid-window), checkpoint, resume into a fresh module. One batch repeated: Lightning's
    # resume after a max_steps stop may replay a batch, which must not matter here.
    data = [batch(0)] * 10
    module = Module()
    trainer, _ = fit(module, data, 30)
    trainer.save_checkpoint(tmp_path / "step30.ckpt")
    module = Module(seed=123)
    trainer, lopt = fit(module, data, STEPS, ckpt=str(tmp_path / "step30.ckpt"))
    assert lopt.step_count == STEPS and {int(s["step"]) for s in lopt.optimizer.state.values()} == {STEPS - 2}
    assert [n["step"] for n in lopt.nowcasts] == [39] and lopt.nowcasts[0]["snapshot_steps"] == [23, 27, 31, 35, 39]
    assert_same(params(module), plain_loop(data))


# ---------------------------------------------------------------------------- DistributedDataParallel
def _ddp_worker(rank: int, world: int, init_file: str, url: str, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = mlp(0)
        ddp = DDP(model)
        opt = NowcastOptimizer(torch.optim.AdamW(ddp.parameters(), lr=1e-2), ddp, server=url, period=PERIOD,
                               ctx=CTX, max_train_steps=STEPS, retries=0, timeout=30, record=True,
                               final_nowcast="keep")
        windows, after, no_grads = {}, {}, []
        for s in range(STEPS):
            window = None
            if len(opt.snapshots) == CTX - 1 and (s + 1) % (PERIOD // CTX) == 0:  # a nowcast call
                window = [snap for _, snap in opt.snapshots] + [params(model)]
            if opt.need_grads:
                opt.zero_grad()
                x, y = batch(s, rank)  # each rank its own data; DDP averages the gradients
                nn.functional.mse_loss(ddp(x), y).backward()
            else:
                no_grads.append(s)
            opt.step()
            if window is not None:
                windows[s], after[s] = window, params(model)
        opt.close()
        torch.save({"final": params(model), "after": after, "windows": windows if rank == 0 else {},
                    "nowcasts": opt.nowcasts, "failures": dict(opt.failures), "backend": opt.backend is not None,
                    "no_grads": no_grads, "spec": opt.spec.to_json()}, os.path.join(out, f"rank{rank}.pt"))
        del opt, ddp
        dist.barrier()  # neither rank tears gloo down while the other still uses it (a rank aborted in teardown once)
    finally:
        dist.destroy_process_group()


def test_ddp_two_gloo_processes_rank0_talks_and_broadcasts(tmp_path):
    import torch.multiprocessing as mp

    from server_utils import Server

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    server = Server(tmp_path / "data").start()
    try:
        mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), server.url, str(tmp_path)), nprocs=2,
                           join=True, start_method="spawn")
        with NowcastClient(server.url) as c:
            sessions = c.list_sessions()
            views = [c.get_session(s["id"]) for s in sessions]
    finally:
        server.stop()
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["backend"] and not r1["backend"]  # only rank 0 has a connection
    assert len(views) == 1 and views[0]["nowcasts_done"] == 2  # one session, fed by rank 0 only
    assert [n["step"] for n in r0["nowcasts"]] == [19, 39] and not r0["failures"] and not r1["failures"]
    # every rank skips backward on the same calls; the first window computes gradients: under DDP the server's
    # start-step advice is settled inside step, on every rank together
    assert r0["no_grads"] == r1["no_grads"] == [39]
    assert_same(r0["final"], r1["final"])
    spec = ModelSpec.from_json(r0["spec"])
    for s, k in zip((19, 39), KS):
        assert_same(r0["after"][s], r1["after"][s])  # broadcast: both ranks hold the same nowcast
        assert_same(r0["after"][s], engine_nowcast(spec, r0["windows"][s], k))  # == a one-process nowcast


# ---------------------------------------------------------------------------- the end of training
@pytest.mark.filterwarnings("ignore:.*LeafSpec")
def test_train_end_deletes_the_session_unless_recorded(tmp_path):
    """Hugging Face and Lightning runs against a real server: ``on_train_end`` closes the wrapper, which
    deletes the run's session (a sweep of many runs must not fill the server); ``record=True`` keeps it."""
    from transformers import Trainer, TrainingArguments

    from ninocast.integrations.hf import NowcastCallback as HFCallback
    from ninocast.integrations.lightning import NowcastCallback as PLCallback
    from ninocast.integrations.lightning import pl
    from server_utils import Server

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = mlp(0)

        def training_step(self, b, i):
            x, y = b
            return nn.functional.mse_loss(self.net(x[0]), y[0])

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    server = Server(tmp_path / "data").start()
    try:
        kw = dict(server=server.url, period=PERIOD, ctx=CTX, retries=0, timeout=30)
        seen = {}
        for record in (False, True):
            args = TrainingArguments(output_dir=str(tmp_path / f"hf{record}"), max_steps=PERIOD, report_to="none",
                                     per_device_train_batch_size=4, logging_strategy="no", save_strategy="no",
                                     use_cpu=True, disable_tqdm=True)
            trainer = Trainer(model=tiny_gpt2(0), args=args, train_dataset=Tokens())
            hf = HFCallback(record=record, **kw).attach(trainer)
            trainer.train()
            cb = PLCallback(record=record, max_train_steps=PERIOD, **kw)
            pl.Trainer(max_steps=PERIOD, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                       enable_progress_bar=False, enable_model_summary=False, callbacks=[cb]).fit(
                Module(), torch.utils.data.DataLoader([batch(s) for s in range(PERIOD)], batch_size=1))
            for opt in (hf.optimizer, cb.optimizer):
                assert len(opt.nowcasts) == 1 and not opt.failures, opt.failures
            seen[record] = {hf.optimizer.backend.session_id, cb.optimizer.backend.session_id}
        with NowcastClient(server.url) as c:
            left = {s["id"] for s in c.list_sessions()}
    finally:
        server.stop()
    assert left == seen[True] and len(left) == 2  # the two recorded runs only


def test_readme_lightning_example_matches_the_integrations_extra():
    """The README's Lightning example imports what ``pip install 'ninocast[integrations]'`` installs."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # the server extra's TOML reader before 3.11
        import tomli as tomllib

    root = Path(__file__).resolve().parents[1]
    extra = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]["integrations"]
    readme = (root / "README.md").read_text()
    client = readme[readme.index("## Client"):readme.index("## Server")]
    if any(d.startswith("pytorch-lightning") for d in extra):
        assert "import pytorch_lightning as pl" in client and "pl.Trainer(" in client
        assert "lightning.Trainer" not in client.replace("pytorch_lightning", "")
    else:
        assert any(d.startswith("lightning") for d in extra) and "lightning.Trainer" in client

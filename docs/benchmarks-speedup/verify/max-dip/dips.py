"""Measure the immediate probe rise of full nowcasts (to choose Verify.max_dip): one seed, every jump rejected.

Run from the repository root with PYTHONPATH=client:service: python dips.py TASK NOWCASTER SEED STEPS
"""
import sys, json, torch
from ninocast import NowcastOptimizer, Verify
from ninocast_server.tasks import get_task
from ninocast_server.bench.speedup import resolve_nowcaster, PROBE_SEED_OFFSET
torch.set_num_threads(1)
tname, ref, seed, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
task = get_task(tname)
model = task.build_model(seed); model.train()
probe = next(task.batches(seed + PROBE_SEED_OFFSET))
opt = NowcastOptimizer(task.make_optimizer(model), model, period=task.period, ctx=task.ctx, max_train_steps=task.budget,
                       nowcaster=resolve_nowcaster(ref)[1], local=True,
                       verify=Verify(batch=probe, loss_fn=task.loss, shrink=()))
b = task.batches(seed)
for s in range(steps):
    batch = next(b)
    opt.zero_grad(); task.loss(model, batch).backward(); opt.step()
for d in opt.nowcasts:
    if "tried" in d:
        print(json.dumps({"task": tname, "ref": ref, "seed": seed, "step": d["step"], "before": d["probe_before"],
                          "a1": d["tried"][0][1], "ratio": d["tried"][0][1] / d["probe_before"]}), flush=True)

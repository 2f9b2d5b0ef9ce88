"""Turn a server's recorded sessions into a trajectory store (``ninocast export-trajectories``).

Only sessions created with ``record=true`` keep every uploaded state; the others hold just the newest ctx
states and are skipped. Each exported session becomes one run: task = the session's name (or "session"), the
spec from the session record, the uploaded states in step order. The snapshot interval is the most common gap
between consecutive steps (the client uploads every period / ctx steps). The server's files are only read.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

import torch

from ninocast.spec import ModelSpec, SpecError

from ..sessions.errors import ServiceError
from ..sessions.safetensors_io import check_against_spec, load_states, parse_header
from ..sessions.store import RECORD
from .store import TrajectoryStore, safe_id


def export_sessions(data_dir: str | Path, out: str | Path, *, dtype: str = "float16",
                    owners: Sequence[str] | None = None, sessions: Sequence[str] | None = None,
                    min_states: int = 2, log: Callable[[str], None] | None = None) -> TrajectoryStore:
    log = log or (lambda s: print(s, file=sys.stderr))
    owners_dir = Path(data_dir) / "owners"
    if not owners_dir.is_dir():
        raise ValueError(f"{data_dir}: not a ninocast data directory (no owners/ folder)")
    store = TrajectoryStore.create(out, dtype)
    n_done = n_skipped = 0
    for owner_dir in sorted(p for p in owners_dir.iterdir() if p.is_dir()):
        if owners and owner_dir.name not in owners:
            continue
        for sdir in sorted(p for p in owner_dir.iterdir() if p.is_dir()):
            if sessions and sdir.name not in sessions:
                continue
            where = f"{owner_dir.name}/{sdir.name}"
            try:
                rec = json.loads((sdir / RECORD).read_text())
                spec = ModelSpec.from_json(rec["spec"])
            except (OSError, ValueError, KeyError, TypeError, SpecError) as e:
                log(f"skipping {where}: unreadable session record ({e})")
                n_skipped += 1
                continue
            if not rec.get("record"):
                log(f"skipping {where}: not created with record=true (only the newest states are kept)")
                n_skipped += 1
                continue
            files = {}
            for p in (sdir / "states").glob("*.safetensors"):
                if not p.name.startswith(".") and p.stem.isdigit():
                    files[int(p.stem)] = p
            steps = sorted(files)
            good = []
            for s in steps:
                try:
                    check_against_spec(parse_header(files[s]), spec)
                    good.append(s)
                except ServiceError as e:
                    log(f"{where}: dropping state {s} ({e.detail})")
            if len(good) < min_states:
                log(f"skipping {where}: {len(good)} states")
                n_skipped += 1
                continue
            states = load_states([files[s] for s in good], spec).T.contiguous()  # (n, P)
            finite = torch.isfinite(states).all(dim=1)
            if not bool(finite.all()):
                cut = int((~finite).nonzero()[0])
                log(f"{where}: state {good[cut]} holds NaN/Inf; keeping the {cut} states before it")
                good, states = good[:cut], states[:cut]
                if len(good) < min_states:
                    n_skipped += 1
                    continue
            gaps = Counter(b - a for a, b in zip(good, good[1:]))
            interval = max(1, gaps.most_common(1)[0][0]) if gaps else 1
            run_id = safe_id(f"{owner_dir.name}-{sdir.name}")
            task = safe_id(rec.get("name") or "session")
            store.begin_run(run_id, task, spec, None, None, interval,
                            info={"source": "session", "owner": owner_dir.name, "session": sdir.name,
                                  "period": rec.get("period"), "ctx": rec.get("ctx"),
                                  "nowcaster": rec.get("nowcaster"),
                                  "nowcast_steps": [h.get("step") for h in rec.get("nowcasts", []) if isinstance(h, dict)]})
            store.append(run_id, good, states)
            store.finish(run_id)
            n_done += 1
    log(f"exported {n_done} sessions ({n_skipped} skipped) into {store.root}")
    return store

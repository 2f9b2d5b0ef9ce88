"""``ninocast graph``: what neural graph a model (or a spec file) gets -- its layers, node and edge counts, edge
types, what was left out and why -- or why it gets none."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from ninocast.spec import ModelSpec, SpecError

from .graphs import NeuralGraph, build_graph
from .graphs.traced import ROLE_TYPES

TYPE_NAMES = {1: "fc", 2: "bias", 3: "conv", 4: "norm", 5: "token", 6: "pos", 7: "query", 8: "key", 9: "value",
              10: "res", 11: "head", 13: "self-loop"}


class GraphCommandError(Exception):
    """Printed as one line by the CLI (exit status 2)."""


def load_model(target: str, shape: str | None) -> tuple[Any, Any]:
    """``pkg.module:factory`` -> (model, example input or None); ``factory()`` may also return (model, input)."""
    mod_name, _, attr = target.partition(":")
    if not attr:
        raise GraphCommandError(f"{target!r}: expected MODULE:FACTORY (e.g. mypkg.models:build) or a spec .json")
    sys.path.insert(0, str(Path.cwd()))
    try:
        factory = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise GraphCommandError(f"cannot load {target}: {e}") from None
    made = factory()
    model, example = made if isinstance(made, tuple) else (made, None)
    if shape:
        import torch

        try:
            example = torch.randn(*[int(d) for d in shape.split(",")])
        except ValueError:
            raise GraphCommandError(f"--input {shape!r}: expected comma-separated sizes like 2,3,32,32") from None
    return model, example


def summary(spec: ModelSpec, graph: NeuralGraph) -> dict[str, Any]:
    """The graph in numbers, plus its layers (traced topology) or tensors (hand-written families)."""
    n_loops = graph.num_nodes
    types = Counter(TYPE_NAMES.get(int(t), str(int(t))) for t in graph.edge_type.tolist())
    out: dict[str, Any] = {
        "family": spec.family, "graph": "traced topology v1" if spec.topology else (
            "generic chain (NINO_SPEC §2.3)" if spec.family == "generic" else f"hand-written {spec.family} (§2.6)"),
        "parameters": spec.n_params, "tensors": len(spec.params), "nodes": graph.num_nodes,
        "edges": graph.num_edges, "parameter_edges": graph.num_edges - n_loops, "self_loops": n_loops,
        "values_per_edge": graph.feat_size, "edge_types": dict(sorted(types.items())),
    }
    if spec.topology is not None:
        into: dict[int, list[str]] = {}
        for lk in spec.topology.links:
            into.setdefault(lk.dst, []).append(f"{lk.param or '(virtual)'} {lk.role}"
                                               + (f" from {spec.topology.groups[lk.src][0]}" if lk.role in (
                                                   "res", "head") else ""))
        out["layers"] = [{"name": name, "neurons": size, "fed_by": into.get(i, [])}
                         for i, (name, size) in enumerate(spec.topology.groups)]
        out["left_out"] = [{"name": n, "why": why} for n, why in spec.topology.left_out]
    else:
        out["layers"] = [{"name": n, "edges": b - a, "type": TYPE_NAMES.get(int(graph.edge_type[a]), "?")}
                         for n, (a, b) in graph.edge_ranges.items()]
        out["left_out"] = []
    return out


def render(s: dict[str, Any]) -> str:
    lines = [f"family {s['family']}, graph: {s['graph']}",
             f"{s['parameters']:,} parameters in {s['tensors']} tensors",
             f"{s['nodes']:,} nodes, {s['edges']:,} edges ({s['parameter_edges']:,} from parameters and virtual "
             f"links, {s['self_loops']:,} self-loops), {s['values_per_edge']} values per edge",
             "edge types: " + ", ".join(f"{k} {v:,}" for k, v in s["edge_types"].items()), "layers:"]
    for i, layer in enumerate(s["layers"]):
        if "neurons" in layer:
            fed = "; ".join(layer["fed_by"]) or "model input"
            lines.append(f"  {i:3d} {layer['name']:<40} {layer['neurons']:6d} neurons  <- {fed}")
        else:
            lines.append(f"  {layer['name']:<48} {layer['type']:<9} {layer['edges']:8,d} edges")
    if s["left_out"]:
        lines.append("left out (pass through nowcasts unchanged):")
        lines += [f"  {x['name']}: {x['why']}" for x in s["left_out"]]
    else:
        lines.append("left out: nothing")
    return "\n".join(lines)


def run_graph(args: argparse.Namespace) -> int:
    from ninocast.cli import CommandError

    try:
        if args.target.endswith(".json"):
            spec = ModelSpec.load(args.target)
        else:
            model, example = load_model(args.target, args.input)
            spec = ModelSpec.from_module(model, example_input=example, leave_out=args.leave_out or (),
                                         graph="traced" if getattr(args, "traced", False) else "auto")
        graph = build_graph(spec, with_lpe=bool(args.pyg))
    except (GraphCommandError, SpecError, OSError) as e:
        raise CommandError(f"no neural graph: {e}") from None
    s = summary(spec, graph)
    if args.spec_out:
        Path(args.spec_out).write_text(json.dumps(spec.to_json()))
    if args.pyg:
        import torch

        try:
            torch.save(graph.to_pyg(), args.pyg)
        except (OSError, RuntimeError) as e:  # torch.save: RuntimeError for a missing folder
            raise CommandError(f"--pyg {args.pyg}: {e}") from None
    print(json.dumps(s, indent=1) if args.json else render(s))
    return 0


assert set(TYPE_NAMES.values()) >= set(ROLE_TYPES)  # every traced role has a printable name

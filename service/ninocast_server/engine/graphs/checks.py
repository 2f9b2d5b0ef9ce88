"""Will a spec's neural graph be right, and readable by the nowcaster? Checked before a graph nowcaster accepts
a session (and before any graph is built), so nothing is refused later, at the first nowcast."""

from __future__ import annotations

import math
from typing import Any

from ninocast.spec import ModelSpec, SpecError
from ninocast.topology import TopologyError, chain_topology

LEAVE_OUT = "leave this tensor out of the spec (it then passes through nowcasts unchanged)"


def check_graph_spec(spec: ModelSpec, max_feat_size: int | None = None) -> None:
    """Raise SpecError naming the tensor when the graph of ``spec`` would misdescribe the model (a generic spec
    without a topology that is not a chain of layers) or has more values per edge than ``max_feat_size``."""
    if spec.family == "generic" and spec.topology is None:
        try:
            chain_topology(spec.params)
        except TopologyError as e:
            raise SpecError(str(e)) from None
    if max_feat_size is None:
        return
    for name, shape in spec.params:
        area = math.prod(shape[2:]) if len(shape) > 2 else 1
        if area > max_feat_size:
            kernel = "x".join(map(str, shape[2:]))
            raise SpecError(f"{name}: a {kernel} kernel has {area} values per edge; this nowcaster reads at most "
                            f"{max_feat_size} (3x3 for every NiNo model); {LEAVE_OUT}")


def check_spec_for(spec: ModelSpec, nowcaster: Any) -> None:
    """``check_graph_spec`` for a nowcaster that reads graphs (NiNo: also its values per edge); others read none."""
    if getattr(nowcaster, "needs_graph", False):
        check_graph_spec(spec, getattr(nowcaster, "max_feat_size", None))

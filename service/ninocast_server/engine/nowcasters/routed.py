"""A nowcaster made of members, each serving the graph families it was meta-trained on.

Why: no single set of weights has yet served vision and language alike here. The FM-16 model slows a byte-level
GPT-2 down, and fine-tuning it on language lost its FM-16 speedup (docs/metatrain.md, round 4). A routed
nowcaster keeps one name (the default) and hands each model to the member trained on its family.

On disk it is a directory whose ``config.json`` names the members (subdirectories in the usual format)::

    {"format": "ninocast-nowcaster", "version": 1, "kind": "routed", "name": "ninocast-nino",
     "routes": {"generic": "vision", "gpt2": "language", "llama": "language"}, "source": {...}}

A traced ``generic`` spec that wires attention goes to the ``gpt2`` member when there is one (it is a
transformer, whatever its family says).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

from torch import Tensor

from ninocast.spec import FAMILIES, ModelSpec

from .base import Nowcaster
from .scope import Scope, has_traced_attention

if TYPE_CHECKING:
    from ..graphs.base import NeuralGraph

# What the runner reads from a nowcaster before it knows the spec: every member must agree on these.
SHARED = ("ctx", "horizon", "needs_graph", "needs_lpe", "max_feat_size", "reads_16bit", "scratch_states")


class RoutedNowcaster(Nowcaster):
    kind = "routed"

    def __init__(self, name: str, routes: Mapping[str, Nowcaster]) -> None:
        if not routes:
            raise ValueError(f"routed nowcaster {name!r}: no routes")
        unknown = sorted(set(routes) - set(FAMILIES))
        if unknown:
            raise ValueError(f"routed nowcaster {name!r}: unknown families {unknown}; known: {list(FAMILIES)}")
        first = next(iter(routes.values()))
        for family, member in routes.items():
            if family not in member.families:
                raise ValueError(f"routed nowcaster {name!r}: member {member.name!r} cannot run family {family!r}")
            for attr in SHARED:
                if getattr(member, attr) != getattr(first, attr):
                    raise ValueError(f"routed nowcaster {name!r}: members {first.name!r} and {member.name!r} "
                                     f"differ in {attr} ({getattr(first, attr)!r} vs {getattr(member, attr)!r})")
        self.name = name
        self.routes = dict(routes)
        for attr in SHARED:
            setattr(self, attr, getattr(first, attr))
        self.families = tuple(f for f in FAMILIES if f in self.routes)
        self.scope = _union([m.scope for m in self._members()])
        self.device = first.device

    def _members(self) -> list[Nowcaster]:
        return list({id(m): m for m in self.routes.values()}.values())

    def member_for(self, spec: ModelSpec) -> Nowcaster:
        """The member that serves ``spec``: by family, a traced attention model as a GPT-2."""
        if spec.family == "generic" and "gpt2" in self.routes and has_traced_attention(spec):
            return self.routes["gpt2"]
        return self.routes[spec.family]

    def predict(self, states: Tensor, k: int, spec: ModelSpec, graph: "NeuralGraph | None", *,
                overwrite_states: bool = False) -> Tensor:
        member = self.member_for(spec)
        extra = {"overwrite_states": overwrite_states} if self.scratch_states else {}
        return member.predict(states, k, spec, graph, **extra)

    def to(self, device) -> "RoutedNowcaster":
        for m in self._members():
            m.to(device)
        self.device = self._members()[0].device
        return self

    def num_parameters(self) -> int:
        return sum(m.num_parameters() for m in self._members())

    def describe(self) -> dict:
        return {**super().describe(), "routes": {f: m.describe() for f, m in self.routes.items()}}

    def scope_warning(self, spec: ModelSpec, spacing: int | None = None) -> str | None:
        """The serving member's warning, in the routed nowcaster's name (the one the user asked for)."""
        scope = self.member_for(spec).scope
        return scope.warning(self.name, spec, spacing) if scope else None


def _union(scopes: list[Scope | None]) -> Scope | None:
    """The families and tasks of all members; no parameter range (each member keeps its own for its warning)."""
    known = [s for s in scopes if s is not None]
    if not known:
        return None
    families = tuple(f for f in FAMILIES if any(f in s.families for s in known))
    tasks = tuple(dict.fromkeys(t for s in known for t in s.tasks))
    return Scope(families, tasks)

"""A nowcaster made of members, each serving the graph families it was meta-trained on.

Why: no single set of weights has yet served vision and language alike here. The FM-16 model slows a byte-level
GPT-2 down, and fine-tuning it on language lost its FM-16 speedup (docs/metatrain.md, round 4). A routed
nowcaster keeps one name (the default) and hands each model to the member trained on its family.

On disk it is a directory whose ``config.json`` names the members (subdirectories in the usual format)::

    {"format": "ninocast-nowcaster", "version": 1, "kind": "routed", "name": "ninocast-nino",
     "routes": {"generic": "vision", "gpt2": ["language", "short"], "llama": ["language", "short"]}}

A family may list several members: the run is served by the first whose declared ``scope.spacing`` holds its
snapshot spacing (period / ctx), else by the first listed. Why: the language member trained on snapshots 200
steps apart slows down runs that nowcast every 100 steps (20 apart); a member trained on those serves them
instead. Every member after the first must declare a spacing (or it could never be chosen).

A member may be listed as ``{"member": "language", "upd_scale": 1.0}``: the same weights with the predicted
update scaled differently for this family (checkpoint.py loads it; the best scale was measured to differ between
GPT-2 and Llama runs).

A traced ``generic`` spec that wires attention goes to the ``gpt2`` members when there are some (it is a
transformer, whatever its family says).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

from torch import Tensor, nn

from ninocast.spec import FAMILIES, ModelSpec

from .base import Nowcaster, NowcastError
from .scope import Scope, has_traced_attention

if TYPE_CHECKING:
    from ..graphs.base import NeuralGraph

# What the runner reads from a nowcaster before it knows the spec: every member must agree on these.
SHARED = ("ctx", "horizon", "needs_graph", "needs_lpe", "max_feat_size", "reads_16bit", "scratch_states")


class RoutedNowcaster(Nowcaster):
    kind = "routed"

    def __init__(self, name: str, routes: Mapping[str, Nowcaster | Sequence[Nowcaster]]) -> None:
        if not routes:
            raise ValueError(f"routed nowcaster {name!r}: no routes")
        unknown = sorted(set(routes) - set(FAMILIES))
        if unknown:
            raise ValueError(f"routed nowcaster {name!r}: unknown families {unknown}; known: {list(FAMILIES)}")
        self.routes: dict[str, tuple[Nowcaster, ...]] = {
            f: (m,) if isinstance(m, Nowcaster) else tuple(m) for f, m in routes.items()}
        empty = [f for f, ms in self.routes.items() if not ms]
        if empty:
            raise ValueError(f"routed nowcaster {name!r}: no member for {empty}")
        first = next(iter(self.routes.values()))[0]
        for family, members in self.routes.items():
            for i, member in enumerate(members):
                if family not in member.families:
                    raise ValueError(f"routed nowcaster {name!r}: member {member.name!r} cannot run family {family!r}")
                if member in members[:i]:
                    raise ValueError(f"routed nowcaster {name!r}: member {member.name!r} listed twice for {family!r}")
                if i and (member.scope is None or member.scope.spacing is None):
                    raise ValueError(f"routed nowcaster {name!r}: member {member.name!r} (not first for family "
                                     f"{family!r}) declares no scope.spacing, so it could never be chosen")
                for attr in SHARED:
                    if getattr(member, attr) != getattr(first, attr):
                        raise ValueError(f"routed nowcaster {name!r}: members {first.name!r} and {member.name!r} "
                                         f"differ in {attr} ({getattr(first, attr)!r} vs {getattr(member, attr)!r})")
        self.name = name
        for attr in SHARED:
            setattr(self, attr, getattr(first, attr))
        self.families = tuple(f for f in FAMILIES if f in self.routes)
        self.scope = _union([m.scope for m in self._members()])
        self.device = first.device

    def _members(self) -> list[Nowcaster]:
        return list({id(m): m for ms in self.routes.values() for m in ms}.values())

    def member_for(self, spec: ModelSpec, spacing: int | None = None) -> Nowcaster:
        """The member that serves ``spec`` with snapshots ``spacing`` steps apart: by family (a traced attention
        model as a GPT-2), then the first whose scope holds the spacing, else the family's first."""
        family = spec.family
        if family == "generic" and "gpt2" in self.routes and has_traced_attention(spec):
            family = "gpt2"
        members = self.routes.get(family)
        if members is None:
            raise NowcastError(f"nowcaster {self.name!r} does not support family {spec.family!r}")
        return next((m for m in members if m.scope is not None and m.scope.covers_spacing(spacing)), members[0])

    def for_run(self, spec: ModelSpec, spacing: int | None = None) -> Nowcaster:
        return self.member_for(spec, spacing)

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
        """Each set of weights once: a member listed with another update scale shares its weights."""
        counted: dict[int, int] = {}
        for m in self._members():
            model = getattr(m, "model", None)
            first = next(model.parameters(), None) if isinstance(model, nn.Module) else None
            counted[id(m) if first is None else first.data_ptr()] = m.num_parameters()
        return sum(counted.values())

    def describe(self) -> dict:
        return {**super().describe(), "start_step": None, "routes": {  # each member advises its own
            f: ms[0].describe() if len(ms) == 1 else [m.describe() for m in ms] for f, ms in self.routes.items()}}

    def scope_warning(self, spec: ModelSpec, spacing: int | None = None) -> str | None:
        """The serving member's warning, in the routed nowcaster's name (the one the user asked for)."""
        scope = self.member_for(spec, spacing).scope
        return scope.warning(self.name, spec, spacing) if scope else None


def _union(scopes: list[Scope | None]) -> Scope | None:
    """The families and tasks of all members; no parameter range (each member keeps its own for its warning)."""
    known = [s for s in scopes if s is not None]
    if not known:
        return None
    families = tuple(f for f in FAMILIES if any(f in s.families for s in known))
    tasks = tuple(dict.fromkeys(t for s in known for t in s.tasks))
    return Scope(families, tasks)

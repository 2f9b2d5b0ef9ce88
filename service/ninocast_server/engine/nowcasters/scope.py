"""What a learned nowcaster was meta-trained on, and the one-line warning for a model outside it.

A nowcaster's *families* (``Nowcaster.families``) are what it can run on at all; its *scope* is what it was
trained on. Outside the scope it still runs, but nothing backs its nowcasts: the FM-16-only ``ninocast-nino``
made a byte-level GPT-2 worse than plain AdamW (issue 11). So a session or local optimizer outside the scope is
served, with a warning that names the nowcaster and the family.

The scope is stored in a nowcaster directory's ``config.json``::

    "scope": {"families": ["generic"], "tasks": ["fm-16"], "params": [14378, 14378]}

``families`` is required, ``tasks`` (informational), ``params`` ([min, max] parameter count; a model outside
it gets a warning too) and ``spacing`` ([min, max] optimiser steps between the snapshots a nowcast reads, i.e.
period / ctx; a run outside it gets a warning) are optional. ``metatrain`` writes the spacing of its training
windows: it was measured to matter (the language member of the default, trained and validated with snapshots 200
steps apart, made the 1,000-step language tasks, period 100: 20 steps apart, slower than AdamW; docs/metatrain.md,
round 5), and a routed nowcaster picks among a family's members by it (routed.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from ninocast.spec import FAMILIES, ModelSpec


class ScopeError(ValueError):
    """A malformed scope in a nowcaster's config; the message names the field."""


@dataclass(frozen=True)
class Scope:
    families: tuple[str, ...]
    tasks: tuple[str, ...] = ()
    params: tuple[int, int] | None = None
    spacing: tuple[int, int] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"families": list(self.families), "tasks": list(self.tasks)}
        if self.params is not None:
            out["params"] = list(self.params)
        if self.spacing is not None:
            out["spacing"] = list(self.spacing)
        return out

    def warning(self, nowcaster: str, spec: ModelSpec, spacing: int | None = None) -> str | None:
        """One line when ``spec`` (or a run whose snapshots are ``spacing`` steps apart) falls outside this scope
        (family first, then size, then spacing), else None."""
        trained = f"meta-trained on {'/'.join(self.families)} models" + (
            f" ({', '.join(self.tasks)})" if self.tasks else "")
        if spec.family not in self.families:
            return (f"nowcaster {nowcaster!r} was {trained}, not on family {spec.family!r}: its nowcasts may slow "
                    "this training down; compare with the base optimizer or pick another nowcaster")
        if has_traced_attention(spec) and not set(self.families) & TRANSFORMER_FAMILIES:
            return (f"nowcaster {nowcaster!r} was {trained}, not on attention models (this {spec.family!r} spec's "
                    "traced topology has query/key/value weights): its nowcasts may slow this training down; "
                    "compare with the base optimizer or pick another nowcaster")
        if self.params is not None and not self.params[0] <= spec.n_params <= self.params[1]:
            return (f"nowcaster {nowcaster!r} was {trained} of {self.params[0]:,}-{self.params[1]:,} parameters, "
                    f"this {spec.family!r} model has {spec.n_params:,}: its nowcasts may slow this training down")
        if not self.covers_spacing(spacing):
            between = (f"{self.spacing[0]}" if self.spacing[0] == self.spacing[1]
                       else f"{self.spacing[0]}-{self.spacing[1]}")
            return (f"nowcaster {nowcaster!r} was {trained} with snapshots {between} steps apart, this run takes "
                    f"one every {spacing} steps (period / ctx): its nowcasts may slow this training down")
        return None

    def covers_spacing(self, spacing: int | None) -> bool:
        """False only when both are known and ``spacing`` is outside the declared range."""
        return self.spacing is None or spacing is None or self.spacing[0] <= spacing <= self.spacing[1]


TRANSFORMER_FAMILIES = {"gpt2", "llama"}
ATTENTION_ROLES = {"query", "key", "value"}


def has_traced_attention(spec: ModelSpec) -> bool:
    """A traced spec (family 'generic' with a topology) that wires attention: 'generic' in a scope means the
    MLP/ConvNet chains a nowcaster was trained on, so such a model is out of it unless a transformer family is
    in the scope too (a traced GPT-2 must not pass as an FM-16 ConvNet)."""
    return spec.topology is not None and any(lk.role in ATTENTION_ROLES for lk in spec.topology.links)


# The reference checkpoints (nino*.pt) were all meta-trained on the same four tasks (NINO_SPEC §6.1): two
# ConvNets (generic graph) and two GPT-2 language models. Llama was only ever an out-of-distribution test.
OFFICIAL_SCOPE = Scope(families=("generic", "gpt2"), tasks=("fm-16", "c10-16", "lm1b-3-24", "lm1b-2-32"))


def parse_scope(obj: Any, where: str) -> Scope | None:
    """The ``scope`` value of a config (None when absent) -> a checked Scope."""
    if obj is None:
        return None
    if not isinstance(obj, dict):
        raise ScopeError(f"{where}: scope must be an object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - {"families", "tasks", "params", "spacing"})
    if unknown:
        raise ScopeError(f"{where}: unknown scope keys {unknown}; known: ['families', 'params', 'spacing', 'tasks']")
    fams = obj.get("families")
    if not isinstance(fams, list) or not fams or any(f not in FAMILIES for f in fams):
        raise ScopeError(f"{where}: scope.families must be a non-empty list of {list(FAMILIES)}, got {fams!r}")
    tasks = obj.get("tasks", [])
    if not isinstance(tasks, list) or any(not isinstance(t, str) for t in tasks):
        raise ScopeError(f"{where}: scope.tasks must be a list of task names, got {tasks!r}")
    params = _range(obj.get("params"), f"{where}: scope.params must be [min, max] positive parameter counts")
    spacing = _range(obj.get("spacing"), f"{where}: scope.spacing must be [min, max] positive step counts")
    return Scope(tuple(fams), tuple(tasks), params, spacing)


def _range(value: Any, message: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if (not isinstance(value, list) or len(value) != 2
            or any(not isinstance(p, int) or isinstance(p, bool) or p < 1 for p in value) or value[0] > value[1]):
        raise ScopeError(f"{message}, got {value!r}")
    return value[0], value[1]


def scope_of_runs(runs: Sequence[tuple[str, str]]) -> Scope:
    """(task, family) of every training trajectory -> the scope they cover. No parameter range: the FM-16-only
    nowcaster kept 85 % of the official model's speedup on FM-32 (3.9x the parameters), so size alone has not
    been shown to matter; a range can still be declared by hand in config.json."""
    if not runs:
        raise ValueError("no training runs to derive a scope from")
    fams = tuple(f for f in FAMILIES if any(fam == f for _, fam in runs))
    return Scope(fams, tuple(sorted({task for task, _ in runs})))

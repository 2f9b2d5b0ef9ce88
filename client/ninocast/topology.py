"""The traced topology of a model: which neurons each parameter tensor connects (spec extension, version 1).

A topology lists neuron *groups* (the features of one activation: a layer's outputs, a model input, attention
heads, the token ids of an embedding) and *links*, one per (slice of a) parameter tensor or virtual connection:

* weight roles ``fc``, ``conv``, ``query``, ``value``: the tensor (or its rows ``[offset, offset + rows)``) is
  stored (out, in, kernel...) and connects every neuron of ``src`` to every neuron of ``dst``;
* ``key``: like ``query`` but the key neurons are the first ``rows`` neurons of the query group ``dst`` and the
  edges run backwards, from those query neurons to ``src`` (NiNo's attention wiring, NINO_SPEC §2.6.1);
* ``token``, ``pos``: an embedding stored (rows, d): row ``r`` connects token/position neuron ``r`` of ``src``
  to the ``d`` neurons of ``dst`` (also class tokens and learned position tables of any shape (..., d));
* ``bias``, ``norm``: a 1-D tensor (or its slice) gets one auxiliary node with an edge to each neuron of ``dst``
  (a bias slice: to its ``rows`` neurons from ``dst_offset``, e.g. the key part of a fused attention bias, on
  the attention input where the key edges end);
* ``res``: a virtual one-to-one connection (residual, concatenation) from ``rows`` neurons of ``src`` starting at
  ``offset`` to those of ``dst`` starting at ``dst_offset``; ``head``: head node ``h`` of ``src`` to the ``h``-th
  of ``rows`` (default: all of ``src``) equal slices of ``dst``.

Its JSON form (the spec's optional ``"topology"`` key; specs without it keep the NiNo generic/GPT-2/Llama
graphs) is::

    {"version": 1, "groups": [["input", 3], ["conv1", 16], ...],
     "links": [["conv1.weight", "conv", 0, 1], ["conv1.bias", "bias", -1, 1], [null, "res", 1, 4, 0, 16, 0], ...],
     "tokens": 2, "left_out": [["rnn.weight_ih_l0", "recurrent layer rnn"]]}

a link being ``[param, role, src, dst]`` optionally followed by ``offset, rows, dst_offset`` (0: whole tensor)
and then by an object of options, each of which only changes how the link is laid out in the graph:

* ``"name"``: the name of its edge block (edges are grouped by the module part of block names, §2.3.3; a fused
  tensor's slices are named like the reference's virtual tensors, e.g. ``h.0.attn.c_attn.q.weight``, and a
  residual sits with the layer it bypasses, ``h.0.attn.c_attn.v.res``);
* ``"stored": "in_out"``: a 2-D weight stored (in, out) (Hugging Face ``Conv1D``); ``offset``/``rows`` then
  count columns. ``"out_in"`` on an embedding reads the (rows, d) table as if stored (out = rows, in = d): the
  reference's Llama token-embedding reading (NINO_SPEC §2.6.4 quirk 6);
* ``"at"``: the group whose auxiliary block holds a bias/norm node (default ``dst``; the reference puts a value
  bias before the query neurons, §2.6.2);
* ``"src_offset"``: a weight's sources are the ``in`` consecutive neurons from neuron ``src_offset`` of ``src``
  on, running into the groups laid out after it (the reference's Llama output projection under grouped-query
  attention, §2.6.4 quirk 1).

This module is torch-free: the tracer that writes topologies is ``ninocast.tracing``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

TOPOLOGY_VERSION = 1
MAX_KERNEL_AREA = 9  # slots per edge every NiNo model reads (3x3 kernels, NINO_SPEC §2.4, §6.2)
WEIGHT_ROLES = ("fc", "conv", "query", "key", "value")
EMBED_ROLES = ("token", "pos")
AUX_ROLES = ("bias", "norm")
VIRTUAL_ROLES = ("res", "head")
ROLES = WEIGHT_ROLES + EMBED_ROLES + AUX_ROLES + VIRTUAL_ROLES
LINK_OPTIONS = ("name", "stored", "at", "src_offset")


class TopologyError(ValueError):
    """A topology that cannot describe the spec's tensors; the message names the link or tensor."""


@dataclass(frozen=True)
class Link:
    param: str | None
    role: str
    src: int  # group index; -1 for bias/norm (their auxiliary node)
    dst: int
    offset: int = 0  # first row of the tensor (weights, 1-D) / first src neuron (res)
    rows: int = 0  # rows (or neurons) covered; 0: the whole tensor / group
    dst_offset: int = 0  # res: first dst neuron
    name: str | None = None  # edge-block name (default: the tensor's, or "<dst group>.res<i>" / ".head<h>")
    stored: str | None = None  # "in_out": a weight stored (in, out); "out_in": an embedding read as (out, in)
    at: int = -1  # bias / norm: the group whose auxiliary block holds the node (-1: dst)
    src_offset: int = 0  # weights: first source neuron inside src (the window may run into later groups)

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"name": self.name, "stored": self.stored,
                                "at": None if self.at == -1 else self.at, "src_offset": self.src_offset or None}
        return {k: v for k, v in opts.items() if v is not None}

    def to_json(self) -> list[Any]:
        out: list[Any] = [self.param, self.role, self.src, self.dst]
        opts = self.options()
        if self.offset or self.rows or self.dst_offset or opts:
            out += [self.offset, self.rows, self.dst_offset]
        if opts:
            out.append(opts)
        return out

    @property
    def transposed(self) -> bool:
        """A weight stored (in, out): rows/offset count its columns (outputs)."""
        return self.stored == "in_out" and self.role in WEIGHT_ROLES


@dataclass(frozen=True)
class Topology:
    groups: tuple[tuple[str, int], ...]
    links: tuple[Link, ...]
    tokens: int | None = None  # group whose neurons are vocabulary ids (pos_w = id + 1)
    left_out: tuple[tuple[str, str], ...] = ()  # (tensor name, why) for parameters the spec leaves out

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": TOPOLOGY_VERSION, "groups": [[n, s] for n, s in self.groups],
                               "links": [lk.to_json() for lk in self.links]}
        if self.tokens is not None:
            out["tokens"] = self.tokens
        if self.left_out:
            out["left_out"] = [[n, why] for n, why in self.left_out]
        return out

    @classmethod
    def from_json(cls, obj: Any) -> "Topology":
        if not isinstance(obj, Mapping):
            raise TopologyError("spec.topology must be an object with 'version', 'groups' and 'links'")
        unknown = set(obj) - {"version", "groups", "links", "tokens", "left_out"}
        if unknown:
            raise TopologyError(f"spec.topology has unknown keys: {sorted(unknown)}")
        if obj.get("version") != TOPOLOGY_VERSION:
            raise TopologyError(f"spec.topology.version must be {TOPOLOGY_VERSION}, got {obj.get('version')!r}")
        groups = []
        for i, g in enumerate(_list(obj.get("groups"), "groups")):
            if not (isinstance(g, (list, tuple)) and len(g) == 2 and isinstance(g[0], str) and _is_int(g[1])):
                raise TopologyError(f"spec.topology.groups[{i}] must be [name, size], got {g!r}"[:300])
            groups.append((g[0], g[1]))
        links = []
        for i, raw in enumerate(_list(obj.get("links"), "links")):
            if not (isinstance(raw, (list, tuple)) and len(raw) in (4, 7, 8)):
                raise TopologyError(f"spec.topology.links[{i}] must be [param, role, src, dst(, offset, rows, "
                                    f"dst_offset(, options))], got {raw!r}"[:300])
            opts = raw[7] if len(raw) == 8 else {}
            if not (raw[0] is None or isinstance(raw[0], str)) or not isinstance(raw[1], str) \
                    or not all(_is_int(v) for v in raw[2:7]):
                raise TopologyError(f"spec.topology.links[{i}]: param must be a string or null, role a string, "
                                    f"the rest integers, got {raw!r}"[:300])
            links.append(Link(*raw[:7], **_link_options(opts, i)))
        tokens = obj.get("tokens")
        if tokens is not None and not _is_int(tokens):
            raise TopologyError(f"spec.topology.tokens must be a group index, got {tokens!r}")
        left_out = []
        for i, item in enumerate(_list(obj.get("left_out", []), "left_out")):
            if not (isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(v, str) for v in item)):
                raise TopologyError(f"spec.topology.left_out[{i}] must be [name, reason], got {item!r}"[:300])
            left_out.append((item[0], item[1]))
        return cls(tuple(groups), tuple(links), tokens, tuple(left_out))


def _link_options(opts: Any, i: int) -> dict[str, Any]:
    where = f"spec.topology.links[{i}]"
    if not isinstance(opts, Mapping):
        raise TopologyError(f"{where}: the 8th entry must be an object of options, got {opts!r}"[:300])
    unknown = set(opts) - set(LINK_OPTIONS)
    if unknown:
        raise TopologyError(f"{where}: unknown options {sorted(unknown)}; expected some of {LINK_OPTIONS}")
    name = opts.get("name")
    if name is not None and not (isinstance(name, str) and 0 < len(name) <= 300):
        raise TopologyError(f"{where}: name must be a non-empty string of at most 300 characters")
    stored = opts.get("stored")
    if stored not in (None, "in_out", "out_in"):
        raise TopologyError(f"{where}: stored must be 'in_out' or 'out_in', got {stored!r}"[:300])
    for key in ("at", "src_offset"):
        if key in opts and not (_is_int(opts[key]) and opts[key] >= 0):
            raise TopologyError(f"{where}: {key} must be a non-negative integer, got {opts[key]!r}"[:300])
    return {"name": name, "stored": stored, "at": opts.get("at", -1), "src_offset": opts.get("src_offset", 0)}


def _list(v: Any, what: str) -> list:
    if not isinstance(v, list):
        raise TopologyError(f"spec.topology.{what} must be a list")
    return v


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ------------------------------------------------------------------------------------------ validation
def check_topology(topo: Topology, params: Sequence[tuple[str, tuple[int, ...]]]) -> None:
    """Every link consistent with the shapes, every spec tensor covered exactly once: what makes the server's
    graph exactly the traced one (and refuses a hand-edited topology that would not be)."""
    shapes = dict(params)
    sizes = [s for _, s in topo.groups]
    for i, (name, size) in enumerate(topo.groups):
        if size <= 0:
            raise TopologyError(f"spec.topology.groups[{i}] ({name}): size must be positive, got {size}")
    if topo.tokens is not None and not 0 <= topo.tokens < len(sizes):
        raise TopologyError(f"spec.topology.tokens: no group {topo.tokens}")
    covered: dict[str, list[tuple[int, int]]] = {}
    for i, lk in enumerate(topo.links):
        where = f"spec.topology.links[{i}] ({lk.param or lk.role})"
        if lk.role not in ROLES:
            raise TopologyError(f"{where}: unknown role {lk.role!r}; expected one of {ROLES}")
        if not 0 <= lk.dst < len(sizes) or not (lk.src == -1 and lk.role in AUX_ROLES or 0 <= lk.src < len(sizes)):
            raise TopologyError(f"{where}: src {lk.src} / dst {lk.dst} is not a group index")
        if min(lk.offset, lk.rows, lk.dst_offset) < 0:
            raise TopologyError(f"{where}: offset, rows and dst_offset must not be negative")
        _check_options(lk, shapes, sizes, where)
        if lk.role in VIRTUAL_ROLES:
            _check_virtual(lk, sizes, where)
            continue
        if lk.param is None or lk.param not in shapes:
            raise TopologyError(f"{where}: {lk.param!r} is not a tensor of the spec")
        shape = shapes[lk.param]
        first = shape[1] if lk.transposed else shape[0] if lk.role not in EMBED_ROLES else math.prod(shape)
        rows = lk.rows or first
        if lk.offset + rows > first or (lk.role in EMBED_ROLES and (lk.offset or lk.rows)):
            raise TopologyError(f"{where}: rows [{lk.offset}, {lk.offset + rows}) outside {list(shape)}")
        _check_shape(lk, shape, rows, sizes, where)
        covered.setdefault(lk.param, []).append((lk.offset, rows, first))
    for name, shape in params:
        spans = sorted(covered.get(name, []))
        if not spans:
            raise TopologyError(f"{name}: no topology link places this tensor on the graph")
        at = 0
        for start, n, extent in spans:
            if start != at or extent != spans[0][2]:
                raise TopologyError(f"{name}: topology links place its rows twice or leave rows out (at row {at})")
            at += n
        if at != spans[0][2]:
            raise TopologyError(f"{name}: topology links place {at} of its {spans[0][2]} rows")
    for name, _ in topo.left_out:
        if name in shapes:
            raise TopologyError(f"{name}: listed as left out but the spec has it")
    _check_size(topo, params, sizes)
    seen: set[str] = set()
    for i, lk in enumerate(topo.links):
        for name in block_names(i, lk, topo.groups):
            if name in seen:
                raise TopologyError(f"spec.topology.links[{i}]: a second edge block named {name!r}")
            seen.add(name)


def module_prefix(name: str) -> str:
    """The module a tensor belongs to: its name up to the last '.' ('' for a top-level name)."""
    return name.rsplit(".", 1)[0] if "." in name else ""


def block_names(i: int, lk: Link, groups: Sequence[tuple[str, int]]) -> list[str]:
    """The edge-block names link ``i`` becomes (one per head for ``head``): what orders edges by module."""
    if lk.role == "res":
        return [lk.name or f"{groups[lk.dst][0]}.res{i}"]
    if lk.role == "head":
        base = lk.name or f"{groups[lk.dst][0]}.head"
        return [f"{base}{h}" for h in range(lk.rows or groups[lk.src][1])]
    if lk.name:
        return [lk.name]
    return [str(lk.param) if not (lk.offset or lk.rows) else f"{lk.param}[{lk.offset}:{lk.offset + lk.rows}]"]


def _check_options(lk: Link, shapes: Mapping[str, tuple[int, ...]], sizes: list[int], where: str) -> None:
    shape = shapes.get(lk.param or "", ())
    if lk.stored == "in_out" and not (lk.role in WEIGHT_ROLES and len(shape) == 2):
        raise TopologyError(f"{where}: stored 'in_out' is for 2-D weights (fc, query, key, value)")
    if lk.stored == "out_in" and not (lk.role in EMBED_ROLES and len(shape) == 2):
        raise TopologyError(f"{where}: stored 'out_in' is for 2-D embedding tables")
    if lk.at != -1 and not (lk.role in AUX_ROLES and lk.at < len(sizes)):
        raise TopologyError(f"{where}: 'at' places bias / norm nodes and must be a group index")
    if lk.src_offset:
        if lk.role not in ("fc", "query", "value") or len(shape) != 2:
            raise TopologyError(f"{where}: src_offset is for 2-D fc / query / value weights")
        n_in = shape[0] if lk.transposed else shape[1]
        if lk.src_offset + n_in > sum(sizes[lk.src:]):
            raise TopologyError(f"{where}: {n_in} sources from neuron {lk.src_offset} of group {lk.src} run past "
                                "the last group")


def _check_size(topo: Topology, params: Sequence[tuple[str, tuple[int, ...]]], sizes: list[int]) -> None:
    """A graph is about as large as its model; a topology that asks for far more nodes or virtual edges than its
    tensors could need is refused before anything is allocated."""
    n_params = sum(math.prod(s) for _, s in params)
    nodes = sum(sizes)
    if nodes > 4 * n_params + 1024:
        raise TopologyError(f"spec.topology has {nodes} neurons for {n_params} parameters; a model's graph has fewer")
    virtual = sum((lk.rows or sizes[lk.src]) if lk.role == "res" else sizes[lk.dst]
                  for lk in topo.links if lk.role in VIRTUAL_ROLES)
    if virtual > 8 * nodes:
        raise TopologyError(f"spec.topology has {virtual} virtual edges for {nodes} neurons; a model's graph has "
                            "fewer")


def _check_virtual(lk: Link, sizes: list[int], where: str) -> None:
    if lk.param is not None:
        raise TopologyError(f"{where}: a {lk.role} link is virtual and names no tensor")
    if lk.role == "head":  # head h of src -> slice h of dst, for the first ``rows`` (default all) heads
        count = lk.rows or sizes[lk.src]
        if lk.offset or lk.dst_offset or count > sizes[lk.src] or sizes[lk.dst] % count:
            raise TopologyError(f"{where}: group {lk.dst} ({sizes[lk.dst]} neurons) does not split into "
                                f"{count} heads of group {lk.src}")
        return
    n = lk.rows or sizes[lk.src]
    if lk.offset + n > sizes[lk.src] or lk.dst_offset + n > sizes[lk.dst]:
        raise TopologyError(f"{where}: {n} neurons from {lk.offset} / to {lk.dst_offset} do not fit the groups "
                            f"({sizes[lk.src]} -> {sizes[lk.dst]})")


def _check_shape(lk: Link, shape: tuple[int, ...], rows: int, sizes: list[int], where: str) -> None:
    ndim = len(shape)
    if lk.role in AUX_ROLES:
        if ndim != 1 or rows + lk.dst_offset > sizes[lk.dst] or (rows != sizes[lk.dst] and lk.role != "bias"):
            raise TopologyError(f"{where}: a {lk.role} tensor must be 1-D with one entry per neuron of group "
                                f"{lk.dst} ({sizes[lk.dst]}), got {rows} of {list(shape)} from neuron {lk.dst_offset}")
        return
    if lk.role in EMBED_ROLES:
        d = sizes[lk.dst]
        if shape[-1] != d or math.prod(shape) // d != sizes[lk.src]:
            raise TopologyError(f"{where}: an embedding of shape {list(shape)} does not connect "
                                f"{sizes[lk.src]} tokens to {d} neurons")
        return
    if (ndim < 3) if lk.role == "conv" else (ndim != 2):
        raise TopologyError(f"{where}: a {lk.role} weight of shape {list(shape)} has the wrong number of dims")
    if lk.role == "conv" and math.prod(shape[2:]) > MAX_KERNEL_AREA:
        raise TopologyError(f"{where}: kernel {list(shape[2:])} has {math.prod(shape[2:])} values per edge; NiNo "
                            f"reads at most {MAX_KERNEL_AREA}")
    out_ok = rows <= sizes[lk.dst] if lk.role == "key" else rows == sizes[lk.dst]
    n_in = shape[0] if lk.transposed else shape[1]
    if (n_in != sizes[lk.src] and not lk.src_offset) or not out_ok:
        raise TopologyError(f"{where}: {rows} x {n_in} rows/inputs do not connect group {lk.src} "
                            f"({sizes[lk.src]}) to group {lk.dst} ({sizes[lk.dst]})")


# ------------------------------------------------------------------------------------------ plain chains
def chain_topology(params: Sequence[tuple[str, tuple[int, ...]]]) -> Topology:
    """The topology a generic spec without one stands for: layers chained in parameter order, each 1-D tensor on
    the outputs of the weight before it, 4-D weights convolutions. Raises TopologyError (naming the tensor) when
    the shapes cannot be such a chain, or when a tensor would get a type that misdescribes it (NINO_SPEC §2.2
    types a 3-D or 5-D weight as a bias). Kernel sizes are the nowcaster's business (``check_graph_spec``)."""
    groups: list[tuple[str, int]] = []
    links: list[Link] = []
    prev: str | None = None
    for name, shape in params:
        if len(shape) == 1:
            if prev is None:
                raise TopologyError(f"{name}: a 1-D tensor before any weight; a generic spec without a topology "
                                    "is a chain of layers (build the spec with ModelSpec.from_module, which traces "
                                    "the model, or leave the tensor out)")
            if shape[0] != groups[-1][1]:
                raise TopologyError(f"{name}: {shape[0]} entries, but {prev} has {groups[-1][1]} outputs; a generic "
                                    "spec without a topology is a chain of layers in parameter order and this "
                                    "model is not one (build the spec with ModelSpec.from_module, which traces "
                                    "the model)")
            links.append(Link(name, "norm" if name.endswith(".weight") else "bias", -1, len(groups) - 1))
            continue
        if len(shape) not in (2, 4):
            raise TopologyError(f"{name}: a {len(shape)}-D weight in a generic spec without a topology would get the "
                                "bias edge type (NINO_SPEC §2.2); build the spec with ModelSpec.from_module, which "
                                "traces the model and types it as a convolution")
        if prev is None:
            groups.append(("input", shape[1]))
        elif shape[1] != groups[-1][1]:
            raise TopologyError(f"{name}: {shape[1]} inputs, but {prev} has {groups[-1][1]} outputs; a generic "
                                "spec without a topology is a chain of layers in parameter order and this model "
                                "is not one (build the spec with ModelSpec.from_module, which traces the model)")
        groups.append((name.rsplit(".", 1)[0], shape[0]))
        links.append(Link(name, "conv" if len(shape) == 4 else "fc", len(groups) - 2, len(groups) - 1))
        prev = name
    return Topology(tuple(groups), tuple(links))


def is_plain_chain(topo: Topology, params: Sequence[tuple[str, tuple[int, ...]]]) -> bool:
    """True when ``topo`` is exactly what the spec means without one (then the spec omits it: same JSON, same
    graph as before topologies existed)."""
    if topo.left_out or topo.tokens is not None:
        return False
    try:
        chain = chain_topology(params)
    except TopologyError:
        return False
    return chain.links == topo.links and [s for _, s in chain.groups] == [s for _, s in topo.groups]

"""The neural graph of a spec that carries a traced topology (``ninocast.topology``): the same edge blocks,
edge types, features and self-loops as the hand-written families, laid out from the topology's groups.

Nodes: group by group, each group's auxiliary nodes (one per bias / norm link placed at it -- its ``dst`` unless
the link says ``at`` -- in link order) right before its neurons: for a plain chain exactly the numbering of
NINO_SPEC §2.3.2, so a traced MLP or ConvNet gets the generic graph edge for edge. Edges: one block per link,
named by ``topology.block_names`` and grouped by module as in §2.3.3; with the reference's block names and
conventions (``ninocast.tracing`` writes them for GPT-2 and Llama) this is the hand-written layout of §2.6.
"""

from __future__ import annotations

import math

from ninocast.spec import ModelSpec
from ninocast.topology import AUX_ROLES, EMBED_ROLES, Link, Topology, block_names

from .generic import (T_BIAS, T_CONV, T_FC, T_HEAD, T_KEY, T_NORM, T_POS, T_QUERY, T_RES, T_TOKEN, T_VALUE,
                      EdgeBlock, GraphLayout, ParamMap, order_by_module)

ROLE_TYPES = {"fc": T_FC, "conv": T_CONV, "query": T_QUERY, "key": T_KEY, "value": T_VALUE, "token": T_TOKEN,
              "pos": T_POS, "bias": T_BIAS, "norm": T_NORM, "res": T_RES, "head": T_HEAD}


def traced_layout(spec: ModelSpec) -> GraphLayout:
    """Edge blocks of ``spec.topology`` (validated with the spec, so shapes and coverage are known to fit)."""
    topo: Topology | None = spec.topology
    assert topo is not None
    info = {p.name: p for p in spec.layout}
    first: list[int] = []  # first neuron id of each group
    aux: dict[int, int] = {}  # link index -> its auxiliary node
    n = 0
    for g, (_, size) in enumerate(topo.groups):
        for i, lk in enumerate(topo.links):
            if lk.role in AUX_ROLES and (lk.dst if lk.at == -1 else lk.at) == g:
                aux[i] = n
                n += 1
        first.append(n)
        n += size
    sizes = [s for _, s in topo.groups]
    blocks: list[EdgeBlock] = []
    feat = 1
    for i, lk in enumerate(topo.links):
        blocks += _blocks(i, lk, topo, info, first, sizes, aux)
        if lk.role == "conv":
            feat = max(feat, math.prod(info[lk.param].shape[2:]))
    tokens = None if topo.tokens is None else (first[topo.tokens], sizes[topo.tokens])
    return GraphLayout(num_nodes=n, blocks=order_by_module(blocks), feat_size=feat, token_nodes=tokens)


def _blocks(i: int, lk: Link, topo: Topology, info: dict, first: list[int], sizes: list[int],
            aux: dict[int, int]) -> list[EdgeBlock]:
    etype = ROLE_TYPES[lk.role]
    dst = (first[lk.dst], sizes[lk.dst])
    names = block_names(i, lk, topo.groups)
    if lk.role == "res":
        count = lk.rows or sizes[lk.src]
        return [EdgeBlock(names[0], etype, (first[lk.src] + lk.offset, count), (dst[0] + lk.dst_offset, count),
                          "diag")]
    if lk.role == "head":
        count = lk.rows or sizes[lk.src]
        size = dst[1] // count
        return [EdgeBlock(names[h], etype, (first[lk.src] + h, 1), (dst[0] + h * size, size)) for h in range(count)]
    p = info[lk.param]
    name = names[0]
    if lk.role in AUX_ROLES:
        rows = lk.rows or p.shape[0]
        return [EdgeBlock(name, etype, (aux[i], 1), (dst[0] + lk.dst_offset, rows), "src",
                          ParamMap(p.start + lk.offset, rows, 1, True))]
    src = (first[lk.src], sizes[lk.src])
    if lk.role in EMBED_ROLES:  # stored (rows, d): row r is token r ("out_in": read as (out, in), §2.6.4 quirk 6)
        return [EdgeBlock(name, etype, src, dst, "src", ParamMap(p.start, src[1], dst[1],
                                                                 out_first=lk.stored == "out_in"))]
    if lk.transposed:  # stored (in, out): the column window [offset, offset + rows) of each input row
        rows = lk.rows or p.shape[1]
        pm = ParamMap(p.start, p.shape[0], rows, False, row_len=p.shape[1], col=lk.offset)
        n_in = p.shape[0]
    else:
        rows = lk.rows or p.shape[0]
        per_row = math.prod(p.shape[1:])
        pm = ParamMap(p.start + lk.offset * per_row, rows, p.shape[1], True, slots=math.prod(p.shape[2:]))
        n_in = p.shape[1]
    src = (src[0] + lk.src_offset, n_in)
    if lk.role == "key":  # key neuron j is query node j; edges run backwards, target-major (§2.6.1)
        return [EdgeBlock(name, etype, (dst[0], rows), src, "dst", pm)]
    return [EdgeBlock(name, etype, src, dst, "src", pm)]

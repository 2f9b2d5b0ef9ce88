"""The generic neural graph of MLPs and ConvNets (NINO_SPEC §2.3), and the edge-block layout that every graph
family produces and ``build.assemble`` turns into tensors.

A layout lists, per (real or virtual) parameter tensor, one *edge block*: a complete bipartite edge set between
two consecutive node ranges (or a one-to-one set), plus where the tensor's flat entries land. Describing graphs
this way keeps the family-specific code free of per-edge Python loops: edges are filled by broadcasting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

from ninocast.spec import ModelSpec
from ninocast.topology import module_prefix

# edge type ids (§2.2)
T_FC, T_BIAS, T_CONV, T_NORM, T_TOKEN, T_POS = 1, 2, 3, 4, 5, 6
T_QUERY, T_KEY, T_VALUE, T_RES, T_HEAD, T_SELF_LOOP = 7, 8, 9, 10, 11, 13


@dataclass(frozen=True)
class ParamMap:
    """Where the flat entries of a real tensor are written (``build.assemble`` fills ``param_slot``).

    ``out_first`` (nn.Linear / Conv2d storage, "first dim is output"): the block [start, start + rows*cols*slots)
    is viewed as (rows = n_out, cols = n_in, slots); entry [o, i, s] goes to edge i*rows + o, slot s.
    Otherwise (GPT-2 Conv1D storage): [start, start + rows*row_len) is viewed as (rows, row_len) and the
    column window [col, col + cols) is read; entry [r, col + c] goes to edge r*cols + c, slot 0.
    """

    start: int
    rows: int
    cols: int
    out_first: bool
    slots: int = 1
    row_len: int = 0  # 0: same as cols
    col: int = 0


@dataclass(frozen=True)
class EdgeBlock:
    """The edges of one tensor between node ranges src = (first id, count) and dst = (first id, count).

    order "src": e = i*n_dst + j connects src i -> dst j (source-major, the default of §2.3.3);
    order "dst": e = j*n_src + i connects src i -> dst j (target-major, key weights of §2.6);
    order "diag": e = i connects src i -> dst i (residuals; both ranges have the same length).
    ``param`` is None for virtual tensors, which carry the constant 1 (§2.4).
    """

    name: str
    etype: int
    src: tuple[int, int]
    dst: tuple[int, int]
    order: str = "src"
    param: ParamMap | None = None

    @property
    def num_edges(self) -> int:
        return self.src[1] if self.order == "diag" else self.src[1] * self.dst[1]


@dataclass
class GraphLayout:
    """Everything a graph family decides; ``build.assemble`` does the (vectorised) rest."""

    num_nodes: int
    blocks: list[EdgeBlock]
    feat_size: int = 1
    token_nodes: tuple[int, int] | None = None  # (first id, vocabulary size): these nodes get pos_w = v + 1


def order_by_module(blocks: Iterable[EdgeBlock]) -> list[EdgeBlock]:
    """§2.3.3: group edge blocks by module prefix, groups in order of first appearance, stable inside."""
    groups: dict[str, list[EdgeBlock]] = {}
    for b in blocks:
        groups.setdefault(module_prefix(b.name), []).append(b)
    return [b for g in groups.values() for b in g]


def generic_type(name: str, shape: tuple[int, ...]) -> int:
    """Edge type of a tensor in the generic graph (§2.2, first matching rule wins)."""
    if len(shape) == 1 and name.endswith(".weight"):
        return T_NORM
    if len(shape) == 4:
        return T_CONV
    if len(shape) == 2:
        return T_FC
    if not name.endswith(".weight") and ".res" in name:
        return T_RES
    if not name.endswith(".weight") and ".self_loop" in name:
        return T_SELF_LOOP
    return T_BIAS


def generic_layout(spec: ModelSpec) -> GraphLayout:
    """Node numbering by the exact offset rule of §2.3.2 (first dim is the output dim), edges by §2.3.3."""
    rows: list[tuple[str, tuple[int, ...], int, int, int, int]] = []  # name, shape, type, rho, gamma, aux
    rho = kappa = 0
    for ell, (name, shape) in enumerate(spec.params):
        if len(shape) == 0:  # scalars: skipped, but they still count in ell (ModelSpec rejects them anyway)
            continue
        n_out, n_in = (shape[0], shape[1]) if len(shape) >= 2 else (math.prod(shape), 1)
        etype = generic_type(name, shape)
        if len(shape) == 1:
            gamma = max(0, kappa - n_out)
        elif ell == 0:
            gamma = n_in
        else:
            gamma = kappa
        kappa = gamma + n_out
        aux = int(len(shape) == 1 and etype != T_RES)
        rows.append((name, shape, etype, rho, gamma, aux))
        rho += n_in

    # cumulative aux shift per target-start group, groups in order of first appearance
    group_aux: dict[int, int] = {}
    for _, _, _, _, gamma, aux in rows:
        group_aux[gamma] = group_aux.get(gamma, 0) + aux
    shift, total = {}, 0
    for gamma, n_aux in group_aux.items():
        total += n_aux
        shift[gamma] = total

    feat = max([1] + [math.prod(s[2:]) for _, s, *_ in rows if len(s) > 2])
    blocks, last_node = [], -1
    info = {p.name: p for p in spec.layout}
    for name, shape, etype, rho, gamma, _ in rows:
        n_out, n_in = (shape[0], shape[1]) if len(shape) >= 2 else (shape[0], 1)
        slots = math.prod(shape[2:]) if len(shape) > 2 else 1
        dst0 = gamma + shift[gamma]
        param = ParamMap(info[name].start, n_out, n_in, out_first=True, slots=slots)
        blocks.append(EdgeBlock(name, etype, (rho, n_in), (dst0, n_out), "src", param))
        last_node = max(last_node, rho + n_in - 1, dst0 + n_out - 1)
    return GraphLayout(num_nodes=last_node + 1, blocks=order_by_module(blocks), feat_size=feat)

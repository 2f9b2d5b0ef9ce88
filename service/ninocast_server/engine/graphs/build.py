"""Turn a ModelSpec into a NeuralGraph (NINO_SPEC §2): pick the family's layout, fill the tensors by
broadcasting (no per-edge Python), add the self-loops and, when asked, the Laplacian encoding.
Also the subgraph split of §2.6.6."""

from __future__ import annotations

import re
from typing import Callable

import torch

from ninocast.spec import GPT2_BLOCK_PREFIX, LLAMA_BLOCK_PREFIX, ModelSpec, SpecError

from .base import NeuralGraph
from .checks import check_graph_spec
from .generic import T_SELF_LOOP, EdgeBlock, GraphLayout, generic_layout
from .blocklap import NotBlockStructured
from .lpe import laplacian_pe, laplacian_pe_blocks
from .traced import traced_layout
from .transformer import gpt2_layout, llama_layout

LAYOUTS: dict[str, Callable[[ModelSpec], GraphLayout]] = {
    "generic": generic_layout,
    "gpt2": gpt2_layout,
    "llama": llama_layout,
}
BLOCK_PREFIXES = {"gpt2": GPT2_BLOCK_PREFIX, "llama": LLAMA_BLOCK_PREFIX}


def build_graph(spec: ModelSpec, *, with_lpe: bool = True, pos: torch.Tensor | None = None) -> NeuralGraph:
    """The neural graph of ``spec``. ``pos`` (N, lpe), when given, is used verbatim (exact tests, cached LPE);
    otherwise the LPE is computed when ``with_lpe`` and left None when not."""
    check_graph_spec(spec)
    layout = spec_layout(spec)
    graph = assemble(layout, spec.n_params)
    if pos is not None:
        pos = torch.as_tensor(pos)
        if pos.dim() != 2 or pos.shape[0] != graph.num_nodes:
            raise ValueError(f"pos must have shape ({graph.num_nodes}, lpe), got {tuple(pos.shape)}")
        graph.pos = pos
    elif with_lpe:
        graph.pos = layout_pe(layout, graph)
    return graph


def spec_layout(spec: ModelSpec) -> GraphLayout:
    """The edge blocks of ``spec``: from its traced topology when it carries one, else its family's layout."""
    return traced_layout(spec) if spec.topology is not None else LAYOUTS[spec.family](spec)


def layout_pe(layout: GraphLayout, graph: NeuralGraph) -> torch.Tensor:
    """The LPE from the layout's blocks (node-sized work); from the edge list if a block is not bipartite."""
    try:
        return laplacian_pe_blocks(layout.blocks, layout.num_nodes)
    except NotBlockStructured:
        return laplacian_pe(graph.edge_index, graph.num_nodes)


def split_blocks(spec: ModelSpec) -> list[ModelSpec]:
    """Subgraph mode (§2.6.6): piece 0 = everything before block 1, piece i = block i, the last piece also takes
    everything after the last block. Pieces are specs of the same family and heads whose flat vectors are
    consecutive slices of the whole one. Generic specs are one piece."""
    prefix = BLOCK_PREFIXES.get(spec.family)
    if prefix is None:
        return [spec]
    pattern = re.compile(r"(?:.*\.)?" + re.escape(prefix) + r"(\d+)\.")  # under any outer prefix
    pieces: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    blocks_seen: list[int] = []
    for name, shape in spec.params:
        m = pattern.match(name)
        if m and int(m.group(1)) not in blocks_seen:
            blocks_seen.append(int(m.group(1)))
            if len(blocks_seen) > 1:  # a new block opens a new piece; block 0 joins the embeddings
                pieces.append([])
        pieces[-1].append((name, shape))
    return [ModelSpec(spec.family, tuple(p), spec.num_heads, spec.num_key_value_heads) for p in pieces]


def assemble(layout: GraphLayout, n_params: int) -> NeuralGraph:
    """Fill edge_index / edge_type / param_slot block by block, then append the N self-loops."""
    n, feat = layout.num_nodes, layout.feat_size
    n_param_edges = sum(b.num_edges for b in layout.blocks)
    n_edges = n_param_edges + n
    edge_index = torch.empty(2, n_edges, dtype=torch.int64)
    edge_type = torch.empty(n_edges, dtype=torch.int64)
    param_slot = torch.full((n_params,), -1, dtype=torch.int64)
    ranges: dict[str, tuple[int, int]] = {}
    virtual: list[torch.Tensor] = []
    e0 = 0
    for blk in layout.blocks:
        e1 = e0 + blk.num_edges
        if blk.name in ranges:
            raise SpecError(f"{blk.name}: two graph tensors with this name")
        ranges[blk.name] = (e0, e1)
        _fill_edges(edge_index[:, e0:e1], blk)
        edge_type[e0:e1] = blk.etype
        if blk.param is None:
            virtual.append(torch.arange(e0, e1))
        else:
            _fill_slots(param_slot, blk, e0, feat)
        e0 = e1
    loops = torch.arange(n)
    edge_index[:, n_param_edges:] = loops
    edge_type[n_param_edges:] = T_SELF_LOOP
    if n_params and int(param_slot.min()) < 0:
        raise SpecError("some parameters are not placed on any graph edge")  # a layout bug, not a user error
    pos_w = torch.zeros(n, dtype=torch.int64)
    if layout.token_nodes is not None:
        first, vocab = layout.token_nodes
        pos_w[first:first + vocab] = torch.arange(1, vocab + 1)
    return NeuralGraph(
        edge_index=edge_index, edge_type=edge_type, pos_w=pos_w, num_nodes=n, feat_size=feat,
        param_slot=param_slot,
        virtual_edges=torch.cat(virtual) if virtual else torch.zeros(0, dtype=torch.int64),
        edge_ranges=ranges, pos=None,
    )


def _fill_edges(seg: torch.Tensor, blk: EdgeBlock) -> None:
    """Write the (2, n_edges) slice of one block by broadcasting its two node ranges."""
    (s0, ns), (d0, nd) = blk.src, blk.dst
    src, dst = torch.arange(s0, s0 + ns), torch.arange(d0, d0 + nd)
    if blk.order == "diag":
        if ns != nd:
            raise SpecError(f"{blk.name}: one-to-one edges between ranges of sizes {ns} and {nd}")
        seg[0].copy_(src)
        seg[1].copy_(dst)
    elif blk.order == "src":  # e = i * nd + j
        seg[0].view(ns, nd).copy_(src[:, None].expand(ns, nd))
        seg[1].view(ns, nd).copy_(dst[None, :].expand(ns, nd))
    else:  # "dst": e = j * ns + i
        seg[0].view(nd, ns).copy_(src[None, :].expand(nd, ns))
        seg[1].view(nd, ns).copy_(dst[:, None].expand(nd, ns))


def _fill_slots(param_slot: torch.Tensor, blk: EdgeBlock, e0: int, feat: int) -> None:
    """param_slot[flat j] = e * F_g + f for the (edge e, slot f) that flat entry j is written to (§2.4)."""
    p = blk.param
    assert p is not None
    if p.out_first:  # stored (out, in, slots): entry [o, i, s] -> edge i * out + o, slot s
        o = torch.arange(p.rows)[:, None, None]
        i = torch.arange(p.cols)[None, :, None]
        s = torch.arange(p.slots)
        vals = (e0 + i * p.rows + o) * feat + s
        param_slot[p.start:p.start + vals.numel()] = vals.reshape(-1)
    else:  # rows of length row_len, column window [col, col + cols): entry [r, col + c] -> edge r * cols + c
        row_len = p.row_len or p.cols
        view = param_slot[p.start:p.start + p.rows * row_len].view(p.rows, row_len)[:, p.col:p.col + p.cols]
        view.copy_((e0 + torch.arange(p.rows)[:, None] * p.cols + torch.arange(p.cols)) * feat)

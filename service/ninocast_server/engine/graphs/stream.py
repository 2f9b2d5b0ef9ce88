"""A neural graph kept as its edge blocks, for models whose edge arrays would not fit (NINO_SPEC §2, unchanged).

``NeuralGraph`` holds edge_index, edge_type and param_slot: 32 bytes per edge, 4 GB for GPT-2 small before a
single feature is made. ``StreamedGraph`` holds only the layout (a few hundred blocks), the node arrays and the
LPE, and produces any run of edges on demand: their endpoints, types, features read from the (P, S) states, and
the flat parameter each prediction belongs to. Every chunk lies inside one block, so all of this is index
arithmetic on the block's ranges. The edge numbering, types and features are exactly those of
``build.assemble`` (tests compare the two), so the nowcast is the same computation, chunk by chunk.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import Tensor

from ninocast.spec import ModelSpec

from ..nowcasters.scaling import EPS
from .base import SELF_LOOP_VALUE, VIRTUAL_VALUE, NeuralGraph
from .generic import T_SELF_LOOP, EdgeBlock, GraphLayout, ParamMap

STREAM_MIN_EDGES = 2**23  # from here on (~1 GB of edge arrays) the cache builds streamed graphs


@dataclass(frozen=True)
class _Block:
    e0: int  # first edge id
    block: EdgeBlock
    constant: float  # slot-0 value of virtual edges (param None)
    tensor: int = -1  # index in spec.layout of the tensor the block's parameters belong to (-1: virtual)


@dataclass(frozen=True)
class EdgeChunk:
    """Edges [sl.start, sl.stop) of the graph, all in one block (local ids ``l0 .. l0 + n``)."""

    sl: slice
    part: _Block
    l0: int

    @property
    def size(self) -> int:
        return self.sl.stop - self.sl.start


class StreamedGraph:
    """The graph of ``layout`` without edge-sized arrays; see the module docstring."""

    def __init__(self, layout: GraphLayout, n_params: int, pos: Tensor | None = None,
                 tensor_starts: Sequence[int] = ()) -> None:
        """``tensor_starts``: the flat offset of each spec tensor, ascending (needed by ``features`` with
        per-tensor scaling)."""
        self.layout, self.tensor_starts = layout, tuple(tensor_starts)
        self.num_nodes, self.feat_size, self.n_params = layout.num_nodes, layout.feat_size, int(n_params)
        parts, e0 = [], 0
        for b in layout.blocks:
            t = bisect.bisect_right(self.tensor_starts, b.param.start) - 1 if b.param is not None else -1
            parts.append(_Block(e0, b, VIRTUAL_VALUE, t))
            e0 += b.num_edges
        n = self.num_nodes
        parts.append(_Block(e0, EdgeBlock("self_loops", T_SELF_LOOP, (0, n), (0, n), "diag"), SELF_LOOP_VALUE))
        self._parts = parts
        self.num_edges = e0 + n
        self.pos = pos
        self.pos_w = torch.zeros(n, dtype=torch.int64)
        if layout.token_nodes is not None:
            first, vocab = layout.token_nodes
            self.pos_w[first:first + vocab] = torch.arange(1, vocab + 1)
        self.device = torch.device("cpu")

    # ------------------------------------------------------------------ what the nowcast asks for
    def chunks(self, size: int) -> Iterator[EdgeChunk]:
        """Runs of at most ``size`` edges in edge-id order, never crossing a block."""
        for part in self._parts:
            total = part.block.num_edges
            for l0 in range(0, total, size):
                n = min(size, total - l0)
                yield EdgeChunk(slice(part.e0 + l0, part.e0 + l0 + n), part, l0)

    def endpoints(self, c: EdgeChunk) -> tuple[Tensor, Tensor]:
        """(src, dst) int64 node ids of the chunk's edges (the rows of ``edge_index[:, c.sl]``)."""
        b = c.part.block
        (s0, ns), (d0, nd) = b.src, b.dst
        local = torch.arange(c.l0, c.l0 + c.size, device=self.device)
        if b.order == "diag":
            return local + s0, local + d0
        if b.order == "src":
            i, j = local // nd, local % nd
        else:
            j, i = local // ns, local % ns
        return i.add_(s0), j.add_(d0)

    def edge_type(self, c: EdgeChunk) -> Tensor:
        return torch.full((c.size,), c.part.block.etype, dtype=torch.int64, device=self.device)

    def param_index(self, c: EdgeChunk) -> Tensor | None:
        """(n, slots) flat parameter ids on the chunk's edges, slot-major per edge; None on virtual edges."""
        p = c.part.block.param
        if p is None:
            return None
        local = torch.arange(c.l0, c.l0 + c.size, device=self.device)
        return _local_to_flat(p, local)

    def features(self, states: Tensor, c: EdgeChunk, out: Tensor,
                 scale: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """(n, F_g * S) slot-major float32 features of the chunk, written into ``out`` (as ``edge_features``).

        ``scale`` = per-tensor (mu, sigma): ``states`` are raw (any float dtype) and are standardised here,
        chunk by chunk, exactly as ``scale_states`` does: (x - mu) / (sigma + EPS) in float32."""
        S = states.shape[1]
        out = out[: c.size]
        out.zero_()
        idx = self.param_index(c)
        if idx is None:
            out[:, :S] = c.part.constant
            return out
        slots = idx.shape[1]
        dst = out.view(c.size, self.feat_size, S)[:, :slots]
        dst.copy_(states[idx.reshape(-1)].view(c.size, slots, S))
        if scale is not None:
            if c.part.tensor < 0:
                raise ValueError("per-tensor scaling needs the graph's tensor_starts")
            mu, sigma = scale
            dst.sub_(mu[c.part.tensor]).div_(sigma[c.part.tensor] + EPS)
        return out

    def scatter(self, pred: Tensor, c: EdgeChunk, out: Tensor) -> None:
        """(n, F_g) predictions of the chunk -> their flat parameter entries of ``out``; virtual edges dropped."""
        idx = self.param_index(c)
        if idx is not None:
            out[idx.reshape(-1)] = pred[:, : idx.shape[1]].reshape(-1)

    def in_degree(self) -> Tensor:
        """(N, 1) float count of incoming edges, at least 1 (as ``nino.in_degree`` of the edge list)."""
        n = self.num_nodes
        diff = torch.zeros(n + 1, dtype=torch.float64)
        for part in self._parts:
            b = part.block
            (s0, ns), (d0, nd) = b.src, b.dst
            diff[d0] += 1 if b.order == "diag" else ns
            diff[d0 + nd] -= 1 if b.order == "diag" else ns
        return diff.cumsum_(0)[:n].clamp_(min=1).to(torch.float32).unsqueeze_(1)

    # ------------------------------------------------------------------ NeuralGraph compatibility
    @property
    def param_type(self) -> Tensor:
        """(P,) edge type per flat parameter (what WNN+ needs), filled block by block."""
        out = torch.empty(self.n_params, dtype=torch.int64)
        for part in self._parts:
            p = part.block.param
            if p is None:
                continue
            if p.out_first:
                out[p.start:p.start + p.rows * p.cols * p.slots] = part.block.etype
            else:
                row_len = p.row_len or p.cols
                out[p.start:p.start + p.rows * row_len].view(p.rows, row_len)[:, p.col:p.col + p.cols] = \
                    part.block.etype
        return out

    def to(self, device: torch.device | str) -> "StreamedGraph":
        g = StreamedGraph(self.layout, self.n_params, None if self.pos is None else self.pos.to(device),
                          self.tensor_starts)
        g.pos_w, g.device = self.pos_w.to(device), torch.device(device)
        return g

    def materialise(self) -> NeuralGraph:
        """The same graph as explicit arrays (tests, and callers that need them; edge-sized)."""
        from .build import assemble

        g = assemble(self.layout, self.n_params)
        g.pos = self.pos
        return g


def _local_to_flat(p: ParamMap, local: Tensor) -> Tensor:
    """Inverse of ``build._fill_slots`` for one block: local edge ids -> (n, slots) flat parameter ids."""
    if p.out_first:  # edge a * rows + b carries entry [b, a, :]
        a, b = local // p.rows, local % p.rows
        first = (b * p.cols + a) * p.slots + p.start
        return first[:, None] + torch.arange(p.slots, device=local.device)
    row_len = p.row_len or p.cols  # edge r * cols + c carries entry [r, col + c]
    r, c = local // p.cols, local % p.cols
    return (r * row_len + c + (p.start + p.col))[:, None]


def build_streamed(spec: ModelSpec, *, with_lpe: bool = True) -> StreamedGraph:
    """The streamed graph of ``spec``, its LPE computed from the blocks (node-sized work)."""
    from .build import spec_layout
    from .lpe import laplacian_pe_blocks

    layout = spec_layout(spec)
    pos = laplacian_pe_blocks(layout.blocks, layout.num_nodes) if with_lpe else None
    return StreamedGraph(layout, spec.n_params, pos, [p.start for p in spec.layout])


def layout_edges(spec: ModelSpec) -> int:
    """Number of edges of the spec's graph (self-loops included), from its layout alone."""
    from .build import spec_layout

    layout = spec_layout(spec)
    return sum(b.num_edges for b in layout.blocks) + layout.num_nodes

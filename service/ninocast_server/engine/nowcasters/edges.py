"""Where NiNo's inference forward reads its edges from: full arrays, or blocks of a streamed graph.

``NiNoModel._run`` is one loop over edge chunks; these two sources give it the same interface (endpoints,
types, features, the newest state of each edge, and where the head writes), so the forward is written once
for graphs that fit in memory and for streamed graphs with hundreds of millions of edges.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

import torch
from torch import Tensor

from .layers import chunks, in_degree

if TYPE_CHECKING:
    from ..graphs.stream import StreamedGraph


class ArrayEdges:
    """Edges given as full (E, ...) arrays; chunks are slices, predictions land in ``out`` (E, F_g)."""

    def __init__(self, attr: Tensor, src: Tensor, dst: Tensor, types: Tensor, pos: Tensor, pos_w: Tensor | None,
                 out: Tensor) -> None:
        self.attr, self.src, self.dst, self._types, self.pos, self.pos_w, self.out = \
            attr, src, dst, types, pos, pos_w, out
        self.num_edges = attr.shape[0]

    def chunks(self, size: int) -> Iterator[slice]:
        return chunks(self.num_edges, size)

    def slice(self, sl: slice) -> slice:
        return sl

    def endpoints(self, sl: slice) -> tuple[Tensor, Tensor]:
        return self.src[sl], self.dst[sl]

    def types(self, sl: slice) -> Tensor:
        return self._types[sl]

    def features(self, sl: slice) -> Tensor:
        return self.attr[sl]

    def in_degree(self) -> Tensor:
        return in_degree(self.dst, self.pos.shape[0])

    def newest(self, sl: slice, f_g: int, ctx: int) -> Tensor:
        return self.attr[sl].view(-1, f_g, ctx)[:, :, -1]

    def head_out(self, sl: slice) -> Tensor:
        return self.out[sl]

    def emit(self, sl: slice, o: Tensor) -> None:
        pass  # written in place by head_out


class StreamedEdges:
    """Edges made per chunk from a StreamedGraph's blocks; predictions are scattered into the (P,) ``out``."""

    def __init__(self, graph: "StreamedGraph", states: Tensor, out: Tensor, feat_buf: Tensor,
                 head_buf: Tensor, scale: tuple[Tensor, Tensor] | None) -> None:
        self.graph, self.states, self.out, self.feat_buf, self.head_buf = graph, states, out, feat_buf, head_buf
        self.scale = scale
        self.pos, self.pos_w = graph.pos.to(torch.float32), graph.pos_w
        self.num_edges = graph.num_edges
        self._feats: tuple[object, Tensor] | None = None  # the last chunk's features (embed and residual share)

    def chunks(self, size: int):
        return self.graph.chunks(size)

    def slice(self, c) -> slice:
        return c.sl

    def endpoints(self, c) -> tuple[Tensor, Tensor]:
        return self.graph.endpoints(c)

    def types(self, c) -> Tensor:
        return self.graph.edge_type(c)

    def features(self, c) -> Tensor:
        if self._feats is None or self._feats[0] is not c:
            self._feats = (c, self.graph.features(self.states, c, self.feat_buf, self.scale))
        return self._feats[1]

    def in_degree(self) -> Tensor:
        return self.graph.in_degree().to(self.pos.device)

    def newest(self, c, f_g: int, ctx: int) -> Tensor:
        return self.features(c).view(-1, f_g, ctx)[:, :, -1]

    def head_out(self, c) -> Tensor:
        return self.head_buf[: c.size]

    def emit(self, c, o: Tensor) -> None:
        self.graph.scatter(o, c, self.out)


"""A bounded cache of built graphs: eigenvectors are costly and the same spec comes back every period."""

from __future__ import annotations

import threading
from collections import OrderedDict

from ninocast.spec import ModelSpec

from .base import NeuralGraph
from .blocklap import NotBlockStructured
from .build import build_graph
from .stream import STREAM_MIN_EDGES, StreamedGraph, build_streamed, layout_edges


def build_for_nowcast(spec: ModelSpec, with_lpe: bool = True,
                      stream_min_edges: int = STREAM_MIN_EDGES) -> "NeuralGraph | StreamedGraph":
    """Explicit arrays for graphs below ``stream_min_edges`` edges (fastest), a StreamedGraph above (node-sized
    memory); explicit arrays also when a layout block is not bipartite between disjoint node ranges."""
    if layout_edges(spec) >= stream_min_edges:
        try:
            return build_streamed(spec, with_lpe=with_lpe)
        except NotBlockStructured:
            pass
    return build_graph(spec, with_lpe=with_lpe)


def held_edges(graph: "NeuralGraph | StreamedGraph") -> int:
    """What a cached graph costs, in edge-array units: a streamed graph holds only node-sized arrays."""
    return graph.num_nodes if isinstance(graph, StreamedGraph) else graph.num_edges


class GraphCache:
    """LRU by spec fingerprint, bounded by the total number of graph edges held."""

    def __init__(self, max_edges: int = 200_000_000, stream_min_edges: int = STREAM_MIN_EDGES) -> None:
        self.max_edges = max_edges
        self.stream_min_edges = stream_min_edges
        self._graphs: OrderedDict[tuple[str, bool], NeuralGraph] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, spec: ModelSpec, with_lpe: bool = True) -> NeuralGraph:
        key = (spec.fingerprint(), with_lpe)
        with self._lock:
            g = self._graphs.get(key)
            if g is not None:
                self._graphs.move_to_end(key)
                self.hits += 1
                return g
        g = build_for_nowcast(spec, with_lpe, self.stream_min_edges)  # outside the lock: building can take seconds
        with self._lock:
            self.misses += 1
            self._graphs[key] = g
            while len(self._graphs) > 1 and sum(held_edges(x) for x in self._graphs.values()) > self.max_edges:
                self._graphs.popitem(last=False)
        return g

    def put(self, spec: ModelSpec, graph: NeuralGraph, with_lpe: bool = True) -> None:
        """Seed the cache with a prepared graph (e.g. one with an injected reference LPE)."""
        with self._lock:
            self._graphs[(spec.fingerprint(), with_lpe)] = graph

    def __len__(self) -> int:
        return len(self._graphs)

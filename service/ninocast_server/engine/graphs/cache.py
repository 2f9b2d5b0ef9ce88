"""A bounded cache of built graphs: eigenvectors are costly and the same spec comes back every period."""

from __future__ import annotations

import threading
from collections import OrderedDict

from ninocast.spec import ModelSpec

from .base import NeuralGraph
from .build import build_graph


class GraphCache:
    """LRU by spec fingerprint, bounded by the total number of graph edges held."""

    def __init__(self, max_edges: int = 200_000_000) -> None:
        self.max_edges = max_edges
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
        g = build_graph(spec, with_lpe=with_lpe)  # outside the lock: building can take seconds
        with self._lock:
            self.misses += 1
            self._graphs[key] = g
            while len(self._graphs) > 1 and sum(x.num_edges for x in self._graphs.values()) > self.max_edges:
                self._graphs.popitem(last=False)
        return g

    def put(self, spec: ModelSpec, graph: NeuralGraph, with_lpe: bool = True) -> None:
        """Seed the cache with a prepared graph (e.g. one with an injected reference LPE)."""
        with self._lock:
            self._graphs[(spec.fingerprint(), with_lpe)] = graph

    def __len__(self) -> int:
        return len(self._graphs)

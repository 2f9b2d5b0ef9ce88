"""The normalised Laplacian of a neural graph applied from its edge blocks, in node-sized time and memory.

Every block of a layout is a complete bipartite edge set between two node ranges (or a one-to-one set), so the
unit-weight undirected adjacency is a union of axis-aligned rectangles in the (lower id, higher id) plane plus
O(N) one-to-one pairs. Rectangles may overlap (GPT-2's q and k weights join the same node pairs), and the
Laplacian counts a pair once, so the union is made disjoint on the grid of all rectangle corners first. Then
A x = sum over rectangles R = I x J of 1_I (1_J . x) + 1_J (1_I . x) takes two prefix sums and two sparse
products with O(#rectangles) entries, never an (E,) array: this is what lets the eigensolver of ``lpe`` run on
graphs of 10^8..10^9 edges.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .generic import EdgeBlock


class NotBlockStructured(ValueError):
    """A block whose source and target ranges overlap: the explicit edge list has to be used instead."""


class BlockAdjacency:
    """Unit-weight undirected adjacency (self-loops and duplicates dropped) of a list of edge blocks."""

    def __init__(self, blocks: Sequence[EdgeBlock], num_nodes: int) -> None:
        n = self.n = int(num_nodes)
        rects, pairs = [], []
        for b in blocks:
            (s0, ns), (d0, nd) = b.src, b.dst
            if ns == 0 or nd == 0:
                continue
            if b.order == "diag":
                lo, hi = np.arange(s0, s0 + ns, dtype=np.int64), np.arange(d0, d0 + nd, dtype=np.int64)
                keep = lo != hi
                pairs.append(np.stack([np.minimum(lo, hi)[keep], np.maximum(lo, hi)[keep]]))
            elif s0 + ns <= d0:
                rects.append((s0, s0 + ns, d0, d0 + nd))
            elif d0 + nd <= s0:
                rects.append((d0, d0 + nd, s0, s0 + ns))
            else:
                raise NotBlockStructured(f"{b.name}: source and target node ranges overlap")
        a0, a1, b0, b1, covered = _disjoint_union(rects)
        self.a0, self.a1, self.b0, self.b1 = a0, a1, b0, b1
        lo, hi = (np.concatenate(pairs, axis=1) if pairs else np.zeros((2, 0), dtype=np.int64))
        key = np.unique(lo * n + hi)  # O(N) one-to-one pairs: dedup among themselves
        lo, hi = key // n, key % n
        inside = covered(lo, hi)
        self.lo, self.hi = lo[~inside], hi[~inside]
        self.num_pairs = int(np.sum((a1 - a0) * (b1 - b0))) + self.lo.size
        self._ops: tuple | None = None

    def dense(self) -> np.ndarray:
        """The (n, n) 0/1 matrix (small graphs; no scipy import, which costs more than a small nowcast)."""
        adj = np.zeros((self.n, self.n))
        for a0, a1, b0, b1 in zip(self.a0, self.a1, self.b0, self.b1):
            adj[a0:a1, b0:b1] = 1.0
            adj[b0:b1, a0:a1] = 1.0
        adj[self.lo, self.hi] = 1.0
        adj[self.hi, self.lo] = 1.0
        return adj

    def _operators(self) -> tuple:
        """Sparse range-sum / range-spread maps with O(#rectangles) entries, and the one-to-one pairs."""
        if self._ops is not None:
            return self._ops
        from scipy.sparse import csr_array

        n, a0, a1, b0, b1, lo, hi = self.n, self.a0, self.a1, self.b0, self.b1, self.lo, self.hi
        r = a0.size
        ones = np.ones(r)
        rows = np.arange(r)
        # range sums: S_I x = C[a1] - C[a0] with C = [0, cumsum(x)]
        sum_a = csr_array((np.concatenate([ones, -ones]), (np.concatenate([rows, rows]),
                                 np.concatenate([a1, a0]))), shape=(r, n + 1))
        sum_b = csr_array((np.concatenate([ones, -ones]), (np.concatenate([rows, rows]),
                                 np.concatenate([b1, b0]))), shape=(r, n + 1))
        # range spreads: y += cumsum(delta at start - delta at end)
        pairs = csr_array((np.ones(2 * lo.size), (np.concatenate([lo, hi]), np.concatenate([hi, lo]))),
                          shape=(n, n))
        self._ops = (sum_a, sum_b, sum_a.T.tocsr() * -1.0, sum_b.T.tocsr() * -1.0, pairs)
        return self._ops

    def matmat(self, x: np.ndarray) -> np.ndarray:
        """A @ x for x of shape (n,) or (n, m)."""
        sum_a, sum_b, spread_a, spread_b, pairs = self._operators()
        c = np.zeros((self.n + 1,) + x.shape[1:])
        np.cumsum(x, axis=0, out=c[1:])
        d = spread_a @ (sum_b @ c) + spread_b @ (sum_a @ c)
        y = np.cumsum(d[: self.n], axis=0)
        y += pairs @ x
        return y

    def degrees(self) -> np.ndarray:
        """Exact integer-valued degrees, from the rectangles' sizes and the pairs (no scipy)."""
        diff = np.zeros(self.n + 1)
        np.add.at(diff, self.a0, self.b1 - self.b0)
        np.add.at(diff, self.a1, -(self.b1 - self.b0))
        np.add.at(diff, self.b0, self.a1 - self.a0)
        np.add.at(diff, self.b1, -(self.a1 - self.a0))
        deg = np.cumsum(diff[: self.n])
        deg += np.bincount(self.lo, minlength=self.n) + np.bincount(self.hi, minlength=self.n)
        return deg


def _disjoint_union(rects: list[tuple[int, int, int, int]]):
    """Rectangles [a0, a1) x [b0, b1) -> the same point set as disjoint rectangles (rows of the corner grid,
    merged along b), and a function telling whether points (lo, hi) lie in the union."""
    if not rects:
        z = np.zeros(0, dtype=np.int64)
        return z, z, z, z, lambda lo, hi: np.zeros(lo.shape, dtype=bool)
    r = np.asarray(rects, dtype=np.int64)
    xs = np.unique(np.concatenate([r[:, 0], r[:, 1]]))
    ys = np.unique(np.concatenate([r[:, 2], r[:, 3]]))
    grid = np.zeros((xs.size - 1, ys.size - 1), dtype=bool)
    ix0, ix1 = np.searchsorted(xs, r[:, 0]), np.searchsorted(xs, r[:, 1])
    iy0, iy1 = np.searchsorted(ys, r[:, 2]), np.searchsorted(ys, r[:, 3])
    for i0, i1, j0, j1 in zip(ix0, ix1, iy0, iy1):
        grid[i0:i1, j0:j1] = True
    # runs of True along each grid row become one rectangle
    padded = np.zeros((grid.shape[0], grid.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = grid
    step = np.diff(padded, axis=1)
    si, sj = np.nonzero(step == 1)
    ei, ej = np.nonzero(step == -1)  # same row order, runs alternate start/end
    a0, a1 = xs[si], xs[si + 1]
    b0, b1 = ys[sj], ys[ej]

    def covered(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        i = np.searchsorted(xs, lo, side="right") - 1
        j = np.searchsorted(ys, hi, side="right") - 1
        ok = (i >= 0) & (i < grid.shape[0]) & (j >= 0) & (j < grid.shape[1])
        out = np.zeros(lo.shape, dtype=bool)
        out[ok] = grid[i[ok], j[ok]]
        return out

    return a0, a1, b0, b1, covered

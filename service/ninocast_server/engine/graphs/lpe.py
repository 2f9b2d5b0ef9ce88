"""Laplacian eigenvector positional encoding (NINO_SPEC §2.5), made deterministic.

The edge set is made undirected (reversed edges added, duplicates and self-loops removed, unit weights) and
L = I - D^-1/2 A D^-1/2 is built (isolated nodes get 0 in D^-1/2, so their diagonal stays 1). The k + 1
smallest eigenpairs are computed, sorted ascending, the first (trivial) one is dropped and the next k columns
are kept; a graph with fewer than k + 1 nodes gets zero columns on the right.

Choices (the reference leaves them open or random):
* Precision: L and the eigensolvers are float64 (the reference: float32); ``pos`` is cast to float32.
* Solver: dense ``numpy.linalg.eigh`` when N <= DENSE_MAX_NODES (full spectrum, no iterative corner cases).
  Above it: ARPACK Lanczos for the largest eigenvalues of I + M (M = D^-1/2 A D^-1/2, so these are the
  smallest of L = I - M), from a seeded start vector, then deflated re-runs that pick up copies of repeated
  eigenvalues which single-vector Lanczos misses (``_sparse_smallest``). Only products M x are needed: no
  factorisation (the earlier shift-invert LU of an edge-sized matrix ran out of memory from ~39M parameters).
  ``laplacian_pe_blocks`` applies M from the layout's edge blocks in O(N + blocks) per product (``blocklap``),
  so the encoding of a 1.2B-parameter Llama (401k nodes, 1.2e9 edges) takes ~4 s and ~0.2 GB; GPT-2 3M
  (52,925 nodes): 46 products, 0.1 s. Both run with OpenBLAS on one thread (``single_threaded_blas``).
* Sign: each column is flipped so that its entry of largest magnitude is positive; entries within a relative
  SIGN_TIE_RTOL of that magnitude count as tied and the lowest node id among them decides. The rule is applied
  to the final float32 values, so it holds exactly on the returned matrix (the reference draws random signs).

Inside an eigenspace of a repeated eigenvalue (common: symmetric heads, FM-16's eigenvalue 1 in columns 3..7)
any orthonormal basis is valid, and which one comes out depends on the solver path. Same spec, same path, same
machine: same ``pos`` bit for bit. The reference's ARPACK itself sometimes returns one copy of a repeated
eigenvalue and the next eigenvalue instead (Llama fixtures, column 7); this module returns the true smallest.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from .generic import EdgeBlock

LPE_DIM = 8
DENSE_MAX_NODES = 500
LANCZOS_NCV = 30  # Lanczos basis size: 46-164 products with M from 50k to 400k nodes (GPT-2 3M .. Llama 1B)
SIGN_TIE_RTOL = 1e-6
_V0_SEED = 0


def laplacian_pe(edge_index: torch.Tensor, num_nodes: int, k: int = LPE_DIM, *,
                 dense_max_nodes: int = DENSE_MAX_NODES) -> torch.Tensor:
    """(2, E) edge index -> (num_nodes, k) float32 eigenvectors of the normalised Laplacian (see module doc)."""
    n = int(num_nodes)
    if n <= 1 or k == 0:
        return torch.zeros(n, k)
    lo, hi, w = _weighted_pairs(edge_index, n)

    def dense() -> np.ndarray:
        lap = np.eye(n)
        lap[lo, hi] = -w
        lap[hi, lo] = -w
        return lap

    def normalised_adjacency():  # M = D^-1/2 A D^-1/2 as a sparse matrix: L = I - M
        from scipy.sparse import csr_array

        return csr_array((np.concatenate([w, w]), (np.concatenate([lo, hi]), np.concatenate([hi, lo]))),
                         shape=(n, n))

    return _encode(n, k, dense_max_nodes, dense, lambda: normalised_adjacency().__matmul__)


def laplacian_pe_blocks(blocks: Sequence[EdgeBlock], num_nodes: int, k: int = LPE_DIM, *,
                        dense_max_nodes: int = DENSE_MAX_NODES) -> torch.Tensor:
    """The same encoding from a layout's edge blocks (self-loops excluded), without an edge-sized array.

    Equal to ``laplacian_pe`` of the assembled graph: bit for bit on the dense path, within the solver tolerance
    (1e-10 on the eigenvalues) on the iterative one. Raises ``NotBlockStructured`` for a block whose source and
    target ranges overlap (no built-in family has one)."""
    from .blocklap import BlockAdjacency

    n = int(num_nodes)
    if n <= 1 or k == 0:
        return torch.zeros(n, k)
    adj = BlockAdjacency(blocks, n)
    dinv = _inverse_sqrt_degrees(adj.degrees())

    def dense() -> np.ndarray:
        return np.eye(n) - dinv[:, None] * adj.dense() * dinv[None, :]

    def normalised_adjacency():
        def apply(x: np.ndarray) -> np.ndarray:
            d = dinv if x.ndim == 1 else dinv[:, None]
            return d * adj.matmat(d * x)
        return apply

    return _encode(n, k, dense_max_nodes, dense, normalised_adjacency)


def _encode(n: int, k: int, dense_max_nodes: int, dense: Callable[[], np.ndarray],
            normalised_adjacency: Callable[[], Callable[[np.ndarray], np.ndarray]]) -> torch.Tensor:
    """Eigenvectors 2..k+1 of L = I - M, float32, zero-padded, signs fixed: dense eigh or Lanczos on I + M."""
    pos = np.zeros((n, k), dtype=np.float32)
    want = min(k + 1, n)
    use_dense = n <= dense_max_nodes or want >= n - 1
    if not use_dense:
        import scipy.sparse.linalg  # noqa: F401 - load scipy's OpenBLAS before pinning its threads
    with single_threaded_blas():
        if use_dense:
            vals, vecs = np.linalg.eigh(dense())
        else:
            vals, vecs = _sparse_smallest(normalised_adjacency(), n, want)
    order = np.argsort(vals, kind="stable")[1:want]
    pos[:, : order.size] = vecs[:, order]
    fix_signs(pos)
    return torch.from_numpy(pos)


def laplacian(edge_index: torch.Tensor, num_nodes: int):  # -> scipy.sparse.csc_array
    """The sparse float64 L that ``laplacian_pe`` decomposes (for tests and diagnostics)."""
    return _sparse_laplacian(*_weighted_pairs(edge_index, num_nodes), num_nodes)


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Run the BLAS libraries loaded in this process (numpy's and scipy's OpenBLAS) on one thread inside the block.

    The eigensolvers make many thin BLAS calls; OpenBLAS's threads spin and, on cores shared with other
    work, make ARPACK 5-20x slower (measured: 1.0 s vs 0.05 s inside ARPACK on the 52k-node graph). One
    thread also makes the floating-point reductions, hence ``pos``, independent of the machine's core count.
    threadpoolctl sets the limit; the count of users here keeps concurrent or nested blocks from restoring the
    threads while another block still runs (threadpoolctl's own context manager would restore at its exit)."""
    global _blas_users, _blas_limits
    with _blas_lock:
        if _blas_users == 0:
            _blas_limits = threadpool_limits(limits=1, user_api="blas")
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0 and _blas_limits is not None:
                _blas_limits.restore_original_limits()
                _blas_limits = None


_blas_lock = threading.Lock()
_blas_users = 0
_blas_limits: threadpool_limits | None = None


def fix_signs(pos: np.ndarray) -> None:
    """In place: make each column's largest-magnitude entry positive (ties within SIGN_TIE_RTOL: lowest index)."""
    if pos.size == 0:
        return
    mag = np.abs(pos)
    top = mag.max(axis=0)
    first = np.argmax(mag >= top * (1 - SIGN_TIE_RTOL), axis=0)
    flip = pos[first, np.arange(pos.shape[1])] < 0
    pos[:, flip] *= -1


def _weighted_pairs(edge_index: torch.Tensor, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lo, hi, w): the undirected edges and their normalised weights; L[lo, hi] = L[hi, lo] = -w."""
    lo, hi = _undirected_pairs(edge_index, n)
    dinv = _inverse_sqrt_degrees(np.bincount(lo, minlength=n) + np.bincount(hi, minlength=n))
    return lo, hi, dinv[lo] * dinv[hi]


def _inverse_sqrt_degrees(deg: np.ndarray) -> np.ndarray:
    """D^-1/2, with 0 for isolated nodes (so their diagonal of L stays 1)."""
    dinv = np.zeros(deg.shape[0])
    np.divide(1.0, np.sqrt(deg), out=dinv, where=deg > 0)
    return dinv


def _undirected_pairs(edge_index: torch.Tensor, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Unique undirected non-loop edges as (lo, hi) with lo < hi, sorted.

    Sorting plus a neighbour comparison: ``np.unique`` is ~100x slower on these (nearly sorted) keys."""
    ei = edge_index.detach().cpu().numpy()
    src, dst = ei[0], ei[1]
    key = np.minimum(src, dst).astype(np.int64)  # int64 keys lo * n + hi: fine up to N ~ 3e9
    key *= n
    key += np.maximum(src, dst)
    key = key[src != dst]
    key.sort()
    if key.size:
        first = np.empty(key.size, dtype=bool)
        first[0] = True
        np.not_equal(key[1:], key[:-1], out=first[1:])
        key = key[first]
    itype = np.int32 if n < 2**31 else np.int64
    return (key // n).astype(itype), (key % n).astype(itype)


def _sparse_laplacian(lo: np.ndarray, hi: np.ndarray, w: np.ndarray, n: int):
    from scipy.sparse import coo_array

    diag = np.arange(n, dtype=lo.dtype)
    rows = np.concatenate([lo, hi, diag])
    cols = np.concatenate([hi, lo, diag])
    data = np.concatenate([-w, -w, np.ones(n)])
    return coo_array((data, (rows, cols)), shape=(n, n)).tocsc()


def _sparse_smallest(adjacency: Callable[[np.ndarray], np.ndarray], n: int,
                     count: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``count`` smallest eigenpairs of L = I - M, given x -> M x, robust to repeated eigenvalues.

    ARPACK (Lanczos, one start vector) finds the largest eigenvalues of I + M, i.e. the smallest of L; no
    factorisation, so memory stays O(N * ncv). Single-vector Lanczos can return only one copy of a repeated
    eigenvalue, and neural graphs are full of them (symmetric heads). So after the first run, ARPACK is asked
    again for the single smallest eigenpair of L on the orthogonal complement of what was found; while that
    one is smaller than the largest kept, it replaces it. The loop ends when nothing outside the kept set is
    smaller, which makes the result the true smallest set (ties at the boundary aside, where any choice is an
    equally valid eigenbasis)."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    rng = np.random.default_rng(_V0_SEED)
    vals, vecs = np.zeros(0), np.zeros((n, 0))

    def project(x: np.ndarray) -> np.ndarray:
        return x - vecs @ (vecs.T @ x)

    def deflated(x: np.ndarray) -> np.ndarray:  # P (I + M) P, P the projector off the kept vectors
        x = project(x.reshape(-1))
        return project(x + adjacency(x))

    op = LinearOperator((n, n), matvec=deflated, dtype=np.float64)
    k = count
    for _ in range(4 * count + 8):  # each extra round adds one missed eigenpair; the bound is a safety net
        mu, found = eigsh(op, k=k, which="LA", v0=project(rng.standard_normal(n)),
                          ncv=min(n, max(2 * k + 1, LANCZOS_NCV)), tol=1e-10)
        new_vals = 2.0 - mu
        if vals.size == count and new_vals.min() >= vals.max() - 1e-8:
            return vals, vecs
        all_vals = np.concatenate([vals, new_vals])
        keep = np.argsort(all_vals, kind="stable")[:count]
        vals, vecs = all_vals[keep], np.hstack([vecs, found])[:, keep]
        k = 1
    warnings.warn("Laplacian PE: repeated eigenvalues kept turning up; the encoding uses valid eigenvectors "
                  "that may not be the very smallest ones", RuntimeWarning, stacklevel=3)
    return vals, vecs

"""NiNo: a graph neural network that nowcasts every weight of a model from its last few states (NINO_SPEC §3).

The model reads a neural graph (one edge per weight, one node per neuron), runs ``layers`` rounds of
edge-conditioned mean message passing, and an MLP head turns each edge's hidden state into the change of
that weight ``k`` intervals ahead. Parameter names and shapes match the published checkpoints (§3.6), so
``load_state_dict(strict=True)`` takes them as they are.

Two forwards share the same layers:

* ``NiNoModel.forward``: the training forward (§3.5): every horizon 1..T for every edge, autograd-friendly.
* ``NiNoModel.nowcast``: the inference forward (§3.3) for one horizon ``k``, built for graphs with millions
  of edges. It gives the same numbers, computed in a cheaper order:
  - the last conv's node output never reaches the head (§9.2), so that layer is skipped entirely;
  - only the F_g rows ``f*T + k-1`` of the head's last layer are used (a tiny matmul instead of F_m*T rows);
  - ``pre([v_dst ; v_src])`` and the edge update's ``lin_s(v_src) + lin_t(v_dst)`` are linear in the node
    states, so they are computed once per node and gathered per edge;
  - edges are processed in chunks into preallocated scratch buffers (allocating big temporaries per chunk
    costs more than the matmuls on CPU); the only O(E) float buffer is the (E, hid) edge state, and even
    that is optional: without it each pass recomputes the states from the edge features (~20 % more
    matmul work, O(chunk) memory). By default it is kept when it fits in ``EDGE_STATE_BUDGET`` bytes, so a
    GPT-2-small graph (~1.2e8 edges, 64 GB of edge states) still runs.

Nothing here mutates the module: one instance serves every graph (the reference truncates ``edge_proj`` in
place when F_g < F_m; here the weight is sliced).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ninocast.spec import ModelSpec

from .base import ModuleNowcaster, NowcastError, all_finite, check_k
from .config import NiNoConfig
from .edges import ArrayEdges, StreamedEdges
from .layers import DEFAULT_CHUNK, GNN, MLP, NiNoConv, embedding, in_degree
from .scaling import tensor_stats, unscale_vector

if TYPE_CHECKING:
    from ..graphs.base import NeuralGraph
    from ..graphs.stream import StreamedGraph

STREAM_CHUNK = 2**13  # streamed graphs: per-chunk index arithmetic is amortised over more edges
GPU_CHUNK = 2**18  # streamed graphs on a GPU: enough rows per kernel to hide launch and index-arithmetic costs
EDGE_STATE_BUDGET = 2**30  # bytes of (E, hid) edge states kept between passes when keep_edge_states is None


def edge_state_budget(device: torch.device) -> int:
    """Bytes of (E, hid) edge states worth keeping between passes: EDGE_STATE_BUDGET on the CPU (RAM is
    shared with the states), half the free memory on a GPU (recomputing costs ~20 % more matmul work)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    return EDGE_STATE_BUDGET


@dataclass
class _Scratch:
    """Per-chunk buffers reused across chunks and layers (the inference forward allocates nothing per chunk)."""

    h: Tensor  # (n, hid) edge states when they are not kept in an (E, hid) store
    a: Tensor  # (n, hid)
    b: Tensor  # (n, hid)
    enc: Tensor  # (n, 2 hid) edge-encoder output

    @classmethod
    def make(cls, n: int, hid: int, device: torch.device) -> "_Scratch":
        new = lambda width: torch.empty(n, width, device=device)  # noqa: E731
        return cls(new(hid), new(hid), new(hid), new(2 * hid))

    def rows(self, n: int) -> "_Scratch":
        return _Scratch(self.h[:n], self.a[:n], self.b[:n], self.enc[:n])


def _gather_sum(table_a: Tensor, idx_a: Tensor, table_b: Tensor, idx_b: Tensor, out: Tensor, tmp: Tensor) -> Tensor:
    """out = table_a[idx_a] + table_b[idx_b], through preallocated buffers."""
    torch.index_select(table_a, 0, idx_a, out=out)
    return out.add_(torch.index_select(table_b, 0, idx_b, out=tmp))


# ----------------------------------------------------------------------------- the model
class NiNoModel(nn.Module):
    """The NiNo GNN (gnn=True in the reference's model_args); see the module docstring. Its architecture is
    ``config``, the same object checkpoints and meta-training read."""

    def __init__(self, config: NiNoConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or NiNoConfig()
        self.layer_embed = embedding(c.edge_types, c.hid)
        self.edge_proj = MLP([c.max_feat_size * c.ctx, c.hid])
        if c.wte_pos_enc:
            self.wte_pos_enc_layer = embedding(c.vocab_size + 1, c.hid)
        self.node_proj = MLP([c.lpe, c.hid])
        self.gnn = GNN(c.hid, c.layers)
        self.edge_out = MLP([c.hid, c.hid, c.max_feat_size * c.seq_len])

    # ---------------------------------------------------------------- shared pieces
    def feat_slots(self, edge_attr: Tensor) -> int:
        """F_g of slot-major (E, F_g*ctx) edge features; the model can read at most F_m slots."""
        c = self.config
        if edge_attr.dim() != 2 or edge_attr.shape[1] % c.ctx:
            raise NowcastError(f"edge features must be (E, F_g*{c.ctx}), got {tuple(edge_attr.shape)}")
        f = edge_attr.shape[1] // c.ctx
        if not 1 <= f <= c.max_feat_size:
            raise NowcastError(f"this NiNo model reads at most {c.max_feat_size} values per edge (kernel area), "
                               f"the graph has {f} (e.g. a 5x5 kernel has 25); such graphs are not supported")
        return f

    def embed_edges(self, edge_attr: Tensor, edge_type: Tensor, out: Tensor | None = None) -> Tensor:
        """h_e = edge_proj(A_e) + Emb_t[type_e], using only edge_proj's first F_g*ctx input columns (§3.3.2)."""
        w = self.edge_proj.fc[0].weight[:, : edge_attr.shape[1]]  # a view: the module is never modified
        b = self.edge_proj.fc[0].bias
        if out is None:
            return F.linear(edge_attr, w, b) + self.layer_embed(edge_type)
        torch.index_select(self.layer_embed.weight, 0, edge_type, out=out)
        return out.addmm_(edge_attr, w.t()).add_(b)

    def embed_nodes(self, pos: Tensor, pos_w: Tensor | None) -> Tensor:
        v = self.node_proj(pos)
        if self.config.wte_pos_enc:
            if pos_w is None:
                raise NowcastError("this NiNo model embeds token ids: the graph must carry pos_w")
            if pos_w.numel() and int(pos_w.max()) > self.config.vocab_size:
                raise NowcastError(f"token id {int(pos_w.max()) - 1} is outside this model's vocabulary "
                                   f"({self.config.vocab_size} tokens)")
            v = v + self.wte_pos_enc_layer(pos_w)
        return v

    def _check_graph(self, edge_attr: Tensor, edge_index: Tensor, edge_type: Tensor, pos: Tensor) -> None:
        E = edge_attr.shape[0]
        if edge_index.shape != (2, E) or edge_type.shape != (E,):
            raise NowcastError(f"graph arrays disagree: edge_attr {tuple(edge_attr.shape)}, edge_index "
                               f"{tuple(edge_index.shape)}, edge_type {tuple(edge_type.shape)}")
        if pos.dim() != 2 or pos.shape[1] != self.config.lpe:
            raise NowcastError(f"pos must be (num_nodes, {self.config.lpe}), got {tuple(pos.shape)}")
        if E and not (0 <= int(edge_index.min()) and int(edge_index.max()) < pos.shape[0]):
            raise NowcastError(f"edge_index refers to nodes outside 0..{pos.shape[0] - 1}")

    # ---------------------------------------------------------------- training forward (§3.5)
    def forward(self, edge_attr: Tensor, edge_index: Tensor, edge_type: Tensor, pos: Tensor,
                pos_w: Tensor | None = None) -> Tensor:
        """(E, F_g*ctx) features -> (E, F_g*T) predictions for every horizon, slot-major (column f*T + t is
        slot f at horizon t+1), the residual added to each. Differentiable; meta-training uses F_g = F_m."""
        f_g = self.feat_slots(edge_attr)
        self._check_graph(edge_attr, edge_index, edge_type, pos)
        src, dst = edge_index[0], edge_index[1]
        deg = in_degree(dst, pos.shape[0])
        h = self.embed_edges(edge_attr, edge_type)
        v = self.embed_nodes(pos, pos_w)
        for conv, upd in zip(self.gnn.convs, self.gnn.edge_update):  # the last conv has no effect: skipped
            v = F.silu(conv(v, h, edge_index, deg))
            s, t = upd.node_terms(v)
            h = upd(h, s[src], t[dst])
        c = self.config
        head_in, head_out = self.edge_out.fc[0], self.edge_out.fc[2]
        n = f_g * c.seq_len  # only the slots the graph has: a GPT-2's edges hold 1 of the 9 (9x less decoding)
        out = F.linear(F.silu(head_in(h)), head_out.weight[:n], head_out.bias[:n])
        delta = out.view(-1, f_g, c.seq_len) * c.upd_scale
        if c.residual:
            delta = delta + edge_attr.reshape(-1, f_g, c.ctx)[:, :, -1:]
        return delta.reshape(-1, f_g * c.seq_len)

    # ---------------------------------------------------------------- inference forward (§3.3)
    def nowcast(self, edge_attr: Tensor, edge_index: Tensor, edge_type: Tensor, pos: Tensor,
                pos_w: Tensor | None, k: int, chunk_size: int = DEFAULT_CHUNK,
                keep_edge_states: bool | None = None) -> Tensor:
        """(E, F_g*ctx) scaled edge features -> (E, F_g) scaled predictions at horizon k (float32).

        ``keep_edge_states``: keep the (E, hid) edge states between passes (faster) or recompute them (O(chunk)
        memory); None decides by ``EDGE_STATE_BUDGET``. Runs under inference mode, but the returned tensor is
        an ordinary one (callers un-scale it in place)."""
        check_k(k, self.config.seq_len)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        f_g = self.feat_slots(edge_attr)
        self._check_graph(edge_attr, edge_index, edge_type, pos)
        out = torch.empty(edge_attr.shape[0], f_g, device=self.layer_embed.weight.device)
        if keep_edge_states is None:
            keep_edge_states = edge_attr.shape[0] * self.config.hid * 4 <= EDGE_STATE_BUDGET
        with torch.inference_mode():
            self._nowcast_into(out, edge_attr, edge_index, edge_type, pos, pos_w, k, chunk_size, keep_edge_states)
        return out

    def nowcast_streamed(self, graph: "StreamedGraph", scaled: Tensor, k: int, chunk_size: int = STREAM_CHUNK,
                         keep_edge_states: bool | None = None, scale: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """(P, ctx) scaled states + a streamed graph -> (P,) scaled predictions at horizon k (float32).
        With ``scale`` = per-tensor (mu, sigma), ``scaled`` holds raw states of any float dtype instead, and
        each chunk is standardised as it is read (no scaled copy, bf16 states stay bf16).

        The same computation as ``nowcast`` on the materialised graph, but edges, types and features are made
        per chunk from the graph's blocks and predictions go straight to their parameters: apart from the
        states and the (P,) result, memory is O(nodes + chunk). Edge states (E * hid * 4 bytes) are recomputed
        per pass unless ``keep_edge_states``; None keeps them when they fit in ``edge_state_budget`` (on a large
        GPU, GPT-2 small's 64 GB do)."""
        c = self.config
        check_k(k, c.seq_len)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        if graph.feat_size > c.max_feat_size:
            raise NowcastError(f"this NiNo model reads at most {c.max_feat_size} values per edge, the graph "
                               f"has {graph.feat_size}")
        if scaled.dim() != 2 or scaled.shape != (graph.n_params, c.ctx):
            raise NowcastError(f"states must be ({graph.n_params}, {c.ctx}), got {tuple(scaled.shape)}")
        if graph.pos is None or graph.pos.dim() != 2 or graph.pos.shape != (graph.num_nodes, c.lpe):
            raise NowcastError(f"pos must be ({graph.num_nodes}, {c.lpe})")
        dev = self.layer_embed.weight.device
        out = torch.empty(graph.n_params, device=dev)
        width = graph.feat_size * c.ctx
        with torch.inference_mode():
            rows = max(1, min(chunk_size, graph.num_edges))
            source = StreamedEdges(graph.to(dev) if graph.device != dev else graph, scaled.to(dev), out,
                                   torch.empty(rows, width, device=dev), torch.empty(rows, graph.feat_size, device=dev),
                                   None if scale is None else (scale[0].to(dev), scale[1].to(dev)))
            if keep_edge_states is None:
                keep_edge_states = graph.num_edges * c.hid * 4 <= edge_state_budget(dev)
            self._run(source, graph.feat_size, k, chunk_size, keep_edge_states)
        return out

    def _nowcast_into(self, out: Tensor, edge_attr: Tensor, edge_index: Tensor, edge_type: Tensor, pos: Tensor,
                      pos_w: Tensor | None, k: int, chunk_size: int, keep_edge_states: bool) -> None:
        dev = out.device
        source = ArrayEdges(edge_attr.to(dev, torch.float32).contiguous(), edge_index[0].to(dev),
                            edge_index[1].to(dev), edge_type.to(dev), pos.to(dev, torch.float32),
                            None if pos_w is None else pos_w.to(dev), out)
        self._run(source, out.shape[1], k, chunk_size, keep_edge_states)

    def _run(self, source: "ArrayEdges | StreamedEdges", f_g: int, k: int, chunk_size: int,
             keep_edge_states: bool) -> None:
        """The inference forward over any edge source (full arrays or streamed blocks)."""
        dev, cfg = source.pos.device, self.config
        E, N, hid = source.num_edges, source.pos.shape[0], cfg.hid
        n_passes = cfg.layers - 1  # message-passing rounds that reach the head

        scratch = _Scratch.make(max(1, min(chunk_size, E)), hid, dev)
        store = torch.empty(E, hid, device=dev) if keep_edge_states and n_passes >= 2 else None
        tables: list[tuple[Tensor, Tensor]] = []  # per edge update: (lin_s(v), lin_t(v) + bias) per node

        def edge_states(c, src: Tensor, dst: Tensor, depth: int, buf: _Scratch) -> Tensor:
            """h^depth for the chunk's edges: the store holds h^(depth-1) from the previous pass, or recompute."""
            sl = source.slice(c)
            if store is not None and depth >= 2:
                h, done = store[sl], depth - 1
            else:
                h = self.embed_edges(source.features(c), source.types(c),
                                     out=store[sl] if store is not None else buf.h)
                done = 0
            for j in range(done, depth):
                s, t = tables[j]
                st = _gather_sum(s, src, t, dst, buf.a, buf.b)
                self.gnn.edge_update[j].forward_(h, st)
            return h

        v = self.embed_nodes(source.pos, source.pos_w)
        deg = source.in_degree()
        for layer in range(n_passes):
            conv: NiNoConv = self.gnn.convs[layer]
            pre_dst, pre_src = conv.node_terms(v)
            sums = torch.zeros(N, hid, device=dev)
            for c in source.chunks(chunk_size):
                src, dst = source.endpoints(c)
                buf = scratch.rows(src.shape[0])
                h = edge_states(c, src, dst, layer, buf)
                pre_e = _gather_sum(pre_dst, dst, pre_src, src, buf.a, buf.b)
                conv.aggregate(conv.message_(h, pre_e, buf.enc), dst, sums)
            v = F.silu(conv.update(v, sums.div_(deg)))
            tables.append(self.gnn.edge_update[layer].node_terms(v))

        head_in, head_out = self.edge_out.fc[0], self.edge_out.fc[2]
        rows = torch.arange(f_g, device=dev) * cfg.seq_len + (k - 1)  # slot f at horizon k
        w_k, b_k = head_out.weight[rows], head_out.bias[rows]
        for c in source.chunks(chunk_size):
            src, dst = source.endpoints(c)
            buf = scratch.rows(src.shape[0])
            h = edge_states(c, src, dst, n_passes, buf)
            z = F.silu(torch.addmm(head_in.bias, h, head_in.weight.t(), out=buf.a), inplace=True)
            o = torch.addmm(b_k, z, w_k.t(), out=source.head_out(c))
            if cfg.upd_scale != 1.0:
                o.mul_(cfg.upd_scale)
            if cfg.residual:
                o.add_(source.newest(c, f_g, cfg.ctx))
            source.emit(c, o)


# ----------------------------------------------------------------------------- the nowcaster
class NiNo(ModuleNowcaster):
    """NiNo as a service nowcaster: scaled (P, ctx) states + the spec's neural graph -> (P,) scaled prediction."""

    kind = "nino"
    reads_16bit = True  # bf16 / fp16 states are read as they are on streamed graphs
    needs_graph = True
    needs_lpe = True

    def __init__(self, model: NiNoModel, name: str = "nino", chunk_size: int = DEFAULT_CHUNK,
                 keep_edge_states: bool | None = None) -> None:
        super().__init__(model, name, chunk_size)
        self.keep_edge_states = keep_edge_states
        self.max_feat_size = model.config.max_feat_size

    def predict(self, states: Tensor, k: int, spec: ModelSpec, graph: "NeuralGraph | StreamedGraph | None", *,
                overwrite_states: bool = False) -> Tensor:
        """On a streamed graph the states are read raw and standardised chunk by chunk (see ``nowcast_streamed``):
        neither a scaled copy nor a float32 copy of 16-bit states is made. Otherwise as every scaled nowcaster."""
        from ..graphs.base import NeuralGraph

        if graph is None or isinstance(graph, NeuralGraph):
            if states.dtype != torch.float32:
                states, overwrite_states = states.float(), True
            return super().predict(states, k, spec, graph, overwrite_states=overwrite_states)
        self._check_graph(graph)
        mu, sigma = tensor_stats(states, spec)
        pred = self._streamed(graph, states, k, (mu, sigma))
        if not all_finite(pred):
            raise FloatingPointError(f"{self.name}: the prediction contains NaN or Inf")
        return unscale_vector(pred, spec, mu, sigma)

    def _check_graph(self, graph: "NeuralGraph | StreamedGraph | None") -> None:
        if graph is None:
            raise NowcastError(f"{self.name}: NiNo needs the model's neural graph")
        if graph.feat_size > self.max_feat_size:
            raise NowcastError(f"{self.name}: the graph has {graph.feat_size} values per edge (largest kernel "
                               f"area) but the model reads at most {self.max_feat_size}; "
                               "models with kernels larger than 3x3 are not supported")
        if graph.pos is None:
            raise NowcastError(f"{self.name}: NiNo needs the graph's Laplacian positional encoding (pos)")

    def _streamed(self, graph: "StreamedGraph", states: Tensor, k: int,
                  scale: tuple[Tensor, Tensor] | None) -> Tensor:
        floor = STREAM_CHUNK if self.device.type == "cpu" else GPU_CHUNK
        return self.model.nowcast_streamed(graph, states, k, chunk_size=max(self.chunk_size, floor),
                                           keep_edge_states=self.keep_edge_states, scale=scale)

    def predict_scaled(self, scaled: Tensor, k: int, graph: "NeuralGraph | StreamedGraph | None") -> Tensor:
        from ..graphs.base import NeuralGraph

        self._check_graph(graph)
        if not isinstance(graph, NeuralGraph):  # a StreamedGraph: no edge-sized arrays anywhere
            return self._streamed(graph, scaled, k, None)
        attr = graph.edge_features(scaled.to(self.device, torch.float32))
        pred = self.model.nowcast(attr, graph.edge_index, graph.edge_type, graph.pos, graph.pos_w, k,
                                  chunk_size=self.chunk_size, keep_edge_states=self.keep_edge_states)
        del attr
        return graph.to_vector(pred)

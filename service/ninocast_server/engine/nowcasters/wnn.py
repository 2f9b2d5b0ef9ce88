"""WNN+: NiNo without message passing (gnn=False; checkpoints nino_mlp.pt, nino_mlp_h32.pt; NINO_SPEC §3.4).

Each weight is predicted from its own ctx values and its parameter type only, by a 4-layer MLP. The reference
runs it per graph edge and per feature slot; since nothing flows between edges, running it directly on the
(P, ctx) states with each entry's edge type gives the same numbers for every real parameter without building
edge features (virtual edges, self-loops and padded slots are discarded by to_vector anyway).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import ModuleNowcaster, NowcastError, check_k
from .config import WNNConfig
from .layers import DEFAULT_CHUNK, MLP, chunks, embedding

if TYPE_CHECKING:
    from ..graphs.base import NeuralGraph


class WNNModel(nn.Module):
    """u = edge_proj(x) + Emb_t[type]; delta = edge_mlp(u) (no activation between the two); x_new = x_last + delta."""

    def __init__(self, config: WNNConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or WNNConfig()
        self.layer_embed = embedding(c.edge_types, c.hid)
        self.edge_proj = MLP([c.ctx, c.hid])
        self.edge_mlp = MLP([c.hid] * (c.layers + 1) + [c.seq_len])  # layers=3 -> fc.0, fc.2, fc.4, fc.6

    def _hidden(self, x: Tensor, types: Tensor) -> Tensor:
        """Everything up to the output layer, for rows of ctx values."""
        return self.edge_mlp.fc[:-1](self.edge_proj(x) + self.layer_embed(types))

    # ---------------------------------------------------------------- training forward (§3.5)
    def forward(self, edge_attr: Tensor, edge_type: Tensor) -> Tensor:
        """(E, F*ctx) slot-major features -> (E, F*T) predictions for every horizon (column f*T + t), residual
        added to each. Differentiable (the reference's version of this path is broken, §9.10)."""
        E = edge_attr.shape[0]
        if edge_attr.dim() != 2 or edge_attr.shape[1] % self.config.ctx:
            raise NowcastError(f"edge features must be (E, F*{self.config.ctx}), got {tuple(edge_attr.shape)}")
        f = edge_attr.shape[1] // self.config.ctx
        x = edge_attr.reshape(E * f, self.config.ctx)
        delta = self.edge_mlp.fc[-1](self._hidden(x, edge_type.repeat_interleave(f))) * self.config.upd_scale
        if self.config.residual:
            delta = delta + x[:, -1:]
        return delta.reshape(E, f * self.config.seq_len)

    # ---------------------------------------------------------------- inference forward (§3.4)
    def nowcast(self, x: Tensor, types: Tensor, k: int, chunk_size: int = DEFAULT_CHUNK) -> Tensor:
        """(M, ctx) scaled rows (one per weight, or per edge slot) and their edge types -> (M,) at horizon k.

        Runs under inference mode, but the returned tensor is an ordinary one (callers un-scale it in place)."""
        check_k(k, self.config.seq_len)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        if x.dim() != 2 or x.shape[1] != self.config.ctx or types.shape != (x.shape[0],):
            raise NowcastError(f"expected (M, {self.config.ctx}) states and (M,) types, got {tuple(x.shape)} and "
                               f"{tuple(types.shape)}")
        out = torch.empty(x.shape[0], device=self.layer_embed.weight.device)
        with torch.inference_mode():
            self._nowcast_into(out, x, types, k, chunk_size)
        return out

    def _nowcast_into(self, out: Tensor, x: Tensor, types: Tensor, k: int, chunk_size: int) -> None:
        dev = out.device
        x, types = x.to(dev, torch.float32).contiguous(), types.to(dev)
        M, hid = x.shape[0], self.config.hid
        n = max(1, min(chunk_size, M))
        a, b = torch.empty(n, hid, device=dev), torch.empty(n, hid, device=dev)  # reused by every chunk
        proj, hidden = self.edge_proj.fc[0], [m for m in self.edge_mlp.fc[:-1] if isinstance(m, nn.Linear)]
        last = self.edge_mlp.fc[-1]
        w_k, b_k = last.weight[k - 1 : k], last.bias[k - 1 : k]  # only horizon k's output row
        for sl in chunks(M, chunk_size):
            m = sl.stop - sl.start
            cur, nxt = a[:m], b[:m]
            torch.addmm(proj.bias, x[sl], proj.weight.t(), out=cur)
            cur.add_(torch.index_select(self.layer_embed.weight, 0, types[sl], out=nxt))
            for lin in hidden:
                F.silu(torch.addmm(lin.bias, cur, lin.weight.t(), out=nxt), inplace=True)
                cur, nxt = nxt, cur
            o = torch.addmm(b_k, cur, w_k.t(), out=out[sl].unsqueeze(1))
            if self.config.upd_scale != 1.0:
                o.mul_(self.config.upd_scale)
            if self.config.residual:
                o.add_(x[sl, -1:])


class WNN(ModuleNowcaster):
    """WNN+ as a service nowcaster. Needs the graph only for each parameter's edge type (no LPE, no edges)."""

    kind = "wnn"
    needs_graph = True
    needs_lpe = False

    def __init__(self, model: WNNModel, name: str = "wnn", chunk_size: int = DEFAULT_CHUNK) -> None:
        super().__init__(model, name, chunk_size)

    def predict_scaled(self, scaled: Tensor, k: int, graph: "NeuralGraph | None") -> Tensor:
        if graph is None:
            raise NowcastError(f"{self.name}: WNN+ needs the model's neural graph (for the parameter types)")
        return self.model.nowcast(scaled, graph.param_type, k, chunk_size=self.chunk_size)

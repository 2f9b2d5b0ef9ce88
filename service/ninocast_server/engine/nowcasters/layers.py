"""The layers NiNo and WNN+ are built from, named as in the published checkpoints (NINO_SPEC §3.6).

Written PyG-style (message / aggregate / update) but in plain torch: importing torch_geometric is slow and the
layers are small. Each layer has a training forward (autograd) and, where NiNo's chunked inference needs one,
an in-place variant that writes into preallocated buffers.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_CHUNK = 2**12  # rows per chunk: scratch stays in cache; as fast as 2^14..2^20 on CPU, less memory


class MLP(nn.Module):
    """Linear layers with SiLU between them, kept under ``.fc`` so keys read ``<name>.fc.<i>.weight``."""

    def __init__(self, dims: Sequence[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            if i:
                layers.append(nn.SiLU())
            layers.append(nn.Linear(a, b))
        self.fc = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x)


def embedding(rows: int, hid: int) -> nn.Embedding:
    """An embedding table left uninitialised: loaders overwrite it, and ``init_weights`` sets the training init.
    (Default init on the meta device pulls in ~70 MB of torch machinery, a third of a small nowcast's RSS.)"""
    return nn.Embedding(rows, hid, _weight=torch.empty(rows, hid))


def init_weights(module: nn.Module) -> None:
    """The training init (NINO_SPEC §3.2): weights and embeddings ~ N(0, 0.02^2), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)



def in_degree(dst: Tensor, num_nodes: int) -> Tensor:
    """(N, 1) float count of incoming edges, at least 1 so that a node without edges gets a mean of 0."""
    return torch.bincount(dst, minlength=num_nodes).clamp_(min=1).to(torch.float32).unsqueeze_(1)


def chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))



class NiNoConv(nn.Module):
    """One message-passing layer: PNA with one tower, the "mean" aggregator and the identity scaler.

    Written PyG-style (message / aggregate / update) but in plain torch: importing torch_geometric is slow and
    the layer is small. The message is a FiLM-style modulation of a node-pair term by the edge state:
    ``m_e = a_e * pre([v_dst ; v_src]) + b_e`` with ``[a_e ; b_e] = edge_encoder(h_e)`` (target first, §9.3).
    """

    def __init__(self, hid: int) -> None:
        super().__init__()
        self.edge_encoder = nn.Linear(hid, 2 * hid)
        self.pre_nns = nn.ModuleList([nn.Sequential(nn.Linear(2 * hid, hid))])
        self.post_nns = nn.ModuleList([nn.Sequential(nn.Linear(2 * hid, hid))])
        self.lin = nn.Linear(hid, hid)

    @property
    def pre(self) -> nn.Linear:
        return self.pre_nns[0][0]

    @property
    def post(self) -> nn.Linear:
        return self.post_nns[0][0]

    def node_terms(self, v: Tensor) -> tuple[Tensor, Tensor]:
        """pre([v_dst ; v_src]) = (W[:, :h] v_dst + b) + W[:, h:] v_src: both halves, once per node."""
        h = v.shape[1]
        w = self.pre.weight
        return F.linear(v, w[:, :h], self.pre.bias), F.linear(v, w[:, h:])

    def message(self, h_e: Tensor, pre_e: Tensor) -> Tensor:
        scale, shift = self.edge_encoder(h_e).chunk(2, dim=-1)
        return torch.addcmul(shift, scale, pre_e)

    def message_(self, h_e: Tensor, pre_e: Tensor, enc: Tensor) -> Tensor:
        """In-place ``message`` for inference: ``enc`` (n, 2h) is scratch, the result overwrites ``pre_e``."""
        h = pre_e.shape[1]
        torch.addmm(self.edge_encoder.bias, h_e, self.edge_encoder.weight.t(), out=enc)
        return pre_e.mul_(enc[:, :h]).add_(enc[:, h:])

    @staticmethod
    def aggregate(msg: Tensor, dst: Tensor, out: Tensor) -> Tensor:
        """Adds each message to its target row of ``out``: the mean's numerator, so that chunks can accumulate."""
        return out.index_add_(0, dst, msg)

    def update(self, v: Tensor, mean: Tensor) -> Tensor:
        return self.lin(self.post(torch.cat([v, mean], dim=1)))  # no activation between post and lin

    def forward(self, v: Tensor, h: Tensor, edge_index: Tensor, deg: Tensor | None = None) -> Tensor:
        src, dst = edge_index[0], edge_index[1]
        pre_dst, pre_src = self.node_terms(v)
        msg = self.message(h, pre_dst[dst] + pre_src[src])
        sums = self.aggregate(msg, dst, v.new_zeros(v.shape))
        return self.update(v, sums / (in_degree(dst, v.shape[0]) if deg is None else deg))


class EdgeUpdate(nn.Module):
    """Refreshes edge states from the new node states: h <- lin1(silu(lin_e(h) + lin_s(v_src) + lin_t(v_dst)))."""

    def __init__(self, hid: int) -> None:
        super().__init__()
        self.lin_e = nn.Linear(hid, hid)
        self.lin_s = nn.Linear(hid, hid)
        self.lin_t = nn.Linear(hid, hid)
        self.lin1 = nn.Linear(hid, hid)

    def node_terms(self, v: Tensor) -> tuple[Tensor, Tensor]:
        """(lin_s(v), lin_t(v) + lin_e.bias) per node; gathered per edge they complete lin_e(h) without its bias."""
        return self.lin_s(v), self.lin_t(v) + self.lin_e.bias

    def forward(self, h: Tensor, s_e: Tensor, t_e: Tensor) -> Tensor:
        return self.lin1(F.silu(F.linear(h, self.lin_e.weight) + s_e + t_e))

    def forward_(self, h: Tensor, st_e: Tensor) -> Tensor:
        """In-place ``forward`` for inference: ``st_e`` = s_e + t_e is scratch, the new state overwrites ``h``."""
        u = F.silu(st_e.addmm_(h, self.lin_e.weight.t()), inplace=True)
        return torch.addmm(self.lin1.bias, u, self.lin1.weight.t(), out=h)


class GNN(nn.Module):
    """The message-passing stack (key prefix ``gnn.``): L convs and L-1 edge updates (final_edge_update=False)."""

    def __init__(self, hid: int, layers: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList([NiNoConv(hid) for _ in range(layers)])
        self.edge_update = nn.ModuleList([EdgeUpdate(hid) for _ in range(layers - 1)])


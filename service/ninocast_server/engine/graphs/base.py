"""NeuralGraph: a trained model seen as a graph (neurons are nodes, weights are edges), plus the map between
the model's flat parameter vector and per-edge features (NINO_SPEC §2.1, §2.4)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from torch_geometric.data import Data

SELF_LOOP_VALUE = 2.0  # written in scaled units on every self-loop (§2.4)
VIRTUAL_VALUE = 1.0  # residual and head edges (types 10, 11)


@dataclass
class NeuralGraph:
    edge_index: Tensor  # (2, E) int64: row 0 source, row 1 target; the last num_nodes edges are self-loops
    edge_type: Tensor  # (E,) int64, ids 1..13 (§2.2)
    pos_w: Tensor  # (N,) int64, token id + 1 on token nodes, else 0 (§2.6.5)
    num_nodes: int
    feat_size: int  # F_g: slots per state on every edge
    param_slot: Tensor  # (P,) int64: flat parameter j sits in slot param_slot[j] of the (E * F_g) slot array
    virtual_edges: Tensor  # (V,) int64: edges that carry the constant 1 in slot 0 (types 10, 11)
    edge_ranges: dict[str, tuple[int, int]] = field(default_factory=dict)  # tensor name -> [start, end) edges
    pos: Tensor | None = None  # (N, lpe) float32 Laplacian eigenvector encoding, None when not computed

    @property
    def num_edges(self) -> int:
        return int(self.edge_index.shape[1])

    @property
    def n_params(self) -> int:
        return int(self.param_slot.numel())

    @property
    def param_type(self) -> Tensor:
        """(P,) edge type of the edge each parameter entry sits on (what WNN+ needs, no message passing)."""
        return self.edge_type[self.param_slot // self.feat_size]

    def edge_features(self, states: Tensor) -> Tensor:
        """(P, S) states -> (E, F_g * S) slot-major edge features (entry f * S + s is slot f of state s)."""
        P, S = states.shape
        if P != self.n_params:
            raise ValueError(f"states have {P} parameters, the graph has {self.n_params}")
        E, F = self.num_edges, self.feat_size
        attr = states.new_zeros(E * F, S)
        attr[self.param_slot] = states
        attr[self.virtual_edges * F] = VIRTUAL_VALUE
        attr[(E - self.num_nodes) * F :: F][: self.num_nodes] = SELF_LOOP_VALUE
        return attr.view(E, F * S)

    def to_vector(self, edge_values: Tensor) -> Tensor:
        """(E, F_g) per-edge predictions -> (P,) flat parameters; virtual edges, self-loops, padding dropped."""
        return edge_values.reshape(-1)[self.param_slot]

    def to(self, device: torch.device | str) -> "NeuralGraph":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return NeuralGraph(move(self.edge_index), move(self.edge_type), move(self.pos_w), self.num_nodes,
                           self.feat_size, move(self.param_slot), move(self.virtual_edges),
                           dict(self.edge_ranges), move(self.pos))

    def to_pyg(self, states: Tensor | None = None) -> "Data":
        """The graph as a PyTorch Geometric ``Data``, to inspect it or feed it to PyG's own tools.

        Fields: ``edge_index``, ``edge_type``, ``num_nodes``, ``pos`` (the LPE, when computed), ``pos_w``,
        ``param_slot``, ``virtual_edges``, ``feat_size``, ``edge_ranges``; with ``states`` (P, S), also
        ``edge_attr``: the (E, F_g * S) edge features the nowcaster reads (``edge_features``, unscaled). The
        engine itself does not use PyG (its chunked message passing needs no ``Data``); the import is here, so
        that only an export pays for it."""
        from torch_geometric.data import Data

        data = Data(edge_index=self.edge_index, edge_type=self.edge_type, num_nodes=self.num_nodes, pos_w=self.pos_w,
                    param_slot=self.param_slot, virtual_edges=self.virtual_edges, feat_size=self.feat_size,
                    edge_ranges=dict(self.edge_ranges))
        if self.pos is not None:
            data.pos = self.pos
        if states is not None:
            data.edge_attr = self.edge_features(states)
        return data

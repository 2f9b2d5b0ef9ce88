"""The architecture of each learned nowcaster, written once (NINO_SPEC §3.1).

The modules' constructors take these, checkpoints store and read them as ``model_args`` (the reference's
vocabulary, so official files load as they are), and meta-training builds its models from them: a new
architecture argument is one new field here, nowhere else.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar


@dataclass(frozen=True)
class NowcasterConfig:
    """What every learned nowcaster has: ctx states in, a head that predicts horizons 1..seq_len."""

    gnn: ClassVar[bool]  # the reference's switch between NiNo (True) and WNN+ (False)

    ctx: int = 5
    hid: int = 128
    layers: int = 3
    seq_len: int = 40  # the largest k (horizon) the head predicts
    edge_types: int = 15
    upd_scale: float = 1.0
    residual: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "upd_scale", float(self.upd_scale))  # a checkpoint may store 1 for 1.0

    def model_args(self) -> dict[str, Any]:
        """The reference's ``model_args``: what checkpoints store."""
        return {"gnn": self.gnn, **asdict(self)}

    @classmethod
    def arg_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


@dataclass(frozen=True)
class WNNConfig(NowcasterConfig):
    """WNN+ (gnn=False): a per-weight MLP; ``layers`` counts its hidden layers."""

    gnn: ClassVar[bool] = False


@dataclass(frozen=True)
class NiNoConfig(NowcasterConfig):
    """NiNo (gnn=True): ``layers`` message-passing rounds over the neural graph."""

    gnn: ClassVar[bool] = True

    max_feat_size: int = 9  # values per edge (the largest kernel area it reads: 3x3)
    wte_pos_enc: bool = True  # embed token ids of embedding-table nodes
    vocab_size: int = 50257
    lpe: int = 8  # Laplacian positional encoding size

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layers < 2:
            raise ValueError("NiNo needs layers >= 2 (with one layer the graph would not influence the output)")

"""Neural graphs of trained models: generic (MLP/ConvNet), GPT-2 and Llama (NINO_SPEC §2)."""

from .base import NeuralGraph
from .build import build_graph, split_blocks
from .cache import GraphCache

__all__ = ["NeuralGraph", "build_graph", "split_blocks", "GraphCache"]

"""Neural graphs of trained models: generic (MLP/ConvNet), GPT-2 and Llama (NINO_SPEC §2), traced topologies."""

from .base import NeuralGraph
from .build import build_graph, split_blocks
from .cache import GraphCache
from .checks import check_graph_spec, check_spec_for

__all__ = ["NeuralGraph", "build_graph", "split_blocks", "GraphCache", "check_graph_spec", "check_spec_for"]

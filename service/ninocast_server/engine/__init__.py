"""The engine: neural graphs plus nowcasters behind one call, ``nowcast(model, spec, states, k)``."""

from .nowcasters.base import Nowcaster, NowcastError
from .runner import nowcast

__all__ = ["Nowcaster", "NowcastError", "nowcast"]

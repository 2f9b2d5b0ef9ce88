"""Nowcasters behind one interface: NiNo (graph model), WNN+ (per-weight MLP), Linefit."""

from .base import Nowcaster, NowcastError, ScaledNowcaster
from .linefit import Linefit

__all__ = ["Nowcaster", "NowcastError", "ScaledNowcaster", "Linefit"]

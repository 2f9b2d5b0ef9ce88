"""ninocast: weight nowcasting for neural-network training (client side).

``import ninocast`` needs only torch, httpx and safetensors. The engine and the server live in the
``ninocast_server`` package (``pip install 'ninocast[server]'``); local mode uses it in-process.

Names are imported on first use, so the engine (which only needs ``ninocast.spec``) does not pay for the HTTP
client's imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "NowcastOptimizer": "optimizer", "NowcastClient": "transport", "ModelSpec": "spec", "SpecError": "spec",
    "k_schedule": "schedule", "k_at_step": "schedule", "NowcastAPIError": "transport",
    "ServerUnavailable": "transport", "ServerBusy": "transport", "RequestRejected": "transport",
    "AuthError": "transport", "NotFound": "transport", "InvalidResponse": "transport", "Verify": "verify",
    "DeadlineExceeded": "transport", "ConfigurationError": "backends", "SessionSettings": "session_settings",
}
__all__ = [*_EXPORTS, "__version__"]

if TYPE_CHECKING:
    from .backends import ConfigurationError
    from .optimizer import NowcastOptimizer
    from .schedule import k_at_step, k_schedule
    from .session_settings import SessionSettings
    from .spec import ModelSpec, SpecError
    from .transport import (AuthError, DeadlineExceeded, InvalidResponse, NotFound, NowcastAPIError,
                            NowcastClient, RequestRejected, ServerBusy, ServerUnavailable)
    from .verify import Verify


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ninocast' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

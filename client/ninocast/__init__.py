"""ninocast: weight nowcasting for neural-network training (client side).

``import ninocast`` needs only torch, httpx and safetensors. The engine and the server live in the
``ninocast_server`` package (``pip install 'ninocast[server]'``); local mode uses it in-process.
"""

from .optimizer import NowcastOptimizer
from .schedule import k_at_step, k_schedule
from .spec import ModelSpec, SpecError
from .transport import (AuthError, InvalidResponse, NotFound, NowcastAPIError, NowcastClient, RequestRejected,
                        ServerBusy, ServerUnavailable)

__version__ = "0.1.0"
__all__ = ["NowcastOptimizer", "NowcastClient", "ModelSpec", "SpecError", "k_schedule", "k_at_step",
           "NowcastAPIError", "ServerUnavailable", "ServerBusy", "RequestRejected", "AuthError", "NotFound",
           "InvalidResponse", "__version__"]

"""ninocast: weight nowcasting for neural-network training (client side).

``import ninocast`` needs only torch, httpx and safetensors. The engine and the server live in the
``ninocast_server`` package (``pip install ninocast[server]``).
"""

from .schedule import k_at_step, k_schedule
from .spec import ModelSpec, SpecError

__version__ = "0.1.0"
__all__ = ["ModelSpec", "SpecError", "k_schedule", "k_at_step", "__version__"]

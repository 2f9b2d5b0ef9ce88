"""The nowcasters a server offers: the built-in linefit plus every directory of the models dir, per device."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch

from ..engine.nowcasters.base import Nowcaster
from ..engine.nowcasters.linefit import Linefit
from .errors import ServiceError

log = logging.getLogger("ninocast.nowcasters")


class RegistryError(RuntimeError):
    """A nowcaster that cannot be loaded at start-up."""


def resolve_devices(device: str) -> list[str]:
    """auto -> every CUDA device, else cpu; cuda -> every CUDA device (error without one)."""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device == "auto":
        return [f"cuda:{i}" for i in range(n)] or ["cpu"]
    if device.startswith("cuda"):
        if n == 0:
            raise RegistryError(f"NINOCAST_DEVICE={device} but no CUDA device is available")
        if device == "cuda":
            return [f"cuda:{i}" for i in range(n)]
        if int(device[5:]) >= n:
            raise RegistryError(f"NINOCAST_DEVICE={device} but only {n} CUDA device(s) exist")
    return [device]


class NowcasterRegistry:
    """name -> one loaded instance per device (plus a CPU copy made on demand for CUDA out-of-memory fallback)."""

    def __init__(self, devices: list[str]) -> None:
        self.devices = devices
        self._refs: dict[str, str] = {}
        self._models: dict[tuple[str, str], Nowcaster] = {}
        self._lock = threading.Lock()

    def load(self, models_dir: Path | None, default: str) -> None:
        from ..engine.nowcasters.checkpoint import BUNDLED_DIR

        self._add("linefit", "linefit", lambda dev: Linefit().to(dev))
        if models_dir is not None and not models_dir.is_dir():
            raise RegistryError(f"NINOCAST_MODELS_DIR={models_dir} is not a directory")
        # The nowcasters shipped in the package first; a models-dir entry of the same name replaces one.
        for folder in (BUNDLED_DIR, models_dir):
            if folder is None or not folder.is_dir():
                continue
            for d in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
                self._add(d.name, str(d), lambda dev, d=d: _load(str(d), dev, d.name))
        if default not in self._refs:
            raise RegistryError(f"NINOCAST_DEFAULT_NOWCASTER={default!r} is not loaded; available: {self.names}")
        self.default = default

    def _add(self, name: str, ref: str, make) -> None:
        for dev in self.devices:
            try:
                self._models[(name, dev)] = make(dev)
            except Exception as e:
                raise RegistryError(f"cannot load nowcaster {name!r} from {ref}: {e}") from e
        self._refs[name] = ref
        log.info("nowcaster %s loaded on %s", name, ", ".join(self.devices))

    @property
    def names(self) -> list[str]:
        return list(self._refs)

    def describe(self) -> list[dict]:
        return [self._models[(n, self.devices[0])].describe() for n in self._refs]

    def get(self, name: str, device: str | None = None) -> Nowcaster:
        device = device or self.devices[0]
        try:
            return self._models[(name, device)]
        except KeyError:
            pass
        if name not in self._refs:
            raise ServiceError(422, "unknown_nowcaster", f"no nowcaster {name!r}; available: {self.names}")
        with self._lock:  # a CPU copy for OOM fallback, loaded once
            if (name, device) not in self._models:
                ref = self._refs[name]
                self._models[(name, device)] = Linefit().to(device) if ref == "linefit" else _load(ref, device, name)
            return self._models[(name, device)]

    def for_session(self, name: str, ctx: int, device: str | None = None) -> Nowcaster:
        """The instance that serves a session; linefit fits any ctx >= 2, so it is re-made for other ctx."""
        m = self.get(name, device)
        if m.ctx != ctx and isinstance(m, Linefit):
            return Linefit(m.name, ctx, m.horizon).to(m.device)
        return m


def _load(ref: str, device: str, name: str) -> Nowcaster:
    from ..engine.nowcasters.checkpoint import load_nowcaster  # lands with the checkpoint formats

    return load_nowcaster(ref, device=device, name=name)

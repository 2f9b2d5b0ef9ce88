"""Start a real ``ninocast serve`` process on a free loopback port (ninocast_server.testing), and build states of a
small trained model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import torch
from safetensors.torch import save

from ninocast_server.testing import ServerProcess, cli_cmd, free_port, serve_cmd, server_env  # noqa: F401 (re-exported)

ROOT = Path(__file__).resolve().parents[1]
OCTET = {"Content-Type": "application/octet-stream"}


class Server(ServerProcess):
    """A ``ninocast serve`` subprocess run from the repository root (see ninocast_server.testing).

    Its default nowcaster is linefit unless a test names another: the protocol tests compare what comes back with
    an exact offline linefit. ``default_nowcaster=None`` keeps the server's own default (ninocast-nino)."""

    def __init__(self, data_dir: Path, port: int | None = None, **settings: Any) -> None:
        settings.setdefault("default_nowcaster", "linefit")
        if settings["default_nowcaster"] is None:
            del settings["default_nowcaster"]
        super().__init__(data_dir, port, cwd=ROOT, **settings)

    def start(self, timeout: float = 60.0) -> "Server":
        super().start(timeout)
        return self

    def client(self, key: str | None = None, **kw: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=kw.pop("timeout", 60), **kw)


def assert_error(resp: httpx.Response, status: int, code: str | None = None, mentions: str | None = None) -> dict:
    """A JSON {error, detail} answer with this status (and code, and a word of the detail)."""
    assert resp.status_code == status, (resp.status_code, resp.text[:500])
    body = resp.json()
    assert set(body) >= {"error", "detail"}, body
    if code is not None:
        assert body["error"] == code, body
    if mentions is not None:
        assert mentions.lower() in body["detail"].lower(), body
    return body


# ---------------------------------------------------------------------------- a small model and its states
def small_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def training_states(seed: int = 0, n: int = 5, steps_between: int = 3) -> tuple[dict, list[dict[str, torch.Tensor]]]:
    """(spec JSON, n state dicts) from real Adam steps of a small MLP on a fixed regression task."""
    from ninocast.spec import ModelSpec

    model = small_model(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(64, 8, generator=g), torch.randn(64, 4, generator=g)
    states = []
    for _ in range(n):
        for _ in range(steps_between):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        states.append({k: v.detach().clone() for k, v in model.named_parameters()})
    return ModelSpec.from_module(model).to_json(), states


def encode(tensors: dict[str, torch.Tensor]) -> bytes:
    return save({k: v.contiguous() for k, v in tensors.items()})


def flat_states(spec_json: dict, states: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """(P, ctx) float32, oldest first, in spec order."""
    from ninocast.spec import ModelSpec

    spec = ModelSpec.from_json(spec_json)
    return torch.stack([torch.cat([s[n].float().reshape(-1) for n in spec.names]) for s in states], dim=1)


def reference_nowcast(nowcaster: Any, spec_json: dict, states: torch.Tensor, k: int) -> torch.Tensor:
    """What the engine answers in-process for the same request."""
    from ninocast.spec import ModelSpec
    from ninocast_server.engine.runner import nowcast

    return nowcast(nowcaster, ModelSpec.from_json(spec_json), states, k)


def flatten_answer(spec_json: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    from ninocast.spec import ModelSpec

    spec = ModelSpec.from_json(spec_json)
    assert list(tensors) == spec.names or set(tensors) == set(spec.names)
    for p in spec.layout:
        assert tuple(tensors[p.name].shape) == p.shape, p.name
    return torch.cat([tensors[n].float().reshape(-1) for n in spec.names])


def upload_all(c: httpx.Client, sid: str, states: list[dict[str, torch.Tensor]], first_step: int = 200,
               every: int = 200) -> list[int]:
    steps = []
    for i, s in enumerate(states):
        step = first_step + i * every
        r = c.put(f"/v1/sessions/{sid}/states/{step}", content=encode(s), headers=OCTET)
        assert r.status_code == 201, r.text
        steps.append(step)
    return steps

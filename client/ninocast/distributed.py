"""Which tensors ``NowcastOptimizer`` owns, and how its ranks agree under ``torch.distributed``.

The model is found behind its wrappers (DDP, ``torch.compile``) and its nowcast tensors are those the base
optimizer updates. Only rank 0 talks to the backend and makes the decisions; the other ranks receive each
decision (a small integer) and the new parameters by broadcast, so all ranks stay identical. Without an
initialised process group of more than one rank every helper is a no-op and the process is rank 0.
"""

from __future__ import annotations

import torch
from torch import nn

from .spec import ModelSpec


def unwrap(model: nn.Module) -> nn.Module:
    """The model whose parameter names the spec uses: DistributedDataParallel / DataParallel keep it in
    ``.module``, ``torch.compile`` in ``._orig_mod``."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def updated_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> set[str]:
    """Names of the model's tensors that ``optimizer`` updates: ``requires_grad`` and in its param groups."""
    owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    names = {n for n, p in model.named_parameters() if p.requires_grad and id(p) in owned}
    if not names:
        raise ValueError("the optimizer updates none of the model's parameters (all frozen, or the optimizer "
                         "was built for another model): nothing to nowcast")
    return names


def nowcast_spec(model: nn.Module, optimizer: torch.optim.Optimizer, spec: ModelSpec | None) -> ModelSpec:
    """``spec``, or one built from the tensors ``optimizer`` updates; refused when it names a tensor the model
    lacks or the optimizer does not update (a nowcast would overwrite a frozen tensor)."""
    params = dict(model.named_parameters())
    updated = updated_names(model, optimizer)
    spec = spec or ModelSpec.from_module(model, include=updated)
    missing = [n for n in spec.names if n not in params]
    if missing:
        raise ValueError(f"spec names not found in the model: {missing[:5]}")
    fixed = [n for n in spec.names if n not in updated]
    if fixed:
        raise ValueError(f"the spec names tensors the optimizer does not update (frozen, or not in its "
                         f"param groups): {fixed[:5]}; a nowcast would overwrite them")
    return spec


def dist_active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


def is_rank0() -> bool:
    return not dist_active() or torch.distributed.get_rank() == 0


def broadcast_code(code: int, device: torch.device) -> int:
    """Rank 0's decision on every rank. ``device``: where the parameters live (NCCL broadcasts device tensors)."""
    flag = torch.full((1,), float(code), device=device)
    if dist_active():
        torch.distributed.broadcast(flag, src=0)
    return int(flag.item())


def broadcast_param(p: torch.Tensor) -> None:
    if dist_active():
        torch.distributed.broadcast(p.data, src=0)

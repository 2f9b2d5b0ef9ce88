"""A session's spec from an untrusted client, with the limits that bound what it costs the server.

Everything the server later does per tensor (checking each upload, reading states, building the graph,
listing the session) scales with the spec, so its size is capped before a ModelSpec is even built: the
number of tensors, the length of their names, the dimensions of a shape, the parameters in all. Runs on a
worker thread (a spec at the limits takes tens of milliseconds to check).
"""

from __future__ import annotations

from typing import Any

from ninocast.spec import ModelSpec, SpecError

from .errors import ServiceError

MAX_DIMS = 8  # no parameter tensor has more; a shape of a million 1s would pass the parameter count


def parse_spec(raw: Any, max_tensors: int, max_name_length: int, max_params: int) -> ModelSpec:
    """The checked spec; 422 ``spec_too_large`` over a limit (naming its setting), ``invalid_spec`` otherwise."""
    params = raw.get("params") if isinstance(raw, dict) else None
    if isinstance(params, list):
        if len(params) > max_tensors:
            raise ServiceError(422, "spec_too_large", f"the spec lists {len(params)} tensors, this server accepts "
                               f"at most {max_tensors} (NINOCAST_MAX_TENSORS_PER_SPEC)")
        for i, item in enumerate(params):
            if not (isinstance(item, list) and len(item) == 2):
                continue  # ModelSpec says what is wrong with it
            name, shape = item
            if isinstance(name, str) and len(name) > max_name_length:
                raise ServiceError(422, "spec_too_large", f"spec.params[{i}]: the name has {len(name)} characters, "
                                   f"this server accepts at most {max_name_length} (NINOCAST_MAX_NAME_LENGTH)")
            if isinstance(shape, list) and len(shape) > MAX_DIMS:
                raise ServiceError(422, "invalid_spec", f"spec.params[{i}] ({str(name)[:100]}): {len(shape)} "
                                   f"dimensions; at most {MAX_DIMS} are supported")
    try:
        spec = ModelSpec.from_json(raw)
    except SpecError as e:
        raise ServiceError(422, "invalid_spec", str(e)) from None
    if spec.n_params > max_params:
        raise ServiceError(422, "spec_too_large", f"the spec has {spec.n_params} parameters, this server accepts at "
                           f"most {max_params} (NINOCAST_MAX_PARAMS_PER_SESSION)")
    return spec

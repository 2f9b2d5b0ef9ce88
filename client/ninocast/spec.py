"""ModelSpec: the one description of a trained model that the engine, the server, the CLI and the client share.

A spec is the ordered list of a model's parameters (``named_parameters()`` order, tied tensors once) plus the
graph family and the attention head counts the transformer graphs need. Its JSON form is::

    {"family": "auto"|"generic"|"gpt2"|"llama", "num_heads": 4, "num_key_value_heads": 2,
     "params": [["name", [d0, d1, ...]], ...], "topology": {...}}

``topology`` (optional, family generic only) is the model's traced neural-graph topology (``ninocast.topology``,
written by ``from_module``); a generic spec without one stands for a plain chain of layers (checked where a graph
is built: ``ninocast_server.engine.graphs.check_graph_spec``).
"""

from __future__ import annotations

import hashlib
import dataclasses
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Collection, Iterable, Mapping, Sequence

from .topology import Topology, TopologyError, check_topology, is_plain_chain

FAMILIES = ("generic", "gpt2", "llama")
GPT2_BLOCK_PREFIX = "transformer.h."
LLAMA_BLOCK_PREFIX = "model.layers."
# What the transformer graphs place (NINO_SPEC §2.6.2 / §2.6.3), shared with the engine's layouts: the tensors of
# one block (after '<prefix><i>.'), and name endings placed before / after the blocks. A Hugging Face model may
# sit under any outer name prefix (``self.model`` of a LightningModule): the graphs strip it.
GPT2_BLOCK = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
              "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
              "mlp.c_proj.weight", "mlp.c_proj.bias")
LLAMA_BLOCK = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
               "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
               "input_layernorm.weight", "post_attention_layernorm.weight")
GRAPH_TENSORS = {  # family -> (block prefix, block tensors, endings before the blocks, endings after them)
    "gpt2": (GPT2_BLOCK_PREFIX, GPT2_BLOCK, ("wte.weight", "wpe.weight"), ("ln_f.weight", "ln_f.bias")),
    "llama": (LLAMA_BLOCK_PREFIX, LLAMA_BLOCK, ("embed_tokens.weight",), ("norm.weight", "lm_head.weight")),
}


class SpecError(ValueError):
    """A model spec that cannot describe a model; the message says what and where."""


@dataclass(frozen=True)
class ParamInfo:
    """One parameter tensor and where it lives in the flat vector."""

    name: str
    shape: tuple[int, ...]
    start: int
    stop: int

    @property
    def numel(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class ModelSpec:
    family: str
    params: tuple[tuple[str, tuple[int, ...]], ...]
    num_heads: int | None = None
    num_key_value_heads: int | None = None
    topology: Topology | None = None
    _layout: tuple[ParamInfo, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", tuple((str(n), tuple(int(d) for d in s)) for n, s in self.params))
        _validate(self)
        layout, offset = [], 0
        for name, shape in self.params:
            n = math.prod(shape)
            layout.append(ParamInfo(name, shape, offset, offset + n))
            offset += n
        object.__setattr__(self, "_layout", tuple(layout))

    # ----------------------------------------------------------------- derived
    @property
    def layout(self) -> tuple[ParamInfo, ...]:
        """Each parameter with its [start, stop) range in the flat vector."""
        return self._layout

    @property
    def n_params(self) -> int:
        return self._layout[-1].stop if self._layout else 0

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.params]

    @property
    def kv_heads(self) -> int | None:
        return self.num_key_value_heads if self.num_key_value_heads is not None else self.num_heads

    def fingerprint(self) -> str:
        """Stable hash of the JSON form: the cache key of the spec's neural graph."""
        blob = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()

    # ----------------------------------------------------------------- JSON
    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"family": self.family, "params": [[n, list(s)] for n, s in self.params]}
        if self.num_heads is not None:
            out["num_heads"] = self.num_heads
        if self.num_key_value_heads is not None:
            out["num_key_value_heads"] = self.num_key_value_heads
        if self.topology is not None:
            out["topology"] = self.topology.to_json()
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any] | str | bytes) -> "ModelSpec":
        """Parse and validate the JSON form (a dict or its text). ``family: auto`` picks it from the names."""
        if isinstance(obj, (str, bytes)):
            try:
                obj = json.loads(obj)
            except json.JSONDecodeError as e:
                raise SpecError(f"spec is not valid JSON: {e}") from None
        if not isinstance(obj, Mapping):
            raise SpecError("spec must be a JSON object with 'family' and 'params'")
        unknown = set(obj) - {"family", "params", "num_heads", "num_key_value_heads", "topology"}
        if unknown:
            raise SpecError(f"spec has unknown keys: {sorted(unknown)}")
        params = _parse_params(obj.get("params"))
        family = obj.get("family", "auto")
        if not isinstance(family, str):
            raise SpecError("spec.family must be a string")
        topology = _parse_topology(obj.get("topology"))
        if family == "auto":
            family = "generic" if topology is not None else detect_family([n for n, _ in params])
        return cls(
            family=family,
            params=tuple(params),
            num_heads=_opt_int(obj.get("num_heads"), "num_heads"),
            num_key_value_heads=_opt_int(obj.get("num_key_value_heads"), "num_key_value_heads"),
            topology=topology,
        )

    @classmethod
    def load(cls, path: str) -> "ModelSpec":
        with open(path, "rb") as f:
            return cls.from_json(f.read())

    # ----------------------------------------------------------------- torch
    @classmethod
    def from_module(
        cls,
        module: Any,
        family: str = "auto",
        num_heads: int | None = None,
        num_key_value_heads: int | None = None,
        include: Collection[str] | None = None,
        example_input: Any = None,
        leave_out: Sequence[str] = (),
        graph: str = "auto",
    ) -> "ModelSpec":
        """Describe an ``nn.Module``: its parameters (only the names in ``include`` when given, e.g. those an
        optimizer updates) that a neural graph can place.

        A Hugging Face GPT-2 or Llama anywhere in the module tree (the model itself, or ``self.model`` of a
        LightningModule or another wrapper) sets the family and the head counts; tensors outside it and scalar
        (0-d) tensors have no place in the graph and are left out, with one warning naming them (they then
        train normally and are kept as they are on nowcast calls). A trainable subset the transformer graph
        cannot take whole (a block half frozen) is described as ``generic``.

        Any other model's graph is traced from one forward pass on ``example_input`` (guessed when None,
        ``ninocast.tracing``); a model whose graph cannot be derived faithfully raises SpecError naming the
        layer. ``leave_out`` (parameter names or module prefixes) keeps tensors out of the spec: they then pass
        through nowcasts unchanged.

        ``graph="traced"`` traces every model, GPT-2, Llama and plain chains included, and keeps the topology in
        the spec, so the server builds the graph from it (for GPT-2, Llama, MLPs and the paper's ConvNets the
        same graph as their hand-written layouts, docs/graphs.md)."""
        if graph not in ("auto", "traced"):
            raise SpecError(f"graph must be 'auto' or 'traced', got {graph!r}")
        if graph == "traced":
            family = "generic"
        all_params = [(n, tuple(p.shape)) for n, p in module.named_parameters()]
        params = [(n, s) for n, s in all_params if include is None or n in include]
        prefix, config = find_hf_model(module)
        model_type = getattr(getattr(module, "config", None), "model_type", None)
        if family == "auto" and config is not None and config.model_type in GRAPH_TENSORS:
            family = config.model_type
        elif family == "auto" and model_type is not None:
            family = "generic"  # other Hugging Face models (BERT, ViT, Qwen2...) are traced
        if family == "auto":
            family = detect_family([n for n, _ in params])
            prefix = outer_prefix([n for n, _ in params], family)
        placed, left_out = params, []
        if family in GRAPH_TENSORS and prefix is None:
            prefix = outer_prefix([n for n, _ in params], family)
        if family in GRAPH_TENSORS:
            if leave_out:
                raise SpecError(f"leave_out needs the generic (traced) family, not {family!r}")
            placed, left_out = split_placeable(params, family, prefix or "")
            if not placed:  # e.g. only adapters train: the transformer graph has nothing to take
                family = "generic"
        topology = None
        if family == "generic":
            left_out = [n for n, s in params if not len(s)]
            untouched = [n for n, _ in all_params if include is not None and n not in include]
            from .tracing import TraceRefused, trace_topology  # torch is needed only here

            try:
                topology = trace_topology(module, example_input, [*leave_out, *left_out, *untouched])
            except TraceRefused as e:
                raise SpecError(f"{type(module).__name__}: {e}") from None
            kept = {n for n, _ in params} - {n for n, _ in topology.left_out}
            placed = [(n, s) for n, s in params if n in kept]
            internal = {*left_out, *untouched}  # scalars and tensors the optimizer does not update: no user choice
            asked = tuple(x for x in topology.left_out if x[0] not in internal)
            if not asked and graph == "auto" and is_plain_chain(dataclasses.replace(topology, left_out=()), placed):
                topology = None  # exactly what a generic spec means without one: the JSON stays as before
        if left_out:
            warnings.warn(f"ninocast: {len(left_out)} parameter(s) left out of the {family} spec (no place in its "
                          f"neural graph; they train normally and are not nowcast): {', '.join(left_out[:10])}"
                          + (f" and {len(left_out) - 10} more" if len(left_out) > 10 else ""),
                          UserWarning, stacklevel=2)
        if config is not None and family == getattr(config, "model_type", None):
            if family == "gpt2" and num_heads is None:
                num_heads = getattr(config, "n_head", None)
            if family == "llama":
                if num_heads is None:
                    num_heads = getattr(config, "num_attention_heads", None)
                if num_key_value_heads is None:
                    num_key_value_heads = getattr(config, "num_key_value_heads", None)
        return cls(family=family, params=tuple(placed), num_heads=num_heads,
                   num_key_value_heads=num_key_value_heads, topology=topology)


def find_hf_model(module: Any) -> tuple[str | None, Any]:
    """``(outer name prefix, config)`` of the first Hugging Face GPT-2 / Llama in the module tree, searched under
    any name (``""`` for the module itself, ``"model."`` for ``self.model``); ``(None, None)`` when none."""
    named = module.named_modules() if hasattr(module, "named_modules") else [("", module)]
    for name, sub in named:
        config = getattr(sub, "config", None)
        if getattr(config, "model_type", None) in GRAPH_TENSORS:
            return (f"{name}." if name else ""), config
    return None, None


def outer_prefix(names: Sequence[str], family: str) -> str | None:
    """The text before the block prefix in the first block tensor's name (``"model."`` for
    ``model.transformer.h.0...``); None for generic specs or when no name has blocks."""
    if family not in GRAPH_TENSORS:
        return None
    pattern = re.compile(r"^(.*?)" + re.escape(GRAPH_TENSORS[family][0]) + r"\d+\.")
    for n in names:
        m = pattern.match(n)
        if m and (not m.group(1) or m.group(1).endswith(".")):
            return m.group(1)
    return None


def split_placeable(params: Sequence[tuple[str, tuple[int, ...]]], family: str,
                    prefix: str) -> tuple[list[tuple[str, tuple[int, ...]]], list[str]]:
    """``(placed, left_out names)``: the tensors under ``prefix`` that the family's graph places, every block
    complete; ``placed`` is empty when no complete block is left (the caller then falls back to generic)."""
    block_prefix, block_keys, pre, post = GRAPH_TENSORS[family]
    pattern = re.compile(re.escape(prefix + block_prefix) + r"(\d+)\.(.+)$")
    placed: list[tuple[str, tuple[int, ...]]] = []
    left_out: list[str] = []
    blocks: dict[int, set[str]] = {}  # block index -> the block tensors present
    for name, shape in params:
        m = pattern.match(name)
        ok = len(shape) > 0 and name.startswith(prefix) and (
            (m is not None and m.group(2) in block_keys) or (m is None and name.endswith(pre + post)))
        if not ok:
            left_out.append(name)
            continue
        placed.append((name, shape))
        if m is not None:
            blocks.setdefault(int(m.group(1)), set()).add(m.group(2))
    if not blocks or any(set(block_keys) - keys for keys in blocks.values()):
        return [], left_out
    return placed, left_out


def detect_family(names: Sequence[str]) -> str:
    """Pick the graph family from parameter names (what ``family: auto`` means), under any outer prefix."""
    for family, marker in (("gpt2", r"\d+\.attn\.c_attn\."), ("llama", r"\d+\.self_attn\.q_proj\.")):
        pattern = re.compile(r"(?:^|\.)" + re.escape(GRAPH_TENSORS[family][0]) + marker)
        if any(pattern.search(n) for n in names):
            return family
    return "generic"


# --------------------------------------------------------------------- validation
def _opt_int(v: Any, what: str) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise SpecError(f"spec.{what} must be an integer, got {v!r}")
    return v


def _parse_topology(raw: Any) -> Topology | None:
    if raw is None:
        return None
    try:
        return Topology.from_json(raw)
    except TopologyError as e:
        raise SpecError(str(e)) from None


def _parse_params(raw: Any) -> list[tuple[str, tuple[int, ...]]]:
    if not isinstance(raw, list):
        raise SpecError("spec.params must be a list of [name, shape] pairs")
    out = []
    for i, item in enumerate(raw):
        if not (isinstance(item, (list, tuple)) and len(item) == 2):
            raise SpecError(f"spec.params[{i}] must be a [name, shape] pair, got {item!r}"[:300])
        name, shape = item
        if not isinstance(name, str):
            raise SpecError(f"spec.params[{i}]: name must be a string, got {name!r}"[:300])
        if not isinstance(shape, (list, tuple)) or not all(
            isinstance(d, int) and not isinstance(d, bool) for d in shape
        ):
            raise SpecError(f"spec.params[{i}] ({name}): shape must be a list of integers, got {shape!r}"[:300])
        out.append((name, tuple(shape)))
    return out


def _validate(spec: ModelSpec) -> None:
    if spec.family not in FAMILIES:
        raise SpecError(f"unknown family {spec.family!r}; expected one of {('auto',) + FAMILIES}")
    if not spec.params:
        raise SpecError("spec.params is empty: a model needs at least one parameter")
    seen: set[str] = set()
    for i, (name, shape) in enumerate(spec.params):
        where = f"spec.params[{i}] ({name})"
        if not name:
            raise SpecError(f"spec.params[{i}]: empty name")
        if name in seen:
            raise SpecError(f"{where}: duplicate name (tied tensors must appear once)")
        seen.add(name)
        if len(shape) == 0:
            raise SpecError(f"{where}: scalar (0-d) parameters have no place in a neural graph; leave it out of "
                            f"the spec (ModelSpec.from_module does, with a warning: it then trains normally)")
        if any(d <= 0 for d in shape):
            raise SpecError(f"{where}: every dimension must be positive, got {list(shape)}")
    for what in ("num_heads", "num_key_value_heads"):
        v = getattr(spec, what)
        if v is not None and v <= 0:
            raise SpecError(f"spec.{what} must be positive, got {v}")
    if spec.topology is not None and spec.family != "generic":
        raise SpecError(f"spec.topology is for family generic (traced graphs), not {spec.family!r}")
    if spec.topology is not None:
        try:
            check_topology(spec.topology, spec.params)
        except TopologyError as e:
            raise SpecError(str(e)) from None
    if spec.family == "gpt2":
        _validate_gpt2(spec)
    elif spec.family == "llama":
        _validate_llama(spec)


def _shape_of(spec: ModelSpec, suffix: str) -> Iterable[tuple[str, tuple[int, ...]]]:
    return ((n, s) for n, s in spec.params if n.endswith(suffix))


def _validate_gpt2(spec: ModelSpec) -> None:
    if spec.num_heads is None:
        raise SpecError("family gpt2 needs num_heads (the model's n_head)")
    if spec.num_key_value_heads not in (None, spec.num_heads):
        raise SpecError("family gpt2 has no grouped-query attention: leave num_key_value_heads out")
    found = False
    for name, shape in _shape_of(spec, ".attn.c_attn.weight"):
        found = True
        if len(shape) != 2 or shape[1] != 3 * shape[0]:
            raise SpecError(f"{name}: expected a fused (d, 3d) Conv1D weight, got {list(shape)}")
        if shape[0] % spec.num_heads:
            raise SpecError(f"{name}: hidden size {shape[0]} is not divisible by num_heads={spec.num_heads}")
    if not found:
        raise SpecError("family gpt2 needs '...attn.c_attn.weight' parameters (Hugging Face GPT-2 names)")


def _validate_llama(spec: ModelSpec) -> None:
    h, kv = spec.num_heads, spec.kv_heads
    if h is None:
        raise SpecError("family llama needs num_heads (the model's num_attention_heads)")
    assert kv is not None
    if h % kv:
        raise SpecError(f"num_heads={h} is not divisible by num_key_value_heads={kv}")
    found = False
    for name, shape in spec.params:
        m = re.search(r"\.self_attn\.(q|k|v)_proj\.(weight|bias)$", name)
        if not m:
            continue
        if m.group(2) == "bias":
            raise SpecError(f"{name}: Llama graphs with attention biases are not supported (spec §2.6.4 item 7)")
        found = True
        heads = h if m.group(1) == "q" else kv
        if shape[0] % heads:
            raise SpecError(f"{name}: output size {shape[0]} is not divisible by {heads} heads")
    if not found:
        raise SpecError("family llama needs '...self_attn.q_proj.weight' parameters (Hugging Face Llama names)")

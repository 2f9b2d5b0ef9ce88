"""Trace a model's neural-graph topology from its computation: run it once on an example input and follow, op by
op, which neurons every tensor holds.

Why a run and not ``torch.fx.symbolic_trace``: symbolic tracing stops at data-dependent Python control flow,
which every Hugging Face model has; a ``TorchFunctionMode`` sees every torch call of a real forward pass, with
real shapes, and needs no model changes. Layers (``nn.Linear``, convolutions, norms, embeddings, attention
modules) are handled as units through module hooks; everything between them (activations, residual additions,
reshapes, pooling, concatenations) is followed by abstract interpretation: each activation tensor is known as
"the neurons of group g along axes A" (found for reshapes and indexing by pushing a probe tensor of neuron ids
through the op). Whatever cannot be followed faithfully is refused with a ``TraceRefused`` naming the layer:
the graph is never guessed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .topology import MAX_KERNEL_AREA, Link, Topology, block_names, module_prefix

LEAVE_OUT_HINT = "ModelSpec.from_module(model, leave_out=[{names}]) builds a spec without it; those tensors then " \
                 "pass through nowcasts unchanged"


class TraceRefused(ValueError):
    """The model (or one layer of it) has no faithful neural graph; the message says which layer and what to do."""


# ----------------------------------------------------------------------------------------- abstract values
@dataclass(frozen=True)
class Feat:
    """An activation whose axes ``axes`` (neuron-major order) index the neurons of group ``group``."""

    group: int
    axes: tuple[int, ...]
    version: int


@dataclass(frozen=True)
class Raw:
    """A model input (or the output of a left-out layer): its neurons become a group where a layer reads it."""


@dataclass(frozen=True)
class Mixed:
    """Depends on the model in a way no graph shows; a layer reading it is refused with ``reason``."""

    reason: str


@dataclass(frozen=True)
class Stat:
    """A statistic over the neurons of one group (mean, variance): normalising that group by it is fine."""

    group: int


@dataclass(frozen=True)
class ParamRef:
    """A parameter tensor (or a view of one, e.g. an expanded class token)."""

    name: str
    tensor: Tensor


RAW = Raw()

ELEMENTWISE = {
    "relu", "relu_", "gelu", "silu", "silu_", "sigmoid", "tanh", "dropout", "neg", "__neg__", "abs", "exp", "log",
    "clamp", "clamp_", "hardtanh", "leaky_relu", "elu", "selu", "celu", "softplus", "mish", "hardswish", "relu6",
    "hardsigmoid", "logsigmoid", "softmax", "log_softmax", "sqrt", "rsqrt", "pow", "__pow__", "square", "erf",
    "to", "float", "half", "bfloat16", "double", "type", "type_as", "contiguous", "clone", "detach", "masked_fill",
    "masked_fill_", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout", "sin", "cos",
    "reciprocal", "__truediv__", "div", "div_", "__itruediv__", "__mul__", "__rmul__", "mul", "mul_", "__imul__",
    "__add__", "__radd__", "add", "add_", "__iadd__", "__sub__", "__rsub__", "sub", "sub_", "__isub__",
    "__rtruediv__", "where", "tanh_", "sigmoid_", "gelu_", "threshold", "glu_never",
}
ADD = {"__add__", "__radd__", "add", "add_", "__iadd__"}
MUL = {"__mul__", "__rmul__", "mul", "mul_", "__imul__"}
REDUCE = {"mean", "var", "std", "sum", "norm", "amax", "amin", "logsumexp", "var_mean", "std_mean"}
CAT = {"cat", "concat", "concatenate"}
IGNORED = {"size", "dim", "numel", "__len__", "__bool__", "item", "tolist", "__get__", "__format__", "__repr__",
           "is_floating_point", "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "eq", "ne", "lt", "gt",
           "isfinite", "isnan", "any", "all", "numpy", "cpu", "data_ptr", "stride", "storage_offset", "get_device",
           "__index__", "__int__", "__float__", "__hash__", "requires_grad_", "retain_grad", "__setstate__"}

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d,
         nn.InstanceNorm2d, nn.InstanceNorm3d) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
REFUSED = {nn.RNNBase: "is a recurrent layer: its weights are applied at every time step and feed back into "
                       "themselves, which a neural graph cannot show",
           nn.RNNCellBase: "is a recurrent cell: its weights feed back into themselves over time steps",
           nn.modules.conv._ConvTransposeNd: "is a transposed convolution (weights stored (in, out, ...)), which the "
                                              "graph builder does not support",
           nn.Bilinear: "is a bilinear layer (a product of two inputs), which a neural graph cannot show"}
ATTENTION_NAMES = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"))


def is_rms_norm(m: nn.Module) -> bool:
    """Hugging Face-style RMSNorm modules (Qwen2RMSNorm, LlamaRMSNorm...): one 1-D ``weight``."""
    w = getattr(m, "weight", None)
    return type(m).__name__.endswith("RMSNorm") and isinstance(w, nn.Parameter) and w.dim() == 1 \
        and len(list(m.parameters(recurse=False))) == 1


def attention_parts(m: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear | None] | None:
    """q, k, v (and output) projections of a Hugging Face-style self-attention module, None if it is not one."""
    for q, k, v in ATTENTION_NAMES:
        parts = [getattr(m, n, None) for n in (q, k, v)]
        if all(isinstance(p, nn.Linear) for p in parts):
            out = getattr(m, "o_proj", None) or getattr(m, "out_proj", None)
            return parts[0], parts[1], parts[2], out if isinstance(out, nn.Linear) else None
    return None


def attention_heads(m: nn.Module) -> int | None:
    for attr in ("num_attention_heads", "num_heads", "n_head"):
        v = getattr(m, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    config = getattr(m, "config", None)
    v = getattr(config, "num_attention_heads", None)
    return v if isinstance(v, int) and v > 0 else None


def is_conv1d(m: nn.Module) -> bool:
    """Hugging Face ``Conv1D`` (GPT-2's linear layer): ``weight`` stored (in, out), ``bias`` (out)."""
    w = getattr(m, "weight", None)
    return type(m).__name__ == "Conv1D" and isinstance(w, nn.Parameter) and w.dim() == 2 \
        and getattr(m, "nf", None) == w.shape[1]


def fused_attention_parts(m: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(c_attn, c_proj) of GPT-2-style self-attention: one Conv1D computing [q | k | v], one output Conv1D."""
    c_attn, c_proj = getattr(m, "c_attn", None), getattr(m, "c_proj", None)
    if c_attn is None or c_proj is None or not (is_conv1d(c_attn) and is_conv1d(c_proj)):
        return None
    d = c_attn.weight.shape[0]
    if getattr(m, "is_cross_attention", False) or c_attn.weight.shape[1] != 3 * d:
        return None
    return c_attn, c_proj


LLAMA_BLOCK_PARTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def is_llama_block(m: nn.Module) -> bool:
    """A Hugging Face Llama decoder layer of the form the reference's Llama graph knows (no biases)."""
    if not type(m).__name__.endswith("DecoderLayer"):
        return False
    try:
        parts = [m.get_submodule(n) for n in LLAMA_BLOCK_PARTS]
        norms = [m.get_submodule(n) for n in ("input_layernorm", "post_attention_layernorm")]
    except AttributeError:
        return False
    return all(isinstance(x, nn.Linear) and x.bias is None for x in parts) and all(is_rms_norm(x) for x in norms) \
        and len(list(m.parameters())) == len(parts) + len(norms)


def is_leaf(m: nn.Module, llama: bool = False) -> bool:
    return isinstance(m, (nn.Linear, nn.Embedding, nn.MultiheadAttention) + CONVS + NORMS + tuple(REFUSED)) \
        or is_rms_norm(m) or attention_parts(m) is not None or is_conv1d(m) or fused_attention_parts(m) is not None \
        or (llama and is_llama_block(m))


def is_hf_llama(module: nn.Module) -> bool:
    """Is there a Hugging Face Llama in the module tree? Its blocks and token embedding then follow the
    reference's Llama graph (NINO_SPEC §2.6.3-2.6.4), the graph the reference nowcasts Llama through."""
    return any(getattr(getattr(m, "config", None), "model_type", None) == "llama" for m in module.modules())


# ----------------------------------------------------------------------------------------- groups
@dataclass
class _Group:
    name: str
    size: int
    parent: int
    readers: int = 0  # layers / residuals that read these neurons
    last_reader: str = ""  # edge-block name of the last weight that read them (a residual around it sits there)
    aux: int = 0  # bias / norm tensors applied on them
    version: int = 0  # bumped when the neurons start to hold a different value (a residual sum)


# ----------------------------------------------------------------------------------------- the tracer
class _Trace(TorchFunctionMode):
    def __init__(self, module: nn.Module, leave_out: Sequence[str], llama: bool = False) -> None:
        super().__init__()
        self.llama = llama  # Llama blocks and token embedding follow the reference's graph (§2.6.3-2.6.4)
        self.block_used: set[str] = set()
        self.module = module
        self.names = {id(p): n for n, p in module.named_parameters()}
        self.leave_out = tuple(leave_out)
        self.groups: list[_Group] = []
        self.links: list[Link] = []
        self.tokens: int | None = None
        self.values: dict[int, Any] = {}
        self.keep: list[Tensor] = []  # tracked tensors stay alive so their ids are not reused
        self.used: dict[str, str] = {}
        self.depth = 0
        self.calls = 0
        self.qualname = {id(m): n for n, m in module.named_modules()}

    # --------------------------------------------------------------- bookkeeping
    def left_out(self, name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in self.leave_out)

    def new_group(self, name: str, size: int) -> int:
        self.groups.append(_Group(name, size, len(self.groups)))
        return len(self.groups) - 1

    def find(self, g: int) -> int:
        while self.groups[g].parent != g:
            g = self.groups[g].parent
        return g

    def set(self, t: Any, v: Any) -> None:
        if isinstance(t, Tensor):
            self.values[id(t)] = v
            self.keep.append(t)

    def get(self, t: Any) -> Any:
        if isinstance(t, nn.Parameter) or (isinstance(t, Tensor) and id(t) in self.names):
            name = self.names.get(id(t))
            return None if name is None or self.left_out(name) else ParamRef(name, t)
        return self.values.get(id(t)) if isinstance(t, Tensor) else None

    def use(self, pname: str, where: str) -> None:
        """A parameter may play one role, once; a second use (shared weights, a layer called twice) is refused."""
        first = self.used.setdefault(pname, where)
        if first != where:
            first_layer, second_layer = (w.split('#')[0].replace('embedding ', '') for w in (first, where))
            raise TraceRefused(f"parameter {pname} is used twice ({first_layer} and {where.split('#')[0]}); "
                               "a neural graph gives every weight one place. " + _hint([second_layer]))

    def link(self, pname: str | None, role: str, src: int, dst: int, offset: int = 0, rows: int = 0,
             dst_offset: int = 0, **options: Any) -> None:
        """Add a link (``options``: ``Link``'s name / stored / at / src_offset)."""
        if pname is not None and self.left_out(pname):
            return
        if role in ("bias", "norm"):
            at = options.get("at", -1)
            self.groups[self.find(dst if at == -1 else at)].aux += 1
        lk = Link(pname, role, src, dst, offset, rows, dst_offset, **options)
        if lk.role not in ("res", "head"):
            name = block_names(0, lk, [("", 0)])[0]
            self.block_used.add(name)
            if role in ("fc", "conv", "query", "key", "value"):
                self.groups[self.find(src)].last_reader = name
        self.links.append(lk)

    def res_name(self, g: int) -> str | None:
        """A residual around a layer sits with that layer's edges (§2.3.3), as the reference's ``v.res`` and
        ``mlp.c_fc.res`` do: named after the module of the last weight that read its source."""
        last = self.groups[self.find(g)].last_reader
        name = module_prefix(last) + ".res" if last else None
        if name is None or name in self.block_used:
            return None
        self.block_used.add(name)
        return name

    def read(self, g: int) -> None:
        self.groups[self.find(g)].readers += 1

    def current(self, v: Feat) -> bool:
        return v.version == self.groups[self.find(v.group)].version

    def bump(self, g: int) -> int:
        g = self.find(g)
        self.groups[g].version += 1
        return self.groups[g].version

    def gname(self, g: int) -> str:
        return self.groups[self.find(g)].name

    # --------------------------------------------------------------- layers
    def features(self, layer: str, t: Tensor, axis: int, size: int) -> int:
        """The group a layer reads along ``axis`` of its input ``t`` (a model input becomes a new group)."""
        if not isinstance(t, Tensor):
            raise TraceRefused(f"{layer} was called without a tensor input")
        v = self.get(t)
        axis %= max(t.dim(), 1)
        if v is None or isinstance(v, Raw):
            g = self.new_group(f"{layer} inputs", size)
            if isinstance(v, Raw):  # later uses of this input (a residual around the layer) are these neurons
                self.set(t, Feat(g, (axis,), 0))
        elif isinstance(v, Feat):
            if not self.current(v):
                raise TraceRefused(f"{layer} reads the outputs of {self.gname(v.group)} from before they were "
                                   "summed into a residual; the graph keeps one set of neurons per layer output. "
                                   + _hint([layer]))
            if v.axes != (axis,) and not (size == 1 and v.axes == ()):
                raise TraceRefused(f"{layer} is applied along an axis that is not the features of its input (for "
                                   f"example token mixing along positions); neural graphs have no nodes for that. "
                                   + _hint([layer]))
            g = self.find(v.group)
            if self.groups[g].size != size:
                raise TraceRefused(f"{layer}: expected {size} input features, the graph has {self.groups[g].size}")
        elif isinstance(v, Mixed):
            raise TraceRefused(f"{layer} reads a value the graph cannot describe: {v.reason}. " + _hint([layer]))
        else:
            raise TraceRefused(f"{layer} reads a parameter or statistic directly, not a layer's output. "
                               + _hint([layer]))
        self.read(g)
        return g

    def tied(self, m: nn.Module) -> bool:
        """An output layer without bias whose weight is the token embedding's (GPT-2's lm_head)."""
        w, b = getattr(m, "weight", None), getattr(m, "bias", None)
        return id(w) in self.names and self.used.get(self.names[id(w)], "").startswith("embedding ") \
            and (b is None or id(b) not in self.names)

    def weight_links(self, m: nn.Module, layer: str, role: str, src: int, dst: int, stored: str | None = None) \
            -> None:
        where = f"{layer}#{self.calls}"
        for pname_attr in ("weight", "bias"):
            p = getattr(m, pname_attr, None)
            if isinstance(p, nn.Parameter) and id(p) in self.names:
                pname = self.names[id(p)]
                if pname_attr == "weight" and role == "fc" and self.used.get(pname, "").startswith("embedding "):
                    continue  # an output layer tied to the token embedding: placed once, as the embedding (§2.6.2)
                self.use(pname, where)
                if pname_attr == "weight":
                    self.link(pname, role, src, dst, stored=stored)
                else:
                    self.link(pname, "bias", -1, dst)

    def on_leaf(self, m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        self.calls += 1
        layer = self.qualname.get(id(m)) or type(m).__name__
        own = [n for n, _ in m.named_parameters(prefix=layer)]
        if own and all(self.left_out(n) for n in own):  # a left-out layer: its outputs are new inputs
            for t in _tensors(out):
                self.set(t, RAW)
            return
        for base, why in REFUSED.items():
            if isinstance(m, base):
                raise TraceRefused(f"{layer} ({type(m).__name__}) {why}. " + _hint([layer]))
        if any(self.left_out(n) and not n.endswith(".bias") for n in own):
            raise TraceRefused(f"{layer}: leave out all of its weights or none")
        x = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None))
        if isinstance(m, nn.Linear) or is_conv1d(m):
            n_in, n_out = (m.in_features, m.out_features) if isinstance(m, nn.Linear) else tuple(m.weight.shape)
            src = self.features(layer, x, -1, n_in)
            if self.tied(m):  # placed once, as the embedding: no output neurons of its own (§2.6.2)
                return self.set(out, Mixed(f"the outputs of {layer}, tied to the token embedding"))
            dst = self.new_group(layer, n_out)
            self.weight_links(m, layer, "fc", src, dst, None if isinstance(m, nn.Linear) else "in_out")
            self.set(out, Feat(dst, (out.dim() - 1,), 0))
        elif isinstance(m, CONVS):
            self.conv(m, layer, x, out)
        elif isinstance(m, NORMS) or is_rms_norm(m):
            self.norm(m, layer, x, out)
        elif isinstance(m, nn.Embedding):
            short = layer.rsplit(".", 1)[-1].lower()
            role = "pos" if "pos" in short or short == "wpe" else "token"
            tok = self.new_group(f"{layer} ids", m.num_embeddings)
            dst = self.new_group(layer, m.embedding_dim)
            self.use(self.names[id(m.weight)], f"embedding {layer}#{self.calls}")
            quirk = self.llama and role == "token" and short == "embed_tokens"  # §2.6.4 quirk 6
            self.link(self.names[id(m.weight)], role, tok, dst, stored="out_in" if quirk else None)
            if role == "token" and self.tokens is None:
                self.tokens = tok
            self.set(out, Feat(dst, (out.dim() - 1,), 0))
        elif isinstance(m, nn.MultiheadAttention):
            self.torch_attention(m, layer, args, kwargs, out)
        elif fused_attention_parts(m) is not None:
            self.fused_attention(m, layer, x, out)
        elif attention_parts(m) is not None:
            self.hf_attention(m, layer, x, out)
        else:
            self.llama_block(m, layer, x, out)

    def conv(self, m: nn.Module, layer: str, x: Tensor, out: Tensor) -> None:
        area = math.prod(m.kernel_size)
        if m.groups != 1:
            raise TraceRefused(f"{layer} is a grouped convolution (groups={m.groups}): each output reads only "
                               f"{m.in_channels // m.groups} of the {m.in_channels} input channels, which the graph "
                               "cannot show. " + _hint([layer]))
        if area > MAX_KERNEL_AREA:
            raise TraceRefused(f"{layer} has a {'x'.join(map(str, m.kernel_size))} kernel ({area} values per edge); "
                               f"NiNo models read at most {MAX_KERNEL_AREA} (3x3). " + _hint([layer]))
        axis = 1 if x.dim() == len(m.kernel_size) + 2 else 0
        src = self.features(layer, x, axis, m.in_channels)
        dst = self.new_group(layer, m.out_channels)
        self.weight_links(m, layer, "conv", src, dst)
        self.set(out, Feat(dst, (axis,), 0))

    def norm(self, m: nn.Module, layer: str, x: Tensor, out: Tensor) -> None:
        if isinstance(m, (nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())) or is_rms_norm(m):
            shape = getattr(m, "normalized_shape", None)
            if shape is not None and len(tuple(shape)) != 1:
                raise TraceRefused(f"{layer} normalises over {list(shape)} (several axes), which mixes positions "
                                   "into every neuron. " + _hint([layer]))
            axis = x.dim() - 1
            size = x.shape[-1]
        else:
            axis = 1 if x.dim() > 1 else 0
            size = x.shape[axis]
        v = self.get(x)
        if isinstance(v, Feat) and self.current(v) and v.axes == (axis,):
            g, version = self.find(v.group), v.version
        else:
            g = self.features(layer, x, axis, size)
            self.groups[g].readers -= 1  # a norm does not read neurons the way a layer does
            version = self.groups[g].version
        where = f"{layer}#{self.calls}"
        for attr, role in (("weight", "norm"), ("bias", "bias")):
            p = getattr(m, attr, None)
            if isinstance(p, nn.Parameter) and id(p) in self.names:
                self.use(self.names[id(p)], where)
                self.link(self.names[id(p)], role, -1, g)
        self.set(out, Feat(g, (axis,), version))

    def attention(self, layer: str, x: int, heads: int, dq: int, dkv: int,
                  names: dict[str, str | None], slices: dict[str, tuple[int, int]] | None = None,
                  blocks: dict[str, str] | None = None, stored: str | None = None) -> int:
        """NiNo's attention wiring (§2.6.1) between the input group ``x``: query X -> Q, key Q -> X (backwards),
        value X -> V, head nodes -> Q and V; returns the group the output projection reads. Laid out as the
        reference's GPT-2 graph (§2.6.2): head nodes before Q and V, each part's weight, heads and bias in turn,
        the key bias on X (where the key edges end), the value bias in the auxiliary block before Q. ``slices``:
        (offset, rows) of each part in a fused tensor, ``blocks``: edge-block names of its parts."""
        sl, bl = slices or {}, blocks or {}
        if dq % heads or dkv % (dq // heads) or dkv > dq:
            raise TraceRefused(f"{layer}: {dq} query and {dkv} key/value features do not split into {heads} heads")
        hd = dq // heads
        kv = dkv // hd
        h, q, v = self.new_group(f"{layer}.heads", heads), self.new_group(f"{layer}.q", dq), self.new_group(
            f"{layer}.v", dkv)
        self.read(x)
        for role, dst in (("query", q), ("key", q), ("value", v)):
            off, rows = sl.get(role, (0, 0))
            self.link(names[role], role, x, dst, off, rows, name=bl.get(role), stored=stored)
            if role != "key":  # heads sit with their part's weight (§2.3.3): "c_attn.q.head", "q_proj.head"
                block = block_names(0, Link(names[role], role, x, dst, off, rows, name=bl.get(role)), [("", 0)])[0]
                self.link(None, "head", h, dst, 0, heads if role == "query" else kv,
                          name=module_prefix(block) + ".head")
            if names.get(role + "_bias"):
                self.link(names[role + "_bias"], "bias", -1, x if role == "key" else dst, off, rows,
                          name=bl.get(role + "_bias"), at=q if role == "value" else -1)
        if dkv == dq:
            return v
        ctx = self.new_group(f"{layer}.context", dq)  # grouped-query attention: value heads serve several queries
        self.read(v)
        for head in range(heads):
            self.link(None, "res", v, ctx, (head // (heads // kv)) * hd, hd, head * hd)
        return ctx

    def torch_attention(self, m: nn.MultiheadAttention, layer: str, args: tuple, kwargs: dict, out: Any) -> None:
        qkv = list(args[:3]) + [kwargs.get(k) for k in ("query", "key", "value")[len(args[:3]):]]
        if not (qkv[0] is qkv[1] is qkv[2]):
            raise TraceRefused(f"{layer} is cross-attention (query, key and value differ); only self-attention has "
                               "a neural graph. " + _hint([layer]))
        if not m._qkv_same_embed_dim or m.bias_k is not None:
            raise TraceRefused(f"{layer}: separate q/k/v projections or add_bias_kv are not supported. "
                               + _hint([layer]))
        d = m.embed_dim
        x = self.features(layer, qkv[0], -1, d)
        self.groups[x].readers -= 1
        w = self.names[id(m.in_proj_weight)]
        b = self.names.get(id(m.in_proj_bias)) if m.in_proj_bias is not None else None
        where = f"{layer}#{self.calls}"
        for p in (w, b):
            if p:
                self.use(p, where)
        slices = {"query": (0, d), "key": (d, d), "value": (2 * d, d)}
        blocks = {f"{role}{part}": f"{layer}.in_proj.{role[0]}.{part[1:] or 'weight'}"
                  for role in ("query", "key", "value") for part in ("", "_bias")}
        src = self.attention(layer, x, m.num_heads, d, d, {"query": w, "key": w, "value": w, "query_bias": b,
                                                           "key_bias": b, "value_bias": b}, slices, blocks)
        self.read(src)
        dst = self.new_group(f"{layer}.out_proj", d)
        self.weight_links(m.out_proj, f"{layer}.out_proj", "fc", src, dst)
        outs = _tensors(out)
        self.set(outs[0], Feat(dst, (outs[0].dim() - 1,), 0))
        for t in outs[1:]:
            self.set(t, Mixed(f"the attention weights of {layer}"))

    def fused_attention(self, m: nn.Module, layer: str, x: Tensor, out: Any) -> None:
        """GPT-2-style self-attention: the fused ``c_attn`` (stored (in, out)) is split into q, k, v slices named
        as the reference's virtual tensors (``c_attn.q.weight``...), then ``c_proj`` reads the values."""
        parts = fused_attention_parts(m)
        heads = attention_heads(m)
        assert parts is not None
        if heads is None:
            raise TraceRefused(f"{layer}: attention module without num_heads / num_attention_heads")
        c_attn, c_proj = parts
        d = c_attn.weight.shape[0]
        g = self.features(layer, x, -1, d)
        self.groups[g].readers -= 1
        w, b = self.names[id(c_attn.weight)], self.names[id(c_attn.bias)]
        for n in (w, b):
            self.use(n, f"{layer}#{self.calls}")
        base = self.qualname.get(id(c_attn), f"{layer}.c_attn")
        blocks = {f"{role}{part}": f"{base}.{role[0]}.{part[1:] or 'weight'}"
                  for role in ("query", "key", "value") for part in ("", "_bias")}
        slices = {"query": (0, d), "key": (d, d), "value": (2 * d, d)}
        src = self.attention(layer, g, heads, d, d, {"query": w, "key": w, "value": w, "query_bias": b,
                                                     "key_bias": b, "value_bias": b}, slices, blocks, "in_out")
        oname = self.qualname.get(id(c_proj), f"{layer}.c_proj")
        self.read(src)
        dst = self.new_group(oname, c_proj.weight.shape[1])
        self.weight_links(c_proj, oname, "fc", src, dst, "in_out")
        outs = _tensors(out)
        self.set(outs[0], Feat(dst, (outs[0].dim() - 1,), 0))
        for t in outs[1:]:
            self.set(t, Mixed(f"the attention weights of {layer}"))

    def llama_block(self, m: nn.Module, layer: str, x: Tensor, out: Any) -> None:
        """A Hugging Face Llama decoder layer, wired as the reference's Llama graph (NINO_SPEC §2.6.3) with its
        quirks (§2.6.4): norms on the block output, a separate up-projection input copy U, the output projection
        reading the dq nodes that end at the last value node, value head h on head node h. This is the graph the
        reference nowcasts Llama through (the hand-written layout's); it is not the block's data flow (that is
        what the tracer gives other decoder layers, e.g. Qwen2's)."""
        p = {n: m.get_submodule(n) for n in LLAMA_BLOCK_PARTS}
        q, k, v, o = (p[f"self_attn.{n}_proj"] for n in "qkvo")
        gate, up, down = (p[f"mlp.{n}_proj"] for n in ("gate", "up", "down"))
        heads = attention_heads(m.self_attn)
        d, dq, dkv, f = q.in_features, q.out_features, k.out_features, gate.out_features
        if heads is None or dq % heads or dkv % (dq // heads) or dkv > dq:
            raise TraceRefused(f"{layer}: {dq} query and {dkv} key/value features do not split into {heads} heads")
        kv = dkv // (dq // heads)
        src = self.features(layer, x, -1, d)
        where = f"{layer}#{self.calls}"
        for _, t in m.named_parameters(prefix=layer):
            self.use(self.names[id(t)], where)
        name = lambda lin: self.names[id(lin.weight)]  # noqa: E731
        pre = lambda lin: module_prefix(name(lin))  # noqa: E731
        h, qg, vg = self.new_group(f"{layer}.heads", heads), self.new_group(f"{pre(q)}", dq), \
            self.new_group(f"{pre(v)}", dkv)
        mg, ug = self.new_group(f"{layer}.attn_out", d), self.new_group(f"{layer}.up_input", d)
        hid, nxt = self.new_group(f"{pre(gate)}", f), self.new_group(f"{layer}.out", d)
        self.link(name(q), "query", src, qg)
        self.link(None, "head", h, qg, 0, heads, name=f"{pre(q)}.head")
        self.link(name(k), "key", src, qg)
        self.link(name(v), "value", src, vg)
        self.link(None, "head", h, vg, 0, kv, name=f"{pre(v)}.head")
        self.link(None, "res", src, mg, name=f"{pre(v)}.res")
        if dkv == dq:
            self.link(name(o), "fc", vg, mg)
        else:  # quirk 1: the dq node ids ending at the last value node
            self.link(name(o), "fc", qg, mg, src_offset=dkv)
        self.link(name(gate), "fc", mg, hid)
        self.link(None, "res", mg, nxt, name=f"{pre(gate)}.res")
        self.link(name(up), "fc", ug, hid)  # quirk 4: U feeds only up_proj and its residual
        self.link(None, "res", ug, nxt, name=f"{pre(up)}.res")
        self.link(name(down), "fc", hid, nxt)
        for norm in ("input_layernorm", "post_attention_layernorm"):  # quirk 5: both on the block output
            self.link(self.names[id(m.get_submodule(norm).weight)], "norm", -1, nxt)
        for g in (src, mg, ug, hid):
            self.read(g)
        outs = _tensors(out)
        self.set(outs[0], Feat(nxt, (outs[0].dim() - 1,), 0))
        for t in outs[1:]:
            self.set(t, Mixed(f"the attention weights of {layer}"))

    def hf_attention(self, m: nn.Module, layer: str, x: Tensor, out: Any) -> None:
        parts = attention_parts(m)
        heads = attention_heads(m)
        assert parts is not None
        if heads is None:
            raise TraceRefused(f"{layer}: attention module without num_attention_heads / num_heads")
        q, k, v, o = parts
        if not q.in_features == k.in_features == v.in_features or k.out_features != v.out_features:
            raise TraceRefused(f"{layer}: q/k/v projections read different inputs or sizes. " + _hint([layer]))
        g = self.features(layer, x, -1, q.in_features)
        self.groups[g].readers -= 1
        where = f"{layer}#{self.calls}"
        names: dict[str, str | None] = {}
        for role, lin in (("query", q), ("key", k), ("value", v)):
            names[role] = self.names[id(lin.weight)]
            names[role + "_bias"] = self.names[id(lin.bias)] if lin.bias is not None else None
            for n in (names[role], names[role + "_bias"]):
                if n:
                    self.use(n, where)
        src = self.attention(layer, g, heads, q.out_features, k.out_features, names)
        outs = _tensors(out)
        if o is not None:
            oname = self.qualname.get(id(o), f"{layer}.o_proj")
            self.read(src)
            dst = self.new_group(oname, o.out_features)
            self.weight_links(o, oname, "fc", src, dst)
            src = dst
        self.set(outs[0], Feat(src, (outs[0].dim() - 1,), self.groups[self.find(src)].version))
        for t in outs[1:]:
            self.set(t, Mixed(f"the attention weights of {layer}"))

    # --------------------------------------------------------------- everything between layers
    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth == 0:
            self.op(func, args, kwargs, out)
        return out

    def op(self, func: Callable, args: tuple, kwargs: dict, out: Any) -> None:
        name = getattr(func, "__name__", str(func))
        if name in IGNORED:
            return
        if name == "__setitem__" and args and self.get(args[0]) is not None:  # x[...] = y writes into x
            value = self.get(args[2]) if len(args) > 2 else None
            if value is not None:
                self.set(args[0], Mixed(f"{name} writes another value into the outputs of a layer"))
            return
        ins = [(t, self.get(t)) for t in _tensors((args, kwargs))]
        tracked = [(t, v) for t, v in ins if v is not None]
        outs = _tensors(out)
        if not tracked or not outs:
            return
        params = [v for _, v in tracked if isinstance(v, ParamRef)]
        acts = [(t, v) for t, v in tracked if not isinstance(v, ParamRef)]
        if params:
            self.param_op(name, func, args, kwargs, acts, params, outs)
            return
        kinds = {type(v) for _, v in acts}
        if Mixed in kinds:
            reason = next(v.reason for _, v in acts if isinstance(v, Mixed))
            return self.set_all(outs, Mixed(reason))
        if kinds == {Raw}:
            return self.set_all(outs, RAW)
        if kinds == {Stat}:
            return self.set_all(outs, acts[0][1])
        if Raw in kinds:
            return self.set_all(outs, Mixed(f"{name} combines a model input with a layer's output"))
        feats = [(t, v) for t, v in acts if isinstance(v, Feat)]
        if name in CAT:
            return self.cat(args, kwargs, out)
        if len({(self.find(v.group), v.version) for _, v in feats}) > 1 or len(feats) < len(acts):
            return self.combine(name, acts, outs)
        t, v = feats[0]
        if name in ELEMENTWISE and len(outs) == 1 and outs[0].shape == _broadcast(t, outs[0]):
            return self.set(outs[0], Feat(v.group, tuple(a + outs[0].dim() - t.dim() for a in v.axes), v.version))
        if len(acts) > 1 and name not in ELEMENTWISE:  # e.g. x @ x.T: neurons of one group multiplied together
            return self.set_all(outs, Mixed(f"{name} multiplies activations of {self.gname(v.group)} together"))
        for o in outs:
            axes = self.probe(func, args, kwargs, t, v, o, outs)
            if axes is not None:
                self.set(o, Feat(v.group, axes, v.version))
            elif name in REDUCE and o.dim() == t.dim() and all(o.shape[a] == 1 for a in v.axes):
                self.set(o, Stat(self.find(v.group)))
            else:
                self.set(o, Mixed(f"{name} mixes the neurons of {self.gname(v.group)}"))

    def set_all(self, outs: list[Tensor], v: Any) -> None:
        for t in outs:
            self.set(t, v)

    def combine(self, name: str, acts: list[tuple[Tensor, Any]], outs: list[Tensor]) -> None:
        """Two activations meet: a residual addition, a gated product, a normalisation by a statistic."""
        out = outs[0]
        if len(acts) != 2 or len(outs) != 1:
            return self.set_all(outs, Mixed(f"{name} combines several layers' outputs"))
        (ta, a), (tb, b) = acts
        if isinstance(b, Stat) or isinstance(a, Stat):
            f, s = (a, b) if isinstance(b, Stat) else (b, a)
            ok = isinstance(f, Feat) and self.find(f.group) == s.group and name in ELEMENTWISE
            tf = ta if f is a else tb
            return self.set(out, Feat(f.group, tuple(x + out.dim() - tf.dim() for x in f.axes), f.version) if ok
                            else Mixed(f"{name} of a layer's output and another layer's statistics"))
        ax_a = tuple(x + out.dim() - ta.dim() for x in a.axes)
        ax_b = tuple(x + out.dim() - tb.dim() for x in b.axes)
        ga, gb = self.find(a.group), self.find(b.group)
        what = f"{self.groups[ga].name} and {self.groups[gb].name}"
        if not (self.current(a) and self.current(b)):
            return self.set(out, Mixed(f"{name} reads a layer output from before a residual addition ({what})"))
        if ax_a != ax_b or self.groups[ga].size != self.groups[gb].size or out.shape != ta.shape and \
                out.shape != tb.shape:
            return self.set(out, Mixed(f"{name} of {what}, whose neurons do not line up"))
        if name not in ADD and name not in MUL:
            return self.set(out, Mixed(f"{name} of the outputs of {what}"))
        A, B = self.groups[ga], self.groups[gb]
        if A.readers == 0 and B.readers == 0 and A.aux == 0 and B.aux == 0:  # both write the same neurons
            keep, gone = min(ga, gb), max(ga, gb)
            self.groups[gone].parent = keep
            return self.set(out, Feat(keep, ax_a, self.bump(keep)))
        if name in MUL:
            return self.set(out, Mixed(f"{name} multiplies the outputs of {what} (gating after a bias or norm, or "
                                       "of outputs other layers also read)"))
        unread = [g for g in (ga, gb) if self.groups[g].readers == 0]
        if unread:  # the sum is held by the neurons only this addition reads
            s = unread[0]
            other = gb if s == ga else ga
            self.link(None, "res", other, s, name=self.res_name(other))
            self.read(other)
            return self.set(out, Feat(s, ax_a, self.bump(s)))
        s = self.new_group(f"{A.name} + {B.name}", A.size)
        for g in (ga, gb):
            self.link(None, "res", g, s, name=self.res_name(g))
            self.read(g)
        self.set(out, Feat(s, ax_a, 0))

    def cat(self, args: tuple, kwargs: dict, out: Tensor) -> None:
        parts = list(args[0] if args else kwargs.get("tensors", ()))
        dim = (args[1] if len(args) > 1 else kwargs.get("dim", kwargs.get("axis", 0))) % out.dim()
        vals = [self.get(t) for t in parts]
        feats = [v for v in vals if isinstance(v, Feat)]
        if any(isinstance(v, (Raw, Mixed, Stat)) for v in vals) or not feats:
            return self.set(out, Mixed("cat of a model input or an untraceable value with a layer output"))
        if all(isinstance(v, Feat) and v.axes == (dim,) and self.current(v) for v in vals):  # along the features
            s = self.new_group("cat(" + ", ".join(self.gname(v.group) for v in vals) + ")", out.shape[dim])
            at = 0
            for v in vals:
                g = self.find(v.group)
                self.read(g)
                self.link(None, "res", g, s, 0, 0, at)
                at += self.groups[g].size
            return self.set(out, Feat(s, (dim,), 0))
        f = feats[0]
        g = self.find(f.group)
        if any(self.find(v.group) != g or v.axes != f.axes or not self.current(v) for v in feats) or dim in f.axes:
            return self.set(out, Mixed("cat of different layers' outputs along positions"))
        for t, v in zip(parts, vals):
            if isinstance(v, ParamRef):
                self.embed_param(v, g, "cat")
        self.set(out, Feat(g, f.axes, f.version))

    def embed_param(self, p: ParamRef, g: int, where: str) -> None:
        """A learned table added to (or concatenated with) a layer's outputs: class tokens, position tables."""
        d = self.groups[g].size
        shape = tuple(self.module.get_parameter(p.name).shape)
        if shape[-1] != d:
            raise TraceRefused(f"parameter {p.name} {list(shape)} is combined with {self.groups[g].name} ({d} "
                               "neurons) along another axis. " + _hint([p.name]))
        rows = math.prod(shape) // d
        self.use(p.name, f"{where} {p.name}")
        if rows == 1 and len(shape) == 1:
            self.link(p.name, "bias", -1, g)
            return
        role = "pos" if "pos" in p.name.lower() else "token"
        src = self.new_group(f"{p.name} rows", rows)
        self.link(p.name, role, src, g)

    def param_op(self, name: str, func: Callable, args: tuple, kwargs: dict, acts: list, params: list[ParamRef],
                 outs: list[Tensor]) -> None:
        p = params[0]
        if name in CAT and len(outs) == 1:
            return self.cat(args, kwargs, outs[0])
        if not acts and len(params) == 1 and len(outs) == 1:
            if name in ("expand", "view", "reshape", "unsqueeze", "squeeze", "__getitem__", "contiguous", "to",
                        "type_as", "repeat", "expand_as"):
                return self.set(outs[0], ParamRef(p.name, outs[0]))
        if len(acts) == 1 and len(params) == 1 and isinstance(acts[0][1], Feat) and len(outs) == 1 \
                and (name in ADD or name in MUL):
            t, v = acts[0]
            out = outs[0]
            g = self.find(v.group)
            pshape = tuple(self.module.get_parameter(p.name).shape)
            last_feature = v.axes == (t.dim() - 1,) and out.shape == t.shape
            per_neuron = math.prod(pshape) == self.groups[g].size and len(v.axes) == 1 and out.shape == t.shape \
                and _along(pshape, out.dim(), v.axes[0], self.groups[g].size)
            if per_neuron and self.current(v):
                self.use(p.name, f"{name} {p.name}")
                self.link(p.name, "bias" if name in ADD else "norm", -1, g)
                return self.set(out, Feat(g, v.axes, v.version))
            if name in ADD and last_feature and self.current(v):
                self.embed_param(p, g, name)
                return self.set(out, Feat(g, v.axes, v.version))
        raise TraceRefused(f"parameter {p.name} is used by {name} outside a recognised layer (nn.Linear, "
                           "convolutions, norms, embeddings, attention); its place in the graph is unknown. "
                           + _hint([p.name]))

    def probe(self, func: Callable, args: tuple, kwargs: dict, t: Tensor, v: Feat, o: Tensor,
              outs: list[Tensor]) -> tuple[int, ...] | None:
        """Push a tensor of neuron ids through ``func`` in place of ``t``: where do the neurons end up?"""
        n = self.groups[self.find(v.group)].size
        name = getattr(func, "__name__", "")
        if (name.endswith("_") and not name.endswith("__")) or "out" in kwargs:  # would write into the model
            return None
        probe = _probe_tensor(t.shape, v.axes, t.device)
        swap = lambda a: probe if a is t else a  # noqa: E731
        try:
            res = func(*_map(args, swap), **{k: _map(x, swap) for k, x in kwargs.items()})
        except Exception:  # noqa: BLE001 - an op the probe cannot go through is not a neuron-preserving one
            return None
        res_list = _tensors(res)
        if len(res_list) != len(outs):
            return None
        r = res_list[outs.index(o)] if o in outs else None
        if r is None or r.shape != o.shape:
            return None
        return _read_probe(r, n)

    # --------------------------------------------------------------- hooks
    def pre_hook(self, m: nn.Module, args: tuple, kwargs: dict) -> None:
        self.depth += 1

    def post_hook(self, m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        self.depth -= 1
        if self.depth == 0:
            with torch._C.DisableTorchFunction():
                self.on_leaf(m, args, kwargs, out)

    # --------------------------------------------------------------- result
    def topology(self, kept: list[str]) -> Topology:
        unused = [n for n in kept if n not in self.used]
        if unused:
            more = f" (and {len(unused) - 5} more)" if len(unused) > 5 else ""
            raise TraceRefused(f"parameters {unused[:5]}{more} are not used by the forward pass on the example input, "
                               "so they have no place in the graph. " + _hint(unused[:5]))
        # a set of neurons several branches write (word + position embeddings) is laid out where its last
        # writer's would be: after the position ids, as the reference's GPT-2 graph has it (§2.6.2)
        last = {}
        for i in range(len(self.groups)):
            last[self.find(i)] = i
        order = sorted(last, key=lambda r: last[r])
        roots = {r: k for k, r in enumerate(order)}
        groups = [(self.groups[r].name, self.groups[r].size) for r in order]
        idx = lambda g: -1 if g == -1 else roots[self.find(g)]  # noqa: E731
        links = tuple(dataclasses.replace(lk, src=idx(lk.src), dst=idx(lk.dst), at=idx(lk.at)) for lk in self.links)
        left = tuple((n, "leave_out " + repr(next(p for p in self.leave_out if n == p or n.startswith(p + "."))))
                     for n, _ in self.module.named_parameters() if self.left_out(n))
        return Topology(tuple(groups), links, None if self.tokens is None else idx(self.tokens), left)


# ----------------------------------------------------------------------------------------- helpers
def _hint(names: Iterable[str]) -> str:
    return "To nowcast the rest, " + LEAVE_OUT_HINT.format(names=", ".join(repr(n) for n in names))


def _tensors(x: Any) -> list[Tensor]:
    """Tensors inside (nested) tuples, lists, dicts and ModelOutput objects, in order."""
    if isinstance(x, Tensor):
        return [x]
    if isinstance(x, dict):
        x = list(x.values())
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _tensors(item)]
    return []


def _map(x: Any, f: Callable) -> Any:
    if isinstance(x, (list, tuple)) and not hasattr(x, "_fields"):
        return type(x)(_map(i, f) for i in x)
    return f(x)


def _broadcast(t: Tensor, out: Tensor) -> torch.Size:
    """The shape ``t`` takes when broadcast to ``out``'s rank (so an elementwise op kept every neuron)."""
    extra = out.dim() - t.dim()
    if extra < 0:
        return t.shape
    return torch.Size([out.shape[i] if i < extra else (out.shape[i] if t.shape[i - extra] == 1 else
                                                      t.shape[i - extra]) for i in range(out.dim())])


def _along(pshape: tuple[int, ...], ndim: int, axis: int, n: int) -> bool:
    """Does a parameter of shape ``pshape`` broadcast against an ndim tensor one value per neuron of ``axis``?"""
    full = (1,) * (ndim - len(pshape)) + tuple(pshape)
    return len(full) == ndim and full[axis] == n and all(d == 1 for i, d in enumerate(full) if i != axis)


def _probe_tensor(shape: torch.Size, axes: tuple[int, ...], device: torch.device) -> Tensor:
    """float64 tensor of ``shape`` holding the neuron id (row-major over ``axes``) at every position."""
    sizes = [shape[a] for a in axes]
    ids = torch.arange(math.prod(sizes), dtype=torch.float64, device=device).reshape(sizes)
    order = sorted(range(len(axes)), key=lambda i: axes[i])
    ids = ids.permute(order) if axes else ids
    view = [shape[k] if k in axes else 1 for k in range(len(shape))]
    return ids.reshape(view).expand(shape).contiguous()


def _read_probe(r: Tensor, n: int) -> tuple[int, ...] | None:
    """The axes (neuron-major) along which ``r`` enumerates neuron ids 0..n-1 exactly once, constant elsewhere."""
    if r.numel() == 0 or not r.is_floating_point():
        return None
    r = r.to(torch.float64)
    varying = [k for k in range(r.dim()) if r.shape[k] > 1 and not bool((r.narrow(k, 0, 1) == r).all())]
    if math.prod(r.shape[k] for k in varying) != n or float(r.reshape(-1)[0]) != 0.0:
        return None
    steps = {}
    for k in varying:
        idx = [0] * r.dim()
        idx[k] = 1
        steps[k] = float(r[tuple(idx)])
    order = sorted(varying, key=lambda k: -steps[k])
    stride = 1
    expected = torch.zeros(r.shape, dtype=torch.float64, device=r.device)
    for k in reversed(order):
        if steps[k] != stride:
            return None
        view = [1] * r.dim()
        view[k] = r.shape[k]
        expected = expected + torch.arange(r.shape[k], dtype=torch.float64, device=r.device).reshape(view) * stride
        stride *= r.shape[k]
    return tuple(order) if bool((expected == r).all()) else None


# ----------------------------------------------------------------------------------------- entry point
def example_input(module: nn.Module) -> Any:
    """A small input the model accepts, guessed from its config or its first layer."""
    p = next(module.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "image_size") and hasattr(config, "num_channels"):
        s = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
        return {"pixel_values": torch.randn(1, config.num_channels, s, s, device=device, dtype=dtype)}
    if config is not None and isinstance(getattr(config, "vocab_size", None), int):
        n = min(8, getattr(config, "max_position_embeddings", 8) or 8)
        return {"input_ids": torch.randint(0, config.vocab_size, (1, n), device=device)}
    for m in module.modules():
        if isinstance(m, nn.Linear):
            return torch.randn(2, m.in_features, device=device, dtype=dtype)
        if isinstance(m, CONVS):
            side = {1: 32, 2: 32, 3: 8}[len(m.kernel_size)]
            return torch.randn(2, m.in_channels, *([side] * len(m.kernel_size)), device=device, dtype=dtype)
        if isinstance(m, nn.Embedding):
            return torch.randint(0, m.num_embeddings, (2, 8), device=device)
        if isinstance(m, nn.MultiheadAttention):
            return torch.randn(2, 8, m.embed_dim, device=device, dtype=dtype)
        if isinstance(m, nn.RNNBase):
            return torch.randn(2, 5, m.input_size, device=device, dtype=dtype) if m.batch_first else \
                torch.randn(5, 2, m.input_size, device=device, dtype=dtype)
    raise TraceRefused(f"cannot guess an example input for {type(module).__name__}; pass one: "
                       "ModelSpec.from_module(model, example_input=...)")


def _run(tracer: _Trace, module: nn.Module, example: Any) -> None:
    """One forward pass with the model inputs marked as such."""
    for t in (list(example.values()) if isinstance(example, dict) else _tensors(example)):
        if isinstance(t, Tensor) and t.is_floating_point():
            tracer.set(t, RAW)
    if isinstance(example, dict):
        module(**example)
    elif isinstance(example, tuple):
        module(*example)
    else:
        module(example)


def trace_topology(module: nn.Module, example: Any = None, leave_out: Sequence[str] = ()) -> Topology:
    """The topology of ``module`` (its parameters minus ``leave_out``: names or module prefixes), from one
    forward pass on ``example`` (guessed when None) in eval mode; a module without a forward of its own (a
    ModuleDict, a LightningModule) is traced part by part, each direct child on its own guessed input. Raises
    TraceRefused naming the layer whose graph cannot be derived faithfully."""
    guessed = example is None
    if guessed:
        example = example_input(module)
    llama = is_hf_llama(module)
    tracer = _Trace(module, leave_out, llama)
    hooks = []
    modes = {m: m.training for m in module.modules()}
    for prefix, m in module.named_modules():
        # a Llama block with tensors left out is traced layer by layer (its data flow), not as the reference's unit
        whole = llama and not any(tracer.left_out(n) for n, _ in m.named_parameters(prefix=prefix))
        if is_leaf(m, whole):
            hooks.append(m.register_forward_pre_hook(tracer.pre_hook, with_kwargs=True))
            hooks.append(m.register_forward_hook(tracer.post_hook, with_kwargs=True))
    module.eval()
    try:
        with tracer:
            try:
                _run(tracer, module, example)
            except NotImplementedError as e:  # no forward of its own (ModuleDict, a LightningModule): its parts
                if 'missing the required "forward"' not in str(e) or not guessed:
                    raise
                for child in module.children():
                    if any(True for _ in child.parameters()):
                        tracer.depth = 0
                        _run(tracer, child, example_input(child))
    except TraceRefused:
        raise
    except Exception as e:  # noqa: BLE001 - the model's own error, reported with where it came from
        what = "a guessed example input" if guessed else "the example input"
        shapes = [list(t.shape) for t in _tensors(example)]
        raise TraceRefused(f"running {type(module).__name__} on {what} {shapes} failed ({type(e).__name__}: "
                           f"{e}); pass an input the model accepts: ModelSpec.from_module(model, example_input=...), and that spec "
                           "to NowcastOptimizer(spec=...)") from e
    finally:
        for h in hooks:
            h.remove()
        for m, training in modes.items():
            m.train(training)
    names = [n for n, _ in module.named_parameters()]
    for p in leave_out:
        if not any(n == p or n.startswith(p + ".") for n in names):
            raise TraceRefused(f"leave_out {p!r} matches no parameter name or module of {type(module).__name__}")
    kept = [n for n in names if not tracer.left_out(n)]
    return tracer.topology(kept)

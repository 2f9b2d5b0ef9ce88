"""GPT-2 and Llama neural graphs (NINO_SPEC §2.6): the parameter list is expanded with virtual tensors (heads,
residuals), nodes are laid out block by block as in the tables of §2.6.2 / §2.6.3, and edges follow the
expanded list grouped by module (§2.3.3).

The node layout is written out explicitly rather than derived from the generic offset rule: the tables are
what was verified against the reference, and they make the Llama quirks (§2.6.4) visible in the code.
``param_slot`` always maps the ORIGINAL flat vector: the fused GPT-2 ``c_attn`` tensors are read through
column windows, Llama weights are stored (out, in).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ninocast.spec import (GPT2_BLOCK, GPT2_BLOCK_PREFIX, LLAMA_BLOCK, LLAMA_BLOCK_PREFIX, ModelSpec, SpecError,
                           outer_prefix)

from .generic import (T_BIAS, T_CONV, T_FC, T_HEAD, T_KEY, T_NORM, T_POS, T_QUERY, T_RES, T_SELF_LOOP, T_TOKEN,
                      T_VALUE, EdgeBlock, GraphLayout, ParamMap, order_by_module)


@dataclass(frozen=True)
class _Names:
    """Tensor-name endings the §2.2 transformer type rules look for."""

    token: str
    pos: str | None
    query: str
    key: str
    value: str


GPT2_NAMES = _Names("wte.weight", "wpe.weight", "c_attn.q.weight", "c_attn.k.weight", "c_attn.v.weight")
LLAMA_NAMES = _Names("embed_tokens.weight", None, "q_proj.weight", "k_proj.weight", "v_proj.weight")



def transformer_type(name: str, ndim: int, names: _Names) -> int:
    """Edge type of an (expanded) tensor in a transformer graph (§2.2, first matching rule wins)."""
    plain = not name.endswith(".weight") and not name.endswith(".bias")
    if ndim == 1 and name.endswith(".weight"):
        return T_NORM
    if ndim in (2, 3) and name.endswith(names.token):
        return T_TOKEN
    if ndim in (2, 3) and names.pos is not None and name.endswith(names.pos):
        return T_POS
    if ndim == 2 and name.endswith(names.query):
        return T_QUERY
    if ndim == 2 and name.endswith(names.key):
        return T_KEY
    if ndim == 2 and name.endswith(names.value):
        return T_VALUE
    if ndim == 4:
        return T_CONV
    if ndim == 2 and "embed" not in name:
        return T_FC
    if plain and ".head" in name:
        return T_HEAD
    if plain and ".self_loop" in name:
        return T_SELF_LOOP
    if plain and ".res" in name:
        return T_RES
    return T_BIAS


# --------------------------------------------------------------------------------------------- parsing
def strip_outer_prefix(spec: ModelSpec) -> ModelSpec:
    """The spec with the Hugging Face model's outer name prefix removed (``model.`` when a LightningModule holds
    it as ``self.model``): the graph, the edge types and the flat layout are those of the bare model."""
    prefix = outer_prefix(spec.names, spec.family)
    if not prefix:
        return spec
    outside = [n for n in spec.names if not n.startswith(prefix)]
    if outside:
        raise SpecError(f"{outside[0]}: outside the {spec.family} model's prefix {prefix!r} (leave such tensors "
                        f"out of the spec)")
    return ModelSpec(spec.family, tuple((n[len(prefix):], s) for n, s in spec.params), spec.num_heads,
                     spec.num_key_value_heads)


@dataclass
class _Parsed:
    """A spec cut into tensors before the blocks, the blocks (in order) and tensors after them."""

    pre: dict[str, tuple[str, tuple[int, ...], int]] = field(default_factory=dict)  # role -> (name, shape, start)
    blocks: list[tuple[int, dict[str, tuple[str, tuple[int, ...], int]]]] = field(default_factory=list)
    post: dict[str, tuple[str, tuple[int, ...], int]] = field(default_factory=dict)


def _parse(spec: ModelSpec, prefix: str, block_keys: tuple[str, ...], pre_roles: dict[str, str],
           post_roles: dict[str, str]) -> _Parsed:
    """Sort every tensor into pre / block / post by name, with the order and completeness checks a layout needs."""
    out = _Parsed()
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.(.+)$")
    seen_blocks: set[int] = set()
    for p in spec.layout:
        entry = (p.name, p.shape, p.start)
        m = pattern.match(p.name)
        if m:
            b, key = int(m.group(1)), m.group(2)
            if key not in block_keys:
                raise SpecError(f"{p.name}: unexpected tensor in a {spec.family} block (expected one of "
                                f"{', '.join(block_keys)})")
            if out.post:
                after = ", ".join(v[0] for v in out.post.values())
                raise SpecError(f"{p.name}: block tensors must come before {after}")
            if not out.blocks or out.blocks[-1][0] != b:
                if b in seen_blocks:
                    raise SpecError(f"{p.name}: the tensors of block {b} are not contiguous")
                seen_blocks.add(b)
                out.blocks.append((b, {}))
            out.blocks[-1][1][key] = entry
            continue
        roles = post_roles if out.blocks else pre_roles
        role = next((r for suffix, r in roles.items() if p.name.endswith(suffix)), None)
        if role is None:
            where = "after" if out.blocks else "before"
            raise SpecError(f"{p.name}: not a tensor a {spec.family} graph can place {where} the blocks "
                            f"(expected names ending in {', '.join(roles)})")
        table = out.post if out.blocks else out.pre
        if role in table:
            raise SpecError(f"{p.name}: a second '{role}' tensor ({table[role][0]} came first)")
        table[role] = entry
    if not out.blocks:
        raise SpecError(f"a {spec.family} graph needs at least one block ('{prefix}<i>.' tensors)")
    for b, tensors in out.blocks:
        missing = [k for k in block_keys if k not in tensors]
        if missing:
            raise SpecError(f"block {prefix}{b}. is missing {', '.join(missing)}")
    return out


def _check_shape(name: str, shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if tuple(shape) != tuple(expected):
        raise SpecError(f"{name}: expected shape {list(expected)}, got {list(shape)}")


class _Nodes:
    """Hands out consecutive node ids."""

    def __init__(self) -> None:
        self.n = 0

    def take(self, count: int) -> tuple[int, int]:
        first, self.n = self.n, self.n + count
        return first, count

    def one(self) -> tuple[int, int]:
        return self.take(1)


def _heads(name: str, heads: tuple[int, int], dst: tuple[int, int], count: int) -> list[EdgeBlock]:
    """Head node h -> the dst neurons of head h (virtual, type 11), for h < count."""
    size = dst[1] // count
    return [EdgeBlock(f"{name}{h}", T_HEAD, (heads[0] + h, 1), (dst[0] + h * size, size)) for h in range(count)]


# --------------------------------------------------------------------------------------------- GPT-2
def gpt2_layout(spec: ModelSpec) -> GraphLayout:
    """§2.6.2: HF GPT2LMHeadModel (tied lm_head absent); Conv1D weights are stored (in, out)."""
    spec = strip_outer_prefix(spec)
    parsed = _parse(spec, GPT2_BLOCK_PREFIX, GPT2_BLOCK, {"wte.weight": "wte", "wpe.weight": "wpe"},
                    {"ln_f.weight": "ln_f.weight", "ln_f.bias": "ln_f.bias"})
    H = spec.num_heads
    assert H is not None  # ModelSpec validation
    d = parsed.blocks[0][1]["attn.c_attn.weight"][1][0]
    for b, t in parsed.blocks:
        f = t["mlp.c_fc.weight"][1][1] if len(t["mlp.c_fc.weight"][1]) == 2 else -1
        for key, shape in (("ln_1.weight", (d,)), ("ln_1.bias", (d,)), ("attn.c_attn.weight", (d, 3 * d)),
                           ("attn.c_attn.bias", (3 * d,)), ("attn.c_proj.weight", (d, d)),
                           ("attn.c_proj.bias", (d,)), ("ln_2.weight", (d,)), ("ln_2.bias", (d,)),
                           ("mlp.c_fc.weight", (d, f)), ("mlp.c_fc.bias", (f,)), ("mlp.c_proj.weight", (f, d)),
                           ("mlp.c_proj.bias", (d,))):
            _check_shape(t[key][0], t[key][1], shape)
    for role, (name, shape, _) in list(parsed.pre.items()) + list(parsed.post.items()):
        _check_shape(name, shape, (shape[0], d) if role in ("wte", "wpe") else (d,))

    # ---- nodes, in id order (table of §2.6.2)
    nodes = _Nodes()
    wte, wpe = parsed.pre.get("wte"), parsed.pre.get("wpe")
    tok = nodes.take(wte[1][0]) if wte else None
    posn = nodes.take(wpe[1][0]) if wpe else None
    per_block = []
    for _, t in parsed.blocks:
        n: dict[str, tuple[int, int]] = {}
        n["ln_1.weight"], n["ln_1.bias"], n["k.bias"] = nodes.one(), nodes.one(), nodes.one()
        n["X"], n["heads"] = nodes.take(d), nodes.take(H)
        n["q.bias"], n["v.bias"] = nodes.one(), nodes.one()
        n["Q"], n["V"] = nodes.take(d), nodes.take(d)
        n["attn.c_proj.bias"], n["ln_2.weight"], n["ln_2.bias"] = nodes.one(), nodes.one(), nodes.one()
        n["M"], n["mlp.c_fc.bias"] = nodes.take(d), nodes.one()
        n["Hid"] = nodes.take(t["mlp.c_fc.weight"][1][1])
        n["mlp.c_proj.bias"] = nodes.one()  # opens the aux block of the next stream X_{b+1}
        per_block.append(n)
    final_aux = {role: nodes.one() for role in ("ln_f.weight", "ln_f.bias") if role in parsed.post}
    streams = [n["X"] for n in per_block] + [nodes.take(d)]

    # ---- edges, in expanded parameter order
    def conv1d(start: int, rows: int, cols: int, row_len: int = 0, col: int = 0) -> ParamMap:
        return ParamMap(start, rows, cols, out_first=False, row_len=row_len, col=col)

    typ = lambda name, ndim: transformer_type(name, ndim, GPT2_NAMES)  # noqa: E731
    blocks: list[EdgeBlock] = []
    x0 = streams[0]
    for role, (name, shape, start) in parsed.pre.items():
        src = tok if role == "wte" else posn
        blocks.append(EdgeBlock(name, typ(name, 2), src, x0, "src", conv1d(start, shape[0], d)))
    for i, ((b, t), n) in enumerate(zip(parsed.blocks, per_block)):
        pre = f"{GPT2_BLOCK_PREFIX}{b}."
        x, x_next, hid = streams[i], streams[i + 1], n["Hid"]
        for key, (name, shape, start) in t.items():
            if key in ("ln_1.weight", "ln_1.bias"):
                blocks.append(EdgeBlock(name, typ(name, 1), n[key], x, "src", conv1d(start, 1, d)))
            elif key == "attn.c_attn.weight":
                fused = f"{pre}attn.c_attn."
                blocks.append(EdgeBlock(fused + "q.weight", typ(fused + "q.weight", 2), x, n["Q"], "src",
                                        conv1d(start, d, d, 3 * d, 0)))
                blocks += _heads(fused + "q.head", n["heads"], n["Q"], H)
                blocks.append(EdgeBlock(fused + "k.weight", typ(fused + "k.weight", 2), n["Q"], x, "dst",
                                        conv1d(start, d, d, 3 * d, d)))
                blocks.append(EdgeBlock(fused + "v.weight", typ(fused + "v.weight", 2), x, n["V"], "src",
                                        conv1d(start, d, d, 3 * d, 2 * d)))
                blocks += _heads(fused + "v.head", n["heads"], n["V"], H)
            elif key == "attn.c_attn.bias":
                fused = f"{pre}attn.c_attn."
                for j, (part, dst) in enumerate((("q", n["Q"]), ("k", x), ("v", n["V"]))):
                    bias = f"{fused}{part}.bias"
                    blocks.append(EdgeBlock(bias, typ(bias, 1), n[f"{part}.bias"], dst, "src",
                                            conv1d(start, 1, d, 3 * d, j * d)))
                blocks.append(EdgeBlock(fused + "v.res", T_RES, x, n["M"], "diag"))
            elif key == "attn.c_proj.weight":
                blocks.append(EdgeBlock(name, typ(name, 2), n["V"], n["M"], "src", conv1d(start, d, d)))
            elif key in ("attn.c_proj.bias", "ln_2.weight", "ln_2.bias"):
                blocks.append(EdgeBlock(name, typ(name, 1), n[key], n["M"], "src", conv1d(start, 1, d)))
            elif key == "mlp.c_fc.weight":
                blocks.append(EdgeBlock(name, typ(name, 2), n["M"], hid, "src", conv1d(start, d, hid[1])))
            elif key == "mlp.c_fc.bias":
                blocks.append(EdgeBlock(name, typ(name, 1), n[key], hid, "src", conv1d(start, 1, hid[1])))
                blocks.append(EdgeBlock(f"{pre}mlp.c_fc.res", T_RES, n["M"], x_next, "diag"))
            elif key == "mlp.c_proj.weight":
                blocks.append(EdgeBlock(name, typ(name, 2), hid, x_next, "src", conv1d(start, hid[1], d)))
            else:  # mlp.c_proj.bias
                blocks.append(EdgeBlock(name, typ(name, 1), n[key], x_next, "src", conv1d(start, 1, d)))
    for role, (name, _, start) in parsed.post.items():
        blocks.append(EdgeBlock(name, typ(name, 1), final_aux[role], streams[-1], "src", conv1d(start, 1, d)))
    return GraphLayout(nodes.n, order_by_module(blocks), 1, (tok[0], tok[1]) if tok else None)


# --------------------------------------------------------------------------------------------- Llama
def llama_layout(spec: ModelSpec) -> GraphLayout:
    """§2.6.3 with the quirks of §2.6.4: HF LlamaForCausalLM without biases, weights stored (out, in)."""
    spec = strip_outer_prefix(spec)
    parsed = _parse(spec, LLAMA_BLOCK_PREFIX, LLAMA_BLOCK, {"embed_tokens.weight": "embed"},
                    {"norm.weight": "norm", "lm_head.weight": "lm_head"})
    H, KV = spec.num_heads, spec.kv_heads
    assert H is not None and KV is not None  # ModelSpec validation
    t0 = parsed.blocks[0][1]
    d = t0["self_attn.q_proj.weight"][1][1]
    dq = t0["self_attn.q_proj.weight"][1][0]
    dkv = t0["self_attn.k_proj.weight"][1][0]
    if dkv > dq:
        raise SpecError(f"{t0['self_attn.k_proj.weight'][0]}: key/value size {dkv} exceeds query size {dq}")
    for b, t in parsed.blocks:
        f = t["mlp.gate_proj.weight"][1][0]
        for key, shape in (("self_attn.q_proj.weight", (dq, d)), ("self_attn.k_proj.weight", (dkv, d)),
                           ("self_attn.v_proj.weight", (dkv, d)), ("self_attn.o_proj.weight", (d, dq)),
                           ("mlp.gate_proj.weight", (f, d)), ("mlp.up_proj.weight", (f, d)),
                           ("mlp.down_proj.weight", (d, f)), ("input_layernorm.weight", (d,)),
                           ("post_attention_layernorm.weight", (d,))):
            _check_shape(t[key][0], t[key][1], shape)
    for role, (name, shape, _) in list(parsed.pre.items()) + list(parsed.post.items()):
        _check_shape(name, shape, (d,) if role == "norm" else (shape[0], d))

    # ---- nodes, in id order (table of §2.6.3)
    nodes = _Nodes()
    embed, lm_head = parsed.pre.get("embed"), parsed.post.get("lm_head")
    tok = nodes.take(embed[1][0]) if embed else None
    streams = [nodes.take(d)]
    per_block = []
    for i, (_, t) in enumerate(parsed.blocks):
        n = {"heads": nodes.take(H), "Q": nodes.take(dq), "V": nodes.take(dkv), "M": nodes.take(d),
             "U": nodes.take(d), "Hid": nodes.take(t["mlp.gate_proj.weight"][1][0]),
             "input_layernorm.weight": nodes.one(), "post_attention_layernorm.weight": nodes.one()}
        if i == len(parsed.blocks) - 1 and "norm" in parsed.post:
            n["norm"] = nodes.one()
        streams.append(nodes.take(d))
        per_block.append(n)
    out = nodes.take(lm_head[1][0]) if lm_head else None

    # ---- edges, in expanded parameter order
    def linear(start: int, shape: tuple[int, ...]) -> ParamMap:
        return ParamMap(start, shape[0], shape[1] if len(shape) == 2 else 1, out_first=True)

    typ = lambda name, ndim: transformer_type(name, ndim, LLAMA_NAMES)  # noqa: E731
    blocks: list[EdgeBlock] = []
    if embed:
        # quirk 6: edges T[v] -> X_0[j] are source-major, values are read as from an (out=V, in=d) weight
        name, shape, start = embed
        blocks.append(EdgeBlock(name, typ(name, 2), tok, streams[0], "src", linear(start, shape)))
    for i, ((b, t), n) in enumerate(zip(parsed.blocks, per_block)):
        pre = f"{LLAMA_BLOCK_PREFIX}{b}."
        x, x_next = streams[i], streams[i + 1]
        q, v = n["Q"], n["V"]
        for key, (name, shape, start) in t.items():
            pm = linear(start, shape)
            if key == "self_attn.q_proj.weight":
                blocks.append(EdgeBlock(name, typ(name, 2), x, q, "src", pm))
                blocks += _heads(f"{pre}self_attn.q_proj.head", n["heads"], q, H)
            elif key == "self_attn.k_proj.weight":  # quirk 3: from the first dkv query nodes, target-major
                blocks.append(EdgeBlock(name, typ(name, 2), (q[0], dkv), x, "dst", pm))
            elif key == "self_attn.v_proj.weight":  # quirk 2: value head h on head node h
                blocks.append(EdgeBlock(name, typ(name, 2), x, v, "src", pm))
                blocks += _heads(f"{pre}self_attn.v_proj.head", n["heads"], v, KV)
                blocks.append(EdgeBlock(f"{pre}self_attn.v_proj.res", T_RES, x, n["M"], "diag"))
            elif key == "self_attn.o_proj.weight":  # quirk 1: the dq ids ending at the last value node
                blocks.append(EdgeBlock(name, typ(name, 2), (v[0] + v[1] - dq, dq), n["M"], "src", pm))
            elif key == "mlp.gate_proj.weight":
                blocks.append(EdgeBlock(name, typ(name, 2), n["M"], n["Hid"], "src", pm))
                blocks.append(EdgeBlock(f"{pre}mlp.gate_proj.res", T_RES, n["M"], x_next, "diag"))
            elif key == "mlp.up_proj.weight":  # quirk 4: separate input copy U
                blocks.append(EdgeBlock(name, typ(name, 2), n["U"], n["Hid"], "src", pm))
                blocks.append(EdgeBlock(f"{pre}mlp.up_proj.res", T_RES, n["U"], x_next, "diag"))
            elif key == "mlp.down_proj.weight":
                blocks.append(EdgeBlock(name, typ(name, 2), n["Hid"], x_next, "src", pm))
            else:  # quirk 5: both norms attach to the block output
                blocks.append(EdgeBlock(name, typ(name, 1), n[key], x_next, "src", pm))
    for role, (name, shape, start) in parsed.post.items():
        if role == "norm":
            blocks.append(EdgeBlock(name, typ(name, 1), per_block[-1]["norm"], streams[-1], "src",
                                    linear(start, shape)))
        else:
            blocks.append(EdgeBlock(name, typ(name, 2), streams[-1], out, "src", linear(start, shape)))
    return GraphLayout(nodes.n, order_by_module(blocks), 1, (tok[0], tok[1]) if tok else None)

"""A zoo of everyday architectures for the traced-graph tests, and the structural oracle that checks a traced
topology against the model's real data flow.

The oracle: for every layer P that writes a group of neurons and every layer C that reads a group, add a
perturbation to output feature j of P and measure how much each input feature of C changes. A *direct*
connection (through activations, norms, pooling, reshapes, residual additions, attention over positions) moves
C's input feature i = j far more than any other; a connection through another layer's weights spreads the
change. The topology must connect P's neuron j to C's input i exactly when the data flow is direct.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ninocast.topology import Topology

# ----------------------------------------------------------------------------------------------- models


class BasicBlock(nn.Module):
    """torchvision-style ResNet basic block: two 3x3 conv+BN, identity or 1x1 conv+BN downsampling skip."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return torch.relu(out)


class ResNet(nn.Module):
    """A small torchvision-style ResNet (3x3 stem by default; ``stem=7`` is the ImageNet 7x7 stem)."""

    def __init__(self, stem: int = 3, widths: tuple[int, ...] = (8, 8, 16), classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], stem, 1, stem // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths[1:]):
            blocks.append(BasicBlock(cin, w, 1 if w == cin else 2))
            cin = w
        self.layer1 = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class UNet(nn.Module):
    """Encoder-decoder with a channel-concatenated skip (upsampling by interpolation)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.enc2 = nn.Sequential(nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.ReLU())
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.dec = nn.Sequential(nn.Conv2d(20, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        return self.head(self.dec(torch.cat([self.up(e2), e1], dim=1)))


class MixerBlock(nn.Module):
    def __init__(self, tokens: int, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mix = nn.Sequential(nn.Linear(tokens, 8), nn.GELU(), nn.Linear(8, tokens))
        self.norm2 = nn.LayerNorm(dim)
        self.channel_mix = nn.Sequential(nn.Linear(dim, 16), nn.GELU(), nn.Linear(16, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.token_mix(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mix(self.norm2(x))


class Mixer(nn.Module):
    """MLP-Mixer: patches -> token-mixing and channel-mixing MLPs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 2, stride=2)
        self.block = MixerBlock(16, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).flatten(2).transpose(1, 2)
        return self.head(self.block(x).mean(1))


class Conv1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(2, 6, 3, padding=1), nn.BatchNorm1d(6), nn.ReLU(),
                                  nn.Conv1d(6, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool1d(1), nn.Flatten())
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


class LSTMClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 6)
        self.rnn = nn.LSTM(6, 8, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(x))
        return self.head(out[:, -1])


def _hf(name: str) -> nn.Module:
    import transformers as tf

    if name == "bert":
        return tf.BertModel(tf.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=32, max_position_embeddings=16))
    if name == "vit":
        # no pooler: it reads only the class-token position, which the patch convolution never writes (neural
        # graphs have no nodes for positions, so the oracle would see that link only through attention)
        return tf.ViTModel(tf.ViTConfig(image_size=12, patch_size=3, num_channels=3, hidden_size=16,
                                        num_hidden_layers=2, num_attention_heads=2, intermediate_size=32),
                           add_pooling_layer=False)
    if name == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(vocab_size=30, hidden_size=16, intermediate_size=32,
                                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                  max_position_embeddings=32))
    if name == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=8, n_layer=2, n_head=2, vocab_size=11, n_positions=8))
    if name == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                                                  num_attention_heads=2, num_key_value_heads=2, vocab_size=11))
    raise KeyError(name)


@dataclass
class Case:
    build: Callable[[], nn.Module]
    example: Callable[[], Any] | None  # None: from_module guesses
    expect: str  # "traced" | "chain" (no topology, generic graph) | "family" (hand-written) | "refused"
    #            | "reference" (traced into the reference's layout, quirks included: the hand-written graph)
    refusal: str = ""  # words the refusal must contain
    family: str = "auto"  # "generic": trace even GPT-2 / Llama


def _image(c: int = 3, s: int = 8) -> Callable[[], torch.Tensor]:
    return lambda: torch.randn(2, c, s, s)


ZOO: dict[str, Case] = {
    "mlp": Case(lambda: nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3)),
                None, "chain"),
    "convnet": Case(lambda: __import__("ninocast_server.tasks.vision", fromlist=["Net"]).Net((4, 6, 6)),
                    _image(1, 12), "chain"),
    "resnet": Case(ResNet, _image(3, 8), "traced"),
    "resnet-7x7-stem": Case(lambda: ResNet(stem=7), _image(3, 8), "refused", "7x7 kernel"),
    "unet": Case(UNet, _image(3, 8), "traced"),
    "conv1d": Case(Conv1dNet, lambda: torch.randn(2, 2, 10), "traced"),
    "transformer-encoder": Case(lambda: nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0,
                                                                                         batch_first=True), 2),
                                lambda: torch.randn(2, 5, 16), "traced"),
    "mlp-mixer": Case(Mixer, _image(3, 8), "refused", "token mixing"),
    "lstm": Case(LSTMClassifier, lambda: torch.randn(2, 4, 3), "refused", "recurrent"),
    "conv3d-3x3x3": Case(lambda: nn.Sequential(nn.Conv3d(1, 2, 3), nn.ReLU(), nn.Conv3d(2, 2, 1)), None, "refused",
                         "values per edge"),
    "bert": Case(lambda: _hf("bert"), None, "traced"),
    "vit": Case(lambda: _hf("vit"), None, "traced"),
    "qwen2-gqa": Case(lambda: _hf("qwen2"), None, "traced"),
    "gpt2": Case(lambda: _hf("gpt2"), None, "family"),
    "llama": Case(lambda: _hf("llama"), None, "family"),
    "llama-traced": Case(lambda: _hf("llama"), None, "reference", family="generic"),
    "gpt2-traced": Case(lambda: _hf("gpt2"), None, "traced", family="generic"),
}


# ----------------------------------------------------------------------------------------------- the oracle
def _layer_of(model: nn.Module, param: str, consumer: bool) -> tuple[nn.Module, int] | None:
    """The module whose call reads (``consumer``) or writes a link's tensor, and its feature axis; None when no
    module call shows it (nn.MultiheadAttention applies out_proj without calling it: its input is unseen)."""
    owner_name = param.rsplit(".", 1)[0]
    owner = model.get_submodule(owner_name) if owner_name else model
    if owner_name.endswith("out_proj") and "." in owner_name:
        parent = model.get_submodule(owner_name.rsplit(".", 1)[0])
        if isinstance(parent, nn.MultiheadAttention):
            return None if consumer else (parent, -1)
    if isinstance(owner, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return owner, 1
    if isinstance(owner, (nn.Linear, nn.Embedding, nn.MultiheadAttention)) or type(owner).__name__ == "Conv1D":
        return owner, -1
    return None


def expected_targets(topo: Topology) -> dict[int, dict[int, Callable[[int], set[int]]]]:
    """group g -> {producer link index: neuron j of the producer -> the neurons of g it directly becomes}."""
    sizes = [s for _, s in topo.groups]
    direct: dict[int, dict[int, Callable[[int], set[int]]]] = {g: {} for g in range(len(sizes))}
    for i, lk in enumerate(topo.links):
        if lk.role in ("fc", "conv", "value", "token", "pos") and not lk.rows:
            direct[lk.dst][i] = lambda j: {j}
    changed = True
    while changed:  # follow residual / concatenation links until nothing new
        changed = False
        for lk in topo.links:
            if lk.role != "res":
                continue
            count = lk.rows or sizes[lk.src]
            for p, f in list(direct[lk.src].items()):
                def mapped(j: int, f=f, lk=lk, count=count) -> set[int]:
                    return {u - lk.offset + lk.dst_offset for u in f(j) if lk.offset <= u < lk.offset + count}
                old = direct[lk.dst].get(p)
                new = mapped if old is None else (lambda j, a=old, b=mapped: a(j) | b(j))
                if old is None or any(new(j) != old(j) for j in range(min(sizes[lk.src], 64))):
                    direct[lk.dst][p] = new
                    changed = True
    return direct


def check_dataflow(model: nn.Module, topo: Topology, example: Any, probes: int = 3, delta: float = 1.0) -> list[str]:
    """Disagreements between the topology and the data flow (empty: verified). Every producer/consumer pair of
    layers whose sizes match is tested, connected or not, so a missing residual edge is caught too."""
    model.eval()
    producers: dict[int, tuple[nn.Module, int]] = {}
    consumers: dict[int, tuple[nn.Module, int]] = {}
    for i, lk in enumerate(topo.links):
        if lk.param is None:
            continue
        made, read = _layer_of(model, lk.param, False), _layer_of(model, lk.param, True)
        if made is not None and lk.role in ("fc", "conv", "value", "token", "pos") and not lk.rows:
            producers[i] = made
        if read is not None and lk.role in ("fc", "conv", "query", "key", "value"):
            consumers[i] = read
    sizes = [s for _, s in topo.groups]
    direct = expected_targets(topo)
    seen: dict[int, torch.Tensor] = {}

    def capture(i: int, axis: int) -> Callable:
        def hook(m: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else next(iter(kwargs.values()))
            seen[i] = x.detach().movedim(axis, -1).reshape(-1, x.shape[axis]).clone()
        return hook

    def run(perturb: tuple[nn.Module, int, int] | None) -> dict[int, torch.Tensor]:
        seen.clear()
        hooks = [m.register_forward_pre_hook(capture(i, ax), with_kwargs=True) for i, (m, ax) in consumers.items()]
        if perturb is not None:
            mod, ax, j = perturb

            def bump(m: nn.Module, args: tuple, out: Any) -> Any:
                t = out[0] if isinstance(out, tuple) else out
                t = t.clone()
                t.select(ax, j).add_(delta)
                return (t,) + tuple(out[1:]) if isinstance(out, tuple) else t
            hooks.append(mod.register_forward_hook(bump))
        try:
            with torch.no_grad():
                model(**example) if isinstance(example, dict) else model(example)
        finally:
            for h in hooks:
                h.remove()
        return dict(seen)

    base = run(None)
    problems = []
    for p, (pm, pax) in producers.items():
        n = sizes[topo.links[p].dst]
        probes_j = sorted({0, n // 2, n - 1})[:probes]
        results: dict[int, list[tuple[int, torch.Tensor]]] = {}
        for j in probes_j:
            moved = run((pm, pax, j))
            for c in consumers:
                if c in moved and c in base:
                    results.setdefault(c, []).append((j, (moved[c] - base[c]).abs().sum(0)))
        for c, res in results.items():
            f = direct[topo.links[c].src].get(p)
            pair = f"{topo.links[p].param} -> {topo.links[c].param}"
            for j, change in res:
                want = f(j) if f is not None else set()
                order = [int(i) for i in torch.argsort(change, descending=True)]
                if want and set(order[:len(want)]) != want:
                    problems.append(f"{pair}: the graph connects output {j} to inputs {sorted(want)}, the data flow "
                                    f"moves {order[:len(want) + 2]} most")
            # identity-like in the data flow for every probe (one input moves, 2x more than any other)
            identity = all(len(change) > 1 and int(change.argmax()) == j and
                           float(change.topk(2).values[1]) * 2 < float(change[j]) for j, change in res)
            if f is None and identity and len(res) == len(probes_j) and len(probes_j) > 1:
                problems.append(f"{pair}: the data flow connects them neuron to neuron, the graph does not")
    return problems

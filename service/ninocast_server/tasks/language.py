"""Byte-level language models on Debian texts, sized like the paper's LM1B tasks (docs/tasks.md).

Four corpora, each with one role: the King James Bible (``bible-kjv``) and the Jargon File (``jargon-text``) are
in-distribution (meta-training may use them); Bierce's *Devil's Dictionary* (``dict-devil``) is the validation
text (never meta-trained on, never benchmarked: models are chosen on it); the ``fortunes`` cookie files are the
held-out text (never meta-trained on, never used to choose: benchmarked only). Two protocols: the first round's
1,000-step tasks (period 100; ``kjv-*``) and the 10,000-step tasks of the vision protocol (period 1000; ``*-10k``).


* KJV text: ``bible -f Gen1:1-Rev22:21`` (one verse per line, "Ge1:1 In the beginning..."), the reference prefix
  stripped, verses joined with "\\n": 31,102 verses, 4,137,850 bytes of ASCII
  (3,932,160 training and 205,690 validation bytes after the split below). ``NINOCAST_KJV_TEXT=file`` uses a
  text file instead (for machines without the package).
* Fortunes text: every cookie file of ``/usr/share/games/fortunes`` (Debian ``fortunes``; ``$NINOCAST_FORTUNES_DIR``)
  except ``ascii-art``, in file-name order; cookies (separated by lines holding ``%``) stripped, overstrikes
  (``X\\bX``) removed, joined with "\\n".
* Jargon File: ``/usr/share/doc/jargon-text/jargon.txt.gz`` (``$NINOCAST_JARGON_TEXT``) from its first chapter
  on (the first unindented "Chapter" line; the table of contents dropped), without the glossary's list of entry
  names, each line's 3-space indent removed, runs of blank lines collapsed to one.
* Devil's Dictionary: ``/usr/share/dictd/devil.dict.dz`` (gzip; ``$NINOCAST_DEVIL_TEXT``) from its title on (the
  dictd header entries dropped), runs of blank lines collapsed to one.
* Tokenizer: raw bytes, vocabulary 256, no special tokens (token id = byte value). Nothing to train, nothing to
  download, and perplexities are per byte.
* Split (fixed, every text): the text is cut into consecutive 4,096-byte blocks; every 20th block
  (index % 20 == 10) is validation (5 %), the rest, concatenated in order, is training.
* Batches: the training stream is cut into non-overlapping windows of ``seq_len + 1`` bytes; epoch e visits them
  in the order ``randperm(n_windows, generator=seed + e)``; the batch is ``batch_size`` windows (the last batch of
  an epoch keeps the remainder). Input = window[:-1], labels = window[1:].
* Validation perplexity: exp(mean next-byte cross-entropy) over ``n_val_windows`` fixed windows taken evenly
  spaced over the validation stream (the same windows for every run).
* Models: Hugging Face ``GPT2LMHeadModel`` (tied lm_head) / ``LlamaForCausalLM`` (untied), ``n_positions`` =
  ``seq_len``, every dropout 0 (so a nowcast step that skips a forward pass does not shift any random stream and
  all methods see identical computations until the first nowcast). Init: ``torch.manual_seed(seed)`` then the
  constructor (HF's own init).
* Context 64 bytes, batch 16 windows; AdamW (constant lr, wd 0). ``kjv-*``: budget 1,000 steps, period 100,
  evaluated every 20 steps; ``*-10k``: budget 10,000 steps, period 1000, evaluated every 100 steps; both with
  ctx 5 and the k schedule 40, 33, 26, 21, 16, 11, 8, 5, 3, 1, and evaluated right before and after every
  nowcast step. Targets: measured AdamW perplexities (LM_CONFIGS below, docs/tasks.md).
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator

import torch
from torch import nn

from .base import DataMissing, Task
from .vision import shuffled_batches

ENV_TEXT = "NINOCAST_KJV_TEXT"
ENV_FORTUNES = "NINOCAST_FORTUNES_DIR"
FORTUNES_DIR = "/usr/share/games/fortunes"
FORTUNES_SKIPPED = ("ascii-art",)  # pictures, not text
_OVERSTRIKE = re.compile(rb".\x08")
BLOCK, VAL_EVERY, VAL_OFFSET = 4096, 20, 10
_REF = re.compile(rb"^\S+?\d+:\d+ ")
ENV_JARGON, JARGON_FILE = "NINOCAST_JARGON_TEXT", "/usr/share/doc/jargon-text/jargon.txt.gz"
ENV_DEVIL, DEVIL_FILE = "NINOCAST_DEVIL_TEXT", "/usr/share/dictd/devil.dict.dz"
_BLANK_RUNS = re.compile(rb"\n{3,}")


class TextMissing(DataMissing):
    """A corpus is not available; the message says how to get it."""


@lru_cache(maxsize=1)
def kjv_text() -> bytes:
    """The whole KJV as bytes, one verse per line, without verse references."""
    path = os.environ.get(ENV_TEXT)
    if path:
        with open(path, "rb") as f:
            return f.read()
    exe = shutil.which("bible")
    if exe is None:
        raise TextMissing("the King James Bible text needs Debian's bible-kjv package (sudo apt-get install "
                          f"bible-kjv, which pulls in bible-kjv-text), or set {ENV_TEXT}=a plain text file")
    raw = subprocess.run([exe, "-f", "Gen1:1-Rev22:21"], check=True, capture_output=True, timeout=120).stdout
    lines = [_REF.sub(b"", line) for line in raw.splitlines() if line.strip()]
    return b"\n".join(lines) + b"\n"


@lru_cache(maxsize=1)
def fortunes_text() -> bytes:
    """Every fortune cookie of the Debian ``fortunes`` package, one after another (see the module docstring)."""
    folder = os.environ.get(ENV_FORTUNES, FORTUNES_DIR)
    files = sorted(p for p in (os.listdir(folder) if os.path.isdir(folder) else [])
                   if "." not in p and p not in FORTUNES_SKIPPED and os.path.isfile(os.path.join(folder, p)))
    if not files:
        raise TextMissing(f"no fortune files in {folder}: the held-out text needs Debian's fortunes package "
                          f"(sudo apt-get install fortunes), or set {ENV_FORTUNES}=a folder of such files")
    cookies: list[bytes] = []
    for name in files:
        with open(os.path.join(folder, name), "rb") as f:
            raw = _OVERSTRIKE.sub(b"", f.read()).replace(b"\x08", b"")
        cookies += [c.strip(b"\n") for c in re.split(rb"(?m)^%\n", raw) if c.strip()]
    return b"\n".join(cookies) + b"\n"


def _packaged_text(env: str, default: str, package: str) -> bytes:
    """A (possibly gzipped) text file of a Debian package, or the file ``$env`` names."""
    path = os.environ.get(env, default)
    if not os.path.isfile(path):
        raise TextMissing(f"{path} is missing: this text needs Debian's {package} package (sudo apt-get install "
                          f"{package}), or set {env}=the file (plain or gzipped)")
    with open(path, "rb") as f:
        raw = f.read()
    return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw


def _tidy(text: bytes) -> bytes:
    return _BLANK_RUNS.sub(b"\n\n", text).strip(b"\n") + b"\n"


@lru_cache(maxsize=1)
def jargon_text() -> bytes:
    """The Jargon File's chapters, lexicon entries and appendices (see the module docstring)."""
    lines = _packaged_text(ENV_JARGON, JARGON_FILE, "jargon-text").split(b"\n")
    start = next((i for i, line in enumerate(lines) if line.startswith(b"Chapter")), 0)
    glossary = next((i for i, line in enumerate(lines) if line == b"Glossary" and i > start), None)
    if glossary is not None:  # the list of entry names between the heading and the first entry
        first = next((i for i in range(glossary, len(lines)) if lines[i].startswith(b"   :")), glossary)
        lines = lines[:glossary + 1] + lines[first:]
    body = [line[3:] if line.startswith(b"   ") else line for line in lines[start:]]
    return _tidy(b"\n".join(body))


@lru_cache(maxsize=1)
def devil_text() -> bytes:
    """The Devil's Dictionary from its title on (see the module docstring)."""
    raw = _packaged_text(ENV_DEVIL, DEVIL_FILE, "dict-devil")
    title = raw.find(b"THE DEVIL'S DICTIONARY")
    start = raw.rfind(b"\n", 0, title) + 1 if title >= 0 else 0
    return _tidy(raw[start:])


CORPORA = {"kjv": kjv_text, "fortunes": fortunes_text, "jargon": jargon_text, "devil": devil_text}


def encode(text: bytes | str) -> torch.Tensor:
    """Byte tokenizer: token id = byte value (vocab 256)."""
    if isinstance(text, str):
        text = text.encode("utf-8")
    return torch.frombuffer(bytearray(text), dtype=torch.uint8).to(torch.int64)


def decode(ids: torch.Tensor | list[int]) -> str:
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def split_blocks(data: bytes, block: int = BLOCK, val_every: int = VAL_EVERY,
                 val_offset: int = VAL_OFFSET) -> tuple[bytes, bytes]:
    """(train, validation): every ``val_every``-th block of ``block`` bytes (index % val_every == val_offset) is
    validation, the rest is training, each concatenated in text order."""
    blocks = [data[i:i + block] for i in range(0, len(data), block)]
    val = b"".join(b for i, b in enumerate(blocks) if i % val_every == val_offset)
    train = b"".join(b for i, b in enumerate(blocks) if i % val_every != val_offset)
    return train, val


@lru_cache(maxsize=None)
def corpus_split(corpus: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(training, validation) byte ids of a corpus (the fixed block split)."""
    train, val = split_blocks(CORPORA[corpus]())
    return encode(train), encode(val)


def kjv_split() -> tuple[torch.Tensor, torch.Tensor]:
    return corpus_split("kjv")


@dataclass(frozen=True)
class LMConfig:
    arch: str  # "gpt2" | "llama"
    n_layer: int
    d_model: int
    n_head: int
    lr: float
    target: float  # validation perplexity (per byte)
    in_distribution: bool
    note: str  # how the target was obtained
    corpus: str = "kjv"
    budget: int = 1_000
    period: int = 100
    eval_every: int = 20


# Targets: the validation perplexity AdamW alone reaches at the end of its 1,000-step budget, seed 1000, rounded
# up to 2 decimals, measured once on this machine (2026-11-27) with
#   ninocast bench speedup --task kjv-gpt2-3-24,kjv-gpt2-2-32,kjv-gpt2-3-64,kjv-llama-3-24 --nowcasters "" \
#       --seeds 1000 --no-early-stop --out DIR
# (val ppl at step 1000: 6.937, 6.344, 7.748, 4.977; all curves still falling there, so AdamW needs its whole budget).
_NOTE = "AdamW seed 1000, val ppl at step 1000 of 1000 ({}), rounded up"
LM_CONFIGS: dict[str, LMConfig] = {
    "kjv-gpt2-3-24": LMConfig("gpt2", 3, 24, 3, 3e-3, 6.94, True, _NOTE.format(6.937)),
    "kjv-gpt2-2-32": LMConfig("gpt2", 2, 32, 2, 3e-3, 6.35, True, _NOTE.format(6.344)),
    "kjv-gpt2-3-64": LMConfig("gpt2", 3, 64, 4, 3e-3, 7.75, False, _NOTE.format(7.748)),
    "kjv-llama-3-24": LMConfig("llama", 3, 24, 3, 3e-3, 4.98, False, _NOTE.format(4.977)),
}


# The 10,000-step tasks (vision's protocol: period 1000, 10 nowcasts). Targets: the worst (largest) validation
# perplexity of the measured AdamW runs (seeds 0-2 or seed 0, see docs/tasks.md) at step 9,000, rounded up to 2
# decimals: AdamW needs ~9,000-10,000 steps (its curve still falls there) and a seed slightly worse than the
# measured ones still reaches it within the budget. Measured with ``ninocast collect`` (the curves are in
# docs/benchmarks-speedup/lm10k-targets/).
_NOTE_10K = "max over AdamW seeds {} of val ppl at step 9,000 ({}), rounded up"
_LONG = dict(budget=10_000, period=1000, eval_every=100)
LM_CONFIGS.update({
    "kjv-gpt2-3-24-10k": LMConfig("gpt2", 3, 24, 3, 3e-3, 4.61, True, _NOTE_10K.format("0, 1", "4.604, 4.451"),
                                   **_LONG),
    "kjv-gpt2-2-32-10k": LMConfig("gpt2", 2, 32, 2, 3e-3, 4.30, True, _NOTE_10K.format("0", "4.298"), **_LONG),
    "kjv-gpt2-3-64-10k": LMConfig("gpt2", 3, 64, 4, 3e-3, 3.67, False,
                                   _NOTE_10K.format("0, 1, 2", "3.582, 3.653, 3.662"), **_LONG),
    "kjv-llama-3-24-10k": LMConfig("llama", 3, 24, 3, 3e-3, 3.85, False, _NOTE_10K.format("0", "3.841"), **_LONG),
    "fortunes-gpt2-3-24-10k": LMConfig("gpt2", 3, 24, 3, 3e-3, 7.78, False, _NOTE_10K.format("0, 1", "7.695, 7.774"),
                                        corpus="fortunes", **_LONG),
})
# Meta-training variants (issue 11: several depths/widths, and Llama in the training mix): in-distribution only,
# never part of the benchmark suite's held-out scoring; targets by the same rule.
LM_CONFIGS.update({
    "kjv-gpt2-4-16-10k": LMConfig("gpt2", 4, 16, 2, 3e-3, 5.22, True, _NOTE_10K.format("0", "5.219"), **_LONG),
    "kjv-llama-2-32-10k": LMConfig("llama", 2, 32, 2, 3e-3, 3.88, True, _NOTE_10K.format("0", "3.878"), **_LONG),
})
# A second in-distribution text (the Jargon File: meta-training may use it) and the validation text (the Devil's
# Dictionary: never meta-trained on, never benchmarked; language members are chosen on it). Issue 11: every
# language member had seen one text only, and the held-out text was the one language target still missed.
# Targets by the same rule, measured 2026-12-02 (docs/tasks.md).
LM_CONFIGS.update({
    "jargon-gpt2-3-24-10k": LMConfig("gpt2", 3, 24, 3, 3e-3, 7.32, True, _NOTE_10K.format("0, 1", "7.237, 7.317"),
                                      corpus="jargon", **_LONG),
    "jargon-gpt2-2-32-10k": LMConfig("gpt2", 2, 32, 2, 3e-3, 6.79, True, _NOTE_10K.format("0, 1", "6.695, 6.783"),
                                      corpus="jargon", **_LONG),
    "devil-gpt2-3-24-10k": LMConfig("gpt2", 3, 24, 3, 3e-3, 5.93, False, _NOTE_10K.format("0, 1", "5.921, 5.908"),
                                     corpus="devil", **_LONG),
})
# Larger meta-training variants at the 1,000-step protocol (issue 11, round 7: the short member had seen nothing
# above 49k parameters, and the held-out GPT-2 3-64, 170k, was the one task it slowed down). Widths 48 and 80
# bracket the held-out width 64 without using it. Targets by the 1,000-step rule (_NOTE), measured 2026-12-02 with
#   ninocast bench speedup --task kjv-gpt2-4-48,kjv-gpt2-2-80,kjv-llama-2-64 --nowcasters "" --seeds 1000 --no-early-stop
LM_CONFIGS.update({
    "kjv-gpt2-4-48": LMConfig("gpt2", 4, 48, 4, 3e-3, 5.94, True, _NOTE.format("5.939")),
    "kjv-gpt2-2-80": LMConfig("gpt2", 2, 80, 4, 3e-3, 5.44, True, _NOTE.format("5.430")),
    "kjv-llama-2-64": LMConfig("llama", 2, 64, 4, 3e-3, 4.46, True, _NOTE.format("4.456")),
})


class LanguageTask(Task):
    kind = "language"
    metric = "val_ppl"
    higher_is_better = False
    weight_decay = 0.0
    batch_size = 16
    seq_len = 64
    budget = 1_000
    period = 100
    ctx = 5
    eval_every = 20
    eval_before_nowcast = True
    n_val_windows = 128
    vocab_size = 256

    def __init__(self, name: str, cfg: LMConfig) -> None:
        self.name, self.cfg = name, cfg
        self.lr, self.target, self.in_distribution = cfg.lr, cfg.target, cfg.in_distribution
        self.budget, self.period, self.eval_every = cfg.budget, cfg.period, cfg.eval_every
        self.description = (f"{cfg.arch} {cfg.n_layer} layers d={cfg.d_model} ({cfg.n_head} heads), bytes, "
                            f"{'KJV' if cfg.corpus == 'kjv' else cfg.corpus}, ctx {self.seq_len}, "
                            f"batch {self.batch_size}, AdamW lr {cfg.lr}, {cfg.budget:,} steps, "
                            f"target val ppl {cfg.target}")
        self._val: torch.Tensor | None = None

    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        c = self.cfg
        if c.arch == "gpt2":
            from transformers import GPT2Config, GPT2LMHeadModel

            conf = GPT2Config(vocab_size=self.vocab_size, n_positions=self.seq_len, n_embd=c.d_model,
                              n_layer=c.n_layer, n_head=c.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                              bos_token_id=None, eos_token_id=None)
            return GPT2LMHeadModel(conf)
        from transformers import LlamaConfig, LlamaForCausalLM

        conf = LlamaConfig(vocab_size=self.vocab_size, hidden_size=c.d_model, intermediate_size=4 * c.d_model,
                           num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_head,
                           max_position_embeddings=self.seq_len, attention_dropout=0.0, tie_word_embeddings=False,
                           bos_token_id=None, eos_token_id=None)
        return LlamaForCausalLM(conf)

    def _windows(self, stream: torch.Tensor) -> torch.Tensor:
        n = (len(stream) - 1) // (self.seq_len + 1)
        return stream[: n * (self.seq_len + 1)].view(n, self.seq_len + 1)

    def batches(self, seed: int) -> Iterator[torch.Tensor]:
        train, _ = corpus_split(self.cfg.corpus)
        windows = self._windows(train)
        for idx in shuffled_batches(len(windows), self.batch_size, seed):
            yield windows[idx]

    def loss(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=batch[:, :-1]).logits
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))

    def val_windows(self) -> torch.Tensor:
        if self._val is None:
            _, val = corpus_split(self.cfg.corpus)
            w = self._windows(val)
            pick = torch.linspace(0, len(w) - 1, min(self.n_val_windows, len(w))).round().long()
            self._val = w[pick]
        return self._val

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        w = self.val_windows()
        total = 0.0
        for i in range(0, len(w), 64):
            b = w[i:i + 64]
            logits = model(input_ids=b[:, :-1]).logits
            total += float(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1),
                                                       reduction="sum"))
        model.train(was_training)
        loss = total / (len(w) * self.seq_len)
        return {"val_ppl": float(torch.tensor(loss).exp()), "val_loss": loss}



def language_task(name: str) -> LanguageTask:
    return LanguageTask(name, LM_CONFIGS[name])

"""Benchmark / meta-training tasks, by name (docs/tasks.md describes each).

``get_task("fm-16")`` returns a fresh ``Task``; ``TASKS`` maps every name to its factory. Names are
case-insensitive and ``_`` may stand for ``-`` (``FM_16`` works).
"""

from __future__ import annotations

from typing import Callable

from .base import Task

__all__ = ["Task", "TASKS", "get_task", "task_names"]


def _fm16() -> Task:
    from .vision import fm16
    return fm16()


def _fm32() -> Task:
    from .vision import fm32
    return fm32()


def _fm16_bn() -> Task:
    from .normalized import FashionMNISTBatchNormTask
    return FashionMNISTBatchNormTask()


def _fm_mlp_ln() -> Task:
    from .normalized import FashionMNISTMLPTask
    return FashionMNISTMLPTask()


def _lm(key: str) -> Callable[[], Task]:
    def make() -> Task:
        from .language import language_task
        return language_task(key)
    return make


def _digits() -> Task:
    from .digits import DigitsTask
    return DigitsTask()


def _digits_cnn() -> Task:
    from .digits import DigitsConvTask
    return DigitsConvTask()


# name -> factory (data is loaded lazily, on first use of batches()/evaluate())
TASKS: dict[str, Callable[[], Task]] = {
    "fm-16": _fm16,
    "fm-32": _fm32,
    "fm-16-bn": _fm16_bn,
    "fm-mlp-ln": _fm_mlp_ln,
    "kjv-gpt2-3-24": _lm("kjv-gpt2-3-24"),
    "kjv-gpt2-2-32": _lm("kjv-gpt2-2-32"),
    "kjv-gpt2-3-64": _lm("kjv-gpt2-3-64"),
    "kjv-llama-3-24": _lm("kjv-llama-3-24"),
    "kjv-gpt2-3-24-10k": _lm("kjv-gpt2-3-24-10k"),
    "kjv-gpt2-2-32-10k": _lm("kjv-gpt2-2-32-10k"),
    "kjv-gpt2-3-64-10k": _lm("kjv-gpt2-3-64-10k"),
    "kjv-llama-3-24-10k": _lm("kjv-llama-3-24-10k"),
    "fortunes-gpt2-3-24-10k": _lm("fortunes-gpt2-3-24-10k"),
    "kjv-gpt2-4-16-10k": _lm("kjv-gpt2-4-16-10k"),
    "kjv-llama-2-32-10k": _lm("kjv-llama-2-32-10k"),
    "kjv-gpt2-4-48": _lm("kjv-gpt2-4-48"),
    "kjv-gpt2-2-80": _lm("kjv-gpt2-2-80"),
    "kjv-llama-2-64": _lm("kjv-llama-2-64"),
    "jargon-gpt2-3-24-10k": _lm("jargon-gpt2-3-24-10k"),
    "jargon-gpt2-2-32-10k": _lm("jargon-gpt2-2-32-10k"),
    "devil-gpt2-3-24-10k": _lm("devil-gpt2-3-24-10k"),
    "digits": _digits,
    "digits-cnn": _digits_cnn,
}


def task_names() -> list[str]:
    return list(TASKS)


def get_task(name: str) -> Task:
    key = name.strip().lower().replace("_", "-")
    if key not in TASKS:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[key]()

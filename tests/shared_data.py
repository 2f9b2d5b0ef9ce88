"""The reference material beside the repository (../shared): where it lives, how its cases load, and how tests
skip, naming the missing file, when it is absent."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

from ninocast.spec import ModelSpec

SHARED = Path(__file__).resolve().parents[2] / "shared"
GOLDEN = SHARED / "reference" / "golden"
CHECKPOINTS = SHARED / "reference" / "checkpoints"
FIXTURES = SHARED / "spec" / "fixtures"
GOLDEN_CASES = ("mlp", "cnn", "gpt2", "llama")
FIXTURE_FAMILY = {"fm16": "generic", "gpt2_tiny": "gpt2", "llama_tiny": "llama"}


def need(path: Path) -> Path:
    """The path, or skip the test saying which reference file is missing."""
    if not path.exists():
        pytest.skip(f"reference material absent: {path} (the ../shared folder beside the repository)")
    return path


def checkpoint(name: str) -> Path:
    """An official checkpoint's file (``nino_no_posw``, ``nino_mlp``...)."""
    return need(CHECKPOINTS / f"{name}.pt")


def golden(case: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(case JSON, tensors as numpy arrays) of one golden end-to-end case."""
    from safetensors.numpy import load_file

    meta = json.loads(need(GOLDEN / f"{case}.json").read_text())
    return meta, load_file(str(need(GOLDEN / f"{case}.safetensors")))


@lru_cache(maxsize=None)
def fixture(case: str) -> tuple[ModelSpec, dict, dict[str, np.ndarray]]:
    """(spec, case JSON, arrays) of one reference fixture (NINO_SPEC §8.1); cached: treat the arrays as read-only."""
    meta = json.loads(need(FIXTURES / f"{case}.json").read_text())
    with np.load(need(FIXTURES / f"{case}.npz")) as z:
        arrays = {k: z[k] for k in z.files}
    spec = ModelSpec(FIXTURE_FAMILY[case], tuple((n, tuple(s)) for n, s in meta["model_dict"]),
                     **meta["graph_kwargs"])
    return spec, meta, arrays

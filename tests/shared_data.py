"""Where the reference material beside the repository lives, and how tests skip when it is absent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
GOLDEN = SHARED / "reference" / "golden"
CHECKPOINTS = SHARED / "reference" / "checkpoints"
FIXTURES = SHARED / "spec" / "fixtures"
GOLDEN_CASES = ("mlp", "cnn", "gpt2", "llama")


def need(path: Path) -> Path:
    """The path, or skip the test saying which reference file is missing."""
    if not path.exists():
        pytest.skip(f"reference material absent: {path} (the ../shared folder beside the repository)")
    return path


def golden(case: str) -> tuple[dict, dict]:
    """(case JSON, tensors as numpy arrays) of one golden end-to-end case."""
    from safetensors.numpy import load_file

    meta = json.loads(need(GOLDEN / f"{case}.json").read_text())
    return meta, load_file(str(need(GOLDEN / f"{case}.safetensors")))

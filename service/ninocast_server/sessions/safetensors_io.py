"""Safetensors files from untrusted clients: parse and check the header ourselves, then read tensors zero-copy.

An upload is hostile until proven otherwise: the 8-byte header length, the JSON and every tensor's offsets are
checked against the file before any byte of tensor data is interpreted. Tensor data is then read with plain reads
(faster than faulting in a memory map of a page-cached file), in small pieces: to check values, and to fill the
states matrix of a nowcast.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from ninocast.flat import ACCEPTED_NAMES, SAFETENSORS_NAMES, STATE_DTYPES
from ninocast.spec import ModelSpec

from .errors import ServiceError

MAX_HEADER_BYTES = 100 * 1024 * 1024
ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
            "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}
FLOAT_DTYPES = STATE_DTYPES  # one definition with the client (ninocast.flat)
DTYPE_NAMES = SAFETENSORS_NAMES
CHECK_BYTES = 4 << 20  # bytes of tensor data read and checked at a time
LOAD_BLOCK = 1 << 16  # parameters per block when reading states for a nowcast (256 kB per state)


@dataclass(frozen=True)
class Entry:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute offsets in the file
    end: int


@dataclass(frozen=True)
class Header:
    entries: dict[str, Entry]
    data_start: int
    metadata: dict[str, str]


def bad(detail: str) -> ServiceError:
    return ServiceError(400, "invalid_safetensors", detail)


def header_limit(spec: ModelSpec) -> int:
    """Largest header accepted for a state of ``spec``: room for its tensors and as many buffers again, with
    long names. json.loads of a header costs ~10x its size in memory, so 100 MB would cost a GB per upload."""
    return min(MAX_HEADER_BYTES, (1 << 20) + 2048 * 3 * len(spec.params))


def parse_header(path: Path, limit: int = MAX_HEADER_BYTES) -> Header:
    """Read and check the header of the file at ``path``; raise ServiceError(400) saying what is wrong."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        f.seek(0)
        if size < 8:
            raise bad(f"body is {size} bytes: a safetensors file starts with an 8-byte header length")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > limit:
            raise bad(f"header length {n} exceeds the {limit}-byte limit for this spec")
        if n > size - 8:
            raise bad(f"header length {n} is larger than the {size - 8} bytes that follow it (truncated body?)")
        raw = f.read(n)
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"header is not valid JSON: {e}") from None
    except RecursionError:  # the JSON nests deeper than the interpreter's limit; a real header nests 3 deep
        raise bad("header JSON nests too deeply (a safetensors header is at most 3 levels deep)") from None
    if not isinstance(obj, dict):
        raise bad("header must be a JSON object")
    return _check_entries(obj, 8 + n, size)


def _check_entries(obj: dict, data_start: int, size: int) -> Header:
    data_len = size - data_start
    meta = obj.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise bad("__metadata__ must map strings to strings")
    entries: dict[str, Entry] = {}
    for name, e in obj.items():
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"tensor {name!r}: entry must have exactly dtype, shape and data_offsets")
        dtype, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
        if dtype not in ITEMSIZE:
            raise bad(f"tensor {name!r}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise bad(f"tensor {name!r}: shape must be a list of non-negative integers, got {shape!r}"[:300])
        if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)):
            raise bad(f"tensor {name!r}: data_offsets must be [begin, end] integers, got {offs!r}"[:300])
        b, end = offs
        if not 0 <= b <= end <= data_len:
            raise bad(f"tensor {name!r}: data_offsets [{b}, {end}] lie outside the {data_len} data bytes")
        want = math.prod(shape) * ITEMSIZE[dtype]
        if end - b != want:
            raise bad(f"tensor {name!r}: data_offsets span {end - b} bytes but {dtype} {shape} needs {want}")
        entries[name] = Entry(dtype, tuple(shape), data_start + b, data_start + end)
    prev_end, prev_name = data_start, None
    for name, e in sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if e.begin < prev_end:
            raise bad(f"tensors {prev_name!r} and {name!r} overlap in the data section")
        if e.end > e.begin:
            prev_end, prev_name = e.end, name
    return Header(entries, data_start, meta)


def check_against_spec(header: Header, spec: ModelSpec) -> None:
    """Every spec tensor present, with its shape and a float dtype; extra tensors (buffers) are ignored."""
    missing = [p.name for p in spec.layout if p.name not in header.entries]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ServiceError(422, "missing_tensor", f"the state lacks spec tensor {missing[0]!r}{more}")
    for p in spec.layout:
        e = header.entries[p.name]
        if e.shape != p.shape:
            raise ServiceError(422, "shape_mismatch",
                               f"tensor {p.name!r} has shape {list(e.shape)}, the spec says {list(p.shape)}")
        if e.dtype not in FLOAT_DTYPES:
            raise ServiceError(422, "unsupported_dtype",
                               f"tensor {p.name!r} has dtype {e.dtype}; expected {', '.join(FLOAT_DTYPES)} "
                               f"({ACCEPTED_NAMES})")


# Finite iff the exponent bits are not all set: the check for the 16-bit floats, which numpy cannot reduce fast.
EXPONENT_MASK = {"BF16": 0x7F80, "F16": 0x7C00}


def all_finite(data: np.ndarray, dtype: str) -> bool:
    """No NaN or Inf in the raw little-endian values ``data`` (uint8) of safetensors dtype F32, BF16 or F16.

    Plain numpy reductions on one thread: torch's would use the intra-op thread pool, whose wake-ups cost ~8 ms
    per call on a busy 2-core machine (0.16 ms for 4 MB on one thread). float32: min and max propagate NaN and
    are infinite iff an entry is (no temporary array, no overflow as a sum could); 16-bit: exponent bits.
    """
    if not data.size:
        return True
    if dtype == "F32":
        x = data.view(np.float32)
        return bool(np.isfinite(x.min())) and bool(np.isfinite(x.max()))
    mask = EXPONENT_MASK[dtype]
    return int(np.bitwise_and(data.view(np.uint16), mask).max()) != mask


def check_finite(path: Path, header: Header, spec: ModelSpec) -> None:
    """Raise 422 naming the first spec tensor holding NaN or Inf (read in pieces of CHECK_BYTES)."""
    buf = np.empty(min(CHECK_BYTES, max((e.end - e.begin for e in header.entries.values()), default=0)), np.uint8)
    with open(path, "rb", buffering=0) as f:
        for p in spec.layout:
            e = header.entries[p.name]
            for begin in range(e.begin, e.end, CHECK_BYTES):
                piece = buf[: min(CHECK_BYTES, e.end - begin)]
                _read_exact(f, begin, memoryview(piece), path)
                if not all_finite(piece, e.dtype):
                    raise ServiceError(422, "nonfinite_values", f"tensor {p.name!r} contains NaN or Inf")


def validate_state(path: Path, spec: ModelSpec) -> None:
    """Trust nothing in an upload until its header, names, shapes, dtypes and values check out (4xx otherwise)."""
    header = parse_header(path, header_limit(spec))
    check_against_spec(header, spec)
    check_finite(path, header, spec)


def load_states(paths: Sequence[Path], spec: ModelSpec, keep_16bit: bool = False) -> Tensor:
    """(P, len(paths)) float32 states, oldest first, in the contiguous layout the engine expects.

    ``keep_16bit``: when every tensor of every file is BF16 (or every one F16), the states are held in that
    dtype, half the memory (for engines that read 16-bit states as they are: a 1B model's five states are
    12 GB instead of 25).

    Read in blocks of LOAD_BLOCK parameters: the block of every file is read (plain reads, into one small
    buffer), converted to float32 and written transposed into its rows of the matrix, so each part of the
    result is written once while it is in cache. numpy throughout: one thread, no wake-ups of torch's pool (ms
    each on a busy machine). Against column-strided torch copies from memory maps: c10-32 40 -> 0.5 ms, gpt2-3m
    (3.4M) 105 -> 45 ms, 25M parameters about the same (~330 ms: reading 500 MB from the page cache).
    """
    ctx = len(paths)
    headers = [parse_header(p) for p in paths]
    kinds = {h.entries[p.name].dtype for h in headers for p in spec.layout}
    held = kinds.pop() if keep_16bit and len(kinds) == 1 and kinds <= {"BF16", "F16"} else "F32"
    states = torch.empty(spec.n_params, ctx, dtype=FLOAT_DTYPES[held])
    out = states.view(torch.int16).numpy() if held != "F32" else states.numpy()  # numpy has no bfloat16
    size = min(LOAD_BLOCK, max(p.numel for p in spec.layout))
    raw = np.empty((ctx, size * 4), np.uint8)
    block = np.empty((ctx, size), np.float32 if held == "F32" else np.int16)
    files = [open(p, "rb", buffering=0) for p in paths]
    try:
        for p in spec.layout:
            for a in range(0, p.numel, size):
                n = min(size, p.numel - a)
                for j, (f, h) in enumerate(zip(files, headers)):
                    e = h.entries[p.name]
                    item = ITEMSIZE[e.dtype]
                    piece = raw[j, : n * item]
                    _read_exact(f, e.begin + a * item, memoryview(piece), paths[j])
                    block[j, :n] = _as_float32(piece, e.dtype) if held == "F32" else piece.view(np.int16)
                out[p.start + a : p.start + a + n] = block[:, :n].T
    finally:
        for f in files:
            f.close()
    return states


def _as_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Raw little-endian F32/BF16/F16 values as float32 (exact: bf16 is the top half of a float32)."""
    if dtype == "F32":
        return raw.view(np.float32)
    if dtype == "BF16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return raw.view(np.float16).astype(np.float32)


def _read_exact(f, offset: int, buf: memoryview, path: Path) -> None:
    """Fill ``buf`` (bytes) with the bytes at ``offset`` of the raw file ``f``."""
    f.seek(offset)
    got = 0
    while got < len(buf):
        n = f.readinto(buf[got:])
        if not n:
            raise OSError(f"{path} ended {len(buf) - got} bytes early (changed on disk?)")
        got += n


def dtypes_of(path: Path, spec: ModelSpec) -> dict[str, str]:
    header = parse_header(path)
    return {p.name: header.entries[p.name].dtype for p in spec.layout}


def encode(flat: Tensor, spec: ModelSpec, dtypes: str | Mapping[str, str],
           metadata: Mapping[str, str] | None = None) -> tuple[bytes, memoryview]:
    """(P,) float32 -> (header bytes, data bytes) of a safetensors file with the spec's tensors in order.

    The spec layout is contiguous, so with one dtype the data section is the (converted) flat vector itself.
    """
    names = [dtypes] * len(spec.layout) if isinstance(dtypes, str) else [dtypes[p.name] for p in spec.layout]
    header: dict[str, object] = {"__metadata__": dict(metadata or {})}
    offset = 0
    for p, dt in zip(spec.layout, names):
        n = p.numel * ITEMSIZE[dt]
        header[p.name] = {"dtype": dt, "shape": list(p.shape), "data_offsets": [offset, offset + n]}
        offset += n
    if len(set(names)) == 1:
        data = flat.to(FLOAT_DTYPES[names[0]]).contiguous().view(torch.uint8)
    else:
        data = torch.empty(offset, dtype=torch.uint8)
        for p, dt in zip(spec.layout, names):
            part = flat[p.start : p.stop].to(FLOAT_DTYPES[dt]).view(torch.uint8)
            b = header[p.name]["data_offsets"][0]  # type: ignore[index]
            data[b : b + part.numel()] = part
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob, memoryview(data.numpy()).cast("B")

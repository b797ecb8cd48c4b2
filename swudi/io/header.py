"""Parse and fully validate a safetensors header before trusting any offset in it.

Format: 8 bytes little-endian u64 `n`, then `n` bytes of UTF-8 JSON, then the data section.
The JSON is an object `{name: {"dtype": str, "shape": [int...], "data_offsets": [begin, end]}, ...}`
with an optional `"__metadata__": {str: str}`. Offsets are relative to the data section (byte
`8 + n` of the file). As in the reference implementation, the tensors must tile the data section
exactly: sorted by offset they start at 0, each begins where the previous ends, and the last ends at
the end of the file. So a header that validates describes every byte of the file.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from swudi.errors import CheckpointError

__all__ = [
    "MAX_HEADER_SIZE",
    "DTYPE_SIZES",
    "TORCH_DTYPES",
    "TensorEntry",
    "Header",
    "header_length",
    "parse_header",
    "torch_dtype",
    "dtype_name",
]

#: The reference parser refuses headers larger than this (bytes).
MAX_HEADER_SIZE = 100_000_000

#: Bytes per element of each safetensors dtype that swudi reads and writes.
DTYPE_SIZES: Mapping[str, int] = MappingProxyType(
    {
        "F64": 8,
        "F32": 4,
        "F16": 2,
        "BF16": 2,
        "I64": 8,
        "I32": 4,
        "I16": 2,
        "I8": 1,
        "U64": 8,
        "U32": 4,
        "U16": 2,
        "U8": 1,
        "BOOL": 1,
        "F8_E4M3": 1,
        "F8_E5M2": 1,
    }
)

_TORCH = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}
#: safetensors dtype name -> torch dtype (only those this torch build has).
TORCH_DTYPES: Mapping[str, torch.dtype] = MappingProxyType(
    {k: getattr(torch, v) for k, v in _TORCH.items() if hasattr(torch, v)}
)
_NAMES = {v: k for k, v in TORCH_DTYPES.items()}

# First bytes of files that are not safetensors, for a helpful error.
_FOREIGN_MAGIC = {
    b"PK\x03\x04": "a zip archive (torch.save format): a pickle checkpoint",
    b"\x80\x02": "a pickle file",
    b"\x80\x03": "a pickle file",
    b"\x80\x04": "a pickle file",
    b"\x80\x05": "a pickle file",
    b"\x89HDF": "an HDF5 file (Keras/TF weights)",
    b"GGUF": "a GGUF file",
}


def torch_dtype(name: str, source: str = "") -> torch.dtype:
    """torch dtype of a safetensors dtype name."""
    try:
        return TORCH_DTYPES[name]
    except KeyError:
        where = f"{source}: " if source else ""
        raise CheckpointError(
            f"{where}dtype {name!r} is not supported (supported: {', '.join(TORCH_DTYPES)})"
        ) from None


def dtype_name(dtype: torch.dtype | str) -> str:
    """safetensors dtype name of a torch dtype (a valid name is returned unchanged)."""
    if isinstance(dtype, str):
        if dtype in TORCH_DTYPES:
            return dtype
        raise CheckpointError(
            f"dtype {dtype!r} is not a supported safetensors dtype (supported: {', '.join(TORCH_DTYPES)})"
        )
    try:
        return _NAMES[dtype]
    except KeyError:
        raise CheckpointError(f"torch dtype {dtype} cannot be stored in safetensors by swudi") from None


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a header; `start`/`end` are relative to the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape), "data_offsets": [self.start, self.end]}


@dataclass(frozen=True)
class Header:
    """A validated header: the entries in file order, the metadata, and where data begins."""

    entries: dict[str, TensorEntry]  # in file order
    metadata: dict[str, str]
    header_size: int  # n: bytes of JSON (with padding)
    file_size: int
    source: str = field(default="", compare=False)

    @property
    def data_offset(self) -> int:
        """Absolute file offset of the data section."""
        return 8 + self.header_size


def _fail(source: str, message: str) -> CheckpointError:
    return CheckpointError(f"{source}: {message}")


def header_length(prefix: bytes, file_size: int, source: str) -> int:
    """Validate and return `n` from the first bytes of a file (at least 8 of them)."""
    if file_size < 8 or len(prefix) < 8:
        raise _fail(source, f"not a safetensors file: {file_size} bytes, fewer than the 8-byte header length")
    (n,) = struct.unpack("<Q", prefix[:8])
    hint = ""
    for magic, what in _FOREIGN_MAGIC.items():
        if prefix.startswith(magic):
            hint = f" (the file starts like {what}, not safetensors)"
    if n > MAX_HEADER_SIZE:
        raise _fail(source, f"header length {n} bytes exceeds the {MAX_HEADER_SIZE}-byte limit{hint}")
    if 8 + n > file_size:
        raise _fail(
            source,
            f"header length {n} bytes runs past the end of the {file_size}-byte file "
            f"(truncated or not safetensors){hint}",
        )
    if n < 2:
        raise _fail(source, f"header length {n} is too small to hold a JSON object")
    return n


class DuplicateKeyError(ValueError):
    """A JSON object with the same key twice (``key`` names it)."""

    def __init__(self, key: str):
        super().__init__(f"duplicate key {key!r}")
        self.key = key


def reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` for ``json.loads`` that raises :class:`DuplicateKeyError`."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKeyError(key)
        out[key] = value
    return out


def _int_list(value: Any) -> bool:
    return isinstance(value, list) and all(type(v) is int and v >= 0 for v in value)


#: torch sizes are signed 64-bit: a shape whose non-zero dimensions hold 2**63 bytes or more cannot be
#: a tensor, even an empty one (``[0, 2**64]``), and fails later, after artefacts were written.
_INT64 = 2**63


def parse_header(raw: bytes, file_size: int, source: str) -> Header:
    """Parse `raw` (the file's first `8 + n` bytes or more) and validate it against `file_size`.

    Raises `CheckpointError` naming `source` and the tensor at fault.
    """
    n = header_length(raw, file_size, source)
    if len(raw) < 8 + n:
        raise _fail(source, f"need {8 + n} header bytes, got {len(raw)}")
    blob = bytes(raw[8 : 8 + n])
    if blob[:1] != b"{":
        raise _fail(source, "header does not start with '{': not a safetensors file")
    try:
        doc = json.loads(blob.decode("utf-8"), object_pairs_hook=reject_duplicate_keys)
    except UnicodeDecodeError as exc:
        raise _fail(source, f"header is not valid UTF-8: {exc}") from None
    except ValueError as exc:  # JSONDecodeError and duplicate keys
        raise _fail(source, f"header is not valid JSON: {exc}") from None
    except RecursionError:
        raise _fail(source, "header JSON is nested too deeply: not a safetensors header") from None
    if not isinstance(doc, dict):
        raise _fail(source, f"header JSON must be an object, got {type(doc).__name__}")

    metadata = doc.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _fail(source, "__metadata__ must be an object of string keys to string values")

    data_size = file_size - 8 - n
    entries: dict[str, TensorEntry] = {}
    for name, info in doc.items():
        where = f"tensor {name!r}"
        if not name:
            raise _fail(source, "empty tensor name")
        if not isinstance(info, dict):
            raise _fail(source, f"{where}: entry must be an object")
        missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
        if missing:
            raise _fail(source, f"{where}: entry lacks {', '.join(missing)}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES or dtype not in TORCH_DTYPES:
            raise _fail(source, f"{where}: unknown dtype {dtype!r} (supported: {', '.join(TORCH_DTYPES)})")
        if not _int_list(shape):
            raise _fail(source, f"{where}: shape must be a list of non-negative integers, got {shape!r}")
        if not _int_list(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
            raise _fail(source, f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, got {offsets!r}")
        start, end = offsets
        if math.prod(d for d in shape if d) * DTYPE_SIZES[dtype] >= _INT64:
            raise _fail(
                source,
                f"{where}: shape {shape!r} is beyond any tensor (a dimension or their product exceeds 2**63 bytes; "
                f"the file holds {file_size} bytes): header corrupt",
            )
        expected = DTYPE_SIZES[dtype] * math.prod(shape)
        if end - start != expected:
            raise _fail(
                source,
                f"{where}: byte size {end - start} does not match dtype {dtype} x shape "
                f"{tuple(shape)} = {expected} bytes",
            )
        if end > data_size:
            raise _fail(
                source,
                f"{where}: data_offsets [{start}, {end}] lie outside the "
                f"{data_size}-byte data section (file truncated or header corrupt)",
            )
        entries[name] = TensorEntry(name, dtype, tuple(shape), start, end)

    # The tensors must tile the data section: no overlap, no gap, nothing after the last one.
    cursor, previous = 0, None
    for entry in sorted(entries.values(), key=lambda e: (e.start, e.end)):
        if entry.start < cursor:
            raise _fail(
                source,
                f"tensor {entry.name!r}: data_offsets [{entry.start}, {entry.end}] overlap "
                f"tensor {previous!r} (which ends at {cursor})",
            )
        if entry.start > cursor:
            raise _fail(
                source,
                f"tensor {entry.name!r}: gap of {entry.start - cursor} unused bytes before it "
                f"(data_offsets must be contiguous)",
            )
        cursor, previous = entry.end, entry.name
    if cursor != data_size:
        raise _fail(
            source,
            f"data section is {data_size} bytes but the tensors cover {cursor}: "
            f"{data_size - cursor} trailing bytes (file corrupt or header stale)",
        )

    ordered = dict(sorted(entries.items(), key=lambda kv: (kv[1].start, kv[1].end)))
    return Header(ordered, dict(metadata), n, file_size, source)

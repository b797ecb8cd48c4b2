"""Builders of small, real safetensors files and checkpoints, written with the reference library
(`safetensors.torch.save`) so that swudi's reader is checked against files it did not write."""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from safetensors.torch import save as st_save

from swudi.storage.filesystem import is_local, join_url, resolve

# Every dtype swudi reads, with a shape that includes odd sizes.
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
if hasattr(torch, "float8_e4m3fn"):
    DTYPES["F8_E4M3"] = torch.float8_e4m3fn
    DTYPES["F8_E5M2"] = torch.float8_e5m2


def random_tensor(dtype: torch.dtype, shape: Sequence[int], seed: int = 0) -> torch.Tensor:
    """Random values covering the dtype's bit patterns reasonably (negatives, NaN-free)."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, tuple(shape), generator=g).bool()
    if dtype.is_floating_point:
        return (torch.randn(tuple(shape), generator=g, dtype=torch.float32) * 3).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -(2**31)), min(info.max, 2**31 - 1), tuple(shape), generator=g,
                         dtype=torch.int64).to(dtype)


def tiny_state_dict(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A few tensors shaped like a miniature transformer layer."""
    shapes = {"embed.weight": (11, 8), "layer.0.attn.q.weight": (8, 8), "layer.0.attn.q.bias": (8,),
              "layer.0.mlp.up.weight": (16, 8), "layer.0.mlp.down.weight": (8, 16), "norm.weight": (8,)}
    return {name: random_tensor(dtype, shape, seed * 1000 + i) for i, (name, shape) in enumerate(shapes.items())}


def put_bytes(url: str, data: bytes, storage_options: Mapping[str, Any] | None = None) -> None:
    fs, path = resolve(url, storage_options)
    if is_local(fs):
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, data)


def write_reference(url: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                    storage_options: Mapping[str, Any] | None = None) -> None:
    """One safetensors file written by the reference implementation."""
    put_bytes(url, st_save(dict(tensors), metadata=dict(metadata) if metadata else None), storage_options)


def write_reference_checkpoint(folder_url: str, tensors: Mapping[str, torch.Tensor],
                               shards: Sequence[Sequence[str]] | None = None,
                               storage_options: Mapping[str, Any] | None = None,
                               extra_files: Mapping[str, bytes] | None = None,
                               index_override: Mapping[str, Any] | None = None) -> list[str]:
    """A Hugging Face style folder: `model.safetensors`, or shards + index when `shards` is given."""
    written = []
    if not shards or len(shards) == 1:
        write_reference(join_url(folder_url, "model.safetensors"), tensors, {"format": "pt"}, storage_options)
        written.append("model.safetensors")
    else:
        n = len(shards)
        weight_map = {}
        for k, names in enumerate(shards, start=1):
            file_name = f"model-{k:05d}-of-{n:05d}.safetensors"
            write_reference(join_url(folder_url, file_name), {m: tensors[m] for m in names}, {"format": "pt"},
                            storage_options)
            weight_map.update(dict.fromkeys(names, file_name))
            written.append(file_name)
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = dict(index_override) if index_override is not None else {
            "metadata": {"total_size": total}, "weight_map": weight_map}
        put_bytes(join_url(folder_url, "model.safetensors.index.json"), json.dumps(index).encode(), storage_options)
        written.append("model.safetensors.index.json")
    for name, data in (extra_files or {}).items():
        put_bytes(join_url(folder_url, name), data, storage_options)
        written.append(name)
    return written


def raw_safetensors(header: Mapping[str, Any] | bytes, data: bytes = b"", declared_length: int | None = None) -> bytes:
    """Hand-made file bytes: length prefix + header JSON (or raw bytes) + data, for crafting bad files."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(blob) if declared_length is None else declared_length
    return struct.pack("<Q", n) + blob + data


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaN payloads and -0.0 included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))

"""Single-file safetensors artefacts (decompositions, merged tensors) at a URL, written atomically.

An artefact is a plain safetensors file: any safetensors reader opens it, and swudi validates its
header completely before trusting it, so a truncated or foreign file is refused, never half-loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from swudi.errors import CheckpointError
from swudi.io.checkpoint import Checkpoint
from swudi.io.header import dtype_name
from swudi.io.writer import TensorSpec, write_safetensors
from swudi.storage.filesystem import resolve

__all__ = ["save_tensors", "load_tensors", "exists"]


def save_tensors(
    url: str,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> int:
    """Write `tensors` (+ string `metadata`) as one safetensors file at `url`; return its size.

    Atomic: readers see the previous file or the complete new one (local: temp + os.replace;
    S3: the object appears when its upload completes).
    """
    if not isinstance(tensors, Mapping):
        raise TypeError("tensors must be a mapping of name -> torch.Tensor")
    specs = []
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{url}: {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        specs.append(TensorSpec(str(name), dtype_name(tensor.dtype), tuple(tensor.shape)))
    fs, path = resolve(url, storage_options)
    return write_safetensors(fs, path, specs, tensors.__getitem__, metadata, url)


def load_tensors(
    url: str, storage_options: Mapping[str, Any] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read every tensor and the metadata of the safetensors file at `url`."""
    ckpt = Checkpoint.open(url, storage_options)
    if ckpt.folder_url is not None:
        raise CheckpointError(f"{url}: is a folder; an artefact is a single safetensors file")
    return ckpt.state_dict(), dict(ckpt.metadata)


def exists(url: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """True if a file exists at `url`."""
    fs, path = resolve(url, storage_options)
    try:
        return fs.info(path).get("type") == "file"
    except FileNotFoundError:
        return False

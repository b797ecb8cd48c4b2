"""Write models in the Hugging Face layout, streaming one tensor at a time.

Layout (as transformers writes it): one shard -> `model.safetensors`, no index; several ->
`model-0000k-of-0000n.safetensors` + `model.safetensors.index.json` with `metadata.total_size`
(sum of tensor bytes) and `weight_map` (tensor -> shard file). Every shard's header carries
`__metadata__ = {"format": "pt"}` (transformers refuses other formats).

A shard is written as: header (computed from the planned dtypes and shapes), then each tensor's
bytes as `read_fn(name)` returns them. Only one tensor is held at a time, never a whole shard.
Each file appears complete or not at all (`open_atomic`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import torch
from fsspec import AbstractFileSystem

from swudi.errors import CheckpointError
from swudi.io.checkpoint import _OTHER_WEIGHT_SUFFIXES, INDEX_NAME, WEIGHTS_NAME, Checkpoint
from swudi.io.header import DTYPE_SIZES, dtype_name, torch_dtype
from swudi.storage.filesystem import find_files, is_local, join_url, open_atomic, resolve, write_bytes_atomic
from swudi.units import parse_size

__all__ = [
    "TensorSpec",
    "WrittenModel",
    "DEFAULT_MAX_SHARD_SIZE",
    "tensor_nbytes",
    "plan_shards",
    "shard_names",
    "TensorData",
    "layout_order",
    "SafetensorsStream",
    "safetensors_stream",
    "write_safetensors",
    "write_sharded",
    "copy_extra_files",
    "files_to_copy",
    "is_copied_file",
    "check_links",
    "check_folder_links",
    "COPIED_NAMES",
    "PRODUCT_FILES",
]

#: What a writer takes for one tensor: the tensor, or its row chunks (along dim 0) in order.
TensorData = torch.Tensor | Iterable[torch.Tensor]

#: transformers' historical default (5 GB, decimal).
DEFAULT_MAX_SHARD_SIZE = 5_000_000_000
_COPY_CHUNK = 8 * 2**20


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to write: name, safetensors dtype name (or torch dtype), shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @classmethod
    def of(cls, spec: Sequence[Any] | TensorSpec) -> TensorSpec:
        if isinstance(spec, TensorSpec):
            return spec
        name, dtype, shape = spec
        return cls(str(name), dtype_name(dtype), tuple(int(s) for s in shape))

    @property
    def nbytes(self) -> int:
        return DTYPE_SIZES[self.dtype] * math.prod(self.shape)


@dataclass(frozen=True)
class WrittenModel:
    """What `write_sharded` wrote: file names relative to `url`, total tensor bytes, weight map."""

    url: str
    files: list[str]
    total_size: int
    weight_map: dict[str, str] = field(repr=False)


def tensor_nbytes(dtype: str | torch.dtype, shape: Sequence[int]) -> int:
    return DTYPE_SIZES[dtype_name(dtype)] * math.prod(shape)


def plan_shards(specs: Sequence[Sequence[Any] | TensorSpec], max_shard_size: int | str) -> list[list[str]]:
    """Group tensors, in the given order, into shards of at most `max_shard_size` tensor bytes.

    Greedy like transformers / huggingface_hub: a shard is closed when the next tensor would overflow
    it; a tensor larger than the limit gets a shard of its own (the open shard keeps filling).
    """
    limit = parse_size(max_shard_size)
    shards: list[list[str]] = []
    current: list[str] = []
    current_size = 0
    seen = set()
    for spec in map(TensorSpec.of, specs):
        if spec.name in seen:
            raise CheckpointError(f"tensor {spec.name!r} planned twice")
        seen.add(spec.name)
        if spec.nbytes > limit:
            shards.append([spec.name])
            continue
        if current and current_size + spec.nbytes > limit:
            shards.append(current)
            current, current_size = [], 0
        current.append(spec.name)
        current_size += spec.nbytes
    if current or not shards:
        shards.append(current)
    return shards


def shard_names(count: int) -> list[str]:
    """File names of `count` shards in the Hugging Face layout."""
    if count == 1:
        return [WEIGHTS_NAME]
    return [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]


def _header_bytes(specs: list[TensorSpec], metadata: Mapping[str, str] | None) -> bytes:
    doc: dict[str, Any] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise CheckpointError("safetensors metadata must map strings to strings")
        doc["__metadata__"] = dict(metadata)
    offset = 0
    for spec in specs:
        doc[spec.name] = {
            "dtype": spec.dtype,
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    blob = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # data section starts 8-byte aligned, as the reference pads
    return struct.pack("<Q", len(blob)) + blob


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return t.view(torch.uint8).numpy().data  # a memoryview of the tensor's bytes


def layout_order(specs: Sequence[Sequence[Any] | TensorSpec]) -> list[TensorSpec]:
    """The order tensors are laid out in a file: by decreasing element size, then as given, so that
    every tensor starts aligned to its element size (as the reference writer does)."""
    return sorted(map(TensorSpec.of, specs), key=lambda s: -DTYPE_SIZES[s.dtype])


class SafetensorsStream:
    """Push-style writer of one safetensors file whose header is already written.

    ``write(name, data)`` appends the bytes of tensor ``name`` — the whole tensor or its next row
    chunk (a slice along dim 0) — in :attr:`order`; each piece is checked against the planned dtype
    and trailing shape, and a tensor is complete when its planned bytes are written. Only the piece
    passed is ever held, so a tensor of any size streams through in chunks.
    """

    def __init__(self, f: IO[bytes], order: list[TensorSpec], source: str):
        self.order = order
        self.source = source
        self.written = 0
        self._f = f
        self._next = 0  # index in order of the tensor being written
        self._done = 0  # its bytes written so far

    def _raw(self, data: bytes | memoryview) -> None:
        self.written += _write(self._f, data)

    def write(self, name: str, data: torch.Tensor) -> None:
        if isinstance(data, torch.Tensor) and data.dim() >= 1 and data.shape[0] == 0 and data.numel() == 0:
            planned = next((s for s in self.order if s.name == name and s.shape), None)
            if planned is not None and tuple(data.shape[1:]) == planned.shape[1:]:
                return  # an empty row chunk adds no bytes (it may come after its tensor is complete)
        if self._next >= len(self.order):
            raise CheckpointError(f"{self.source}: tensor {name!r} written after the last planned tensor")
        spec = self.order[self._next]
        where = f"{self.source}: tensor {spec.name!r}"
        if name != spec.name:
            raise CheckpointError(f"{where} is due next, got {name!r}")
        if not isinstance(data, torch.Tensor):
            raise CheckpointError(f"{where}: got {type(data).__name__}, not a torch.Tensor")
        whole = tuple(data.shape) == spec.shape and self._done == 0
        rows = len(spec.shape) >= 1 and data.dim() == len(spec.shape) and tuple(data.shape[1:]) == spec.shape[1:]
        if data.dtype != torch_dtype(spec.dtype) or not (whole or rows):
            raise CheckpointError(
                f"{where}: got {data.dtype} {list(data.shape)}, planned {spec.dtype} {list(spec.shape)} "
                "(whole, or row chunks along dim 0)"
            )
        n = data.numel() * data.element_size()
        if self._done + n > spec.nbytes:
            raise CheckpointError(
                f"{where}: got {data.dtype} {list(data.shape)} after {self._done} bytes, planned {spec.dtype} "
                f"{list(spec.shape)} ({spec.nbytes} bytes)"
            )
        self._raw(_tensor_bytes(data))
        self._done += n
        if self._done == spec.nbytes:
            self._next, self._done = self._next + 1, 0

    def finish_tensor(self, name: str) -> None:
        """Check that tensor `name` is complete (an empty tensor needs no bytes)."""
        if self._next < len(self.order) and self.order[self._next].name == name:
            spec = self.order[self._next]
            if spec.nbytes or self._done:
                raise CheckpointError(
                    f"{self.source}: tensor {name!r} incomplete ({self._done} of {spec.nbytes} bytes written)"
                )
            self._next += 1

    def finish(self) -> None:
        """Check that every planned tensor was written in full."""
        while self._next < len(self.order):
            self.finish_tensor(self.order[self._next].name)


@contextlib.contextmanager
def safetensors_stream(
    fs: AbstractFileSystem,
    path: str,
    specs: Sequence[Sequence[Any] | TensorSpec],
    metadata: Mapping[str, str] | None = None,
    source: str | None = None,
) -> Iterator[SafetensorsStream]:
    """Open one safetensors file at `path` for streaming: the header (from the planned dtypes and
    shapes, :func:`layout_order`) is written first, the caller then writes each tensor's bytes in
    that order. The file appears only if every tensor was written in full (`open_atomic`); on an
    error or an incomplete write nothing is left at `path`."""
    source = source or path
    order = layout_order(specs)
    names = [s.name for s in order]
    if len(set(names)) != len(names):
        raise CheckpointError(f"{source}: duplicate tensor names")
    head = _header_bytes(order, metadata)
    with open_atomic(fs, path) as f:
        stream = SafetensorsStream(f, order, source)
        stream._raw(head)
        yield stream
        stream.finish()


def write_safetensors(
    fs: AbstractFileSystem,
    path: str,
    specs: Sequence[Sequence[Any] | TensorSpec],
    read_fn: Callable[[str], TensorData],
    metadata: Mapping[str, str] | None = None,
    source: str | None = None,
) -> int:
    """Stream one safetensors file to `path`; return its size in bytes.

    `read_fn(name)` is called in :func:`layout_order` and returns the tensor, or an iterable of its
    row chunks (dim 0, in order) so that a tensor larger than memory passes through in pieces.
    """
    with safetensors_stream(fs, path, specs, metadata, source) as stream:
        for spec in stream.order:
            data = read_fn(spec.name)
            for piece in [data] if isinstance(data, torch.Tensor) else data:
                stream.write(spec.name, piece)
                del piece
            stream.finish_tensor(spec.name)
            del data
    return stream.written


def _write(f: IO[bytes], data: bytes | memoryview) -> int:
    n = len(data)
    if n:
        f.write(data)
    return n


def write_sharded(
    url: str,
    specs: Sequence[Sequence[Any] | TensorSpec],
    read_fn: Callable[[str], TensorData],
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    storage_options: Mapping[str, Any] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> WrittenModel:
    """Write a model folder at `url` in the Hugging Face layout; tensors come from `read_fn(name)`.

    Writes shards in order, then the index (several shards only). Other files already in the folder
    are left alone: write into a fresh folder (see `publish.publish_version`).
    """
    tensors = [TensorSpec.of(s) for s in specs]
    by_name = {s.name: s for s in tensors}
    plan = plan_shards(tensors, max_shard_size)
    names = shard_names(len(plan))
    fs, _ = resolve(url, storage_options)
    shard_metadata = {"format": "pt", **(metadata or {})}
    weight_map: dict[str, str] = {}
    for file_name, members in zip(names, plan, strict=True):
        shard_url = join_url(url, file_name)
        _, path = resolve(shard_url, storage_options)
        write_safetensors(fs, path, [by_name[m] for m in members], read_fn, shard_metadata, shard_url)
        weight_map.update(dict.fromkeys(members, file_name))
    total = sum(s.nbytes for s in tensors)
    files = list(names)
    if len(plan) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        write_bytes_atomic(join_url(url, INDEX_NAME), (json.dumps(index, indent=2) + "\n").encode(), storage_options)
        files.append(INDEX_NAME)
    return WrittenModel(url, files, total, weight_map)


#: Files of a base that a merged version gets besides its weights: what the architecture, its
#: tokenizer or processor and sentence-transformers need to load the model (file names at the top of
#: the checkpoint folder). Nothing else is copied: not the base's README.md (the version has its own
#: card), notes, scripts, nor a file the product writes itself (:data:`PRODUCT_FILES`).
COPIED_NAMES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.txt",
        "vocab.json",
        "merges.txt",
        "tokenizer.model",
        "spiece.model",
        "sentencepiece.bpe.model",
        "source.spm",
        "target.spm",
        "preprocessor_config.json",
        "processor_config.json",
        "video_preprocessor_config.json",
        "chat_template.json",
        "chat_template.jinja",
        "modules.json",
        "sentence_bert_config.json",
        "config_sentence_transformers.json",
    }
)
#: Also copied: ``*.tiktoken`` vocabularies, the code of ``trust_remote_code`` architectures
#: (``configuration_*.py``, ``modeling_*.py``, ``tokenization_*.py``), and the settings of
#: sentence-transformers modules (``1_Pooling/config.json``, ``2_Dense/config.json``: JSON or text
#: files one level down in a folder named ``<n>_<Module>``).
_COPIED_PATTERN = re.compile(
    r"[^/]+\.tiktoken|(configuration|modeling|tokenization)_[\w.-]+\.py|\d+_[A-Za-z]\w*/[^/]+\.(json|txt)"
)
#: Written by swudi into every version; never carried over from a base (a published version used as
#: the base of a chained merge holds them, and they describe that version, not the new one).
PRODUCT_FILES = ("adapter/", "swudi_version.json", "merge_report.json", "README.md")


def is_copied_file(name: str) -> bool:
    """Whether the file ``name`` (relative to a base's folder, ``/``-separated) is copied into a
    merged version (:data:`COPIED_NAMES`, the patterns above; never :data:`PRODUCT_FILES`)."""
    if name in PRODUCT_FILES or name.startswith(PRODUCT_FILES[0]):
        return False
    return name in COPIED_NAMES or _COPIED_PATTERN.fullmatch(name) is not None


def files_to_copy(checkpoint: Checkpoint) -> tuple[str, ...]:
    """The base's files that a merged version gets (:func:`is_copied_file`), after checking every
    symbolic link among the folder's non-weight files (:func:`check_links`)."""
    names = [*checkpoint.extra_files, *nested_extra_files(checkpoint)]
    check_links(checkpoint, names)
    return tuple(name for name in names if is_copied_file(name))


def check_links(checkpoint: Checkpoint, names: Sequence[str]) -> None:
    """:func:`check_folder_links` for a local checkpoint folder's files ``names`` (no-op elsewhere)."""
    if checkpoint.folder_url is None:
        return
    fs, root = resolve(checkpoint.folder_url, checkpoint.storage_options)
    if is_local(fs):
        check_folder_links(root, names)


def check_folder_links(folder: str, names: Sequence[str] | None = None) -> None:
    """Refuse a file of a local checkpoint folder that resolves outside it (a symbolic link, or a
    path through a linked folder), naming the link: its content would be published.

    Allowed targets: inside the folder itself, or, for a Hugging Face hub cache snapshot
    (``models--org--name/snapshots/<rev>/``), the same repository's ``blobs/``. Weight shards that
    are only read are not checked (they may be linked from anywhere). ``names``: paths relative to
    the folder; default: every non-weight file under it (hidden ones left out), linked folders too.
    """
    folder = os.path.abspath(folder)
    if not os.path.isdir(folder):
        return
    allowed = [os.path.realpath(folder)]
    snapshots = os.path.dirname(folder)
    if os.path.basename(snapshots) == "snapshots" and os.path.basename(os.path.dirname(snapshots)).startswith(
        "models--"
    ):
        allowed.append(os.path.realpath(os.path.join(os.path.dirname(snapshots), "blobs")))
    for name in _non_weight_files(folder) if names is None else names:
        path = os.path.join(folder, *name.split("/"))
        target = os.path.realpath(path)
        if not any(target == root or target.startswith(root + os.sep) for root in allowed):
            raise CheckpointError(
                f"{path}: symbolic link to {target}, outside the checkpoint folder {folder} (its content would "
                "be published); copy the file into the folder or remove the link"
            )


def _non_weight_files(folder: str) -> list[str]:
    """Every file (and linked folder) under ``folder`` but weights, index files and hidden names."""
    names = []
    for dirpath, dirnames, filenames in os.walk(folder):
        rel = os.path.relpath(dirpath, folder)
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        linked = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in linked]
        for name in [*filenames, *linked]:
            lower = name.lower()
            if name.startswith(".") or lower.endswith(_OTHER_WEIGHT_SUFFIXES) or lower.endswith(".index.json"):
                continue
            names.append(prefix + name)
    return names


def copy_extra_files(
    checkpoint: Checkpoint,
    dest_url: str,
    storage_options: Mapping[str, Any] | None = None,
    names: Sequence[str] | None = None,
) -> list[str]:
    """Copy the checkpoint's non-weight files (config, tokenizer, ...) into `dest_url`: `names`, by
    default :func:`files_to_copy` (the copy policy, links checked).

    The source is read with the checkpoint's own storage options, the destination written with
    `storage_options` (they may be different stores). Returns the names copied.
    """
    names = list(files_to_copy(checkpoint) if names is None else names)
    if not names:
        return []
    src_fs, _ = resolve(checkpoint.file_url(names[0]), checkpoint.storage_options)
    dest_fs, _ = resolve(dest_url, storage_options)
    for name in names:
        _, src = resolve(checkpoint.file_url(name), checkpoint.storage_options)
        _, dst = resolve(join_url(dest_url, name), storage_options)
        with src_fs.open(src, "rb") as fin, open_atomic(dest_fs, dst) as fout:
            while chunk := fin.read(_COPY_CHUNK):
                fout.write(chunk)
    return names


def nested_extra_files(checkpoint: Checkpoint) -> tuple[str, ...]:
    """Non-weight files in subfolders of the checkpoint's folder (``1_Pooling/config.json`` of a
    sentence-transformers model, ``original/params.json``...), as paths relative to the folder.

    Hidden files and folders, weights of any format and index files are left out; a single-file
    checkpoint has none.
    """
    if checkpoint.folder_url is None:
        return ()
    fs, root = resolve(checkpoint.folder_url, checkpoint.storage_options)
    prefix = root.rstrip("/") + "/"
    names = []
    for path in find_files(fs, root):
        rel = path[len(prefix) :] if path.startswith(prefix) else ""
        parts = rel.split("/")
        if len(parts) < 2 or any(part.startswith(".") for part in parts):
            continue
        lower = rel.lower()
        if lower.endswith(_OTHER_WEIGHT_SUFFIXES) or lower.endswith(".index.json"):
            continue
        names.append(rel)
    return tuple(sorted(names))

"""Open a safetensors checkpoint at any fsspec URL from its headers alone; read tensors lazily.

Accepted layouts:
- a folder with `model.safetensors` (transformers' single-file layout);
- a folder with `model.safetensors.index.json` + shards (transformers' sharded layout), or the URL of
  that index file;
- a folder holding exactly one other `*.safetensors` file;
- the URL of a single safetensors file (any name).

Opening reads only the headers, with range reads (one per shard, two when a header is larger than
64 KiB; batched across shards). `read(name)` is one range read of the tensor's bytes (local files:
`readinto` at an offset, no copy). Pickle checkpoints are refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import posixpath
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from fsspec import AbstractFileSystem

from swudi.errors import CheckpointError, CheckpointNotFoundError
from swudi.io.fingerprint import checkpoint_fingerprint, shard_fingerprint, tensor_fingerprint
from swudi.io.header import DuplicateKeyError, Header, header_length, parse_header, reject_duplicate_keys, torch_dtype
from swudi.storage.filesystem import is_local, join_url, list_folder, parent_url, resolve

__all__ = [
    "Checkpoint",
    "TensorLocation",
    "read_tensor",
    "read_safetensors_header",
    "WEIGHTS_NAME",
    "INDEX_NAME",
    "PICKLE_SUFFIXES",
]

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
#: First read of a file: the 8-byte length and, usually, the whole header.
SPECULATIVE_READ = 64 * 1024
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
#: Weight files of other frameworks / formats: neither read nor copied as "extra files".
_OTHER_WEIGHT_SUFFIXES = (*PICKLE_SUFFIXES, ".h5", ".msgpack", ".onnx", ".gguf", ".ot", ".tflite", ".safetensors")
#: Not copied to a merged model: the model card describes the base model, not the merge.
_NOT_EXTRA = {"README.md", INDEX_NAME}

CONVERT_HINT = (
    "swudi reads safetensors only: pickle files can execute code when loaded. Convert once, in an "
    "environment you trust: for a transformers model folder, "
    "`AutoModel.from_pretrained(DIR).save_pretrained(OUT, safe_serialization=True)`; for a plain state "
    "dict, `safetensors.torch.save_file(torch.load(FILE, weights_only=True), 'model.safetensors')` "
    "(or the `convert.py` script of the safetensors project)."
)


@dataclass(frozen=True)
class TensorLocation:
    """Where one tensor's bytes are: enough to read it without reopening the checkpoint."""

    name: str
    shard_url: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the shard file
    end: int
    fingerprint: str

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def rows(self, start: int, stop: int) -> TensorLocation:
        """Where rows ``[start, stop)`` (along dim 0) are: one contiguous byte range of this tensor,
        read like a tensor of shape ``(stop - start, *shape[1:])``."""
        if not self.shape or not 0 <= start <= stop <= self.shape[0]:
            raise ValueError(f"{self.name!r}: rows [{start}, {stop}) outside shape {list(self.shape)}")
        row = self.nbytes // self.shape[0] if self.shape[0] else 0
        return dataclasses.replace(
            self,
            shape=(stop - start, *self.shape[1:]),
            start=self.start + start * row,
            end=self.start + stop * row,
            fingerprint=f"{self.fingerprint}[{start}:{stop}]",
        )


@dataclass(frozen=True)
class _Shard:
    url: str
    path: str
    size: int
    fingerprint: str
    header: Header
    local_stat: tuple[int, int] | None  # (size, mtime_ns) at open time, local files only


def _tensor_from_bytes(buf: bytearray | memoryview | bytes, loc: TensorLocation) -> torch.Tensor:
    if len(buf) != loc.nbytes:
        raise CheckpointError(
            f"{loc.shard_url}: tensor {loc.name!r}: read {len(buf)} bytes, expected "
            f"{loc.nbytes} (file changed or truncated since it was opened?)"
        )
    dtype = torch_dtype(loc.dtype, loc.shard_url)
    if loc.nbytes == 0:
        return torch.empty(loc.shape, dtype=dtype)
    if not isinstance(buf, bytearray):
        buf = bytearray(buf)
    return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(loc.shape)


def _read_local(path: str, loc: TensorLocation, expect: tuple[int, int] | None = None) -> torch.Tensor:
    dtype = torch_dtype(loc.dtype, loc.shard_url)
    out = torch.empty(loc.nbytes, dtype=torch.uint8)
    with open(path, "rb", buffering=0) as f:
        if expect is not None:
            st = os.fstat(f.fileno())
            if (st.st_size, st.st_mtime_ns) != expect:
                raise CheckpointError(
                    f"{loc.shard_url}: file changed since the checkpoint was opened (size/mtime differ); reopen it"
                )
        view = out.numpy().data if loc.nbytes else memoryview(b"")  # .data: a writable memoryview of the buffer
        got = 0
        while got < loc.nbytes:
            n = os.preadv(f.fileno(), [view[got:]], loc.start + got)
            if n == 0:
                break
            got += n
    if got != loc.nbytes:
        raise CheckpointError(
            f"{loc.shard_url}: tensor {loc.name!r}: file ends after {got} of "
            f"{loc.nbytes} bytes (truncated since it was opened?)"
        )
    return out.view(dtype).reshape(loc.shape)


def read_tensor(location: TensorLocation, storage_options: Mapping[str, Any] | None = None) -> torch.Tensor:
    """Read one tensor from its location record (one range read), bit-exact, on CPU."""
    if location.nbytes == 0:  # a zero-length range would read the whole object on S3
        return torch.empty(location.shape, dtype=torch_dtype(location.dtype, location.shard_url))
    fs, path = resolve(location.shard_url, storage_options)
    if is_local(fs):
        return _read_local(path, location)
    return _tensor_from_bytes(fs.cat_file(path, start=location.start, end=location.end), location)


def _raise_pickle(source: str, names: Iterable[str] = ()) -> None:
    found = ", ".join(names)
    raise CheckpointError(f"{source}: pickle checkpoint{' (' + found + ')' if found else ''} refused. " + CONVERT_HINT)


def read_safetensors_header(fs: AbstractFileSystem, path: str, size: int, source: str) -> Header:
    """Read and validate the header of one file with range reads."""
    return _read_headers(fs, [(path, size, source)])[0]


def _read_headers(fs: AbstractFileSystem, files: list[tuple[str, int, str]]) -> list[Header]:
    """Headers of several files: one speculative range read each (batched), a second when needed."""
    if not files:
        return []
    paths = [p for p, _, _ in files]
    ends = [min(SPECULATIVE_READ, size) for _, size, _ in files]
    first = _cat_ranges(fs, paths, [0] * len(files), ends, [s for _, _, s in files])
    lengths = [header_length(b, size, src) for b, (_, size, src) in zip(first, files, strict=True)]
    todo = [i for i, n in enumerate(lengths) if 8 + n > len(first[i])]
    if todo:
        rest = _cat_ranges(
            fs,
            [paths[i] for i in todo],
            [len(first[i]) for i in todo],
            [8 + lengths[i] for i in todo],
            [files[i][2] for i in todo],
        )
        for i, more in zip(todo, rest, strict=True):
            first[i] = first[i] + more
    return [parse_header(b, size, src) for b, (_, size, src) in zip(first, files, strict=True)]


def _cat_ranges(
    fs: AbstractFileSystem, paths: list[str], starts: list[int], ends: list[int], sources: list[str]
) -> list[bytes]:
    if len(paths) == 1 or is_local(fs):
        out = []
        for p, s, e, src in zip(paths, starts, ends, sources, strict=True):
            try:
                out.append(fs.cat_file(p, start=s, end=e))
            except FileNotFoundError:
                raise CheckpointNotFoundError(f"{src}: file not found") from None
        return out
    results = fs.cat_ranges(paths, starts, ends, on_error="return")
    for r, src in zip(results, sources, strict=True):
        if isinstance(r, FileNotFoundError):
            raise CheckpointNotFoundError(f"{src}: file not found")
        if isinstance(r, BaseException):
            raise CheckpointError(f"{src}: cannot read header: {r}") from r
    return list(results)


def _check_shard_name(index_url: str, shard: Any) -> str:
    """A weight_map value must name a file inside the checkpoint folder."""
    bad = None
    if not isinstance(shard, str) or not shard:
        bad = "is not a non-empty string"
    elif "://" in shard or "::" in shard or (len(shard) > 1 and shard[1] == ":"):
        bad = "has a URL scheme or drive (shards must be relative to the index)"
    elif shard.startswith(("/", "\\", "~")) or "\\" in shard:
        bad = "is an absolute path or uses backslashes"
    elif any(part in ("..", ".", "") for part in shard.split("/")):
        bad = "contains '..', '.' or empty path components (shards must stay inside the folder)"
    if bad:
        raise CheckpointError(f"{index_url}: shard path {shard!r} {bad}")
    return shard


class Checkpoint:
    """A safetensors checkpoint opened from its headers. Build with `Checkpoint.open(url)`."""

    url: str
    tensors: dict[str, TensorLocation]
    metadata: dict[str, str]
    extra_files: tuple[str, ...]
    fingerprint: str
    index: dict[str, Any] | None

    def __init__(
        self,
        url: str,
        fs: AbstractFileSystem,
        storage_options: Mapping[str, Any] | None,
        folder_url: str | None,
        shards: list[_Shard],
        index: dict[str, Any] | None,
        extra_files: tuple[str, ...],
    ):
        self.url = url
        self.storage_options = dict(storage_options or {})
        self.folder_url = folder_url
        self.index = index
        self.extra_files = extra_files
        self._fs = fs
        self._shards = {s.url: s for s in shards}
        self.tensors = {}
        self.metadata = {}
        for shard in shards:
            self.metadata.update(shard.header.metadata)
            base = shard.header.data_offset
            for entry in shard.header.entries.values():
                self.tensors[entry.name] = TensorLocation(
                    entry.name,
                    shard.url,
                    entry.dtype,
                    entry.shape,
                    base + entry.start,
                    base + entry.end,
                    tensor_fingerprint(shard.fingerprint, entry),
                )
        names = {
            posixpath.basename(s.url) if folder_url is None else s.url[len(folder_url) + 1 :]: s.fingerprint
            for s in shards
        }
        self.fingerprint = checkpoint_fingerprint(names, index)
        #: bytes read to open it: each shard's header (one speculative range read, a second one for
        #: a longer header) and the index document (added by the index opener)
        self.header_bytes = sum(max(min(SPECULATIVE_READ, s.size), s.header.data_offset) for s in shards)

    # ----------------------------------------------------------------------------------- opening
    @classmethod
    def open(cls, url: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None) -> Checkpoint:
        """Open the checkpoint at `url` (folder, index file or single safetensors file)."""
        url = os.fspath(url).rstrip("/") or "/"
        try:
            return cls._open(url, storage_options)
        except PermissionError as exc:
            raise CheckpointError(
                f"{url}: access denied ({exc}); check the storage options (key/secret, profile, endpoint_url)"
            ) from exc

    @classmethod
    def _open(cls, url: str, storage_options: Mapping[str, Any] | None) -> Checkpoint:
        fs, path = resolve(url, storage_options)
        lower = path.lower()
        if lower.endswith(".index.json"):
            files = _list_files(fs, path.rsplit("/", 1)[0]) if "/" in path else {}
            return cls._open_index(
                url,
                fs,
                path,
                storage_options,
                folder_url=parent_url(url),
                listing=files,
                extra=tuple(sorted(n for n in files if _is_extra_file(n))),
            )
        if lower.endswith(PICKLE_SUFFIXES):
            _raise_pickle(url)
        if lower.endswith(".safetensors"):
            return cls._open_file(url, fs, path, storage_options)

        try:
            listing = _followed(fs, list_folder(fs, path))
        except (FileNotFoundError, NotADirectoryError):
            listing = []
        if (
            len(listing) == 1
            and listing[0]["name"].rstrip("/") == path.rstrip("/")
            and listing[0].get("type") == "file"
        ):
            # `ls` of a file lists the file: a single file without the .safetensors suffix.
            return cls._open_file(url, fs, path, storage_options, info=listing[0])
        files = {posixpath.basename(e["name"].rstrip("/")): e for e in listing if e.get("type") == "file"}
        if not files:
            if _is_file(fs, path):
                return cls._open_file(url, fs, path, storage_options)
            raise CheckpointNotFoundError(f"{url}: no such checkpoint (not a file, or an empty/missing folder)")
        extra = tuple(sorted(n for n in files if _is_extra_file(n)))
        if WEIGHTS_NAME in files:
            if INDEX_NAME in files:
                log.warning(
                    "%s: both %s and %s present; using %s as transformers does",
                    url,
                    WEIGHTS_NAME,
                    INDEX_NAME,
                    WEIGHTS_NAME,
                )
            return cls._open_file(
                join_url(url, WEIGHTS_NAME),
                fs,
                files[WEIGHTS_NAME]["name"],
                storage_options,
                folder_url=url,
                info=files[WEIGHTS_NAME],
                extra=extra,
            )
        if INDEX_NAME in files:
            return cls._open_index(
                join_url(url, INDEX_NAME),
                fs,
                files[INDEX_NAME]["name"],
                storage_options,
                folder_url=url,
                listing=files,
                extra=extra,
            )
        safetensors = sorted(n for n in files if n.endswith(".safetensors"))
        if len(safetensors) == 1:
            name = safetensors[0]
            log.info("%s: using the only safetensors file, %s", url, name)
            return cls._open_file(
                join_url(url, name),
                fs,
                files[name]["name"],
                storage_options,
                folder_url=url,
                info=files[name],
                extra=extra,
            )
        if len(safetensors) > 1:
            raise CheckpointError(
                f"{url}: {len(safetensors)} safetensors files ({', '.join(safetensors)}) "
                f"and no {INDEX_NAME}: point at one file or add an index"
            )
        pickles = sorted(n for n in files if n.lower().endswith(PICKLE_SUFFIXES))
        if pickles:
            _raise_pickle(url, pickles)
        raise CheckpointError(
            f"{url}: no weights found (no {WEIGHTS_NAME}, {INDEX_NAME} or *.safetensors; "
            f"files: {', '.join(sorted(files))})"
        )

    @classmethod
    def _open_file(
        cls,
        url: str,
        fs: AbstractFileSystem,
        path: str,
        storage_options: Mapping[str, Any] | None,
        folder_url: str | None = None,
        info: Mapping[str, Any] | None = None,
        extra: tuple[str, ...] = (),
    ) -> Checkpoint:
        shard = _open_shard(fs, url, path, info)
        return cls(url if folder_url is None else folder_url, fs, storage_options, folder_url, [shard], None, extra)

    @classmethod
    def _open_index(
        cls,
        index_url: str,
        fs: AbstractFileSystem,
        index_path: str,
        storage_options: Mapping[str, Any] | None,
        folder_url: str,
        listing: Mapping[str, Mapping[str, Any]] | None,
        extra: tuple[str, ...] = (),
    ) -> Checkpoint:
        try:
            raw = fs.cat_file(index_path)
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"{index_url}: index file not found") from None
        try:
            index = json.loads(raw, object_pairs_hook=reject_duplicate_keys)
        except DuplicateKeyError as exc:
            raise CheckpointError(
                f"{index_url}: key {exc.key!r} appears twice (the same tensor listed twice?)"
            ) from None
        except ValueError as exc:
            raise CheckpointError(f"{index_url}: not valid JSON: {exc}") from None
        except RecursionError:
            raise CheckpointError(f"{index_url}: JSON nested too deeply; not an index file") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_url}: index must be a JSON object with a non-empty 'weight_map'")
        shard_names = sorted({_check_shard_name(index_url, s) for s in weight_map.values()})
        infos = []
        for name in shard_names:
            shard_path = posixpath.join(index_path.rsplit("/", 1)[0], name) if "/" in index_path else name
            info = (listing or {}).get(name) if "/" not in name else None
            if info is None:
                try:
                    info = _info(fs, shard_path)
                except FileNotFoundError:
                    raise CheckpointError(
                        f"{index_url}: shard {name!r} listed in weight_map not found at {join_url(folder_url, name)}"
                    ) from None
            infos.append((name, shard_path, info))
        headers = _read_headers(fs, [(p, int(i["size"]), join_url(folder_url, n)) for n, p, i in infos])
        shards = [
            _shard_from(fs, join_url(folder_url, n), p, i, h) for (n, p, i), h in zip(infos, headers, strict=True)
        ]

        # Cross-check the index against the headers.
        owner: dict[str, str] = {}
        problems = []
        for name, shard in zip(shard_names, shards, strict=True):
            for tensor in shard.header.entries:
                if tensor in owner:
                    problems.append(f"tensor {tensor!r} is stored in two shards: {owner[tensor]} and {name}")
                else:
                    owner[tensor] = name
        for tensor, shard_name in weight_map.items():
            if tensor not in owner:
                problems.append(f"tensor {tensor!r} is mapped to {shard_name} but not in that shard's header")
            elif owner[tensor] != shard_name and tensor not in shards[shard_names.index(shard_name)].header.entries:
                problems.append(f"tensor {tensor!r} is mapped to {shard_name} but stored in {owner[tensor]}")
        for tensor, shard_name in owner.items():
            if tensor not in weight_map:
                problems.append(f"tensor {tensor!r} is stored in {shard_name} but missing from weight_map")
        if problems:
            raise CheckpointError(f"{index_url}: index does not match its shards:\n  " + "\n  ".join(problems))
        total = (index.get("metadata") or {}).get("total_size") if isinstance(index.get("metadata"), dict) else None
        actual = sum(e.nbytes for s in shards for e in s.header.entries.values())
        if total is not None and total != actual:
            log.warning("%s: metadata.total_size is %s but the shards hold %d tensor bytes", index_url, total, actual)
        checkpoint = cls(folder_url, fs, storage_options, folder_url, shards, index, extra)
        checkpoint.header_bytes += len(raw)
        return checkpoint

    # ----------------------------------------------------------------------------------- reading
    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __len__(self) -> int:
        return len(self.tensors)

    def __repr__(self) -> str:
        return f"Checkpoint({self.url!r}, {len(self.tensors)} tensors, {len(self._shards)} shard(s))"

    @property
    def shard_urls(self) -> list[str]:
        return list(self._shards)

    def location(self, name: str) -> TensorLocation:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.url}: no tensor named {name!r}") from None

    def file_url(self, name: str) -> str:
        """URL of a file of the checkpoint folder (e.g. one of `extra_files`)."""
        if self.folder_url is None:
            raise CheckpointError(f"{self.url}: a single-file checkpoint has no folder")
        return join_url(self.folder_url, name)

    def read(self, name: str) -> torch.Tensor:
        """The tensor `name`, bit-exact, on CPU: one range read."""
        loc = self.location(name)
        shard = self._shards[loc.shard_url]
        if loc.nbytes == 0:  # a zero-length range would read the whole object on S3
            return torch.empty(loc.shape, dtype=torch_dtype(loc.dtype, loc.shard_url))
        if is_local(self._fs):
            return _read_local(shard.path, loc, shard.local_stat)
        return _tensor_from_bytes(self._fs.cat_file(shard.path, start=loc.start, end=loc.end), loc)

    def read_many(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Several tensors; remote reads are issued concurrently (one range request per tensor)."""
        wanted = [self.location(n) for n in names]
        locs = [loc for loc in wanted if loc.nbytes]
        if is_local(self._fs) or len(locs) <= 1:
            return {loc.name: self.read(loc.name) for loc in wanted}
        out = {loc.name: self.read(loc.name) for loc in wanted if loc.nbytes == 0}
        paths = [self._shards[loc.shard_url].path for loc in locs]
        blobs = self._fs.cat_ranges(paths, [loc.start for loc in locs], [loc.end for loc in locs], on_error="return")
        for loc, blob in zip(locs, blobs, strict=True):
            if isinstance(blob, BaseException):
                raise CheckpointError(f"{loc.shard_url}: tensor {loc.name!r}: read failed: {blob}") from blob
            out[loc.name] = _tensor_from_bytes(blob, loc)
        return {loc.name: out[loc.name] for loc in wanted}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor (for small models and tests)."""
        return self.read_many(list(self.tensors))


def _list_files(fs: AbstractFileSystem, folder: str) -> dict[str, dict[str, Any]]:
    try:
        listing = _followed(fs, list_folder(fs, folder))
    except (FileNotFoundError, NotADirectoryError):
        return {}
    return {posixpath.basename(e["name"].rstrip("/")): e for e in listing if e.get("type") == "file"}


def _followed(fs: AbstractFileSystem, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Local listing entries with symbolic links described by their targets.

    A Hugging Face hub cache snapshot (``models--org--name/snapshots/<sha>/``) holds only links into
    ``../../blobs/``; fsspec's local listing resolves a relative link against the working directory
    and reports it as type ``other``. Links made by whoever owns the folder are legitimate: the
    target's type, size and time are used (escapes are only paths written inside an index). A link
    to a missing target is an error naming it.
    """
    if not is_local(fs):
        return entries
    return [_follow(e) if e.get("islink") else e for e in entries]


def _follow(entry: dict[str, Any]) -> dict[str, Any]:
    try:
        st = os.stat(entry["name"])  # follows the link from its own folder
    except OSError:
        raise CheckpointError(
            f"{entry['name']}: broken symbolic link (its target {entry.get('destination')!r} does not exist)"
        ) from None
    kind = "directory" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode) else "other"
    return {**entry, "type": kind, "size": st.st_size, "mtime": st.st_mtime}


def _info(fs: AbstractFileSystem, path: str) -> dict[str, Any]:
    """``fs.info(path)``, a local symbolic link described by its target (:func:`_followed`)."""
    return _followed(fs, [fs.info(path)])[0]


def _is_file(fs: AbstractFileSystem, path: str) -> bool:
    try:
        return _info(fs, path).get("type") == "file"
    except FileNotFoundError:
        return False


def _is_extra_file(name: str) -> bool:
    return not (
        name.startswith(".")
        or name in _NOT_EXTRA
        or name.lower().endswith(_OTHER_WEIGHT_SUFFIXES)
        or name.lower().endswith(".index.json")
    )


def _open_shard(fs: AbstractFileSystem, url: str, path: str, info: Mapping[str, Any] | None) -> _Shard:
    if info is None:
        try:
            info = _info(fs, path)
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"{url}: file not found") from None
    if info.get("type") != "file":
        raise CheckpointError(f"{url}: not a file")
    header = read_safetensors_header(fs, path, int(info["size"]), url)
    return _shard_from(fs, url, path, info, header)


def _shard_from(fs: AbstractFileSystem, url: str, path: str, info: Mapping[str, Any], header: Header) -> _Shard:
    local_stat = None
    if is_local(fs):
        st = os.stat(path)
        local_stat = (st.st_size, st.st_mtime_ns)
    return _Shard(url, path, int(info["size"]), shard_fingerprint(fs, path, info, url), header, local_stat)

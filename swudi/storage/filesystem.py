"""URL -> fsspec filesystem + path, URL joins, storage options pass-through.

Every checkpoint, artefact and output location in swudi is an fsspec URL: a local path, `file://`,
`s3://bucket/key`, or a chained URL such as `simplecache::s3://bucket/key`. `storage_options` come
from the merge config unchanged (`endpoint_url`, `key`/`secret`, `profile`, `client_kwargs`, ...).
For a chained URL, plain options are given to the innermost (storage) layer, the one that needs the
endpoint and credentials; options keyed by protocol (`{"s3": {...}, "simplecache": {...}}`) are
passed as they are.

S3 filesystems get a bounded retry policy (attempts, connect and read timeouts:
:mod:`swudi.storage.retry`) and defaults suited to range reads: no read-ahead cache for files opened with
`fs.open` (s3fs reads 50 MiB ahead by default, so an 8-byte header read would fetch 50 MiB) and no
listings cache (a re-written object must show its new ETag, or fingerprints would be stale).
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import shutil
import uuid
from collections.abc import Iterator, Mapping
from typing import IO, Any

import fsspec
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from swudi.storage.killpoints import storage_event
from swudi.storage.retry import RETRY_KEY, bound_body_retries, s3_layer_options
from swudi.storage.secrets import resolve_secret_refs

__all__ = [
    "resolve",
    "join_url",
    "is_local",
    "is_local_url",
    "parent_url",
    "url_name",
    "open_atomic",
    "write_bytes_atomic",
    "S3_DEFAULTS",
    "list_folder",
    "find_files",
    "is_folder_marker",
    "remove_tree",
]

#: Defaults for s3fs filesystems; any key given in storage_options wins.
S3_DEFAULTS: dict[str, Any] = {
    "default_cache_type": "none",
    "use_listings_cache": False,
}

_S3_PROTOCOLS = ("s3", "s3a")
_DEFAULTS_BY_PROTOCOL: dict[str, dict[str, Any]] = dict.fromkeys(_S3_PROTOCOLS, S3_DEFAULTS)


def _protocol(bit: str, last: bool) -> str:
    protocol, sep, _ = bit.partition("://")
    if sep:
        return protocol
    return "file" if last else bit  # in a chain, a bare word is a protocol ("simplecache::s3://...")


def _storage_layer(protocol: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Options of the storage layer: defaults, the retry policy (S3), the user's options, and any
    secret references resolved (:mod:`swudi.storage.secrets`)."""
    options = resolve_secret_refs(options)
    defaults = _DEFAULTS_BY_PROTOCOL.get(protocol, {})
    if protocol in _S3_PROTOCOLS:
        return s3_layer_options(defaults, options)
    options.pop(RETRY_KEY, None)  # a policy for S3 requests: nothing to tell other filesystems
    return {**defaults, **options}


def _layer_options(url: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Keyword arguments for `fsspec.core.url_to_fs`: defaults + user options on the right layer."""
    options = dict(storage_options or {})
    bits = url.split("::")
    protocols = [_protocol(b, i == len(bits) - 1) for i, b in enumerate(bits)]
    target = protocols[-1]
    if len(bits) == 1:
        return _storage_layer(target, options)
    # Chained: options keyed by a protocol in the chain go to that layer; the rest to the storage layer.
    per_layer = {p: dict(options.pop(p)) for p in set(protocols) if isinstance(options.get(p), Mapping)}
    per_layer[target] = _storage_layer(target, {**options, **per_layer.get(target, {})})
    return per_layer


def resolve(
    url: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> tuple[AbstractFileSystem, str]:
    """Return `(fs, path)` for `url`; `path` is what `fs` methods take."""
    url = os.fspath(url)
    if not url:
        raise ValueError("empty URL")
    fs, path = fsspec.core.url_to_fs(url, **_layer_options(url, storage_options))
    return bound_body_retries(fs), path


def is_local_url(url: str) -> bool:
    """True for a plain local path (no fsspec protocol and no ``::`` chain)."""
    return "://" not in url and "::" not in url


def is_local(fs: AbstractFileSystem) -> bool:
    """True for the plain local filesystem (not a caching wrapper): reads may use pread/mmap."""
    return isinstance(fs, LocalFileSystem)


def _split_chain(url: str) -> tuple[str, str]:
    prefix, sep, last = url.rpartition("::")
    return (prefix + sep), last


def join_url(url: str | os.PathLike[str], *parts: str) -> str:
    """Join path parts onto a URL (the last layer of a chained URL), with `/` separators.

    `join_url("s3://b/out", "versions", "v1")` -> `"s3://b/out/versions/v1"`. Empty parts are skipped;
    parts are relative names (leading and trailing slashes are stripped).
    """
    prefix, last = _split_chain(os.fspath(url))
    if last.endswith("://"):
        base = last
    else:
        base = last.rstrip("/") or "/"
    for part in parts:
        part = str(part).strip("/")
        if not part:
            continue
        base = part if base == "" else (base + part if base.endswith(("/", "://")) else base + "/" + part)
    return prefix + base


def parent_url(url: str | os.PathLike[str]) -> str:
    """The folder containing `url` (same scheme / chain)."""
    prefix, last = _split_chain(os.fspath(url))
    last = last.rstrip("/")
    scheme, sep, rest = last.rpartition("://")
    head = posixpath.dirname(rest)
    return prefix + (scheme + sep if sep else "") + head


def url_name(url: str | os.PathLike[str]) -> str:
    """The last component of `url` (file or folder name)."""
    return posixpath.basename(os.fspath(url).rstrip("/"))


@contextlib.contextmanager
def open_atomic(fs: AbstractFileSystem, path: str) -> Iterator[IO[bytes]]:
    """Open `path` for writing so that readers see the old file or the complete new one, never a part.

    Local: a temporary file in the same folder, fsync'ed, then `os.replace` (and the folder fsync'ed).
    Object stores: the object appears only when the upload completes (one PUT or a completed
    multipart upload); on an exception the upload is discarded.
    """
    if is_local(fs):
        folder = os.path.dirname(path) or "."
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:12]}")
        f = open(tmp, "wb")  # noqa: SIM115 - closed by hand: before os.replace, or before the unlink on error
        try:
            yield f
            f.flush()
            os.fsync(f.fileno())
            f.close()
            storage_event("staged", tmp)
            os.replace(tmp, path)
        except BaseException as exc:
            with contextlib.suppress(OSError):  # closing flushes, which fails again on a full disk
                f.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT) and not exc.filename:
                raise OSError(exc.errno, exc.strerror, path) from exc  # name the file that did not fit
            raise
        _fsync_dir(folder)
        storage_event("committed", path)
        return
    f = fs.open(path, "wb")
    try:
        yield f
    except BaseException:
        discard = getattr(f, "discard", None)
        if callable(discard):
            with contextlib.suppress(Exception):
                discard()
        # Mark closed so that garbage collection does not commit a partial object.
        with contextlib.suppress(Exception):
            f.closed = True
        raise
    storage_event("staged", path)
    f.close()
    storage_event("committed", path)


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(url: str, data: bytes, storage_options: Mapping[str, Any] | None = None) -> None:
    """Write a small object in one piece (local: temp + os.replace; S3: one PUT)."""
    fs, path = resolve(url, storage_options)
    if is_local(fs):
        with open_atomic(fs, path) as f:
            f.write(data)
    else:
        fs.pipe_file(path, data)
        storage_event("committed", path)


# ------------------------------------------------------------------------------------- listings
def is_folder_marker(entry: str | Mapping[str, Any]) -> bool:
    """A zero-byte ``prefix/`` object, as the S3 console's "Create folder" makes: a folder, not a
    file (s3fs lists it as a file named ``bucket/prefix/``)."""
    name = entry if isinstance(entry, str) else str(entry.get("name", ""))
    return name.endswith("/")


def list_folder(fs: AbstractFileSystem, path: str, detail: bool = True) -> list[Any]:
    """``fs.ls(path)`` without folder marker objects (:func:`is_folder_marker`). Every listing of a
    folder in swudi goes through it (or :func:`find_files`); a path is never a glob pattern."""
    return [entry for entry in fs.ls(path, detail=detail) if not is_folder_marker(entry)]


def find_files(fs: AbstractFileSystem, path: str) -> dict[str, dict[str, Any]]:
    """``fs.find(path, detail=True)`` (every file below ``path``) without folder marker objects."""
    return {name: info for name, info in fs.find(path, detail=True).items() if not is_folder_marker(name)}


def remove_tree(fs: AbstractFileSystem, path: str) -> None:
    """Remove the folder ``path`` and everything below it, ``path`` taken literally.

    ``fs.rm(path, recursive=True)`` expands ``[ ] * ?`` in ``path`` as a glob pattern (fsspec's
    ``expand_path``): a folder named ``out [v2]`` would not be found, or another one removed. Here
    every object below it is listed (:meth:`find`, markers included) and deleted one by one.
    """
    if is_local(fs):
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(path)
        return
    prefix = path.rstrip("/")
    names = [name for name in fs.find(prefix) if name == prefix or name.startswith(prefix + "/")]
    for name in [*names, prefix + "/"]:
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(name)

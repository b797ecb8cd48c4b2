"""Checks run before a merge starts any work: what would otherwise fail late, or with a traceback.

:func:`check_before_merge` raises one :class:`~swudi.errors.SwudiError` naming the key or location
at fault when an input checkpoint is missing or unreadable, the output or work folder cannot be
written (missing bucket, access denied, read-only or missing parent folder), ``device: cuda`` is
asked for where CUDA is not available, the configured Dask scheduler does not answer, or an optional
package the config needs (the ``[dask]`` or ``[s3]`` extra) is not installed. Each check
costs at most a few metadata requests or one TCP connection.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from urllib.parse import urlsplit

from swudi.config.merge_config import MergeConfig
from swudi.core.device import resolve_device
from swudi.errors import CheckpointError, ConfigError
from swudi.io.writer import check_folder_links
from swudi.storage.filesystem import is_local, resolve

__all__ = [
    "check_base_links",
    "check_before_merge",
    "check_extras",
    "check_device",
    "check_scheduler",
    "check_writable",
    "check_inputs_readable",
]

#: Optional packages per extra of the distribution (pyproject.toml), by import name.
EXTRAS = {"dask": ("dask", "distributed", "prefect_dask"), "s3": ("s3fs",)}

#: Seconds to wait for the Dask scheduler's TCP port.
SCHEDULER_TIMEOUT_S = 5.0


def check_inputs_readable(config: MergeConfig) -> None:
    """Every checkpoint URL exists and may be read (all missing ones named in one error)."""
    missing = []
    for role, url in [("base", config.base), *((f"experts[{i}]", u) for i, u in enumerate(config.experts))]:
        fs, path = resolve(url, config.storage_options)
        try:
            found = fs.exists(path)
        except PermissionError as error:
            raise CheckpointError(
                f"{role} {url}: access denied ({error}); check storage_options (key/secret, profile, endpoint_url)"
            ) from None
        if not found:
            missing.append(f"{role}: {url}")
    if missing:
        raise CheckpointError("checkpoint(s) not found: " + "; ".join(missing))


def check_writable(key: str, url: str, config: MergeConfig) -> None:
    """The folder ``url`` (config key ``key``) can be created and written.

    Local: the nearest existing folder above it must be a writable folder. Remote: the bucket must
    exist and be visible with these storage options.
    """
    fs, path = resolve(url, config.storage_options)
    if is_local(fs):
        probe = os.path.abspath(path)
        while not os.path.exists(probe):
            probe = os.path.dirname(probe)
        if not os.path.isdir(probe):
            raise ConfigError(f"{key} {url}: {probe} is a file, not a folder; choose another {key}")
        if not os.access(probe, os.W_OK | os.X_OK):
            raise ConfigError(f"{key} {url}: {probe} is not writable by this user; choose another {key}")
        return
    bucket = path.split("/", 1)[0]
    try:
        found = fs.exists(bucket)
    except PermissionError as error:
        raise ConfigError(f"{key} {url}: access denied to bucket {bucket!r} ({error}); check storage_options") from None
    if not found:
        raise ConfigError(
            f"{key} {url}: bucket {bucket!r} does not exist (or these credentials cannot see it); "
            "create it or fix the URL / storage_options"
        )


def check_device(config: MergeConfig) -> None:
    """``device: cuda`` needs CUDA here when the tasks run on this machine (threads, local Dask)."""
    if config.device == "cuda" and not (config.task_runner.kind == "dask" and config.task_runner.address):
        try:
            resolve_device("cuda")
        except ConfigError as error:
            raise ConfigError(f"device: {error}") from None


def check_scheduler(config: MergeConfig) -> None:
    """A configured Dask scheduler address answers on its TCP port."""
    address = config.task_runner.address
    if config.task_runner.kind != "dask" or not address:
        return
    split = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        host, port = split.hostname, split.port
    except ValueError:
        host, port = None, None
    if not host or not port:
        raise ConfigError(f"task_runner.address {address!r} is not of the form tcp://host:port")
    try:
        with socket.create_connection((host, port), timeout=SCHEDULER_TIMEOUT_S):
            pass
    except OSError as error:
        raise ConfigError(
            f"task_runner.address {address}: the Dask scheduler does not answer ({error.strerror or error}); "
            "start it, fix the address, or remove it to start a local cluster"
        ) from None


def check_base_links(config: MergeConfig) -> None:
    """A local base folder's files that a version may get resolve inside it (or the hub cache's
    blobs): :func:`swudi.io.writer.check_folder_links`."""
    fs, path = resolve(config.base, config.storage_options)
    if is_local(fs):
        check_folder_links(path)


def check_extras(config: MergeConfig) -> None:
    """The optional packages this config needs are installed: ``task_runner.kind: dask`` the
    ``[dask]`` extra, an ``s3://`` location the ``[s3]`` extra (one error naming the extra)."""
    needed = {"dask": config.task_runner.kind == "dask"}
    locations = [config.base, *config.experts, config.output, config.resolved_work_dir]
    needed["s3"] = any(str(url).startswith(("s3://", "s3a://")) or "::s3://" in str(url) for url in locations)
    for extra, wanted in needed.items():
        missing = [name for name in EXTRAS[extra] if wanted and importlib.util.find_spec(name) is None]
        if missing:
            why = "task_runner.kind: dask" if extra == "dask" else "an s3:// location"
            raise ConfigError(
                f"{why} needs the optional packages of swudi's [{extra}] extra ({', '.join(missing)} missing): "
                f"pip install 'swudi[{extra}]'"
            )


def check_before_merge(config: MergeConfig) -> None:
    """All of the module's checks, cheapest first."""
    check_extras(config)
    check_device(config)
    check_inputs_readable(config)
    check_base_links(config)
    check_writable("output", config.output, config)
    check_writable("work_dir", config.resolved_work_dir, config)
    check_scheduler(config)

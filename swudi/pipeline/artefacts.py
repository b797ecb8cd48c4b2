"""The artefact store: ``WORK/<kind>/<key>.safetensors``, opened from its header and checked against its
key and format (a missing or damaged artefact is recomputed, never handed on), listed, loaded, saved."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from swudi.config.merge_config import MergeConfig
from swudi.core.decomposition import Decomposition
from swudi.core.task_svd import TaskSVDs
from swudi.errors import CheckpointError, CheckpointNotFoundError, InputError
from swudi.io.artifacts import save_tensors
from swudi.io.checkpoint import Checkpoint
from swudi.pipeline.reads import StepCost
from swudi.pipeline.records import DELTA_FORMAT, MERGED, MERGED_FORMAT, RECORD_FORMAT_VERSION, MergedRecord
from swudi.storage.filesystem import is_local, join_url, list_folder, resolve

log = logging.getLogger(__name__)

T = TypeVar("T")


def artefact_url(config: MergeConfig, kind: str, key: str) -> str:
    """``WORK/<kind>/<key>.safetensors``."""
    return join_url(config.resolved_work_dir, kind, f"{key}.safetensors")


def open_artefact(url: str, config: MergeConfig, fmt: str | None, key: str) -> Checkpoint | None:
    """The artefact at ``url`` opened from its header; None if missing or damaged (logged)."""
    try:
        artefact = Checkpoint.open(url, config.storage_options)
    except CheckpointNotFoundError:
        return None
    except CheckpointError as error:
        log.warning("damaged artefact %s is recomputed: %s", url, error)
        return None
    meta = artefact.metadata
    if meta.get("key") != key or (
        fmt is not None and (meta.get("format"), meta.get("format_version")) != (fmt, RECORD_FORMAT_VERSION)
    ):
        log.warning("artefact %s is not the %s with key %s; it is recomputed", url, fmt or "artefact", key)
        return None
    return artefact


def load_merged_record(url: str, key: str, config: MergeConfig) -> MergedRecord | None:
    """The record of a complete merged artefact (header read only), or None if it must be computed."""
    artefact = open_artefact(url, config, MERGED_FORMAT, key)
    if artefact is None:
        return None
    try:
        record = MergedRecord.from_json(artefact.metadata["record"])
    except (KeyError, ValueError, TypeError) as error:
        log.warning("artefact %s has an unreadable record (%s); it is recomputed", url, error)
        return None
    if record.key != key or set(record.names) != set(artefact.tensors):
        log.warning("artefact %s does not hold the tensors its record names; it is recomputed", url)
        return None
    return dataclasses.replace(record, url=url)


def list_artefacts(config: MergeConfig, kind: str) -> dict[str, dict[str, Any]]:
    """``{key: {"size": bytes, "mtime": seconds or None}}`` of one kind of artefact (one listing)."""
    fs, path = resolve(join_url(config.resolved_work_dir, kind), config.storage_options)
    try:
        entries = list_folder(fs, path)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    out = {}
    for entry in entries:
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if entry.get("type") != "file" or not name.endswith(".safetensors"):
            continue
        when = entry.get("mtime", entry.get("LastModified"))
        out[name.removesuffix(".safetensors")] = {
            "size": int(entry.get("size") or 0),
            "mtime": when.timestamp() if hasattr(when, "timestamp") else (float(when) if when else None),
        }
    return out


def find_merged(keys: Iterable[str], config: MergeConfig) -> dict[str, MergedRecord]:
    """Records of the merged artefacts that already exist for ``keys`` (one listing, then headers).

    This is what makes a re-run cheap: work whose artefact is complete is never submitted.
    """
    wanted = set(keys)
    present = [key for key in list_artefacts(config, MERGED) if key in wanted]
    if not present:
        return {}

    def load(key: str) -> tuple[str, MergedRecord | None]:
        return key, load_merged_record(artefact_url(config, MERGED, key), key, config)

    fs, _ = resolve(config.resolved_work_dir, config.storage_options)
    workers = 1 if is_local(fs) else 16
    with ThreadPoolExecutor(max_workers=workers) as pool:
        found = dict(pool.map(load, present))
    return {key: record for key, record in found.items() if record is not None}


def save_merged(record: MergedRecord, tensors: Mapping[str, torch.Tensor], config: MergeConfig) -> None:
    metadata = {
        "format": MERGED_FORMAT,
        "format_version": RECORD_FORMAT_VERSION,
        "key": record.key,
        "record": record.to_json(),
    }
    save_tensors(record.url, tensors, metadata, config.storage_options)


def _load_stored(
    url: str,
    key: str,
    config: MergeConfig,
    reads: StepCost,
    build: Callable[[dict[str, torch.Tensor], dict[str, str]], T],
    what: str,
) -> T | None:
    """``build(tensors, metadata)`` of the artefact at ``url`` (its bytes counted as work bytes read),
    or None when it is missing or damaged (then recomputed)."""
    artefact = open_artefact(url, config, None, key)
    if artefact is None:
        return None
    try:
        with reads.phase("read"):
            tensors = artefact.state_dict()
        reads.work += sum(loc.nbytes for loc in artefact.tensors.values())
        return build(tensors, dict(artefact.metadata))
    except (CheckpointError, InputError) as error:
        log.warning("damaged %s %s is recomputed: %s", what, url, error)
        return None


def load_decomposition(url: str, key: str, config: MergeConfig, reads: StepCost) -> Decomposition | None:
    """The stored decomposition of a weight, or None when missing or damaged (then recomputed)."""
    return _load_stored(url, key, config, reads, Decomposition.from_tensors, "decomposition")


def load_task_svds(url: str, key: str, config: MergeConfig, reads: StepCost) -> TaskSVDs | None:
    """The stored per-task SVDs of a weight, or None when missing or damaged (then recomputed)."""
    return _load_stored(url, key, config, reads, TaskSVDs.from_tensors, "task SVDs")


def open_delta(url: str, key: str, names: Sequence[str], config: MergeConfig) -> Checkpoint | None:
    """The delta artefact at ``url`` opened from its header, if complete and holding ``names``."""
    artefact = open_artefact(url, config, DELTA_FORMAT, key)
    if artefact is not None and set(artefact.tensors) != set(names):
        log.warning("delta %s does not hold the expected tensors; it is recomputed", url)
        return None
    return artefact


def load_delta(
    url: str, key: str, names: Sequence[str], config: MergeConfig, reads: StepCost
) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    artefact = open_delta(url, key, names, config)
    if artefact is None:
        return None
    try:
        info = json.loads(artefact.metadata.get("diagnostics", "{}"))
        with reads.phase("read"):
            tensors = artefact.state_dict()
    except (CheckpointError, ValueError) as error:
        log.warning("damaged delta %s is recomputed: %s", url, error)
        return None
    reads.work += sum(loc.nbytes for loc in artefact.tensors.values())
    return tensors, info

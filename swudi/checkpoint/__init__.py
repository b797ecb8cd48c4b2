"""Checkpoint I/O over fsspec: lazy safetensors reads, validation, HF-layout writing, publishing.

Pure library (no Prefect). One module, one job:

- `storage`: URL -> (filesystem, path), joins, atomic writes;
- `header`: parse and fully validate a safetensors header;
- `checkpoint`: open a checkpoint from its headers, read tensors with range reads;
- `fingerprint`: content fingerprints for cache keys;
- `validate`: base + experts fit together;
- `writer`: Hugging Face layout output, streaming;
- `artifacts`: single-file safetensors artefacts;
- `publish`: versioned atomic publishing with `latest.json`; `lock`: an advisory output lock.
"""

from swudi.checkpoint.artifacts import exists, load_tensors, save_tensors
from swudi.checkpoint.checkpoint import INDEX_NAME, WEIGHTS_NAME, Checkpoint, TensorLocation, read_tensor
from swudi.checkpoint.header import Header, TensorEntry, parse_header
from swudi.checkpoint.lock import acquire_lock, output_lock, release_lock
from swudi.checkpoint.publish import list_versions, prune_versions, publish_version, read_latest, version_url
from swudi.checkpoint.storage import join_url, resolve
from swudi.checkpoint.validate import validate_checkpoints
from swudi.checkpoint.writer import TensorSpec, WrittenModel, copy_extra_files, plan_shards, write_sharded

__all__ = [
    "Checkpoint",
    "TensorLocation",
    "read_tensor",
    "WEIGHTS_NAME",
    "INDEX_NAME",
    "Header",
    "TensorEntry",
    "parse_header",
    "resolve",
    "join_url",
    "validate_checkpoints",
    "TensorSpec",
    "WrittenModel",
    "plan_shards",
    "write_sharded",
    "copy_extra_files",
    "save_tensors",
    "load_tensors",
    "exists",
    "publish_version",
    "read_latest",
    "list_versions",
    "prune_versions",
    "version_url",
    "acquire_lock",
    "release_lock",
    "output_lock",
]

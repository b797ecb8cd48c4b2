"""Refusals at the checkpoint level: bad indexes of sharded checkpoints and pickle checkpoints."""

from __future__ import annotations

import io
import json

import pytest
import torch

from swudi.errors import CheckpointError
from swudi.io.checkpoint import Checkpoint
from tests.helpers.builders import put_bytes, write_reference, write_reference_checkpoint

S1, S2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


def _two_shards(store, index: dict | str, shard1=None, shard2=None) -> str:
    folder = store.url("m")
    write_reference(store.url("m", S1), shard1 or {"a": torch.ones(2), "b": torch.ones(3)}, None,
                    store.storage_options)
    write_reference(store.url("m", S2), shard2 or {"c": torch.ones(4)}, None, store.storage_options)
    raw = index if isinstance(index, str) else json.dumps(index)
    put_bytes(store.url("m", "model.safetensors.index.json"), raw.encode(), store.storage_options)
    return folder


@pytest.mark.parametrize("shard_path", [
    "../outside/model.safetensors",
    "sub/../../model.safetensors",
    "/etc/model.safetensors",
    "s3://other-bucket/model.safetensors",
    "file:///tmp/model.safetensors",
    "simplecache::model.safetensors",
    "C:/weights/model.safetensors",
    "sub\\model.safetensors",
    "",
])
def test_index_shard_path_must_stay_inside_the_folder(store, shard_path):
    folder = _two_shards(store, {"weight_map": {"a": S1, "b": S1, "c": shard_path}})
    with pytest.raises(CheckpointError) as err:
        Checkpoint.open(folder, store.storage_options)
    assert "model.safetensors.index.json" in str(err.value)
    assert f"shard path {shard_path!r}" in str(err.value)


def test_same_tensor_in_two_shards(store):
    folder = _two_shards(store, {"weight_map": {"a": S1, "b": S1, "c": S2}},
                         shard2={"c": torch.ones(4), "a": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"'a' is stored in two shards: .*00001.* and .*00002"):
        Checkpoint.open(folder, store.storage_options)


def test_same_tensor_twice_in_weight_map(store):
    raw = f'{{"weight_map": {{"a": "{S1}", "b": "{S1}", "c": "{S2}", "a": "{S2}"}}}}'
    folder = _two_shards(store, raw)
    with pytest.raises(CheckpointError, match="'a' appears twice"):
        Checkpoint.open(folder, store.storage_options)


def test_weight_map_entry_missing_from_its_shard(store):
    folder = _two_shards(store, {"weight_map": {"a": S1, "b": S1, "c": S2, "d": S2}})
    with pytest.raises(CheckpointError, match=r"'d' is mapped to .*00002.* but not in that shard's header"):
        Checkpoint.open(folder, store.storage_options)


def test_weight_map_points_at_the_wrong_shard(store):
    folder = _two_shards(store, {"weight_map": {"a": S1, "b": S2, "c": S2}})
    with pytest.raises(CheckpointError, match=r"'b' is mapped to .*00002.* but stored in .*00001"):
        Checkpoint.open(folder, store.storage_options)


def test_tensor_missing_from_weight_map(store):
    folder = _two_shards(store, {"weight_map": {"a": S1, "c": S2}})
    with pytest.raises(CheckpointError, match=r"'b' is stored in .*00001.* but missing from weight_map"):
        Checkpoint.open(folder, store.storage_options)


def test_shard_listed_but_absent(store):
    folder = _two_shards(store, {"weight_map": {"a": S1, "b": S1, "c": "model-00003-of-00003.safetensors"}})
    with pytest.raises(CheckpointError, match=r"00003-of-00003\.safetensors.*not found"):
        Checkpoint.open(folder, store.storage_options)


@pytest.mark.parametrize("raw", ["not json", "[]", '{"weight_map": {}}', '{"metadata": {}}'])
def test_unreadable_index(store, raw):
    folder = _two_shards(store, raw)
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json"):
        Checkpoint.open(folder, store.storage_options)


def _pickle_bytes() -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    return buf.getvalue()


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth", "last.ckpt"])
def test_pickle_checkpoints_are_refused_with_a_conversion_hint(store, name):
    put_bytes(store.url("p", name), _pickle_bytes(), store.storage_options)
    put_bytes(store.url("p", "config.json"), b"{}", store.storage_options)
    for target in (store.url("p"), store.url("p", name)):
        with pytest.raises(CheckpointError) as err:
            Checkpoint.open(target, store.storage_options)
        message = str(err.value)
        assert "pickle" in message and name in message
        assert "save_pretrained(OUT, safe_serialization=True)" in message
        assert "safetensors.torch.save_file" in message


def test_pickle_beside_safetensors_is_ignored(store):
    write_reference_checkpoint(store.url("m"), {"w": torch.ones(2)}, None, store.storage_options,
                               {"pytorch_model.bin": _pickle_bytes(), "config.json": b"{}"})
    ckpt = Checkpoint.open(store.url("m"), store.storage_options)
    assert list(ckpt.tensors) == ["w"] and ckpt.extra_files == ("config.json",)

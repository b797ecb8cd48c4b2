"""Opening checkpoints from headers and reading tensors bit-exactly, local and S3."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from swudi.errors import CheckpointError
from swudi.io.checkpoint import SPECULATIVE_READ, Checkpoint, read_tensor
from tests.helpers.builders import (
    DTYPES,
    bit_equal,
    put_bytes,
    random_tensor,
    tiny_state_dict,
    write_reference,
    write_reference_checkpoint,
)

SHAPES = [(3, 5), (7,), (), (0, 4), (2, 3, 2)]


def all_dtypes_state_dict() -> dict[str, torch.Tensor]:
    out = {}
    for i, (name, dtype) in enumerate(DTYPES.items()):
        for j, shape in enumerate(SHAPES):
            out[f"{name.lower()}.{j}"] = random_tensor(dtype, shape, seed=10 * i + j)
    return out


def test_every_dtype_bit_exact(store):
    tensors = all_dtypes_state_dict()
    tensors["f32.nan"] = torch.tensor([float("nan"), -0.0, float("inf"), -float("inf"), 1e-45])
    url = store.url("all.safetensors")
    write_reference(url, tensors, {"note": "reference"}, store.storage_options)
    ckpt = Checkpoint.open(url, store.storage_options)
    assert set(ckpt.tensors) == set(tensors)
    assert ckpt.metadata == {"note": "reference"}
    assert ckpt.extra_files == ()
    for name, expected in tensors.items():
        got = ckpt.read(name)
        assert bit_equal(got, expected), name
        loc = ckpt.tensors[name]
        assert loc.shape == tuple(expected.shape) and loc.nbytes == expected.numel() * expected.element_size()
    many = ckpt.read_many(list(tensors))
    assert all(bit_equal(many[n], t) for n, t in tensors.items())
    # A location record alone is enough to read (what pipeline tasks pass around).
    loc = ckpt.tensors["bf16.0"]
    assert bit_equal(read_tensor(loc, store.storage_options), tensors["bf16.0"])


def test_read_returns_independent_writable_tensors(store):
    url = store.url("m.safetensors")
    write_reference(url, {"a": torch.ones(4), "b": torch.zeros(4)}, None, store.storage_options)
    ckpt = Checkpoint.open(url, store.storage_options)
    a = ckpt.read("a")
    a += 1  # must not raise (writable) nor change a second read
    assert torch.equal(ckpt.read("a"), torch.ones(4))


@pytest.mark.parametrize("layout", ["single_folder", "sharded_folder", "index_url", "single_file", "other_name"])
def test_layouts(store, layout):
    tensors = tiny_state_dict(seed=3)
    names = list(tensors)
    folder = store.url("model")
    extra = {"config.json": b'{"model_type": "bert"}', "tokenizer.json": b"{}", "vocab.txt": b"a\nb\n",
             "README.md": b"# card", ".gitattributes": b"*", "pytorch_model.bin": b"ignored pickle"}
    if layout == "sharded_folder" or layout == "index_url":
        write_reference_checkpoint(folder, tensors, [names[:2], names[2:4], names[4:]], store.storage_options, extra)
    elif layout == "other_name":
        write_reference(store.url("model", "weights.safetensors"), tensors, None, store.storage_options)
        for name, data in extra.items():
            put_bytes(store.url("model", name), data, store.storage_options)
    else:
        write_reference_checkpoint(folder, tensors, None, store.storage_options, extra)
    target = {"index_url": store.url("model", "model.safetensors.index.json"),
              "single_file": store.url("model", "model.safetensors")}.get(layout, folder)
    ckpt = Checkpoint.open(target, store.storage_options)
    assert set(ckpt.tensors) == set(tensors)
    for name, t in tensors.items():
        assert bit_equal(ckpt.read(name), t)
    if layout == "single_file":
        assert ckpt.extra_files == ()
    else:
        assert ckpt.extra_files == ("config.json", "tokenizer.json", "vocab.txt")
        assert ckpt.url == folder
    if layout in ("sharded_folder", "index_url"):
        assert len(ckpt.shard_urls) == 3
        assert ckpt.tensors[names[4]].shard_url == store.url("model", "model-00003-of-00003.safetensors")


def test_large_header_needs_a_second_range_read(store):
    tensors = {f"layers.{i}.some_rather_long_parameter_name.weight": torch.full((2,), float(i)) for i in range(2500)}
    url = store.url("big_header.safetensors")
    write_reference(url, tensors, None, store.storage_options)
    fs = store.fs()
    path = url.split("://")[-1] if store.kind == "s3" else url
    n = int.from_bytes(fs.cat_file(path, 0, 8), "little")
    assert n > SPECULATIVE_READ  # the header really is larger than the first read
    ckpt = Checkpoint.open(url, store.storage_options)
    assert len(ckpt) == 2500
    assert torch.equal(ckpt.read("layers.2499.some_rather_long_parameter_name.weight"), torch.full((2,), 2499.0))


def test_folder_with_two_safetensors_and_no_index_is_ambiguous(store):
    write_reference(store.url("m", "a.safetensors"), {"x": torch.ones(1)}, None, store.storage_options)
    write_reference(store.url("m", "b.safetensors"), {"y": torch.ones(1)}, None, store.storage_options)
    with pytest.raises(CheckpointError, match="2 safetensors files"):
        Checkpoint.open(store.url("m"), store.storage_options)


def test_missing_checkpoint_and_tensor(store):
    with pytest.raises(CheckpointError, match=r"no such checkpoint|not found"):
        Checkpoint.open(store.url("nowhere"), store.storage_options)
    with pytest.raises(CheckpointError, match="not found"):
        Checkpoint.open(store.url("nowhere", "model.safetensors"), store.storage_options)
    url = store.url("m.safetensors")
    write_reference(url, {"x": torch.ones(1)}, None, store.storage_options)
    with pytest.raises(CheckpointError, match="no tensor named 'y'"):
        Checkpoint.open(url, store.storage_options).read("y")


def test_fingerprints_change_when_bytes_change(store):
    tensors = tiny_state_dict(seed=1)
    names = list(tensors)
    folder = store.url("fp")
    write_reference_checkpoint(folder, tensors, [names[:3], names[3:]], store.storage_options)
    first = Checkpoint.open(folder, store.storage_options)
    again = Checkpoint.open(folder, store.storage_options)
    assert first.fingerprint == again.fingerprint
    assert {n: loc.fingerprint for n, loc in first.tensors.items()} == {
        n: loc.fingerprint for n, loc in again.tensors.items()}
    assert len({loc.fingerprint for loc in first.tensors.values()}) == len(names)  # distinct per tensor

    # Rewrite the second shard with different values of the same size (mtime must move locally).
    time.sleep(0.01)
    changed = {n: tensors[n] + 1 for n in names[3:]}
    write_reference(store.url("fp", "model-00002-of-00002.safetensors"), changed, {"format": "pt"},
                    store.storage_options)
    after = Checkpoint.open(folder, store.storage_options)
    assert after.fingerprint != first.fingerprint
    for n in names[:3]:
        assert after.tensors[n].fingerprint == first.tensors[n].fingerprint
    for n in names[3:]:
        assert after.tensors[n].fingerprint != first.tensors[n].fingerprint


def test_same_bytes_elsewhere_have_another_fingerprint(store):
    tensors = tiny_state_dict(seed=2)
    write_reference(store.url("a", "model.safetensors"), tensors, None, store.storage_options)
    write_reference(store.url("b", "model.safetensors"), tensors, None, store.storage_options)
    a = Checkpoint.open(store.url("a"), store.storage_options)
    b = Checkpoint.open(store.url("b"), store.storage_options)
    assert a.fingerprint != b.fingerprint  # size+mtime alone could collide: the location is part of it


def test_local_read_notices_a_file_changed_since_open(tmp_path):
    url = str(tmp_path / "m.safetensors")
    write_reference(url, {"x": torch.ones(4)}, None)
    ckpt = Checkpoint.open(url)
    time.sleep(0.01)
    write_reference(url, {"x": torch.zeros(4)}, None)
    os.utime(url, ns=(time.time_ns(), time.time_ns()))
    with pytest.raises(CheckpointError, match="changed since"):
        ckpt.read("x")


def test_file_url_and_chained_simplecache(s3_bucket, tmp_path):
    tensors = tiny_state_dict(seed=4)
    local = tmp_path / "m"
    write_reference_checkpoint(str(local), tensors)
    ckpt = Checkpoint.open(f"file://{local}")
    assert bit_equal(ckpt.read("embed.weight"), tensors["embed.weight"])

    write_reference_checkpoint(f"{s3_bucket.url}/m", tensors, None, s3_bucket.storage_options)
    options = {**s3_bucket.storage_options, "simplecache": {"cache_storage": str(tmp_path / "cache")}}
    chained = Checkpoint.open(f"simplecache::{s3_bucket.url}/m", options)
    assert bit_equal(chained.read("norm.weight"), tensors["norm.weight"])
    assert any((tmp_path / "cache").iterdir())  # went through the local cache


def test_index_metadata_mismatch_only_warns(store, caplog):
    tensors = tiny_state_dict()
    names = list(tensors)
    weight_map = {n: ("model-00001-of-00002.safetensors" if i < 3 else "model-00002-of-00002.safetensors")
                  for i, n in enumerate(names)}
    write_reference_checkpoint(store.url("m"), tensors, [names[:3], names[3:]], store.storage_options,
                               index_override={"metadata": {"total_size": 1}, "weight_map": weight_map})
    ckpt = Checkpoint.open(store.url("m"), store.storage_options)
    assert len(ckpt) == len(names)
    assert "total_size" in caplog.text
    assert json.dumps(ckpt.index["weight_map"], sort_keys=True) == json.dumps(weight_map, sort_keys=True)

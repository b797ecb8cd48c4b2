"""Hugging Face layout output: shard planning, streaming shards, index, extra files; readers agree."""

from __future__ import annotations

import json
import weakref

import pytest
import torch
from safetensors import safe_open

from swudi.errors import CheckpointError
from swudi.io.checkpoint import Checkpoint
from swudi.io.writer import copy_extra_files, plan_shards, shard_names, write_sharded
from swudi.units import parse_size
from tests.helpers.builders import DTYPES, bit_equal, random_tensor, tiny_state_dict, write_reference_checkpoint


def _local_copy(store, url: str, tmp_path) -> str:
    """A local folder with the files at `url` (safe_open and transformers need local paths)."""
    if store.kind == "local":
        return url
    dest = tmp_path / "downloaded"
    store.fs().get(url.split("://", 1)[1] + "/", str(dest), recursive=True)
    return str(dest)


def _specs(tensors):
    return [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]


def test_parse_size():
    assert parse_size(123) == 123
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5MB") == 1_500_000
    for bad in ("lots", "-1", 0, "5XB"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_plan_shards_greedy_in_order():
    specs = [("a", "F32", (10,)), ("b", "F32", (10,)), ("c", "F16", (30,)), ("huge", "F64", (100,)),
             ("d", "U8", (40,)), ("e", "U8", (1,))]
    # sizes: a 40, b 40, c 60, huge 800, d 40, e 1 ; limit 100
    # "huge" gets a shard of its own while the open shard keeps filling (as huggingface_hub plans)
    assert plan_shards(specs, 100) == [["a", "b"], ["huge"], ["c", "d"], ["e"]]
    assert plan_shards(specs, 10**6) == [["a", "b", "c", "huge", "d", "e"]]
    assert plan_shards([], 100) == [[]]
    with pytest.raises(CheckpointError, match="planned twice"):
        plan_shards([("a", "F32", (1,)), ("a", "F32", (1,))], 100)


def test_shard_names_follow_transformers():
    assert shard_names(1) == ["model.safetensors"]
    assert shard_names(3) == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]


def test_single_shard_round_trip_every_dtype(store, tmp_path):
    tensors = {f"{name.lower()}.w": random_tensor(dtype, (3, 5), seed=i)
               for i, (name, dtype) in enumerate(DTYPES.items())}
    tensors["scalar"] = torch.tensor(2.5, dtype=torch.float64)
    tensors["empty"] = torch.empty(0, 7, dtype=torch.bfloat16)
    out = store.url("out")
    written = write_sharded(out, _specs(tensors), tensors.__getitem__, storage_options=store.storage_options)
    assert written.files == ["model.safetensors"]
    assert written.total_size == sum(t.numel() * t.element_size() for t in tensors.values())
    ckpt = Checkpoint.open(out, store.storage_options)
    assert ckpt.metadata == {"format": "pt"} and ckpt.index is None
    for name, t in tensors.items():
        assert bit_equal(ckpt.read(name), t), name
    with safe_open(f"{_local_copy(store, out, tmp_path)}/model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert set(f.keys()) == set(tensors)
        for name in f.keys():  # noqa: SIM118 - safe_open is not iterable
            assert bit_equal(f.get_tensor(name), tensors[name]), name


def test_several_shards_with_index(store, tmp_path):
    tensors = tiny_state_dict(seed=5)
    tensors["big"] = torch.randn(40, 40)  # 6400 bytes: over the limit, its own shard
    limit = 700
    out = store.url("sharded")
    written = write_sharded(out, _specs(tensors), tensors.__getitem__, max_shard_size=limit,
                            storage_options=store.storage_options)
    shards = [f for f in written.files if f.endswith(".safetensors")]
    assert len(shards) >= 3 and written.files[-1] == "model.safetensors.index.json"
    assert shards == shard_names(len(shards))
    local = _local_copy(store, out, tmp_path)
    with open(f"{local}/model.safetensors.index.json") as f:
        index = json.load(f)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert index["weight_map"] == written.weight_map and set(index["weight_map"]) == set(tensors)
    for shard in shards:
        with safe_open(f"{local}/{shard}", "pt") as f:
            assert f.metadata() == {"format": "pt"}
            names = list(f.keys())
            assert all(index["weight_map"][n] == shard for n in names)
            size = sum(tensors[n].numel() * tensors[n].element_size() for n in names)
            assert size <= limit or names == ["big"]
            for n in names:
                assert bit_equal(f.get_tensor(n), tensors[n])
    ckpt = Checkpoint.open(out, store.storage_options)
    assert all(bit_equal(ckpt.read(n), t) for n, t in tensors.items())


def test_tensors_are_streamed_one_at_a_time(tmp_path):
    specs = [(f"t{i}", torch.float32, (64,)) for i in range(6)]
    alive: list[weakref.ref] = []
    order = []

    def read_fn(name):
        assert sum(r() is not None for r in alive) == 0, "writer kept an earlier tensor alive"
        order.append(name)
        t = torch.full((64,), float(name[1:]))
        alive.append(weakref.ref(t))
        return t

    write_sharded(str(tmp_path / "o"), specs, read_fn, max_shard_size=600)
    assert order == [f"t{i}" for i in range(6)]


def test_bad_read_fn_leaves_no_partial_shard(store):
    out = store.url("bad")
    specs = [("a", torch.float32, (4,)), ("b", torch.float32, (4,))]
    values = {"a": torch.ones(4), "b": torch.ones(5)}  # b has the wrong shape
    with pytest.raises(CheckpointError, match=r"'b': got torch.float32 \[5\] after 0 bytes, planned F32 \[4\]"):
        write_sharded(out, specs, values.__getitem__, storage_options=store.storage_options)
    fs = store.fs()
    path = out.split("://", 1)[1] if store.kind == "s3" else out
    leftovers = fs.find(path) if fs.exists(path) else []
    assert leftovers == []


def test_copy_extra_files_between_stores(store, tmp_path):
    extra = {"config.json": b'{"a": 1}', "tokenizer.json": b"x" * 20_000_000, "special_tokens_map.json": b"{}"}
    src = str(tmp_path / "src")
    write_reference_checkpoint(src, {"w": torch.ones(2)}, None, None, extra)
    ckpt = Checkpoint.open(src)
    copied = copy_extra_files(ckpt, store.url("dst"), store.storage_options)
    assert copied == sorted(extra)
    fs = store.fs()
    for name, data in extra.items():
        path = store.url("dst", name)
        assert fs.cat_file(path.split("://", 1)[1] if store.kind == "s3" else path) == data


@pytest.mark.slow  # importing transformers alone takes ~10 s
def test_merged_folder_loads_with_transformers(store, tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=37, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir, safe_serialization=True)
    base_url = str(base_dir) if store.kind == "local" else store.url("base")
    if store.kind == "s3":
        store.fs().put(str(base_dir) + "/", base_url.split("://", 1)[1], recursive=True)
    base = Checkpoint.open(base_url, store.storage_options)
    assert "config.json" in base.extra_files

    # A "merge": every float tensor scaled, written in several shards with the base's files beside.
    def read_fn(name):
        t = base.read(name)
        return t * 2 if t.is_floating_point() else t

    out = store.url("merged")
    specs = [(n, loc.dtype, loc.shape) for n, loc in base.tensors.items()]
    written = write_sharded(out, specs, read_fn, max_shard_size=20_000, storage_options=store.storage_options)
    assert len(written.files) > 3
    copy_extra_files(base, out, store.storage_options)

    loaded = transformers.AutoModel.from_pretrained(_local_copy(store, out, tmp_path), local_files_only=True)
    expected = {n: (t * 2 if t.is_floating_point() else t) for n, t in model.state_dict().items()}
    got = loaded.state_dict()
    for name in base.tensors:
        assert bit_equal(got[name], expected[name]), name


def test_row_chunks_stream_into_a_file_that_every_reader_agrees_with(store, tmp_path):
    """A tensor given as row chunks (any split along dim 0) is the same file as given whole, and
    each row range reads back through ``TensorLocation.rows`` as the matching slice."""
    torch.manual_seed(0)
    tensors = {"emb": random_tensor(torch.bfloat16, (37, 6)), "norm": torch.randn(6), "scalar": torch.tensor(2.5)}
    whole = store.url("whole")
    chunked = store.url("chunked")
    write_sharded(whole, _specs(tensors), tensors.__getitem__, storage_options=store.storage_options)

    def in_pieces(name):
        t = tensors[name]
        if t.dim() == 0:
            return t
        return iter([t[0:5], t[5:5], t[5:30], t[30:]])  # uneven, with an empty piece

    write_sharded(chunked, _specs(tensors), in_pieces, storage_options=store.storage_options)
    fs = store.fs()
    strip = (lambda u: u.split("://", 1)[1]) if store.kind == "s3" else (lambda u: u)
    assert fs.cat_file(strip(whole) + "/model.safetensors") == fs.cat_file(strip(chunked) + "/model.safetensors")
    ckpt = Checkpoint.open(chunked, store.storage_options)
    loc = ckpt.location("emb")
    from swudi.io.checkpoint import read_tensor

    for start, stop in [(0, 37), (3, 4), (10, 37), (36, 37), (5, 5)]:
        assert bit_equal(read_tensor(loc.rows(start, stop), store.storage_options), tensors["emb"][start:stop])
    for bad in [(-1, 3), (4, 3), (0, 38)]:
        with pytest.raises(ValueError, match="'emb': rows"):
            loc.rows(*bad)


def test_an_incomplete_or_misshapen_chunk_stream_leaves_no_file(store):
    specs = [("emb", torch.float32, (10, 4))]
    cases = {
        "short": (lambda name: iter([torch.zeros(4, 4), torch.zeros(5, 4)]), r"'emb' incomplete \(144 of 160 bytes"),
        "long": (lambda name: iter([torch.zeros(8, 4), torch.zeros(4, 4)]), r"got torch.float32 \[4, 4\] after 128"),
        "columns": (lambda name: iter([torch.zeros(10, 3)]), r"planned F32 \[10, 4\] \(whole, or row chunks"),
        "dtype": (lambda name: iter([torch.zeros(10, 4, dtype=torch.float16)]), r"got torch.float16"),
    }
    fs = store.fs()
    for label, (read_fn, message) in cases.items():
        out = store.url(label)
        with pytest.raises(CheckpointError, match=message):
            write_sharded(out, specs, read_fn, storage_options=store.storage_options)
        path = out.split("://", 1)[1] if store.kind == "s3" else out
        assert (fs.find(path) if fs.exists(path) else []) == [], label

"""Single-file artefacts: round trip, atomic replacement, refusal of damaged files."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load as st_load

from swudi.errors import CheckpointError
from swudi.io.artifacts import exists, load_tensors, save_tensors
from tests.helpers.builders import DTYPES, bit_equal, put_bytes, random_tensor


def _path(store, url):
    return url.split("://", 1)[1] if store.kind == "s3" else url


def test_round_trip_every_dtype_with_metadata(store):
    tensors = {f"{n.lower()}": random_tensor(d, (4, 3), seed=i) for i, (n, d) in enumerate(DTYPES.items())}
    tensors["non_contiguous"] = torch.arange(12.0).reshape(3, 4).t()
    tensors["scalar"] = torch.tensor(7, dtype=torch.int64)
    url = store.url("decompositions", "abc.safetensors")
    assert not exists(url, store.storage_options)
    size = save_tensors(url, tensors, {"algorithm": "swudi-1", "rank": "8"}, store.storage_options)
    assert exists(url, store.storage_options)
    loaded, metadata = load_tensors(url, store.storage_options)
    assert metadata == {"algorithm": "swudi-1", "rank": "8"}
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert bit_equal(loaded[name], t.contiguous()), name
    # The reference implementation reads it too.
    raw = store.fs().cat_file(_path(store, url))
    assert len(raw) == size
    reference = st_load(raw)
    assert all(bit_equal(reference[n], t.contiguous()) for n, t in tensors.items())


class _Exploding(dict):
    def __getitem__(self, name):
        if name == "b":
            raise RuntimeError("disk full (simulated)")
        return super().__getitem__(name)


def test_failed_save_keeps_the_previous_file(store):
    url = store.url("merged", "x.safetensors")
    save_tensors(url, {"a": torch.ones(1000), "b": torch.ones(10)}, {"v": "1"}, store.storage_options)
    with pytest.raises(RuntimeError, match="disk full"):
        save_tensors(url, _Exploding(a=torch.zeros(1000), b=torch.zeros(10)), {"v": "2"}, store.storage_options)
    tensors, metadata = load_tensors(url, store.storage_options)
    assert metadata == {"v": "1"} and torch.equal(tensors["a"], torch.ones(1000))
    fs = store.fs()
    folder = _path(store, store.url("merged"))
    assert [p.rsplit("/", 1)[-1] for p in fs.find(folder)] == ["x.safetensors"]  # no temp file left


def test_truncated_artefact_is_refused(store):
    url = store.url("t.safetensors")
    save_tensors(url, {"a": torch.ones(100)}, None, store.storage_options)
    raw = store.fs().cat_file(_path(store, url))
    put_bytes(url, raw[:-10], store.storage_options)
    with pytest.raises(CheckpointError, match=r"outside|trailing"):
        load_tensors(url, store.storage_options)


def test_non_tensor_values_are_refused(store):
    with pytest.raises(CheckpointError, match="'x' is a list"):
        save_tensors(store.url("n.safetensors"), {"x": [1, 2]}, None, store.storage_options)  # type: ignore[dict-item]  # the refusal
    with pytest.raises(CheckpointError, match="metadata must map strings"):
        save_tensors(store.url("n.safetensors"), {"x": torch.ones(1)}, {"k": 1}, store.storage_options)  # type: ignore[dict-item]

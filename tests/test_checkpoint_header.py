"""Header validation: every refusal with a crafted file, on local disk and on S3."""

from __future__ import annotations

import io
import json
import struct

import pytest
import torch

from swudi.errors import CheckpointError
from swudi.io.checkpoint import Checkpoint
from swudi.io.header import MAX_HEADER_SIZE, header_length, parse_header
from tests.helpers.builders import put_bytes, raw_safetensors


def f32(start: int, n: int) -> dict:
    return {"dtype": "F32", "shape": [n], "data_offsets": [start, start + 4 * n]}


def _torch_zip_bytes() -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    return buf.getvalue()


# name -> (file bytes, words the error must contain)
BAD_FILES = {
    "header_too_big": (raw_safetensors(b"{}", declared_length=MAX_HEADER_SIZE + 1), ["exceeds", "100000000"]),
    "header_past_end": (raw_safetensors(b'{"a":1}', declared_length=5000), ["past the end"]),
    "shorter_than_8_bytes": (b"\x01\x00\x00", ["fewer than the 8-byte"]),
    "not_json": (raw_safetensors(b'{"a": [1, 2'), ["not valid JSON"]),
    "not_an_object": (raw_safetensors(b"[1, 2, 3]"), ["does not start with '{'"]),
    "duplicate_key": (raw_safetensors(b'{"a":' + json.dumps(f32(0, 1)).encode() + b',"a":'
                                      + json.dumps(f32(0, 1)).encode() + b"}", b"\0" * 4), ["duplicate key 'a'"]),
    "unknown_dtype": (raw_safetensors({"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8),
                      ["'w'", "unknown dtype 'C64'"]),
    "size_mismatch": (raw_safetensors({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8),
                      ["'w'", "byte size 8", "= 12 bytes"]),
    "offsets_outside": (raw_safetensors({"w": f32(0, 4)}, b"\0" * 8), ["'w'", "outside"]),
    "offsets_overlap": (raw_safetensors({"a": f32(0, 2), "b": f32(4, 2)}, b"\0" * 12), ["'b'", "overlap", "'a'"]),
    "offsets_gap": (raw_safetensors({"a": f32(0, 1), "b": f32(8, 1)}, b"\0" * 12), ["'b'", "gap"]),
    "trailing_bytes": (raw_safetensors({"a": f32(0, 1)}, b"\0" * 9), ["trailing bytes"]),
    "negative_shape": (raw_safetensors({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}),
                       ["'w'", "shape"]),
    "float_shape": (raw_safetensors({"w": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}}, b"\0" * 4),
                    ["'w'", "shape"]),
    "reversed_offsets": (raw_safetensors({"w": {"dtype": "U8", "shape": [0], "data_offsets": [4, 0]}}, b"\0" * 4),
                         ["'w'", "data_offsets"]),
    "missing_field": (raw_safetensors({"w": {"dtype": "F32", "shape": [1]}}, b"\0" * 4), ["'w'", "data_offsets"]),
    "metadata_not_strings": (raw_safetensors({"__metadata__": {"step": 3}, "a": f32(0, 1)}, b"\0" * 4),
                             ["__metadata__"]),
    "torch_pickle_renamed": (_torch_zip_bytes(), ["zip archive"]),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_parse_header_refuses(case):
    data, words = BAD_FILES[case]
    with pytest.raises(CheckpointError) as err:
        parse_header(data, len(data), f"crafted/{case}.safetensors")
    message = str(err.value)
    assert f"crafted/{case}.safetensors" in message
    for word in words:
        assert word in message, (case, message)


@pytest.mark.parametrize("case", ["header_too_big", "header_past_end", "offsets_outside", "offsets_overlap",
                                  "unknown_dtype", "size_mismatch", "torch_pickle_renamed"])
def test_open_refuses_crafted_file(store, case):
    data, words = BAD_FILES[case]
    url = store.url("bad", "model.safetensors")
    put_bytes(url, data, store.storage_options)
    for target in (url, store.url("bad")):  # the file, and the folder holding it
        with pytest.raises(CheckpointError) as err:
            Checkpoint.open(target, store.storage_options)
        assert url.split("://")[-1] in str(err.value)
        for word in words:
            assert word in str(err.value)


def test_valid_header_round_trip():
    header = {"__metadata__": {"format": "pt"}, "b": f32(8, 2), "a": f32(0, 2),
              "empty": {"dtype": "BF16", "shape": [0, 5], "data_offsets": [16, 16]},
              "scalar": {"dtype": "I64", "shape": [], "data_offsets": [16, 24]}}
    data = raw_safetensors(header, bytes(range(24)))
    h = parse_header(data, len(data), "ok")
    assert list(h.entries) == ["a", "b", "empty", "scalar"]  # file order
    assert h.metadata == {"format": "pt"}
    assert h.data_offset == len(data) - 24
    assert h.entries["scalar"].shape == () and h.entries["scalar"].nbytes == 8
    assert h.entries["empty"].nbytes == 0


def test_header_length_needs_only_the_prefix():
    data = raw_safetensors({"a": f32(0, 1)}, b"\0" * 4)
    n = struct.unpack("<Q", data[:8])[0]
    assert header_length(data[:8], len(data), "x") == n
    with pytest.raises(CheckpointError, match="need"):
        parse_header(data[:10], len(data), "x")  # caller passed too few bytes

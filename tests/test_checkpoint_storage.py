"""URL handling and filesystem construction."""

from __future__ import annotations

from typing import Any

import pytest
from s3fs.core import S3File

from swudi.storage.filesystem import join_url, open_atomic, parent_url, resolve, url_name


@pytest.mark.parametrize("url, parts, expected", [
    ("s3://bucket/out", ("versions", "v1"), "s3://bucket/out/versions/v1"),
    ("s3://bucket/out/", ("/versions/", "v1/"), "s3://bucket/out/versions/v1"),
    ("s3://bucket", ("a",), "s3://bucket/a"),
    ("/data/models", ("base", "model.safetensors"), "/data/models/base/model.safetensors"),
    ("relative/dir", ("x",), "relative/dir/x"),
    ("file:///data/m", ("config.json",), "file:///data/m/config.json"),
    ("simplecache::s3://b/m", ("model.safetensors",), "simplecache::s3://b/m/model.safetensors"),
    ("s3://b/m", ("", "x"), "s3://b/m/x"),
    ("/", ("x",), "/x"),
])
def test_join_url(url, parts, expected):
    assert join_url(url, *parts) == expected


def test_parent_and_name():
    assert parent_url("s3://b/m/model.safetensors.index.json") == "s3://b/m"
    assert parent_url("simplecache::s3://b/m/x") == "simplecache::s3://b/m"
    assert parent_url("/a/b/") == "/a"
    assert url_name("s3://b/m/") == "m"


def test_s3_defaults_and_pass_through(moto_server):
    options = {"endpoint_url": moto_server, "key": "k", "secret": "s", "client_kwargs": {"region_name": "eu-west-1"}}
    fs, path = resolve("s3://bucket/key", options)
    assert path == "bucket/key"
    assert fs.default_cache_type == "none"  # no 50 MiB read-ahead for fs.open()
    assert not fs.dircache.use_listings_cache  # re-written objects show their new ETag
    assert fs.key == "k" and fs.secret == "s" and fs.client_kwargs["region_name"] == "eu-west-1"
    fs2, _ = resolve("s3://bucket/key", {**options, "default_cache_type": "readahead"})
    assert fs2.default_cache_type == "readahead"  # the caller's choice wins


def test_chained_url_options_reach_the_storage_layer(moto_server, tmp_path):
    options = {"endpoint_url": moto_server, "key": "k", "secret": "s",
               "simplecache": {"cache_storage": str(tmp_path)}}
    fs, _path = resolve("simplecache::s3://bucket/key", options)
    assert "simplecache" in fs.protocol
    assert fs.fs.key == "k" and fs.fs.default_cache_type == "none"
    assert fs.storage == [str(tmp_path)]


def test_open_atomic_local_keeps_old_file_on_error(tmp_path):
    fs, path = resolve(str(tmp_path / "sub" / "f.bin"))
    with open_atomic(fs, path) as f:
        f.write(b"old")
    with pytest.raises(RuntimeError), open_atomic(fs, path) as f:
        f.write(b"new, half written")
        raise RuntimeError("boom")
    assert (tmp_path / "sub" / "f.bin").read_bytes() == b"old"
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["f.bin"]


def test_open_atomic_s3_discards_a_multipart_upload_on_error(s3_bucket):
    fs, path = resolve(f"{s3_bucket.url}/big.bin", s3_bucket.storage_options)
    chunk = b"x" * (6 * 2**20)
    with pytest.raises(RuntimeError), open_atomic(fs, path) as f:
        assert isinstance(f, S3File)  # s3fs's file: its block size and multipart upload
        s3_file: Any = f
        s3_file.blocksize = 5 * 2**20  # force parts to be uploaded before the failure
        f.write(chunk)
        f.flush()
        assert s3_file.mpu is not None  # a multipart upload is open, with a part uploaded
        f.write(chunk)
        raise RuntimeError("boom")
    assert not s3_bucket.fs.exists(path)
    uploads = s3_bucket.fs.call_s3("list_multipart_uploads", Bucket=s3_bucket.name).get("Uploads", [])
    assert uploads == []

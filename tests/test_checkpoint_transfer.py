"""Bytes on the wire: reading one tensor from a 200 MB S3 shard downloads little more than it.

The S3 client talks to moto through a counting TCP proxy, so every byte the server sends is counted,
whatever path the client code takes.
"""

from __future__ import annotations

import uuid
from types import SimpleNamespace
from urllib.parse import urlparse

import pytest
import s3fs
import torch

from swudi.io.checkpoint import Checkpoint
from swudi.storage.filesystem import resolve
from tests.helpers.builders import bit_equal, random_tensor, raw_safetensors
from tests.helpers.proxy import CountingProxy

BIG = 200 * 10**6
HTTP_SLACK = 16 * 1024  # headers of a handful of HTTP responses


@pytest.fixture(scope="module")
def big_shard(moto_server, _moto_fs):
    """A 200 MB shard on S3: zeros, then the 1 MiB target tensor, then a small one (built in place)."""
    target = random_tensor(torch.float32, (256, 1024), seed=7)
    target_bytes = target.numpy().tobytes()
    header = {"__metadata__": {"format": "pt"},
              "a.big": {"dtype": "U8", "shape": [BIG], "data_offsets": [0, BIG]},
              "b.target": {"dtype": "F32", "shape": [256, 1024], "data_offsets": [BIG, BIG + len(target_bytes)]},
              "c.small": {"dtype": "I64", "shape": [10], "data_offsets": [BIG + len(target_bytes),
                                                                          BIG + len(target_bytes) + 80]}}
    head = raw_safetensors(header)
    data = bytearray(len(head) + BIG + len(target_bytes) + 80)  # zero-filled
    data[:len(head)] = head
    start = len(head) + BIG
    data[start:start + len(target_bytes)] = target_bytes
    data[start + len(target_bytes):] = torch.arange(10, dtype=torch.int64).numpy().tobytes()
    bucket = f"swudi-big-{uuid.uuid4().hex[:8]}"
    _moto_fs.call_s3("create_bucket", Bucket=bucket)
    path = f"{bucket}/big/model.safetensors"
    _moto_fs.pipe_file(path, data, chunksize=len(data))  # one PUT, directly to moto (not via the proxy)
    del data
    yield SimpleNamespace(name=bucket, endpoint_url=moto_server,
                          storage_options={"endpoint_url": moto_server, "key": "testing", "secret": "testing"}), \
        path, target
    _moto_fs.rm(bucket, recursive=True)


def test_one_tensor_from_a_200mb_shard(big_shard):
    bucket, _path, target = big_shard
    endpoint = urlparse(bucket.endpoint_url)
    with CountingProxy(endpoint.hostname, endpoint.port) as proxy:
        options = {**bucket.storage_options, "endpoint_url": proxy.endpoint_url}

        ckpt = Checkpoint.open(f"s3://{bucket.name}/big", options)
        opened = proxy.bytes_down
        tensor = ckpt.read("b.target")
        read = proxy.bytes_down - opened

    nbytes = target.numel() * 4
    assert bit_equal(tensor, target)
    assert ckpt.tensors["a.big"].nbytes == BIG
    assert opened < 64 * 1024 + HTTP_SLACK, opened  # listing + one header range read
    assert nbytes <= read < nbytes + HTTP_SLACK, read
    assert proxy.bytes_down < nbytes + 64 * 1024 + 2 * HTTP_SLACK


def test_the_proxy_sees_s3fs_read_ahead(big_shard):
    """Control: the measurement does catch s3fs's default 50 MiB read-ahead, and swudi's resolve() turns it off."""
    bucket, path, _ = big_shard
    endpoint = urlparse(bucket.endpoint_url)
    with CountingProxy(endpoint.hostname, endpoint.port) as proxy:
        plain = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=proxy.endpoint_url,
                                  skip_instance_cache=True)
        with plain.open(path, "rb") as f:
            f.read(8)
        naive = proxy.bytes_down
        proxy.reset()
        fs, p = resolve(f"s3://{path}", {**bucket.storage_options, "endpoint_url": proxy.endpoint_url})
        with fs.open(p, "rb") as f:
            f.read(8)
        ours = proxy.bytes_down
    assert naive > 40 * 2**20, naive
    assert ours < HTTP_SLACK, ours

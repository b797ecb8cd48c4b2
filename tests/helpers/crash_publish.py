"""Child process for the crash test: publish a version and stall after its first shard.

Usage: python crash_publish.py OUTPUT_URL STORAGE_OPTIONS_JSON SIGNAL_FILE VERSION
When the writer asks for the first tensor of the second shard, the first shard is complete: this
process then creates SIGNAL_FILE and waits to be killed (SIGKILL: no cleanup, no finally blocks).
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

import torch

from swudi.io.writer import write_sharded
from swudi.publish.versions import publish_version


def main() -> None:
    output_url, options, signal_file, version = sys.argv[1:5]
    storage_options = json.loads(options) or None
    specs = [(f"w{i}", torch.float32, (1000,)) for i in range(4)]

    def read_fn(name: str) -> torch.Tensor:
        if name == "w2":  # first tensor of shard 2 (2 tensors of 4000 bytes per 8000-byte shard)
            pathlib.Path(signal_file).write_text("first shard written")
            time.sleep(120)
            raise SystemExit("not killed in time")
        return torch.full((1000,), 2.0)

    publish_version(
        output_url,
        version,
        lambda url: write_sharded(url, specs, read_fn, max_shard_size=8000, storage_options=storage_options),
        storage_options=storage_options,
        report={"note": "must never be published"},
    )


if __name__ == "__main__":
    main()

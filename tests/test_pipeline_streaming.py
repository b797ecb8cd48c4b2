"""Large non-matrix tensors (embeddings, lm_head) stream in row chunks sized by ``memory_budget``:
the published model does not depend on the chunk size and equals W0 + scale * mean(E_i - W0)."""

from __future__ import annotations

from pathlib import Path

import torch

from flows.merge import run_merge
from swudi.config.merge_config import config_from_mapping
from swudi.io.checkpoint import Checkpoint
from swudi.io.synthetic import SyntheticLlama, write_synthetic_models
from swudi.pipeline.plan import build_plan, chunk_budget, group_row_bytes, row_chunks

LLAMA = SyntheticLlama(layers=1, hidden=32, intermediate=64, heads=4, kv_heads=2, vocab=3000)
STREAMED = ("model.embed_tokens.weight", "lm_head.weight")


def _config(root: Path, base: str, experts: list[str], name: str, **extra):
    return config_from_mapping(
        {
            "base": base,
            "experts": experts,
            "output": str(root / name / "out"),
            "work_dir": str(root / name / "work"),
            "method": "swudi",
            "device": "cpu",
            "workers": 1,
            "scale": 0.7,
            **extra,
        }
    )


def test_embeddings_stream_in_chunks_with_the_same_bytes_as_whole(prefect_api: str, tmp_path: Path) -> None:
    base, experts = write_synthetic_models(str(tmp_path / "in"), 3, LLAMA)
    whole_cfg = _config(tmp_path, base, experts, "whole")
    chunked_cfg = _config(tmp_path, base, experts, "chunked", memory_budget="2MB")
    plan = build_plan(chunked_cfg)
    for job in plan.jobs:
        if job.name in STREAMED:
            assert len(row_chunks(job.shape, group_row_bytes(job, 3), chunk_budget(chunked_cfg))) >= 3
            assert len(row_chunks(job.shape, group_row_bytes(job, 3), chunk_budget(whole_cfg))) == 1

    whole = run_merge(whole_cfg)
    chunked = run_merge(chunked_cfg)
    files = sorted(p.name for p in Path(whole["url"]).glob("*.safetensors"))
    assert files
    for name in files:
        assert (Path(whole["url"]) / name).read_bytes() == (Path(chunked["url"]) / name).read_bytes(), name

    # independent formula, from the checkpoints themselves
    merged = Checkpoint.open(chunked["url"])
    base_ckpt = Checkpoint.open(base)
    expert_ckpts = [Checkpoint.open(url) for url in experts]
    for name in STREAMED:
        w0 = base_ckpt.read(name).double()
        mean_tv = torch.stack([e.read(name).double() - w0 for e in expert_ckpts]).mean(0)
        expected = (w0 + 0.7 * mean_tv).float()
        torch.testing.assert_close(merged.read(name), expected, rtol=1e-6, atol=1e-6)

    # a new scale reads the stored deltas in chunks: no expert bytes, same formula
    rescaled = run_merge(_config(tmp_path, base, experts, "chunked", memory_budget="2MB", scale=0.3))
    assert all(c["tensor_bytes"] == 0 for c in rescaled["io"]["per_checkpoint"][1:])
    again = Checkpoint.open(rescaled["url"])
    for name in STREAMED:
        w0 = base_ckpt.read(name).double()
        mean_tv = torch.stack([e.read(name).double() - w0 for e in expert_ckpts]).mean(0)
        torch.testing.assert_close(again.read(name), (w0 + 0.3 * mean_tv).float(), rtol=1e-6, atol=1e-6)

"""What a person watching a merge sees: task run names that say the tensors, progress figures."""

from __future__ import annotations

from flows.progress import MergeProgress
from swudi.io.checkpoint import TensorLocation
from swudi.pipeline.plan import TensorJob
from swudi.pipeline.records import MergedRecord
from swudi.units import format_bytes
from tasks.merge import task_label


def _job(name: str) -> TensorJob:
    location = TensorLocation(name, "/x/model.safetensors", "F32", (4, 4), 0, 64, "fp")
    return TensorJob(name, (4, 4), "F32", "method", location, (location,))


def test_task_label_names_the_block_and_its_tensors() -> None:
    leaves = ("attention.self.query", "attention.self.key", "output.dense")
    block = [_job(f"encoder.layer.3.{n}.weight") for n in leaves]
    assert task_label(block) == "encoder.layer.3: attention.self.query, attention.self.key, output.dense"
    assert task_label(block[:1]) == "encoder.layer.3.attention.self.query.weight"
    two = [_job("model.layers.0.mlp.up_proj.weight"), _job("model.layers.1.mlp.up_proj.weight")]
    assert task_label(two) == "model.layers.0..model.layers.1: model.layers.0.mlp.up_proj, model.layers.1.mlp.up_proj"
    many = [_job(f"model.layers.0.w{i:02d}.weight") for i in range(40)]
    label = task_label(many)
    assert label.startswith("model.layers.0: w00, w01") and label.endswith(")") and len(label) <= 110
    shown = label.split(": ", 1)[1].rsplit(" (+", 1)
    assert len(shown[0].split(", ")) + int(shown[1].rstrip(")")) == 40
    groups = [_job("embeddings.LayerNorm.weight"), _job("embeddings.LayerNorm.bias")]
    assert task_label(groups) == "2 tensors: embeddings.LayerNorm, embeddings.LayerNorm.bias"


def test_progress_counts_weights_bytes_and_estimates_the_time_left() -> None:
    progress = MergeProgress(total=4, reused=2)
    assert progress.describe().startswith("merge progress: 0/4 weights (0%)") and "ETA ?" in progress.describe()
    record = MergedRecord(key="k", url="u", names=("a",), method="swudi", bytes_read=(1000, 2000, 2000),
                          work_bytes_read=500)
    progress.finished([record, record])  # no Prefect run here: only the counts (no artifact is made)
    assert progress.done == 2 and progress.bytes_read == 11000
    line = progress.describe()
    assert "2/4 weights (50%)" in line and "read 11.0 kB" in line and "2 reused" in line
    assert progress.eta_s is not None and progress.eta_s > 0
    assert [format_bytes(n) for n in (999, 1500, 2.5e9, 3.2e12)] == ["999 B", "1.5 kB", "2.5 GB", "3.2 TB"]

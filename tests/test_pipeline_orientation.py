"""Orientation: a GPT-2 Conv1D weight is stored [in, out]; swudi merges it with its input dimension as
the Gram dimension (it transposes, merges, transposes back), from config.json's model_type or a
per-pattern ``orientation`` override. Checked against a float64 reference computed on W^T, and the
untransposed merge (the wrong orientation) is shown to differ."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from swudi.config.merge_config import MergeConfig
from swudi.io.checkpoint import Checkpoint, TensorLocation, read_tensor
from swudi.pipeline.layer_step import merge_layer
from swudi.pipeline.plan import TensorJob, build_plan, describe_plan, version_id
from tests.conformance.families import BY_NAME, build_family
from tests.conformance.reference import swudi_a

CONV1D = ("c_attn", "c_proj", "c_fc")


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    return build_family(BY_NAME["gpt2"], tmp_path_factory.mktemp("gpt2"))


def _config(gpt2: tuple[Path, list[Path]], out: Path, **extra: object) -> MergeConfig:
    base, experts = gpt2
    return MergeConfig(base=str(base), experts=[str(e) for e in experts], output=str(out), device="cpu", **extra)


def _merged(job: TensorJob, config: MergeConfig) -> torch.Tensor:
    record = merge_layer(job, config)
    return read_tensor(Checkpoint.open(record.url).location(job.name))


def _inputs(job: TensorJob) -> tuple[torch.Tensor, list[torch.Tensor]]:
    experts = [read_tensor(e).double() for e in job.experts if isinstance(e, TensorLocation)]
    assert len(experts) == len(job.experts)
    return read_tensor(job.base).double(), experts


def test_conv1d_weights_merge_over_their_input_dimension(gpt2: tuple[Path, list[Path]], tmp_path: Path) -> None:
    config = _config(gpt2, tmp_path / "out")
    plan = build_plan(config)
    rows = {row["name"]: row for row in describe_plan(config, plan)["tensors"]}
    conv = [job for job in plan.layer_jobs if job.name.split(".")[-2] in CONV1D]
    assert len(conv) == 2 * 4  # 2 blocks x (c_attn, attn.c_proj, c_fc, mlp.c_proj)
    assert all(job.orientation == "in_out" and rows[job.name]["orientation"] == "in_out" for job in conv)
    assert plan.counts()["in_out_weights"] == len(conv)
    for job in conv[:3]:
        w0, experts = _inputs(job)
        taus = [e - w0 for e in experts]
        right = w0 + swudi_a([t.T for t in taus]).T  # merged as [out, in] = W^T
        wrong = w0 + swudi_a(taus)
        got = _merged(job, config).double()
        assert got.shape == w0.shape  # written back as stored
        torch.testing.assert_close(got, right, rtol=1e-4, atol=1e-6)
        assert (got - wrong).abs().max() > 1e-2 * wrong.abs().max(), f"{job.name}: orientation made no difference"


def test_orientation_override_wins_over_the_architecture(gpt2: tuple[Path, list[Path]], tmp_path: Path) -> None:
    default = _config(gpt2, tmp_path / "out")
    config = _config(gpt2, tmp_path / "out", orientation={"*.attn.c_attn.weight": "out_in"})
    plan = build_plan(config)
    jobs = {job.name: job for job in plan.layer_jobs}
    job = jobs["transformer.h.0.attn.c_attn.weight"]
    assert job.orientation == "out_in" and jobs["transformer.h.0.mlp.c_fc.weight"].orientation == "in_out"
    w0, experts = _inputs(job)
    got = _merged(job, config).double()
    torch.testing.assert_close(got, w0 + swudi_a([e - w0 for e in experts]), rtol=1e-4, atol=1e-6)
    # the default (in_out) merge of the same weight is another artefact, and another version
    default_job = {j.name: j for j in build_plan(default).layer_jobs}[job.name]
    assert default_job.input_key != job.input_key
    assert version_id(config, plan) != version_id(default, build_plan(default))


def test_orientation_config_refuses_an_unknown_value(gpt2: tuple[Path, list[Path]], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="orientation"):
        _config(gpt2, tmp_path / "out", orientation={"*.c_fc.weight": "transposed"})


def test_fan_in_fan_out_adapters_merge_to_an_adapter_peft_loads(prefect_api: str, tmp_path: Path) -> None:
    """GPT-2 LoRA experts with fan_in_fan_out (PEFT's Conv1D form), merged in [out, in] and written
    as a merged adapter (output_format: adapter): PEFT loads it onto the base and reproduces the
    published dense model."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from flows.merge import run_merge

    family = BY_NAME["gpt2"]
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(family.build_config()).save_pretrained(tmp_path / "base")
    experts = []
    for i in range(2):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
        lora = LoraConfig(r=3, lora_alpha=6, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
        peft_model = get_peft_model(model, lora)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(10 * i + len(name))))
        peft_model.save_pretrained(str(tmp_path / f"ad{i}"))
        experts.append(str(tmp_path / f"ad{i}"))
    config = MergeConfig(
        base=str(tmp_path / "base"),
        experts=experts,
        output=str(tmp_path / "out"),
        device="cpu",
        scale=0.7,
        output_format="adapter",
    )
    assert all(job.orientation == "in_out" for job in build_plan(config).layer_jobs)
    version = Path(run_merge(config)["url"])
    published = Checkpoint.open(str(version)).state_dict()
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), version / "adapter")
    loaded = merged.merge_and_unload().state_dict()
    for name in ("transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_fc.weight"):
        scale = float(published[name].abs().max())
        torch.testing.assert_close(loaded[name], published[name], atol=1e-5 * scale, rtol=1e-5, msg=name)

"""PEFT LoRA adapters that target embeddings, made and saved by PEFT 0.21 itself.

PEFT saves such an adapter with ``...embed_tokens.base_layer.weight`` (its copy of the frozen base
weight, ``save_embedding_layers``) and ``lora_embedding_A`` ``[r, vocab]`` / ``lora_embedding_B``
``[dim, r]``. The independent references are PEFT's own ``merge_and_unload()`` (the experts' dense
weights, and the merged adapter loaded back) and float64 formulas written here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from swudi import merge_state_dicts
from swudi.config.merge_config import MergeConfig, config_from_mapping
from swudi.errors import CheckpointMismatchError
from swudi.io.adapter import LoraAdapter, LoraFactors
from swudi.io.checkpoint import Checkpoint
from swudi.pipeline.plan import build_plan
from swudi.pipeline.reads import read_task_vectors
from tests.helpers.lora import llama_config, write_adapter, write_base
from tests.helpers.steps import merge_without_prefect

CONFIG = llama_config(hidden=32, intermediate=48, layers=1, vocab=40)
EMBED = "model.embed_tokens.weight"
ADAPTERS: dict[str, dict[str, Any]] = {
    "emb": {"r": 2, "lora_alpha": 4, "target_modules": ["embed_tokens", "q_proj"]},
    "emb_rslora": {"r": 3, "lora_alpha": 3, "use_rslora": True, "target_modules": ["embed_tokens", "v_proj"]},
}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("lora-emb")
    base = write_base(root / "base", CONFIG)
    dense = {
        name: write_adapter(root / name, CONFIG, seed=i + 1, **lora) for i, (name, lora) in enumerate(ADAPTERS.items())
    }
    return {"root": root, "base": base, "dense": dense}


def _config(root: Path, out: Path, experts: list[str] | None = None, **extra: Any) -> MergeConfig:
    experts = experts or [str(root / n) for n in ADAPTERS]
    return config_from_mapping(
        {"base": str(root / "base"), "experts": experts, "output": str(out), "device": "cpu", **extra}
    )


def test_saved_embedding_adapters_are_read_as_peft_merges_them(adapters, tmp_path: Path) -> None:
    root, base = adapters["root"], adapters["base"]
    adapter = LoraAdapter.open(str(root / "emb"))
    assert EMBED in adapter.base_layers  # PEFT's copy of the base weight, not a tensor "not in the base"
    factors = adapter.inputs[EMBED]
    assert isinstance(factors, LoraFactors) and factors.embedding and factors.weight_shape == (40, 32)
    cfg = _config(root, tmp_path / "out")
    plan = build_plan(cfg)
    job = next(job for job in plan.jobs if job.name == EMBED)
    _, tv = read_task_vectors(job, cfg)
    for i, dense in enumerate(adapters["dense"].values()):
        torch.testing.assert_close(tv[i], dense[EMBED] - base[EMBED], rtol=1e-5, atol=1e-6)


def test_default_routing_merges_adapter_embeddings_by_the_mean(adapters, tmp_path: Path) -> None:
    root, base = adapters["root"], adapters["base"]
    result = merge_without_prefect(_config(root, tmp_path / "out", scale=0.7))
    got = Checkpoint.open(result["url"]).state_dict()
    w0 = base[EMBED].double()
    want = w0 + 0.7 * sum(d[EMBED].double() - w0 for d in adapters["dense"].values()) / len(ADAPTERS)
    torch.testing.assert_close(got[EMBED].double(), want, rtol=1e-5, atol=1e-6)


def test_merged_embedding_adapter_loads_back_as_the_published_model(adapters, tmp_path: Path) -> None:
    """Embeddings merged with swudi_a in factor space, written as lora_embedding_A/B: PEFT loads the
    adapter onto the base and its merge_and_unload() is the published dense model."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    root, base = adapters["root"], adapters["base"]
    cfg = _config(root, tmp_path / "out", include=["*"], scale=0.7, output_format="adapter")
    result = merge_without_prefect(cfg)
    version = Path(result["url"])
    published = Checkpoint.open(str(version)).state_dict()
    keys = load_file(version / "adapter" / "adapter_model.safetensors")
    assert {k for k in keys if "embed_tokens" in k} == {
        "base_model.model.model.embed_tokens.lora_embedding_A",
        "base_model.model.model.embed_tokens.lora_embedding_B",
    }
    assert keys["base_model.model.model.embed_tokens.lora_embedding_A"].shape[1] == 40
    adapter_config = json.loads((version / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["fan_in_fan_out"] is False and "model.embed_tokens" in adapter_config["target_modules"]
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(root / "base"), version / "adapter")
    loaded = model.merge_and_unload().state_dict()
    for name, tensor in published.items():
        scale = float(tensor.abs().max()) or 1.0
        assert float((loaded[name] - tensor).abs().max()) < 1e-5 * scale, name
    # the dense path on PEFT's dense experts (factor space must equal it) and the embedding's update
    want = merge_state_dicts(base, list(adapters["dense"].values()), "swudi_a", include=["*"])
    for name in (EMBED, "model.layers.0.self_attn.q_proj.weight"):
        expected = base[name] + 0.7 * (want[name] - base[name])
        torch.testing.assert_close(published[name], expected, rtol=1e-4, atol=1e-5, msg=name)
    assert float((published[EMBED] - base[EMBED]).abs().max()) > 1e-3  # the embeddings did change


def _edited(src: Path, dst: Path, edit: Any) -> Path:
    shutil.copytree(src, dst)
    weights = dst / "adapter_model.safetensors"
    tensors = load_file(weights)
    edit(tensors)
    save_file(tensors, weights, metadata={"format": "pt"})
    return dst


def test_full_tensor_beside_factors_and_a_foreign_base_layer_are_refused(adapters, tmp_path: Path) -> None:
    root, base = adapters["root"], adapters["base"]
    prefix = "base_model.model."
    both = _edited(root / "emb", tmp_path / "both", lambda t: t.update({prefix + EMBED: base[EMBED].clone()}))
    with pytest.raises(
        CheckpointMismatchError,
        match=r"both/adapter_model.safetensors: weight 'model.embed_tokens.weight' has both a full "
        r"tensor .* and LoRA factors",
    ):
        build_plan(_config(root, tmp_path / "o1", [str(both)]))

    def shift(tensors: dict[str, torch.Tensor]) -> None:
        tensors[prefix + "model.embed_tokens.base_layer.weight"][7] += 0.5

    foreign = _edited(root / "emb", tmp_path / "foreign", shift)
    with pytest.raises(
        CheckpointMismatchError,
        match=r"foreign: .*embed_tokens.base_layer.weight .* differs from "
        r"'model.embed_tokens.weight' of the base",
    ):
        build_plan(_config(root, tmp_path / "o2", [str(foreign)]))
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()

"""The model families of the conformance lane, built offline from transformers' own classes.

A family is a tiny config (hidden 16-32, 1-2 layers), the Auto class that builds it, the inputs of a
forward pass, and what the test expects of its tensors (which are stored [in, out], which are fused
experts). :func:`build_family` writes the base (``from_config``, seeded, ``save_pretrained``) and
N experts: the base plus a seeded low-rank update on every floating parameter, saved the same way
(so tensor names, tied weights, dtypes and sharding are what users have).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

#: experts per family: enough for a non-trivial Gram (rank up to 3 x 2) and for TIES' sign election
NUM_EXPERTS = 3
UPDATE_RANK = 2
VOCAB = 64

_CAUSAL = {
    "vocab_size": VOCAB,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


def _text(model: Any, config: Any) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))}


def _seq2seq(model: Any, config: Any) -> dict[str, torch.Tensor]:
    ids = _text(model, config)["input_ids"]
    return {"input_ids": ids, "decoder_input_ids": ids[:, :4]}


def _image(model: Any, config: Any) -> dict[str, torch.Tensor]:
    size = config.image_size
    return {"pixel_values": torch.randn(1, config.num_channels, size, size, generator=torch.Generator().manual_seed(0))}


@dataclasses.dataclass(frozen=True)
class Family:
    """One transformers family of the lane."""

    name: str
    model_type: str
    auto_class: str  # transformers Auto class name
    config: dict[str, Any]
    inputs: Callable[[Any, Any], dict[str, torch.Tensor]] = _text
    in_out: tuple[str, ...] = ()  # glob patterns the test expects to be stored [in, out]
    fused: tuple[str, ...] = ()  # glob patterns the test expects to be fused [E, a, b] expert tensors
    max_shard_size: str | None = None  # save sharded (a small size: several shards)
    dtype: torch.dtype = torch.float32
    note: str = ""
    #: builds the experts from the base model instead of :func:`low_rank_experts` (the hook for other
    #: kinds of experts, e.g. vocab-extended experts or PEFT adapters): (family, model, root) -> paths;
    #: the test reads each expert's tensors with :func:`expert_tensors`, which such experts extend
    experts_builder: Callable[[Family, Any, Path], list[Path]] | None = None

    def model_class(self) -> Any:
        import transformers

        return getattr(transformers, self.auto_class)

    def build_config(self) -> Any:
        from transformers import AutoConfig

        return AutoConfig.for_model(self.model_type, **self.config)


FAMILIES: tuple[Family, ...] = (
    Family(
        "llama",
        "llama",
        "AutoModelForCausalLM",
        dict(_CAUSAL),
        max_shard_size="8KB",
        note="GQA (4 heads, 2 kv heads), sharded",
    ),
    Family(
        "qwen2",
        "qwen2",
        "AutoModelForCausalLM",
        {**_CAUSAL, "tie_word_embeddings": True},
        note="qkv biases, tied embeddings",
    ),
    Family("mistral", "mistral", "AutoModelForCausalLM", {**_CAUSAL, "sliding_window": 32}, note="GQA"),
    Family(
        "gemma2",
        "gemma2",
        "AutoModelForCausalLM",
        {**_CAUSAL, "head_dim": 8, "num_attention_heads": 2, "num_key_value_heads": 1},
        dtype=torch.bfloat16,
        note="tied, extra norms, bfloat16",
    ),
    Family(
        "phi3", "phi3", "AutoModelForCausalLM", {**_CAUSAL, "pad_token_id": 0}, note="fused qkv_proj and gate_up_proj"
    ),
    Family(
        "gpt2",
        "gpt2",
        "AutoModelForCausalLM",
        {"vocab_size": VOCAB, "n_embd": 16, "n_layer": 2, "n_head": 2, "n_positions": 32},
        in_out=("*.c_attn.weight", "*.c_proj.weight", "*.c_fc.weight"),
        note="Conv1D weights [in, out], tied lm_head",
    ),
    Family(
        "bert",
        "bert",
        "AutoModelForMaskedLM",
        {
            "vocab_size": VOCAB,
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 32,
            "max_position_embeddings": 32,
        },
        note="MLM head tied to word embeddings",
    ),
    Family(
        "roberta",
        "roberta",
        "AutoModelForMaskedLM",
        {
            "vocab_size": VOCAB,
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 32,
            "max_position_embeddings": 40,
            "pad_token_id": 1,
        },
    ),
    Family(
        "t5",
        "t5",
        "AutoModelForSeq2SeqLM",
        {
            "vocab_size": VOCAB,
            "d_model": 16,
            "d_ff": 32,
            "d_kv": 8,
            "num_layers": 1,
            "num_decoder_layers": 1,
            "num_heads": 2,
        },
        inputs=_seq2seq,
        max_shard_size="8KB",
        note="encoder-decoder, shared embeddings, sharded",
    ),
    Family(
        "vit",
        "vit",
        "AutoModel",
        {
            "image_size": 8,
            "patch_size": 4,
            "num_channels": 3,
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 32,
        },
        inputs=_image,
        note="4-D conv patch embedding (mean)",
    ),
    Family(
        "mixtral",
        "mixtral",
        "AutoModelForCausalLM",
        {**_CAUSAL, "num_local_experts": 4, "num_experts_per_tok": 2},
        note="saved as per-expert 2-D weights (block_sparse_moe.experts.E.w1)",
    ),
    Family(
        "gpt_oss",
        "gpt_oss",
        "AutoModelForCausalLM",
        {**_CAUSAL, "num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 8},
        in_out=("*.experts.gate_up_proj", "*.experts.down_proj"),
        fused=("*.experts.gate_up_proj", "*.experts.down_proj"),
        max_shard_size="8KB",
        note="fused 3-D experts [E, in, out] with [E, out] biases, sharded",
    ),
    Family(
        "granitemoe",
        "granitemoe",
        "AutoModelForCausalLM",
        {**_CAUSAL, "num_local_experts": 4, "num_experts_per_tok": 2},
        fused=("*.block_sparse_moe.input_linear.weight", "*.block_sparse_moe.output_linear.weight"),
        note="fused 3-D experts [E, out, in]",
    ),
    Family(
        "llava",
        "llava",
        "AutoModelForImageTextToText",
        {
            "text_config": {"model_type": "llama", **_CAUSAL},
            "vision_config": {
                "model_type": "clip_vision_model",
                "hidden_size": 16,
                "intermediate_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "image_size": 8,
                "patch_size": 4,
                "projection_dim": 16,
            },
            "image_token_index": VOCAB - 1,
            "vision_feature_layer": -1,
        },
        note="vision-language: CLIP vision tower (4-D conv) + projector + Llama",
    ),
)

BY_NAME = {family.name: family for family in FAMILIES}


def _low_rank_update(shape: tuple[int, ...], generator: torch.Generator, size: float) -> torch.Tensor:
    """A seeded update of ``shape``: rank UPDATE_RANK per 2-D slice ([rows, rest] for 4-D, per expert
    for 3-D), a random vector for 1-D; entries of about ``size``."""
    if len(shape) <= 1:
        return torch.randn(shape, generator=generator) * size
    if len(shape) == 3:
        return torch.stack([_low_rank_update(shape[1:], generator, size) for _ in range(shape[0])])
    rows, cols = shape[0], int(torch.tensor(shape[1:]).prod())
    u = torch.randn(rows, UPDATE_RANK, generator=generator)
    v = torch.randn(UPDATE_RANK, cols, generator=generator)
    return ((u @ v) * (size / UPDATE_RANK**0.5)).reshape(shape)


def build_family(family: Family, root: Path, seed: int = 0) -> tuple[Path, list[Path]]:
    """Write ``root/base`` (``from_config`` seeded, ``save_pretrained``, safetensors) and the experts
    (:func:`low_rank_experts` unless the family has its own ``experts_builder``); return their paths."""
    cls = family.model_class()
    torch.manual_seed(seed)
    model = cls.from_config(family.build_config()).to(family.dtype).eval()
    kwargs = _save_kwargs(family)
    base = root / "base"
    model.save_pretrained(base, **kwargs)
    builder = family.experts_builder or low_rank_experts
    return base, builder(family, model, root)


def _save_kwargs(family: Family) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"safe_serialization": True}
    if family.max_shard_size:
        kwargs["max_shard_size"] = family.max_shard_size
    return kwargs


def low_rank_experts(family: Family, model: Any, root: Path, seed: int = 0) -> list[Path]:
    """NUM_EXPERTS full checkpoints ``root/expert_i``: the base plus :func:`_low_rank_update` on every
    floating parameter (tied parameters are one parameter, updated once, so they stay tied)."""
    kwargs = _save_kwargs(family)
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    experts = []
    for i in range(NUM_EXPERTS):
        generator = torch.Generator().manual_seed(1000 * (seed + 1) + i)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.is_floating_point():
                    update = _low_rank_update(tuple(param.shape), generator, 0.05)
                    param.copy_((original[name].float() + update).to(param.dtype))
        path = root / f"expert_{i}"
        model.save_pretrained(path, **kwargs)
        experts.append(path)
    return experts


def expert_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder (all its safetensors shards), each name once."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for name in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                assert name not in out, f"{name} saved twice in {path}"
                out[name] = f.get_tensor(name)
    return out

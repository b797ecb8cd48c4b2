"""Tiny Llama-shaped base models and LoRA adapters made with transformers and PEFT themselves.

The base is a randomly initialised `LlamaForCausalLM` saved with `save_pretrained` (safetensors,
HF layout). Adapters are `LoraConfig` + `get_peft_model` on that model, their factors (B starts at
zero in PEFT) filled with seeded random values, saved with PEFT's `save_pretrained`. The dense
reference of each adapter is PEFT's own `merge_and_unload()` state dict.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def llama_config(hidden: int = 64, intermediate: int = 96, layers: int = 2, vocab: int = 48) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        tie_word_embeddings=False,
    )


def base_model(config: Any, seed: int = 0) -> Any:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def write_base(folder: Path, config: Any, seed: int = 0) -> dict[str, torch.Tensor]:
    """Save a base model; return its state dict."""
    model = base_model(config, seed)
    model.save_pretrained(folder)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def write_adapter(folder: Path, config: Any, seed: int, base_seed: int = 0, **lora: Any) -> dict[str, torch.Tensor]:
    """Save a LoRA adapter of the base (``lora``: LoraConfig keyword arguments) with random factors;
    return the fine-tuned model's dense state dict as PEFT merges it (``merge_and_unload``)."""
    from peft import LoraConfig, get_peft_model

    model = base_model(config, base_seed)
    peft_model = get_peft_model(model, LoraConfig(**lora))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
            elif "modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.01)
    peft_model.save_pretrained(str(folder))
    merged = peft_model.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def write_full_expert(folder: Path, base: dict[str, torch.Tensor], seed: int, config: Any) -> dict[str, torch.Tensor]:
    """A fully fine-tuned expert: every tensor of the base plus seeded noise, saved as HF layout."""
    from transformers import LlamaForCausalLM

    generator = torch.Generator().manual_seed(seed)
    state = {k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in base.items()}
    model = LlamaForCausalLM(config)
    model.load_state_dict(state)
    model.save_pretrained(folder)
    return state

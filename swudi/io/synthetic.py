"""Generated checkpoints for the demo, tests and benchmarks: a transformer-shaped base and experts.

:class:`SyntheticModel` has the tensor names and shapes of a BERT-style encoder (embeddings,
attention and MLP weights, biases, layer norms, an integer buffer); :class:`SyntheticLlama` those
of a Llama decoder (grouped-query k/v, gate/up/down, RMSNorm, tied or untied embeddings). Each
expert adds to every weight a task-specific low-rank update plus small dense noise, as fine-tuning
does, so the task vectors have the spectral structure SWUDI-A is built for. Everything is seeded:
the same arguments give the same bytes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from swudi.io.header import dtype_name
from swudi.io.writer import write_sharded
from swudi.storage.filesystem import join_url, write_bytes_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyntheticModel:
    """Shape of the generated encoder."""

    layers: int = 2
    hidden: int = 64
    intermediate: int = 256
    vocab: int = 128
    positions: int = 32

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensor name -> shape, in checkpoint order."""
        h, f = self.hidden, self.intermediate
        shapes: dict[str, tuple[int, ...]] = {
            "embeddings.word_embeddings.weight": (self.vocab, h),
            "embeddings.position_embeddings.weight": (self.positions, h),
            "embeddings.LayerNorm.weight": (h,),
            "embeddings.LayerNorm.bias": (h,),
        }
        for i in range(self.layers):
            p = f"encoder.layer.{i}."
            for proj in ("query", "key", "value"):
                shapes[p + f"attention.self.{proj}.weight"] = (h, h)
                shapes[p + f"attention.self.{proj}.bias"] = (h,)
            shapes[p + "attention.output.dense.weight"] = (h, h)
            shapes[p + "attention.output.dense.bias"] = (h,)
            shapes[p + "attention.output.LayerNorm.weight"] = (h,)
            shapes[p + "attention.output.LayerNorm.bias"] = (h,)
            shapes[p + "intermediate.dense.weight"] = (f, h)
            shapes[p + "intermediate.dense.bias"] = (f,)
            shapes[p + "output.dense.weight"] = (h, f)
            shapes[p + "output.dense.bias"] = (h,)
            shapes[p + "output.LayerNorm.weight"] = (h,)
            shapes[p + "output.LayerNorm.bias"] = (h,)
        return shapes

    def config_json(self) -> dict[str, object]:
        """A Hugging Face ``config.json`` for the generated encoder."""
        return {
            "model_type": "bert",
            "architectures": ["BertModel"],
            "hidden_size": self.hidden,
            "num_hidden_layers": self.layers,
            "num_attention_heads": max(1, self.hidden // 32),
            "intermediate_size": self.intermediate,
            "vocab_size": self.vocab,
            "max_position_embeddings": self.positions,
            "type_vocab_size": 1,
            "layer_norm_eps": 1e-12,
        }

    def buffers(self) -> dict[str, torch.Tensor]:
        """Integer buffers stored with the weights (never merged)."""
        return {"embeddings.position_ids": torch.arange(self.positions, dtype=torch.int64).unsqueeze(0)}


@dataclass(frozen=True)
class SyntheticLlama:
    """Shape of a generated Llama decoder (``LlamaForCausalLM`` names; k/v have ``kv_heads`` heads)."""

    layers: int = 2
    hidden: int = 64
    intermediate: int = 172
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 256
    tie_embeddings: bool = False

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensor name -> shape, in checkpoint order."""
        h, m = self.hidden, self.intermediate
        kv = self.kv_heads * (h // self.heads)
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab, h)}
        for i in range(self.layers):
            p = f"model.layers.{i}."
            shapes[p + "self_attn.q_proj.weight"] = (h, h)
            shapes[p + "self_attn.k_proj.weight"] = (kv, h)
            shapes[p + "self_attn.v_proj.weight"] = (kv, h)
            shapes[p + "self_attn.o_proj.weight"] = (h, h)
            shapes[p + "mlp.gate_proj.weight"] = (m, h)
            shapes[p + "mlp.up_proj.weight"] = (m, h)
            shapes[p + "mlp.down_proj.weight"] = (h, m)
            shapes[p + "input_layernorm.weight"] = (h,)
            shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes["model.norm.weight"] = (h,)
        if not self.tie_embeddings:
            shapes["lm_head.weight"] = (self.vocab, h)
        return shapes

    def config_json(self) -> dict[str, object]:
        """A Hugging Face ``config.json`` for the generated decoder."""
        return {
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
        }

    def buffers(self) -> dict[str, torch.Tensor]:
        """No buffers are stored in a Llama checkpoint."""
        return {}


def base_state_dict(
    model: SyntheticModel | SyntheticLlama, seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """The base weights: scaled Gaussian matrices, unit layer norms, small biases, a position buffer."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, shape in model.shapes().items():
        if name.endswith(("LayerNorm.weight", "norm.weight")):
            tensor = torch.ones(shape)
        elif len(shape) == 1:
            tensor = 0.02 * torch.randn(shape, generator=generator)
        else:
            tensor = torch.randn(shape, generator=generator) / shape[-1] ** 0.5
        state[name] = tensor.to(dtype)
    state.update(model.buffers())
    return state


def expert_state_dict(
    base: dict[str, torch.Tensor], task: int, seed: int = 0, rank: int = 4, strength: float = 0.05, noise: float = 0.002
) -> dict[str, torch.Tensor]:
    """Base + a task-specific rank-``rank`` update (plus dense noise) on every float tensor."""
    generator = torch.Generator().manual_seed(10_000 * (seed + 1) + task)
    expert: dict[str, torch.Tensor] = {}
    for name, tensor in base.items():
        if not tensor.is_floating_point():
            expert[name] = tensor.clone()
            continue
        w = tensor.to(torch.float32)
        if w.ndim == 2:
            m, d = w.shape
            k = min(rank, m, d)
            u = torch.randn(m, k, generator=generator)
            v = torch.randn(k, d, generator=generator)
            delta = strength * (u @ v) / (k * d) ** 0.5 + noise * torch.randn(m, d, generator=generator)
        else:
            delta = strength * 0.2 * torch.randn(w.shape, generator=generator)
        expert[name] = (w + delta).to(tensor.dtype)
    return expert


def write_checkpoint(
    url: str,
    state: dict[str, torch.Tensor],
    model: SyntheticModel | SyntheticLlama,
    storage_options: dict | None = None,
    max_shard_size: int | str = "10GB",
) -> str:
    """Write ``state`` at ``url`` in the Hugging Face layout with a ``config.json``."""
    specs = [(name, dtype_name(t.dtype), tuple(t.shape)) for name, t in state.items()]
    write_sharded(url, specs, state.__getitem__, max_shard_size, storage_options)
    write_bytes_atomic(
        join_url(url, "config.json"), (json.dumps(model.config_json(), indent=2) + "\n").encode(), storage_options
    )
    return url


def write_synthetic_models(
    root: str,
    num_experts: int = 4,
    model: SyntheticModel | SyntheticLlama | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    storage_options: dict | None = None,
    max_shard_size: int | str = "10GB",
) -> tuple[str, list[str]]:
    """Write ``root/base`` and ``root/expert-<i>``; return (base URL, expert URLs)."""
    model = model or SyntheticModel()
    base = base_state_dict(model, seed, dtype)
    base_url = write_checkpoint(join_url(root, "base"), base, model, storage_options, max_shard_size)
    experts: Sequence[str] = [
        write_checkpoint(
            join_url(root, f"expert-{i}"), expert_state_dict(base, i, seed), model, storage_options, max_shard_size
        )
        for i in range(num_experts)
    ]
    log.info("wrote synthetic base and %d experts under %s", num_experts, root)
    return base_url, list(experts)

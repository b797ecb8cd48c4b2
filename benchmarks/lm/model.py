"""The benchmark's Llama-shaped decoder, its byte-level BPE tokenizer, token streams and scoring.

Scoring of a causal LM on blocks ``x`` of shape ``[B, T]`` (token ids): position ``t`` predicts
``x[:, t + 1]`` from ``x[:, : t + 1]``, so there are ``B (T - 1)`` predictions and

    loss     = - (1 / (B (T-1))) sum_{b, t} log softmax(logits[b, t])[x[b, t+1]]   (nats / token)
    accuracy = (1 / (B (T-1))) sum_{b, t} [argmax logits[b, t] == x[b, t+1]]
    perplexity = exp(loss)
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"


@dataclass(frozen=True)
class ModelShape:
    """LlamaForCausalLM size: GQA (``kv_heads`` < ``heads``), RMSNorm, untied embeddings."""

    layers: int = 4
    hidden: int = 256
    heads: int = 8
    kv_heads: int = 2
    intermediate: int = 688
    vocab: int = 4096
    max_positions: int = 256
    tie_embeddings: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def llama_config(shape: ModelShape, vocab_size: int, eos_id: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.max_positions,
        rms_norm_eps=1e-5,
        tie_word_embeddings=shape.tie_embeddings,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


def quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Any:
    """Byte-level BPE (GPT-2 style pre-tokenization, every byte in the alphabet) trained on
    ``texts``, wrapped as a ``PreTrainedTokenizerFast`` with ``EOS`` as its only special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS, unk_token=None, model_max_length=1_000_000
    )


def encode_stream(tokenizer: Any, docs: Sequence[str]) -> torch.Tensor:
    """The documents as one stream of token ids, each document followed by ``EOS``."""
    eos = tokenizer.convert_tokens_to_ids(EOS)
    ids: list[int] = []
    for enc in tokenizer(list(docs), add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int32)


def eval_blocks(stream: torch.Tensor, seq_len: int, max_blocks: int) -> torch.Tensor:
    """The first ``max_blocks`` non-overlapping blocks of ``seq_len`` tokens, ``[B, seq_len]`` int64."""
    n = min(max_blocks, stream.numel() // seq_len)
    if n == 0:
        raise ValueError(f"a stream of {stream.numel()} tokens has no block of {seq_len}")
    return stream[: n * seq_len].reshape(n, seq_len).long()


def sample_windows(stream: torch.Tensor, batch: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """``batch`` windows of ``seq_len`` tokens at uniformly random offsets of ``stream``."""
    starts = torch.randint(0, stream.numel() - seq_len, (batch,), generator=generator)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()]).long()


@torch.no_grad()
def score_blocks(model: Any, blocks: torch.Tensor, batch_size: int = 16) -> dict[str, float]:
    """``{"loss", "accuracy", "perplexity", "tokens"}`` of ``model`` on ``blocks`` (module docstring)."""
    model.eval()
    nll, correct, count = 0.0, 0, 0
    for i in range(0, blocks.shape[0], batch_size):
        x = blocks[i : i + batch_size]
        logits = model(input_ids=x).logits[:, :-1].float()
        target = x[:, 1:]
        nll += float(
            torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
        )
        correct += int((logits.argmax(-1) == target).sum())
        count += target.numel()
    loss = nll / count
    return {
        "loss": loss,
        "accuracy": correct / count,
        "perplexity": float(torch.exp(torch.tensor(loss))),
        "tokens": float(count),
    }


def load_causal_lm(folder: str | Path) -> Any:
    from transformers import LlamaForCausalLM

    quiet_transformers()
    return LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()

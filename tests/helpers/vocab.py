"""Tiny causal LMs whose experts append tokens to the base's vocabulary, built offline.

The base tokenizer is a `tokenizers` WordLevel model (no download) wrapped in
`PreTrainedTokenizerFast`; an expert adds tokens with `add_tokens` (ids after the base's), resizes
its embeddings with `resize_token_embeddings(len(tokenizer), pad_to_multiple_of=...)` (padding rows
no tokenizer names) and perturbs every weight, as a fine-tune would. Everything is saved with
`save_pretrained`, so tensor names, tied weights and tokenizer files are what users have.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]


def base_tokenizer(size: int) -> Any:
    """A word-level tokenizer of exactly ``size`` tokens: 4 specials and words ``w4``...``w{size-1}``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIALS), size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def llama_config(vocab: int, tied: bool) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )


def write_base(folder: Path, vocab: int, tied: bool) -> dict[str, torch.Tensor]:
    """Save the base model and its tokenizer; return the state dict."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(vocab, tied)).eval()
    model.save_pretrained(folder)
    base_tokenizer(vocab).save_pretrained(folder)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def write_expert(
    folder: Path, base: Path, seed: int, tokens: Sequence[str] = (), pad_to: int | None = None
) -> dict[str, torch.Tensor]:
    """An expert of the base: ``tokens`` appended to the tokenizer, embeddings resized (padded to a
    multiple of ``pad_to``), every weight perturbed by seeded noise. Returns the saved state dict."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base).eval()
    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokens:
        tokenizer.add_tokens(list(tokens))
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=pad_to, mean_resizing=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}

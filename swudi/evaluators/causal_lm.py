"""Built-in evaluator ``swudi.evaluators:causal_lm_loss``: next-token loss of a causal LM on text files.

For each evaluation file (one task per file, named by the file's stem: :mod:`swudi.evaluators.data`)
the documents are tokenized with the model folder's tokenizer (no special tokens added) and joined
into one stream, each document followed by the tokenizer's EOS token when it has one. The stream is
cut at ``max_tokens`` tokens, then into consecutive non-overlapping blocks of ``block_size`` tokens
(the last block shorter; a last block of one token is dropped). In a block ``x`` of length ``T``
position ``t`` predicts ``x[t + 1]`` from ``x[: t + 1]``, so the file gives
``n = sum over blocks (T_b - 1)`` predictions and

    loss       = -(1 / n) * sum_{b, t} log softmax(logits_b[t])[x_b[t + 1]]     (nats per token)
    perplexity = exp(loss)
    tokens     = n

The model runs in float32 on the CPU by default (``device``), in file order, with deterministic torch
algorithms: two runs on one machine give the same numbers. Blocks of equal length are batched
``batch_size`` at a time (no padding); the log-likelihoods are summed in float64.

Options: ``files`` (list of paths or URLs; required), ``column`` (JSONL field, default ``text``),
``max_tokens`` (per file, default all), ``batch_size`` (8), ``block_size`` (default the model's
``max_position_embeddings``, at most 1024), ``tokenizer`` (folder URL, default the model folder),
``device`` (cpu | cuda | auto), ``storage_options`` (fsspec options of the files and folders; the
merge config's are given when this is absent).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from swudi.errors import ConfigError, InputError
from swudi.evaluators.data import check_files, read_documents, task_names
from swudi.evaluators.models import (
    check_known,
    deterministic,
    load_tokenizer,
    local_model_folder,
    positive_int,
    require_model_folder,
    torch_device,
    transformers_module,
)

log = logging.getLogger(__name__)

NAME = "swudi.evaluators:causal_lm_loss"
DEFAULT_BATCH_SIZE = 8
MAX_DEFAULT_BLOCK = 1024


@dataclass(frozen=True)
class CausalLMOptions:
    """The evaluator's options, checked (module docstring)."""

    files: list[str]
    column: str = "text"
    max_tokens: int | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    block_size: int | None = None
    tokenizer: str | None = None
    device: str = "cpu"
    storage_options: dict[str, Any] | None = None

    @classmethod
    def parse(cls, options: Mapping[str, Any]) -> CausalLMOptions:
        check_known(NAME, options, set(cls.__dataclass_fields__))
        if "files" not in options:
            raise ConfigError(f"evaluator {NAME}: option files (the evaluation files) is required")
        column = options.get("column", "text")
        if not isinstance(column, str) or not column:
            raise ConfigError(f"evaluator {NAME}: option column must be a field name, got {column!r}")
        files = check_files(options["files"])
        task_names(files)
        block_size = positive_int(NAME, "block_size", options.get("block_size"), allow_none=True)
        if block_size is not None and block_size < 2:
            raise ConfigError(f"evaluator {NAME}: option block_size must be at least 2 (one prediction), got 1")
        return cls(
            files=files,
            column=column,
            max_tokens=positive_int(NAME, "max_tokens", options.get("max_tokens"), allow_none=True),
            batch_size=positive_int(NAME, "batch_size", options.get("batch_size", DEFAULT_BATCH_SIZE)) or 1,
            block_size=block_size,
            tokenizer=options.get("tokenizer"),
            device=str(options.get("device", "cpu")),
            storage_options=dict(options.get("storage_options") or {}),
        )


def check_causal_lm_options(options: Mapping[str, Any]) -> None:
    """Check the options and read every evaluation file (before any merge work): :class:`ConfigError`
    or :class:`InputError` naming the option, file or line at fault."""
    parsed = CausalLMOptions.parse(options)
    torch_device(parsed.device)
    for url in parsed.files:
        read_documents(url, parsed.column, parsed.storage_options)


def token_stream(tokenizer: Any, documents: Sequence[str], max_tokens: int | None) -> list[int]:
    """The documents' token ids, each followed by EOS when the tokenizer has one, cut at ``max_tokens``."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer(list(documents), add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        if eos is not None:
            stream.append(int(eos))
        if max_tokens is not None and len(stream) >= max_tokens:
            break
    return stream[:max_tokens] if max_tokens is not None else stream


def token_blocks(stream: Sequence[int], block_size: int) -> list[torch.Tensor]:
    """Consecutive blocks of ``block_size`` ids (the last one shorter, dropped when of one token)."""
    blocks = [torch.tensor(stream[i : i + block_size], dtype=torch.long) for i in range(0, len(stream), block_size)]
    return [b for b in blocks if b.numel() >= 2]


def score_blocks(
    model: Any, blocks: Sequence[torch.Tensor], batch_size: int, device: torch.device
) -> tuple[float, int]:
    """(sum of next-token negative log-likelihoods in float64, number of predictions) over ``blocks``."""
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    start = 0
    while start < len(blocks):  # a batch: up to batch_size consecutive blocks of one length
        stop = start + 1
        while stop < len(blocks) and stop - start < batch_size and blocks[stop].numel() == blocks[start].numel():
            stop += 1
        x = torch.stack(list(blocks[start:stop])).to(device)
        logits = model(input_ids=x).logits[:, :-1].float()
        target = x[:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none"
        )
        total += nll.double().sum().cpu()
        count += target.numel()
        start = stop
    return float(total), count


def _block_size(model: Any, requested: int | None, source: str) -> int:
    limit = getattr(model.config, "max_position_embeddings", None)
    if requested is None:
        return min(int(limit), MAX_DEFAULT_BLOCK) if limit else MAX_DEFAULT_BLOCK
    if limit and requested > int(limit):
        raise ConfigError(
            f"evaluator {NAME}: block_size {requested} exceeds {source}'s max_position_embeddings {limit}"
        )
    return requested


def causal_lm_loss(
    model_path: str,
    *,
    files: Sequence[str],
    column: str = "text",
    max_tokens: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    block_size: int | None = None,
    tokenizer: str | None = None,
    device: str = "cpu",
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, float]]:
    """``{task: {"loss", "perplexity", "tokens"}}`` of the causal LM at ``model_path`` (module docstring)."""
    opts = CausalLMOptions.parse(
        {
            "files": files,
            "column": column,
            "max_tokens": max_tokens,
            "batch_size": batch_size,
            "block_size": block_size,
            "tokenizer": tokenizer,
            "device": device,
            "storage_options": storage_options,
        }
    )
    torch_dev = torch_device(opts.device)
    documents = {url: read_documents(url, opts.column, opts.storage_options) for url in opts.files}
    transformers = transformers_module()
    results: dict[str, dict[str, float]] = {}
    with (
        local_model_folder(model_path, opts.storage_options) as folder,
        local_model_folder(opts.tokenizer or model_path, opts.storage_options, required=None) as tok_folder,
    ):
        tok = load_tokenizer(tok_folder, opts.tokenizer or model_path)
        model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        model.to(torch_dev).eval()
        block_size = _block_size(model, opts.block_size, model_path)
        vocab = int(model.get_input_embeddings().num_embeddings)
        with deterministic():
            for task, url in zip(task_names(opts.files), opts.files, strict=True):
                stream = token_stream(tok, documents[url], opts.max_tokens)
                if stream and max(stream) >= vocab:
                    raise InputError(
                        f"{url}: the tokenizer gives token id {max(stream)}, beyond the model's vocabulary of {vocab}"
                    )
                blocks = token_blocks(stream, block_size)
                if not blocks:
                    raise InputError(f"evaluation file {url} has fewer than 2 tokens: nothing to predict")
                nll, count = score_blocks(model, blocks, opts.batch_size, torch_dev)
                loss = nll / count
                results[task] = {"loss": loss, "perplexity": math.exp(loss), "tokens": float(count)}
                log.info("%s on %s: loss %.4f over %d tokens", model_path, task, loss, count)
    return results


causal_lm_loss.check_options = check_causal_lm_options  # type: ignore[attr-defined]
causal_lm_loss.check_model = require_model_folder  # type: ignore[attr-defined]

"""Built-in evaluator ``swudi.evaluators:sequence_classification``: accuracy of a sequence classifier.

Each evaluation file is JSON Lines, one example per line: ``{"text": "...", "label": 1}`` (the
field names are the options ``text_column`` and ``label_column``). A label is a class index
(``0 <= label < num_labels``) or a class name of the model's ``config.label2id``. One task per file
(its stem, :mod:`swudi.evaluators.data`), with

    accuracy = (1 / n) * sum_i [argmax_c logits_i[c] == label_i]
    examples = n

The model (``AutoModelForSequenceClassification``, float32, CPU by default) sees the examples in file
order, ``batch_size`` at a time, padded to the longest in the batch and cut at ``max_length`` tokens
(default: the tokenizer's ``model_max_length``, at most the model's ``max_position_embeddings``),
with deterministic torch algorithms.

Options: ``files`` (required), ``text_column`` (``text``), ``label_column`` (``label``),
``batch_size`` (16), ``max_length``, ``tokenizer`` (folder URL, default the model folder),
``device`` (cpu | cuda | auto), ``storage_options`` (the merge config's when absent).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from swudi.errors import ConfigError, InputError
from swudi.evaluators.data import check_files, read_records, task_names
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

NAME = "swudi.evaluators:sequence_classification"
DEFAULT_BATCH_SIZE = 16

#: (line number, text, label as given) of one example
Example = tuple[int, str, Any]


@dataclass(frozen=True)
class ClassificationOptions:
    """The evaluator's options, checked (module docstring)."""

    files: list[str]
    text_column: str = "text"
    label_column: str = "label"
    batch_size: int = DEFAULT_BATCH_SIZE
    max_length: int | None = None
    tokenizer: str | None = None
    device: str = "cpu"
    storage_options: dict[str, Any] | None = None

    @classmethod
    def parse(cls, options: Mapping[str, Any]) -> ClassificationOptions:
        check_known(NAME, options, set(cls.__dataclass_fields__))
        if options.get("files") is None:
            raise ConfigError(f"evaluator {NAME}: option files (the evaluation files) is required")
        for key in ("text_column", "label_column"):
            if not isinstance(options.get(key, "x"), str) or not options.get(key, "x"):
                raise ConfigError(f"evaluator {NAME}: option {key} must be a field name, got {options[key]!r}")
        files = check_files(options["files"])
        task_names(files)
        return cls(
            files=files,
            text_column=options.get("text_column", "text"),
            label_column=options.get("label_column", "label"),
            batch_size=positive_int(NAME, "batch_size", options.get("batch_size", DEFAULT_BATCH_SIZE)) or 1,
            max_length=positive_int(NAME, "max_length", options.get("max_length"), allow_none=True),
            tokenizer=options.get("tokenizer"),
            device=str(options.get("device", "cpu")),
            storage_options=dict(options.get("storage_options") or {}),
        )


def read_examples(url: str, opts: ClassificationOptions) -> list[Example]:
    """The examples of one file; :class:`InputError` naming the file and line of a bad one."""
    examples = []
    for number, record in read_records(url, [opts.text_column, opts.label_column], opts.storage_options):
        text, label = record[opts.text_column], record[opts.label_column]
        if not isinstance(text, str):
            raise InputError(f"{url} line {number}: field {opts.text_column!r} is {type(text).__name__}, expected text")
        if isinstance(label, bool) or not isinstance(label, (int, str)):
            raise InputError(f"{url} line {number}: label {label!r} is neither a class index nor a class name")
        examples.append((number, text, label))
    return examples


def check_classification_options(options: Mapping[str, Any]) -> None:
    """Check the options and read every evaluation file (before any merge work)."""
    opts = ClassificationOptions.parse(options)
    torch_device(opts.device)
    for url in opts.files:
        read_examples(url, opts)


def label_ids(examples: Sequence[Example], config: Any, url: str) -> list[int]:
    """Class indices of the examples' labels: an int as it is, a name through ``config.label2id``."""
    num_labels = int(config.num_labels)
    names = {str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}
    ids = []
    for number, _, label in examples:
        if isinstance(label, str):
            if label not in names:
                raise InputError(
                    f"{url} line {number}: label {label!r} is not a class of the model ({', '.join(names)})"
                )
            ids.append(names[label])
        elif not 0 <= label < num_labels:
            raise InputError(f"{url} line {number}: label {label} is outside the model's {num_labels} classes")
        else:
            ids.append(int(label))
    return ids


def sequence_classification(
    model_path: str,
    *,
    files: Sequence[str],
    text_column: str = "text",
    label_column: str = "label",
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int | None = None,
    tokenizer: str | None = None,
    device: str = "cpu",
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, float]]:
    """``{task: {"accuracy", "examples"}}`` of the classifier at ``model_path`` (module docstring)."""
    opts = ClassificationOptions.parse(
        {
            "files": files,
            "text_column": text_column,
            "label_column": label_column,
            "batch_size": batch_size,
            "max_length": max_length,
            "tokenizer": tokenizer,
            "device": device,
            "storage_options": storage_options,
        }
    )
    torch_dev = torch_device(opts.device)
    examples = {url: read_examples(url, opts) for url in opts.files}
    transformers = transformers_module()
    results: dict[str, dict[str, float]] = {}
    with (
        local_model_folder(model_path, opts.storage_options) as folder,
        local_model_folder(opts.tokenizer or model_path, opts.storage_options, required=None) as tok_folder,
    ):
        tok = load_tokenizer(tok_folder, opts.tokenizer or model_path)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(str(folder), dtype=torch.float32)
        model.to(torch_dev).eval()
        if tok.pad_token is None and opts.batch_size > 1:
            if tok.eos_token is None:
                raise InputError(f"{model_path}: the tokenizer has no padding token; use batch_size: 1")
            tok.pad_token = tok.eos_token
        length = opts.max_length or min(
            int(tok.model_max_length), int(getattr(model.config, "max_position_embeddings", 512) or 512)
        )
        with deterministic():
            for task, url in zip(task_names(opts.files), opts.files, strict=True):
                items = examples[url]
                labels = torch.tensor(label_ids(items, model.config, url))
                predicted = []
                for start in range(0, len(items), opts.batch_size):
                    texts = [text for _, text, _ in items[start : start + opts.batch_size]]
                    batch = tok(texts, padding=True, truncation=True, max_length=length, return_tensors="pt")
                    logits = model(**{k: v.to(torch_dev) for k, v in batch.items()}).logits.float()
                    predicted.append(logits.argmax(-1).cpu())
                correct = int((torch.cat(predicted) == labels).sum())
                results[task] = {"accuracy": correct / len(items), "examples": float(len(items))}
                log.info("%s on %s: accuracy %.4f over %d examples", model_path, task, correct / len(items), len(items))
    return results


sequence_classification.check_options = check_classification_options  # type: ignore[attr-defined]
sequence_classification.check_model = require_model_folder  # type: ignore[attr-defined]

"""What the built-in evaluators share: transformers (imported on first use), a local copy of a model
folder at an fsspec URL, deterministic float32 inference, option checks.

A remote model folder (``s3://...``) is copied file by file into a temporary folder for the
evaluation (the weights, ``*.json`` configs and tokenizer files of the top level; subfolders are not
needed by ``from_pretrained``), removed afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from swudi.errors import ConfigError, InputError
from swudi.storage.filesystem import is_local, resolve

log = logging.getLogger(__name__)

EXTRA = "bench"


def transformers_module() -> Any:
    """``transformers``, or a :class:`ConfigError` saying which extra installs it."""
    try:
        import transformers
    except ImportError:
        raise ConfigError(
            f"the built-in evaluators need transformers: pip install 'swudi[{EXTRA}]' (the {EXTRA} extra)"
        ) from None
    transformers.logging.set_verbosity_error()
    return transformers


@contextlib.contextmanager
def local_model_folder(
    url: str, storage_options: Mapping[str, Any] | None = None, required: str | None = "config.json"
) -> Iterator[Path]:
    """A local folder holding the folder at ``url``: itself when local, else a temporary copy.
    :class:`InputError` when the file ``required`` is not in it."""
    fs, path = resolve(url, storage_options)
    path = path.rstrip("/")
    if required and not fs.exists(f"{path}/{required}"):
        raise InputError(f"{url}: no {required} (expected a Hugging Face model folder)")
    if is_local(fs):
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="swudi-eval-") as tmp:
        for entry in fs.ls(path, detail=True):
            if entry.get("type") != "file":
                continue
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            fs.get_file(entry["name"], str(Path(tmp) / name))
        log.info("copied %s to %s for evaluation", url, tmp)
        yield Path(tmp)


def load_tokenizer(folder: Path, source: str) -> Any:
    """``AutoTokenizer`` from a local folder; :class:`InputError` naming ``source`` when it has none."""
    transformers = transformers_module()
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as error:
        raise InputError(
            f"{source}: no usable tokenizer ({str(error).splitlines()[0]}); "
            "give the evaluator option tokenizer: URL of a folder holding one"
        ) from None


@contextlib.contextmanager
def deterministic() -> Iterator[None]:
    """Deterministic torch algorithms and no autograd for the block; the previous mode restored after."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with torch.inference_mode():
            yield
    finally:
        torch.use_deterministic_algorithms(before)


def torch_device(device: str) -> torch.device:
    """``cpu`` (the default: reproducible across machines), ``cuda`` or ``auto`` (cuda when present)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"evaluator option device must be cpu, cuda or auto, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("evaluator option device: cuda, but no CUDA device is available")
    return torch.device(device)


def check_known(function: str, options: Mapping[str, Any], known: set[str]) -> None:
    """:class:`ConfigError` for an option the evaluator does not take."""
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"evaluator {function}: unknown option {unknown[0]!r}; known: {', '.join(sorted(known))}")


def positive_int(function: str, name: str, value: Any, allow_none: bool = False) -> int | None:
    """The option as a positive int (``None`` passes when ``allow_none``); :class:`ConfigError` otherwise."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"evaluator {function}: option {name} must be a positive integer, got {value!r}")
    return value


def require_model_folder(url: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """:class:`InputError` unless ``url`` is a Hugging Face model folder (holds a ``config.json``):
    the check of a checkpoint a built-in evaluator runs on (``check_model``)."""
    fs, path = resolve(url, storage_options)
    if not fs.exists(f"{path.rstrip('/')}/config.json"):
        raise InputError(
            f"{url}: no config.json; the built-in evaluators run on Hugging Face model folders "
            "(a LoRA adapter or a bare safetensors file cannot be evaluated)"
        )

"""A PEFT LoRA adapter as an expert: which base weights it changes, and how, from headers alone.

An adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (any fsspec URL;
``adapter_model.bin`` is pickle and refused). Its keys follow PEFT's naming,
``base_model.model.<module>.lora_A.weight`` ``[r, d]`` and ``...lora_B.weight`` ``[m, r]``; the
task vector of the base weight ``<module>.weight`` is

    tau = scaling * B @ A,   scaling = alpha / r   (alpha / sqrt(r) with ``use_rslora``)

with r and alpha from ``rank_pattern`` / ``alpha_pattern`` when a pattern matches the module
(a pattern matches the module name or its trailing dotted components, as in PEFT), else ``r`` and
``lora_alpha``. ``fan_in_fan_out`` (weights stored in x out) and embedding factors
(``lora_embedding_A`` ``[r, vocab]``, ``lora_embedding_B`` ``[dim, r]``) give the transpose.
Every other key (``modules_to_save``, trained biases) holds a tensor of the fine-tuned model
itself: its task vector is that tensor minus the base's, as for a full checkpoint. Base weights
the adapter does not name have a zero task vector. A weight with both a full tensor and factors is
refused (one of the two would be ignored).

``<module>.base_layer.weight`` (PEFT's ``save_embedding_layers``, on by default when an embedding is
a target) is PEFT's copy of the frozen base weight under the factors: the adapter's weight is that
copy plus the LoRA update. It must equal the base's tensor (:func:`verify_base_layers`, the one
check that reads tensors before the merge), so the task vector is the LoRA update alone.

DoRA (``use_dora``) and LoRA biases (``lora_bias``) are not of the form B A and are refused.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

from swudi.errors import CheckpointError, CheckpointMismatchError
from swudi.io.checkpoint import PICKLE_SUFFIXES, Checkpoint, TensorLocation, _raise_pickle, read_tensor
from swudi.io.fingerprint import digest
from swudi.storage.filesystem import join_url, list_folder, resolve

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "PEFT_PREFIX",
    "LoraFactors",
    "LoraAdapter",
    "ExpertInput",
    "verify_base_layers",
    "is_adapter",
    "open_expert",
    "expert_input",
    "input_nbytes",
    "input_fingerprint",
]

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_FACTOR_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$")


@dataclass(frozen=True)
class LoraFactors:
    """One base weight's task vector in an adapter: ``scaling * B @ A``, transposed when
    ``transposed`` (``fan_in_fan_out`` layers and embeddings). ``a`` is ``[r, in]``, ``b``
    ``[out, r]`` as stored."""

    a: TensorLocation
    b: TensorLocation
    scaling: float
    transposed: bool = False
    embedding: bool = False  # lora_embedding_A / lora_embedding_B (transposed too)

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @property
    def nbytes(self) -> int:
        return self.a.nbytes + self.b.nbytes

    @property
    def fingerprint(self) -> str:
        return digest("lora", self.a.fingerprint, self.b.fingerprint, self.scaling, self.transposed)

    @property
    def weight_shape(self) -> tuple[int, int]:
        """The shape of the base weight the factors change."""
        out, inp = int(self.b.shape[0]), int(self.a.shape[1])
        return (inp, out) if self.transposed else (out, inp)


#: What an expert holds for one base tensor: the fine-tuned tensor itself, LoRA factors, or
#: nothing (None: the expert leaves the tensor at the base value, a zero task vector).
ExpertInput = TensorLocation | LoraFactors | None


def input_nbytes(item: ExpertInput) -> int:
    """Bytes read to get an expert's input (0 for an unchanged tensor)."""
    return 0 if item is None else item.nbytes


def input_fingerprint(item: ExpertInput) -> str:
    """Content fingerprint of an expert's input ("unchanged" when the expert leaves it at the base)."""
    return "unchanged" if item is None else item.fingerprint


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """The value of the first pattern that matches ``module`` (whole name or trailing components)."""
    for pattern, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({pattern})$", module):
                return value
        except re.error:
            if module == pattern or module.endswith("." + pattern):
                return value
    return default


class LoraAdapter:
    """A PEFT LoRA adapter opened from its config and its weights' header (no tensor read).

    ``inputs``: base tensor name -> :class:`LoraFactors` or :class:`TensorLocation` (a tensor of
    the fine-tuned model); ``problems``: what is wrong inside the adapter (missing factor,
    rank that contradicts the config), reported with the base mismatches by
    :func:`swudi.io.validate.validate_checkpoints`.
    """

    def __init__(self, url: str, config: dict[str, Any], weights: Checkpoint, config_bytes: int):
        self.url = url
        self.config = config
        self.weights = weights
        self.fingerprint = digest("lora-adapter", weights.fingerprint, config)
        self.header_bytes = weights.header_bytes + config_bytes
        self.inputs: dict[str, LoraFactors | TensorLocation] = {}
        #: base weight name -> PEFT's saved copy of it (``<module>.base_layer.weight``)
        self.base_layers: dict[str, TensorLocation] = {}
        self.problems: list[str] = []
        self._read_keys()

    # ------------------------------------------------------------------------------- opening
    @classmethod
    def open(cls, url: str, storage_options: Mapping[str, Any] | None = None) -> LoraAdapter:
        """Open the adapter folder at ``url``; refuse pickle weights and configs swudi cannot merge."""
        url = url.rstrip("/")
        fs, path = resolve(url, storage_options)
        config_url = join_url(url, ADAPTER_CONFIG)
        try:
            raw = fs.cat_file(resolve(config_url, storage_options)[1])
        except FileNotFoundError:
            raise CheckpointError(f"{config_url}: file not found (not a PEFT adapter folder)") from None
        try:
            config = json.loads(raw)
        except RecursionError:
            raise CheckpointError(f"{config_url}: JSON nested too deeply") from None
        except ValueError as error:
            raise CheckpointError(f"{config_url}: not valid JSON ({error})") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{config_url}: must be a JSON object")
        _check_config(config, config_url)
        weights_url = join_url(url, ADAPTER_WEIGHTS)
        if not fs.exists(resolve(weights_url, storage_options)[1]):
            try:
                names = [e.rstrip("/").rsplit("/", 1)[-1] for e in list_folder(fs, path, detail=False)]
            except FileNotFoundError:
                names = []
            pickles = [n for n in names if n.lower().endswith(PICKLE_SUFFIXES)]
            if pickles:
                _raise_pickle(url, pickles)
            raise CheckpointError(f"{weights_url}: file not found (a PEFT adapter needs {ADAPTER_WEIGHTS})")
        return cls(url, config, Checkpoint.open(weights_url, storage_options), len(raw))

    def _read_keys(self) -> None:
        factors: dict[str, dict[str, TensorLocation]] = {}
        full: dict[str, str] = {}  # weight name -> its adapter key
        for key, loc in self.weights.tensors.items():
            if not key.startswith(PEFT_PREFIX):
                self.problems.append(
                    f"{self.weights.url}: key {key!r} does not start with {PEFT_PREFIX!r} (PEFT naming)"
                )
                continue
            name = key[len(PEFT_PREFIX) :]
            match = _FACTOR_KEY.match(name)
            if match:
                factors.setdefault(match["module"], {})[match["kind"]] = loc
            elif ".lora_" in name:
                self.problems.append(f"{self.weights.url}: key {key!r} is a LoRA tensor swudi cannot merge")
            elif name.endswith(".base_layer.weight"):
                self.base_layers[name[: -len(".base_layer.weight")] + ".weight"] = loc
            else:
                self.inputs[name] = loc  # modules_to_save, trained biases: tensors of the fine-tuned model
                full[name] = key
        for module, parts in sorted(factors.items()):
            embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
            a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
            if a_key not in parts or b_key not in parts:
                missing = b_key if a_key in parts else a_key
                self.problems.append(f"{self.weights.url}: {PEFT_PREFIX}{module}.{missing} is missing")
                continue
            a, b = parts[a_key], parts[b_key]
            if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
                self.problems.append(
                    f"{self.weights.url}: {PEFT_PREFIX}{module}: {a_key} {list(a.shape)} and {b_key} "
                    f"{list(b.shape)} are not factors [r, in] and [out, r] of one rank r"
                )
                continue
            rank = int(a.shape[0])
            r = _pattern_value(self.config.get("rank_pattern") or {}, module, self.config["r"])
            alpha = _pattern_value(self.config.get("alpha_pattern") or {}, module, self.config["lora_alpha"])
            if int(r) != rank:
                self.problems.append(
                    f"{self.weights.url}: {PEFT_PREFIX}{module}.{a_key} has rank {rank}, "
                    f"but {ADAPTER_CONFIG} gives r = {r} for this module"
                )
                continue
            scaling = float(alpha) / (math.sqrt(rank) if self.config.get("use_rslora") else rank)
            transposed = embedding or bool(self.config.get("fan_in_fan_out"))
            weight = f"{module}.weight"
            if weight in full:
                self.problems.append(
                    f"{self.weights.url}: weight {weight!r} has both a full tensor ({full[weight]!r}) and LoRA "
                    f"factors ({PEFT_PREFIX}{module}.{a_key}); one of them would be ignored: keep one"
                )
                continue
            self.inputs[weight] = LoraFactors(a, b, scaling, transposed, embedding)
        for weight in sorted(set(self.base_layers) - {f"{module}.weight" for module in factors}):
            module = weight[: -len(".weight")]
            self.problems.append(
                f"{self.weights.url}: {PEFT_PREFIX}{module}.base_layer.weight has no LoRA factors beside it"
            )

    # ----------------------------------------------------------------------------- checking
    def mismatches(self, base: Checkpoint) -> list[str]:
        """Every problem of the adapter itself and every tensor it names that the base lacks or
        holds in another shape (one line each, naming the adapter key and the base tensor)."""
        problems = list(self.problems)
        for name, item in self.inputs.items():
            loc = base.tensors.get(name)
            shape = item.weight_shape if isinstance(item, LoraFactors) else tuple(item.shape)
            what = "LoRA factors of" if isinstance(item, LoraFactors) else "tensor"
            if loc is None:
                problems.append(f"{self.url}: {what} {name!r} not in the base {base.url}")
            elif tuple(loc.shape) != tuple(shape):
                problems.append(
                    f"{self.url}: {what} {name!r} give shape {list(shape)}, the base {base.url} has {list(loc.shape)}"
                )
        for name, copy in self.base_layers.items():
            loc = base.tensors.get(name)
            if loc is not None and tuple(loc.shape) != tuple(copy.shape):
                problems.append(
                    f"{self.url}: {copy.name!r} (PEFT's copy of the base weight) has shape {list(copy.shape)}, the "
                    f"base {base.url} has {list(loc.shape)} (a resized vocabulary in a LoRA adapter is not supported)"
                )
        return problems

    def __repr__(self) -> str:
        lora = sum(isinstance(v, LoraFactors) for v in self.inputs.values())
        return f"LoraAdapter({self.url!r}, {lora} LoRA weights, {len(self.inputs) - lora} full tensors)"


PositiveRank = Annotated[StrictInt, Field(gt=0)]
PositiveAlpha = Annotated[float, Field(gt=0, allow_inf_nan=False, strict=True)]


class AdapterConfigModel(BaseModel):
    """The keys of ``adapter_config.json`` that define the update ``(alpha / r) * B @ A``, strictly:
    ``r`` and every ``rank_pattern`` value a whole number >= 1; ``lora_alpha`` and every
    ``alpha_pattern`` value a finite number > 0 (never a boolean, null, NaN or Infinity). Other
    keys of PEFT's config are kept as they are."""

    model_config = ConfigDict(extra="allow")

    r: PositiveRank
    lora_alpha: PositiveAlpha
    rank_pattern: dict[str, PositiveRank] | None = None
    alpha_pattern: dict[str, PositiveAlpha] | None = None

    @field_validator("lora_alpha", mode="before")
    @classmethod
    def _number(cls, value: Any) -> Any:
        return _no_bool(value)

    @field_validator("alpha_pattern", mode="before")
    @classmethod
    def _numbers(cls, value: Any) -> Any:
        if isinstance(value, dict):
            for item in value.values():
                _no_bool(item)
        return value


def _no_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    return float(value) if isinstance(value, int) else value


def verify_base_layers(
    base: Checkpoint, experts: Sequence[Checkpoint | LoraAdapter], max_bytes: int = 64 * 2**20
) -> None:
    """Check that every adapter's ``base_layer.weight`` equals the base's tensor (read in row chunks
    of about ``max_bytes``, values compared exactly after upcasting to float32).

    Raises :class:`CheckpointMismatchError` naming the adapter key: the adapter was trained on
    another base, and its weight is that copy plus the LoRA update, not the base plus the update.
    """
    for expert in experts:
        if not isinstance(expert, LoraAdapter):
            continue
        for name, copy in sorted(expert.base_layers.items()):
            loc = base.tensors[name]
            step = max(1, max_bytes // max(1, loc.nbytes // max(1, loc.shape[0])))
            for start in range(0, loc.shape[0], step):
                stop = min(loc.shape[0], start + step)
                mine = read_tensor(copy.rows(start, stop), expert.weights.storage_options)
                theirs = read_tensor(loc.rows(start, stop), base.storage_options)
                if not torch.equal(mine.to(torch.float32), theirs.to(torch.float32)):
                    raise CheckpointMismatchError(
                        f"{expert.url}: {PEFT_PREFIX}{copy.name} (PEFT's copy of the base weight under the "
                        f"LoRA factors) differs from {name!r} of the base {base.url} from row {start}: the adapter "
                        "was trained on another base"
                    )
            log.info("%s: %s equals the base's %s", expert.url, copy.name, name)


def _check_config(config: dict[str, Any], source: str) -> None:
    """Refuse adapter configs whose update is not ``scaling * B @ A`` (or that lack r / alpha):
    :class:`AdapterConfigModel`, one line naming the key."""
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{source}: peft_type {config.get('peft_type')!r} is not supported (only LORA)")
    if config.get("use_dora"):
        raise CheckpointError(f"{source}: use_dora is true; DoRA updates are not B A products and cannot be merged")
    if config.get("lora_bias"):
        raise CheckpointError(f"{source}: lora_bias is true; LoRA bias terms are not supported")
    try:
        AdapterConfigModel.model_validate(config)
    except ValidationError as error:
        item = error.errors()[0]
        key = ".".join(str(part) for part in item["loc"])
        value = item.get("input")
        raise CheckpointError(
            f"{source}: {key!r} must be a "
            f"{'whole number >= 1' if key.split('.')[0] in ('r', 'rank_pattern') else 'finite number > 0'}, "
            f"got {value!r} ({item['msg']})"
        ) from None


def is_adapter(url: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """True when ``url`` is a folder holding ``adapter_config.json``."""
    fs, path = resolve(join_url(url.rstrip("/"), ADAPTER_CONFIG), storage_options)
    return bool(fs.exists(path))


def open_expert(url: str, storage_options: Mapping[str, Any] | None = None) -> Checkpoint | LoraAdapter:
    """An expert: a PEFT adapter folder (``adapter_config.json`` present) or a full checkpoint."""
    if is_adapter(url, storage_options):
        return LoraAdapter.open(url, storage_options)
    return Checkpoint.open(url, storage_options)


def expert_input(expert: Checkpoint | LoraAdapter, name: str) -> ExpertInput:
    """What ``expert`` holds for base tensor ``name`` (validated experts only)."""
    if isinstance(expert, LoraAdapter):
        return expert.inputs.get(name)
    return expert.tensors[name]

"""Check, from headers alone, that a base checkpoint and its experts fit together."""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence

from swudi.errors import CheckpointMismatchError, InputError
from swudi.io.adapter import LoraAdapter
from swudi.io.checkpoint import Checkpoint

__all__ = ["validate_checkpoints"]

log = logging.getLogger(__name__)

#: Per checkpoint, how many dtype differences a warning spells out before summarising.
_DTYPE_EXAMPLES = 3


def validate_checkpoints(
    base: Checkpoint, experts: Sequence[Checkpoint | LoraAdapter], vocab: Collection[str] = ()
) -> list[str]:
    """Same tensor names and shapes in the base and every expert, before any tensor is read.

    The tensors named in ``vocab`` (:func:`swudi.io.vocab.vocab_tensor_names`) may have more rows in
    a full-checkpoint expert than in the base (appended tokens, :mod:`swudi.io.vocab`); their other
    dimensions must match.

    A LoRA adapter expert names only the tensors it changes: each must be in the base with the
    shape its factors (or its full tensor) give (:meth:`LoraAdapter.mismatches`).

    Raises `CheckpointMismatchError` listing every missing tensor, extra tensor and shape mismatch
    (each naming the checkpoint URL and the tensor); the list is also in the error's `problems`.
    Returns warnings (also logged): dtypes that differ from the base (compute is upcast to float32
    and the output keeps the base dtype), and experts identical to the base or to each other.
    """
    if not experts:
        raise InputError("no expert checkpoints to merge: give at least one")
    problems: list[str] = []
    warnings: list[str] = []
    seen = {base.fingerprint: f"the base {base.url}"}
    for expert in experts:
        if isinstance(expert, LoraAdapter):
            problems += expert.mismatches(base)
            if expert.fingerprint in seen:
                warnings.append(
                    f"{expert.url}: same fingerprint as {seen[expert.fingerprint]} (same files listed twice?)"
                )
            seen.setdefault(expert.fingerprint, expert.url)
            continue
        missing = [n for n in base.tensors if n not in expert.tensors]
        extra = [n for n in expert.tensors if n not in base.tensors]
        problems += [f"{expert.url}: tensor {n!r} is missing (present in the base {base.url})" for n in missing]
        problems += [f"{expert.url}: tensor {n!r} is not in the base {base.url}" for n in extra]
        dtype_diffs = []
        for name, loc in base.tensors.items():
            other = expert.tensors.get(name)
            if other is None:
                continue
            extended = name in vocab and other.shape[1:] == loc.shape[1:] and other.shape[:1] > loc.shape[:1]
            if other.shape != loc.shape and not extended:
                problems.append(
                    f"{expert.url}: tensor {name!r} has shape {list(other.shape)}, "
                    f"the base {base.url} has {list(loc.shape)}"
                )
            if other.dtype != loc.dtype:
                dtype_diffs.append(f"{name} {other.dtype} (base {loc.dtype})")
        if dtype_diffs:
            shown = ", ".join(dtype_diffs[:_DTYPE_EXAMPLES])
            more = f" and {len(dtype_diffs) - _DTYPE_EXAMPLES} more" if len(dtype_diffs) > _DTYPE_EXAMPLES else ""
            warnings.append(
                f"{expert.url}: {len(dtype_diffs)} tensor(s) differ in dtype from the base: "
                f"{shown}{more}; compute is upcast to float32, the output keeps the base dtype"
            )
        if expert.fingerprint in seen:
            warnings.append(f"{expert.url}: same fingerprint as {seen[expert.fingerprint]} (same files listed twice?)")
        seen.setdefault(expert.fingerprint, expert.url)
    named = {e.config.get("base_model_name_or_path") for e in experts if isinstance(e, LoraAdapter)} - {None}
    if len(named) > 1:
        warnings.append(
            f"the LoRA adapters name different base models ({', '.join(sorted(map(str, named)))}); "
            f"shapes fit the base {base.url}, check that they were trained on it"
        )
    if problems:
        error = CheckpointMismatchError(
            f"{len(problems)} mismatch(es) between the base and the experts:\n  " + "\n  ".join(problems)
        )
        error.problems = problems
        raise error
    for warning in warnings:
        log.warning(warning)
    return warnings

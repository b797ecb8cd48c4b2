"""Whole-model merge of in-memory state dicts (small models; the pipeline works per tensor).

W = W0 + scale * theta, computed in float32 and cast to the base tensor's dtype, with theta from
the route of each tensor (:mod:`swudi.core.routing`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from swudi.core import baselines
from swudi.core.routing import is_fused_experts, route_tensor
from swudi.core.task_vectors import merged_weight, stack_task_vectors
from swudi.errors import ConfigError, InputError
from swudi.methods import get_method
from swudi.methods.declarations import _merge_elementwise_f32, _merge_matrix_f32

__all__ = ["merge_state_dicts"]

logger = logging.getLogger(__name__)


def _check_experts(base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]]) -> None:
    if len(experts) == 0:
        raise InputError("no experts given (N = 0); merging needs at least one expert state dict")
    base_keys = set(base)
    for i, expert in enumerate(experts):
        missing = sorted(base_keys - set(expert))
        extra = sorted(set(expert) - base_keys)
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing keys {missing[:10]}{' ...' if len(missing) > 10 else ''}")
            if extra:
                parts.append(f"unexpected keys {extra[:10]}{' ...' if len(extra) > 10 else ''}")
            raise InputError(f"expert {i} does not match the base state dict: {'; '.join(parts)}")
        for key, w0 in base.items():
            if tuple(expert[key].shape) != tuple(w0.shape):
                raise InputError(
                    f"tensor {key!r}: expert {i} has shape {tuple(expert[key].shape)}, base has {tuple(w0.shape)}"
                )


def merge_state_dicts(
    base: Mapping[str, torch.Tensor],
    experts: Sequence[Mapping[str, torch.Tensor]],
    method: str,
    scale: float = 1.0,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    keep_base: Iterable[str] = (),
    device: str | torch.device = "auto",
    method_params: Mapping[str, Any] | None = None,
    **params: Any,
) -> dict[str, torch.Tensor]:
    """Merge expert state dicts into the base: ``W = W0 + scale * theta`` per tensor.

    Every expert must have the base's keys and shapes (:class:`InputError` names the key and the
    expert index). Parameters are validated before any work (:class:`ConfigError`). Routing
    (``include``/``exclude``/``keep_base`` globs) as in :func:`swudi.core.routing.route_tensor`:
    "method" tensors get ``method``, "mean" tensors the mean of task vectors, "base" tensors are
    copied from the base. Returns a new dict in the base's key order.

    Method parameters come as keyword arguments or in ``method_params``; the latter is needed for
    the ``scale`` of ``task_arithmetic`` / ``ties``, since ``scale`` here is the global alpha.
    """
    spec = get_method(method)
    both = sorted(set(params) & set(method_params or {}))
    if both:
        raise ConfigError(f"method parameter(s) {both} given both as keywords and in method_params")
    p = spec.validate({**(method_params or {}), **params})
    _check_experts(base, experts)
    include, exclude, keep_base = tuple(include), tuple(exclude), tuple(keep_base)
    merged: dict[str, torch.Tensor] = {}
    for key, w0 in base.items():
        route = route_tensor(key, w0.shape, w0.dtype, spec.name, include, exclude, keep_base)
        logger.debug("tensor %r %s -> %s", key, tuple(w0.shape), route)
        if route == "base":
            merged[key] = w0.clone()
            continue
        tv = stack_task_vectors(w0, [expert[key] for expert in experts], key)
        if route == "mean":
            theta = baselines.mean(tv)
        elif is_fused_experts(key, w0.shape):  # [N, E, m, d]: each expert's weight merged on its own
            theta = torch.stack([_merge_one(tv[:, e], spec, p, f"{key}[{e}]", device) for e in range(w0.shape[0])])
        else:
            theta = _merge_one(tv, spec, p, key, device)
        merged[key] = merged_weight(w0, theta, scale, w0.dtype, name=key)
    return merged


def _merge_one(tv: torch.Tensor, spec: Any, p: Any, name: str, device: str | torch.device) -> torch.Tensor:
    """theta of one tensor under the method (elementwise, or a matrix method on a 2-D weight)."""
    if spec.kind == "elementwise":
        return _merge_elementwise_f32(tv, spec, p)
    return _merge_matrix_f32(tv, spec, p, name=name, device=device)

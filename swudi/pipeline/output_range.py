"""Every output dtype's range is checked before a merged weight is cast to it.

``merged_weight`` (:mod:`swudi.core.task_vectors`) refuses a merged value that its cast turns into
inf (float16 beyond 65504, bfloat16 beyond 3.39e38). A float8 cast does not: torch saturates
``float8_e4m3fn`` at 448 and turns values beyond ``float8_e4m3fnuz`` / ``float8_e5m2fnuz`` into NaN,
and an integer cast wraps around. For those dtypes :func:`merged_in_range` checks
``W = W0 + scale * theta`` against the dtype's finite range first, with the same refusal: an
:class:`~swudi.errors.InputError` naming the tensor, the peak value, the dtype's largest value and
the fix (``output_dtype`` or ``scale``). Nothing is ever clamped silently.
"""

from __future__ import annotations

import torch

from swudi.core.task_vectors import merged_weight
from swudi.errors import InputError

__all__ = ["merged_in_range", "check_range", "needs_range_check"]

#: Dtypes whose cast does not produce inf beyond their range (float8 variants, integers).
_WIDE = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def needs_range_check(dtype: torch.dtype) -> bool:
    """True for float8 variants and integer types: their cast saturates, wraps or gives NaN."""
    return dtype not in _WIDE and dtype != torch.bool


def dtype_limits(dtype: torch.dtype) -> tuple[float, float]:
    """(lowest, largest) finite value of ``dtype``."""
    info = torch.finfo(dtype) if dtype.is_floating_point else torch.iinfo(dtype)
    return float(info.min), float(info.max)


def check_range(values: torch.Tensor, dtype: torch.dtype, name: str, scale: float = 1.0) -> None:
    """Refuse ``values`` (float32) beyond the finite range of ``dtype`` (:class:`InputError`)."""
    if values.numel() == 0:
        return
    low, high = dtype_limits(dtype)
    lo, hi = float(values.min()), float(values.max())
    if lo < low or hi > high:
        peak = hi if hi > high else lo
        raise InputError(
            f"tensor {name!r}: merged values up to {peak:.4g} exceed the range of {dtype} "
            f"(largest finite value {high:.4g}) and would be clamped or corrupted; "
            f"use output_dtype: float32 or bfloat16, or a smaller scale than {scale:g}"
        )


def merged_in_range(
    base: torch.Tensor, theta: torch.Tensor, scale: float, dtype: torch.dtype, *, name: str = ""
) -> torch.Tensor:
    """:func:`~swudi.core.task_vectors.merged_weight`, with the range of a float8 or integer
    ``dtype`` checked on ``W0 + scale * theta`` (float32) first."""
    if needs_range_check(dtype):
        values = base.to(torch.float32) + float(scale) * theta.to(device=base.device, dtype=torch.float32)
        check_range(values, dtype, name, scale)
        del values
        if not dtype.is_floating_point:
            raise InputError(f"tensor {name!r}: an integer tensor ({dtype}) cannot hold a merged weight")
    return merged_weight(base, theta, scale, dtype, name=name)

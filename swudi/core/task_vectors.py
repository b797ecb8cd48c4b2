"""Task vectors: tau_i = W_i - W0 (or tau_i = B_i A_i for a LoRA expert), stacked along a new
leading axis and validated."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from swudi.errors import InputError

__all__ = [
    "ZERO_NORM_SQ",
    "LowRank",
    "ExpertValue",
    "stack_task_vectors",
    "check_task_vectors",
    "squared_norms",
    "is_all_zero",
    "merged_weight",
    "check_base_finite",
    "MeanAccumulator",
]

#: A layer whose task vectors all have squared Frobenius norm below this is "all zero" and every
#: method falls back to the mean (threshold of the reference implementation). The same value
#: floors ||tau_i||^2 in the WUDI weights w_i = 1 / max(||tau_i||^2, ZERO_NORM_SQ).
ZERO_NORM_SQ = 1e-12


def _label(name: str) -> str:
    return f"weight {name!r}" if name else "weight"


@dataclass(frozen=True)
class LowRank:
    """A task vector in factored form, tau = b @ a: ``b`` ``[m, r]`` (any scaling folded in),
    ``a`` ``[r, d]``, float32; r = 0 is a zero task vector."""

    b: torch.Tensor
    a: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.b.shape[0]), int(self.a.shape[1]))

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def dense(self) -> torch.Tensor:
        """tau = b @ a ``[m, d]`` float32."""
        return (self.b.to(torch.float32) @ self.a.to(torch.float32)).contiguous()


#: One expert's value of a tensor: the fine-tuned tensor itself (tau = E - W0), a LoRA update in
#: factored form (tau = B A), or None (the expert leaves the tensor at the base value: tau = 0).
ExpertValue = torch.Tensor | LowRank | None


def _where(sources: Sequence[str] | None, index: int) -> str:
    """`` in FILE`` for checkpoint ``index`` (0: the base, i + 1: expert i) when sources are known."""
    return f" in {sources[index]}" if sources and index < len(sources) else ""


def check_base_finite(base: torch.Tensor, name: str = "", sources: Sequence[str] | None = None) -> None:
    """:class:`InputError` blaming the base when the base tensor holds NaN or inf (every task vector
    would be non-finite, and the experts are not at fault)."""
    if base.is_floating_point() and not _all_finite(base):
        raise InputError(
            f"{_label(name)}: the base checkpoint holds non-finite values (NaN or inf){_where(sources, 0)}; "
            "every task vector would be non-finite: repair or replace the base checkpoint"
        )


def _blame_experts(tv: torch.Tensor, name: str, sources: Sequence[str] | None) -> None:
    """:class:`InputError` naming the experts (and their files) whose task vectors are not finite."""
    if _all_finite(tv):
        return
    bad = (~torch.isfinite(tv)).reshape(tv.shape[0], -1).any(dim=1).nonzero().flatten().tolist()
    files = "; ".join(f"expert {i}{_where(sources, i + 1)}" for i in bad)
    raise InputError(
        f"{_label(name)}: non-finite values (NaN or inf) in the weights of {files}; check those checkpoints"
    )


def stack_task_vectors(
    base: torch.Tensor, experts: Sequence[ExpertValue], name: str = "", *, sources: Sequence[str] | None = None
) -> torch.Tensor:
    """Return ``stack([E_i - base])`` as float32 ``[N, *base.shape]`` (on the base's device).

    An expert given as :class:`LowRank` contributes ``b @ a``, one given as None a zero task vector.

    Raises :class:`InputError` naming the weight and the expert index for no experts,
    a shape mismatch, a non-floating dtype or non-finite values; ``sources`` (the files of the base
    and of each expert, in that order) are named too. NaN or inf in the base blames the base.
    """
    if len(experts) == 0:
        raise InputError(f"{_label(name)}: no experts given (N = 0); merging needs at least one expert")
    if not base.is_floating_point():
        raise InputError(f"{_label(name)}: base tensor has non-floating dtype {base.dtype}; cannot form task vectors")
    check_base_finite(base, name, sources)
    for i, expert in enumerate(experts):
        if expert is None:
            continue
        if tuple(expert.shape) != tuple(base.shape):
            raise InputError(
                f"{_label(name)}: expert {i} has shape {tuple(expert.shape)}, base has {tuple(base.shape)}"
            )
        if isinstance(expert, torch.Tensor) and not expert.is_floating_point():
            raise InputError(f"{_label(name)}: expert {i} has non-floating dtype {expert.dtype}")
    base32 = base.to(torch.float32)
    out = torch.empty((len(experts), *base.shape), dtype=torch.float32, device=base.device)
    for i, expert in enumerate(experts):
        if expert is None:
            out[i].zero_()
        elif isinstance(expert, LowRank):
            torch.mm(
                expert.b.to(device=base.device, dtype=torch.float32),
                expert.a.to(base.device, torch.float32),
                out=out[i],
            )
        else:
            torch.sub(expert.to(device=base.device, dtype=torch.float32), base32, out=out[i])
    _blame_experts(out, name, sources)
    return check_task_vectors(out, name)


def check_task_vectors(
    task_vectors: torch.Tensor | Sequence[torch.Tensor], name: str = "", *, ndim: int | None = None
) -> torch.Tensor:
    """Validate stacked task vectors ``[N, ...]`` and return them as one tensor.

    A sequence of equally shaped tensors is stacked. ``ndim`` (e.g. 3 for ``[N, out, in]``) is
    enforced when given. Raises :class:`InputError` naming the weight (``name``) for N = 0,
    mismatched shapes, a non-floating dtype or non-finite values (with the expert index).
    """
    if not isinstance(task_vectors, torch.Tensor):
        items = list(task_vectors)
        if not items:
            raise InputError(f"{_label(name)}: no task vectors given (N = 0)")
        for i, tv in enumerate(items):
            if not isinstance(tv, torch.Tensor):
                raise InputError(f"{_label(name)}: task vector {i} is a {type(tv).__name__}, not a tensor")
            if tv.shape != items[0].shape:
                raise InputError(
                    f"{_label(name)}: task vector {i} has shape {tuple(tv.shape)}, "
                    f"task vector 0 has {tuple(items[0].shape)}"
                )
            if tv.dtype != items[0].dtype:
                raise InputError(
                    f"{_label(name)}: task vector {i} has dtype {tv.dtype}, task vector 0 has {items[0].dtype}"
                )
        task_vectors = torch.stack(items)
    tv = task_vectors
    if tv.ndim == 0 or tv.shape[0] == 0:
        raise InputError(f"{_label(name)}: no task vectors given (N = 0); expected a tensor [N, ...] with N >= 1")
    if ndim is not None and tv.ndim != ndim:
        raise InputError(
            f"{_label(name)}: expected stacked task vectors with {ndim} dimensions "
            f"([N, out, in] for a matrix method), got shape {tuple(tv.shape)}"
        )
    if not tv.is_floating_point():
        raise InputError(f"{_label(name)}: task vectors have non-floating dtype {tv.dtype}")
    if not _all_finite(tv):
        bad = (~torch.isfinite(tv)).reshape(tv.shape[0], -1).any(dim=1).nonzero().flatten().tolist()
        raise InputError(
            f"{_label(name)}: non-finite values (NaN or inf) in the task vector(s) of expert(s) {bad}; "
            "check those checkpoints"
        )
    return tv


def _all_finite(tv: torch.Tensor) -> bool:
    """True when no entry is NaN or inf.

    Fast path: one reduction (NaN and inf propagate into the sum); only when the sum is not finite
    (a bad value, or a float overflow of the sum) is the exact elementwise check run.
    """
    acc = torch.float64 if tv.dtype == torch.float64 else torch.float32
    if bool(torch.isfinite(tv.sum(dtype=acc))):
        return True
    return bool(torch.isfinite(tv).all())


#: Elements per float64 chunk when summing squares (8 MiB of float64 at a time).
_NORM_CHUNK = 1 << 20


def squared_norms(task_vectors: torch.Tensor) -> torch.Tensor:
    """``||tau_i||_F^2`` for each task as float64 (on the input's device), accumulated in float64.

    A float32 sum over millions of entries loses digits (relative error ~1e-3 at 4096 x 4096, and
    every eigenvalue of C = sum_i tau_i^T tau_i / ||tau_i||^2 inherits it), so the squares are summed
    in float64, a chunk at a time: no float64 copy of the whole task vector is made.
    """
    flat = task_vectors.reshape(task_vectors.shape[0], -1)
    out = torch.zeros(flat.shape[0], dtype=torch.float64, device=flat.device)
    for start in range(0, flat.shape[1], _NORM_CHUNK):
        out += flat[:, start : start + _NORM_CHUNK].double().square().sum(dim=1)
    return out


def is_all_zero(sq_norms: torch.Tensor) -> bool:
    """True when every task vector is (near) zero: max_i ||tau_i||^2 < ZERO_NORM_SQ."""
    return bool(sq_norms.max() < ZERO_NORM_SQ)


def merged_weight(
    base: torch.Tensor, theta: torch.Tensor, scale: float, dtype: torch.dtype, *, name: str = ""
) -> torch.Tensor:
    """The merged weight ``W = W0 + scale * theta``, computed in float32 and cast to ``dtype``.

    Raises :class:`InputError` naming the weight when a merged value is beyond the range of
    ``dtype`` (float16: 65504): the cast would store inf, a model that cannot run. Nothing is
    clamped silently; the message says what to change (output dtype or scale).
    """
    merged = base.to(torch.float32) + float(scale) * theta.to(device=base.device, dtype=torch.float32)
    out = merged.to(dtype).contiguous()
    if out.is_floating_point() and not _all_finite(out):
        if not _all_finite(merged):
            raise InputError(
                f"{_label(name)}: W0 + {scale:g} * theta is not finite in float32; lower the scale "
                "(or check the method's parameters)"
            )
        peak = float(merged.abs().max())
        raise InputError(
            f"{_label(name)}: merged values up to {peak:.4g} exceed the range of {dtype} "
            f"(largest finite value {torch.finfo(dtype).max:.4g}) and would be written as inf; "
            "use output_dtype: float32 or bfloat16, or a smaller scale"
        )
    return out


class MeanAccumulator:
    """theta = (1/N) sum_i (E_i - W0), one expert at a time (memory of two tensors, whatever N).

    ``add(i, expert)`` validates expert ``i`` as :func:`stack_task_vectors` does (shape, floating
    dtype, finite task vector) and adds its task vector; ``mean()`` divides by the number added.
    A base holding NaN or inf is refused when the accumulator is made (the base is blamed).
    """

    def __init__(self, base: torch.Tensor, name: str = "", *, sources: Sequence[str] | None = None):
        if not base.is_floating_point():
            raise InputError(
                f"{_label(name)}: base tensor has non-floating dtype {base.dtype}; cannot form task vectors"
            )
        check_base_finite(base, name, sources)
        self.name = name
        self.sources = sources
        self.base = base.to(torch.float32)
        self.total = torch.zeros_like(self.base)
        self.count = 0

    def add(self, index: int, expert: ExpertValue) -> None:
        """Add expert ``index``'s task vector (a :class:`LowRank` adds b @ a, None adds zero)."""
        if expert is None:
            self.count += 1
            return
        if tuple(expert.shape) != tuple(self.base.shape):
            raise InputError(
                f"{_label(self.name)}: expert {index} has shape {tuple(expert.shape)}, "
                f"base has {tuple(self.base.shape)}"
            )
        if isinstance(expert, LowRank):
            tau = expert.dense()
        elif not expert.is_floating_point():
            raise InputError(f"{_label(self.name)}: expert {index} has non-floating dtype {expert.dtype}")
        else:
            tau = expert.to(torch.float32) - self.base
        if not _all_finite(tau):
            raise InputError(
                f"{_label(self.name)}: non-finite values (NaN or inf) in the weights of "
                f"expert {index}{_where(self.sources, index + 1)}; check that checkpoint"
            )
        self.total += tau
        self.count += 1

    def mean(self) -> torch.Tensor:
        if self.count == 0:
            raise InputError(f"{_label(self.name)}: no experts given (N = 0); merging needs at least one expert")
        return self.total / self.count

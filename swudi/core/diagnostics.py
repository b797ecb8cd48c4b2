"""Data-free diagnostics of a merged weight: the WUDI interference per task.

For task vectors tau_i and merged theta, task i's interference is its term of the WUDI loss,

    L_i(theta) = w_i || (theta - tau_i) tau_i^T ||_F^2,   w_i = 1 / ||tau_i||_F^2,

how much theta disturbs the outputs of the inputs task i feeds the layer. It is reported relative to
task arithmetic's theta = sum_i tau_i, so 1.0 means "as much interference as summing", and lower is
better. From task vectors in memory (:func:`interference_vs_sum`, per task and total) it is
computed in float32 with the cheaper of two orders: (A tau^T) costs m^2 d, tr(A G A^T) with
G = tau^T tau costs 2 m d^2. From a stored decomposition (:func:`interference_from_decomposition`,
total only) it costs O(m r) and reads no task vector. From LoRA factors and a factored
decomposition (:func:`interference_from_factors`) it costs O(N m r^2): with tau_i = N_i Q^T and
theta = T Q^T (N_i = tau_i Q, T = theta Q), ||(theta - tau_i) tau_i^T||^2 = <E^T E, N_i^T N_i>,
E = T - N_i.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from swudi.core.decomposition import Decomposition
from swudi.core.device import resolve_device
from swudi.core.lowrank import task_projections
from swudi.core.spectral import filtered_projection
from swudi.core.task_vectors import LowRank


def task_interference(
    theta: torch.Tensor, task_vectors: torch.Tensor, device: str | torch.device = "auto"
) -> torch.Tensor:
    """``[N]`` float64: L_i(theta) for every task (0 for an all-zero task vector)."""
    return _task_losses([theta], task_vectors, device)[0]


def _task_losses(
    thetas: list[torch.Tensor], task_vectors: torch.Tensor, device: str | torch.device = "auto"
) -> list[torch.Tensor]:
    """L_i(theta) for several thetas, each task's Gram G_i = tau_i^T tau_i formed once for all."""
    dev = resolve_device(device)
    tv = task_vectors.to(device=dev, dtype=torch.float32)
    ths = [theta.to(device=dev, dtype=torch.float32) for theta in thetas]
    m, d = ths[0].shape
    out = [torch.zeros(tv.shape[0], dtype=torch.float64) for _ in ths]
    for i, tau in enumerate(tv):
        norm2 = float(tau.double().square().sum())
        if norm2 == 0.0:
            continue
        gram = tau.T @ tau if m * m * d > 2 * m * d * d else None  # the cheaper order when m > 2 d
        for values, th in zip(out, ths, strict=True):
            diff = th - tau
            if gram is None:
                value = (diff @ tau.T).double().square().sum()
            else:
                value = ((diff @ gram) * diff).double().sum()
            values[i] = float(value) / norm2
    return out


def interference_vs_sum(
    theta: torch.Tensor, task_vectors: torch.Tensor, device: str | torch.device = "auto"
) -> dict[str, object]:
    """Per-task and total interference of ``theta`` relative to theta = sum of task vectors.

    Returns ``{"per_task": [L_i(theta) / L_i(sum)], "total": sum L_i(theta) / sum L_i(sum)}``;
    a ratio is None where the reference is 0.
    """
    merged, reference = _task_losses([theta, task_vectors.sum(dim=0)], task_vectors, device)
    per_task = [float(a / b) if b > 0 else None for a, b in zip(merged, reference, strict=True)]
    total = float(merged.sum() / reference.sum()) if float(reference.sum()) > 0 else None
    return {"per_task": per_task, "total": total}


def interference_from_decomposition(
    dec: Decomposition, f: torch.Tensor, init: str = "sum", device: str | torch.device = "auto"
) -> float | None:
    """Total interference L(theta) / L(sum of task vectors) of a filtered merge, from the decomposition.

    Both losses come from projections on the stored eigenvectors (theta Q and S Q, O(m r) work,
    :meth:`~swudi.core.decomposition.Decomposition.objective_of_projection`): no task vector is needed.
    Exact when every direction of C's range is stored (no ``max_rank`` cut). None when the
    reference loss is 0 (all task vectors zero).
    """
    if dec.all_zero:
        return None
    reference = dec.objective_of_projection(dec.sum_q)
    if reference <= 0.0:
        return None
    return dec.objective_of_projection(filtered_projection(dec, f, init, device=device)) / reference


def interference_from_factors(
    dec: Decomposition, f: torch.Tensor, init: str, factors: Sequence[LowRank], device: str | torch.device = "auto"
) -> dict[str, object]:
    """:func:`interference_vs_sum` of a filtered merge from a factored decomposition and the LoRA
    factors it was built from (per task and total), never forming an m x d matrix."""
    if not dec.factored:
        raise ValueError(f"weight {dec.name!r}: interference_from_factors needs a factored decomposition")
    dev = resolve_device(device)
    if dec.all_zero:
        return {"per_task": [None] * len(factors), "total": None}
    thetas = [filtered_projection(dec, f, init, device=dev).to(dev, torch.float64), dec.sum_q.to(dev, torch.float64)]
    merged, reference = torch.zeros(len(factors), dtype=torch.float64), torch.zeros(len(factors), dtype=torch.float64)
    for i, proj in enumerate(task_projections(factors, dec.eigenvectors.to(dev))):
        gram = proj.T @ proj
        norm2 = float(gram.trace())
        if norm2 == 0.0:
            continue
        for values, theta_q in zip((merged, reference), thetas, strict=True):
            diff = theta_q - proj
            values[i] = float(((diff.T @ diff) * gram).sum()) / norm2
    per_task = [float(a / b) if b > 0 else None for a, b in zip(merged, reference, strict=True)]
    total = float(merged.sum() / reference.sum()) if float(reference.sum()) > 0 else None
    return {"per_task": per_task, "total": total}

"""Per-task SVDs of one 2-D weight: the stored input of the subspace methods (Iso-C, Iso-CTS, TSV-M,
CART, ACE) and of the SVC post-filter.

For task vectors tau_i ``[m, d]`` (i = 1..N)::

    tau_i = U_i diag(s_i) V_i^T,     U_i [m, k_i], s_i [k_i] descending, V_i [d, k_i]

keeping the k_i singular triplets above the numerical-rank tolerance
``s > s_max * max(m, d) * eps(float32)`` (the rank rule of ``numpy.linalg.matrix_rank``): what is
dropped is float32 round-off, so tau_i = U_i diag(s_i) V_i^T to float32 accuracy and every method
built on a :class:`TaskSVDs` sees the task vectors themselves. Storage is sum_i (m + d + 1) k_i
floats: at most (m + d) min(m, d) per task for a dense full-rank update, (m + d) r_i for a LoRA
update of rank r_i.

LoRA experts (tau_i = B_i A_i, :class:`~swudi.core.task_vectors.LowRank`) are decomposed in factor
space: with the thin QRs B_i = Q_b R_b and A_i^T = Q_a R_a, tau_i = Q_b (R_b R_a^T) Q_a^T, and the
SVD of the r_i x r_i core X S Y^T gives U_i = Q_b X, V_i = Q_a Y (cost O((m + d) r_i^2), no m x d
matrix; the small algebra in float64).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from swudi.core.device import resolve_device
from swudi.core.task_vectors import LowRank, check_task_vectors
from swudi.errors import InputError

__all__ = ["TASK_SVD_FORMAT", "TASK_SVD_FORMAT_VERSION", "TaskSVDs", "task_svds", "task_svds_from_factors"]

log = logging.getLogger(__name__)

TASK_SVD_FORMAT = "swudi.task_svds"
TASK_SVD_FORMAT_VERSION = "1"
_EPS32 = float(torch.finfo(torch.float32).eps)


@dataclass(eq=False)
class TaskSVDs:
    """The thin SVD of every task vector of one weight (float32, CPU): ``u[i]`` ``[m, k_i]``,
    ``s[i]`` ``[k_i]`` (descending), ``v[i]`` ``[d, k_i]``; ``shape`` = (m, d)."""

    u: list[torch.Tensor]
    s: list[torch.Tensor]
    v: list[torch.Tensor]
    shape: tuple[int, int]
    name: str = ""
    route: str = "dense"  # "dense" (SVD of tau_i) or "factors" (from LoRA factors)

    @property
    def num_tasks(self) -> int:
        return len(self.s)

    @property
    def ranks(self) -> list[int]:
        """k_i: the stored singular triplets per task."""
        return [int(s.shape[0]) for s in self.s]

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tensors: 4 (m + d + 1) sum_i k_i."""
        m, d = self.shape
        return 4 * (m + d + 1) * sum(self.ranks)

    def task(self, i: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """tau_i = U_i diag(s_i) V_i^T ``[m, d]`` float32 on ``device``."""
        u, s, v = (x.to(device) for x in (self.u[i], self.s[i], self.v[i]))
        return (u * s) @ v.T

    def sum(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """S = sum_i tau_i ``[m, d]`` float32 (one product over the stacked factors)."""
        m, d = self.shape
        if sum(self.ranks) == 0:
            return torch.zeros((m, d), dtype=torch.float32, device=device)
        us = torch.cat([(u * s) for u, s in zip(self.u, self.s, strict=True)], dim=1).to(device)
        return us @ torch.cat(self.v, dim=1).to(device).T

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """(tensors, metadata) for a safetensors file: ``u.i``, ``s.i``, ``v.i`` per task."""
        tensors: dict[str, torch.Tensor] = {}
        for i in range(self.num_tasks):
            tensors[f"u.{i}"] = self.u[i].contiguous()
            tensors[f"s.{i}"] = self.s[i].contiguous()
            tensors[f"v.{i}"] = self.v[i].contiguous()
        m, d = self.shape
        metadata = {
            "format": TASK_SVD_FORMAT,
            "format_version": TASK_SVD_FORMAT_VERSION,
            "name": self.name,
            "shape": f"{m},{d}",
            "num_tasks": str(self.num_tasks),
            "route": self.route,
        }
        return tensors, metadata

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> TaskSVDs:
        """Inverse of :meth:`to_tensors`; :class:`InputError` naming the bad entry otherwise."""
        meta = dict(metadata or {})
        what = f"task SVDs {meta.get('name', '')!r}"
        if (meta.get("format"), meta.get("format_version")) != (TASK_SVD_FORMAT, TASK_SVD_FORMAT_VERSION):
            raise InputError(f"{what}: not a {TASK_SVD_FORMAT} v{TASK_SVD_FORMAT_VERSION} artefact")
        try:
            m, d = (int(x) for x in meta["shape"].split(","))
            n = int(meta["num_tasks"])
        except (KeyError, ValueError) as exc:
            raise InputError(f"{what}: unreadable metadata ({exc})") from exc
        us, ss, vs = [], [], []
        for i in range(n):
            try:
                u, s, v = tensors[f"u.{i}"], tensors[f"s.{i}"], tensors[f"v.{i}"]
            except KeyError as exc:
                raise InputError(f"{what}: missing tensor {exc}") from None
            k = int(s.shape[0]) if s.ndim == 1 else -1
            if k < 0 or tuple(u.shape) != (m, k) or tuple(v.shape) != (d, k):
                raise InputError(f"{what}: task {i} has u {tuple(u.shape)}, s {tuple(s.shape)}, v {tuple(v.shape)}")
            us.append(u.to(torch.float32))
            ss.append(s.to(torch.float32))
            vs.append(v.to(torch.float32))
        return cls(us, ss, vs, (m, d), meta.get("name", ""), meta.get("route", "dense"))


def _kept(s: torch.Tensor, m: int, d: int) -> int:
    """Number of singular values above s_max * max(m, d) * eps(float32)."""
    if s.numel() == 0 or float(s[0]) <= 0.0:
        return 0
    return int((s > float(s[0]) * max(m, d) * _EPS32).sum())


def task_svds(
    task_vectors: torch.Tensor | Sequence[torch.Tensor], *, name: str = "", device: str | torch.device = "auto"
) -> TaskSVDs:
    """The thin SVD of each task vector of ``[N, m, d]``, truncated at its numerical rank (float32)."""
    tv = check_task_vectors(task_vectors, name, ndim=3)
    dev = resolve_device(device)
    m, d = int(tv.shape[1]), int(tv.shape[2])
    us, ss, vs = [], [], []
    for i in range(int(tv.shape[0])):
        u, s, vh = torch.linalg.svd(tv[i].to(device=dev, dtype=torch.float32), full_matrices=False)
        k = _kept(s, m, d)
        us.append(u[:, :k].cpu().contiguous())
        ss.append(s[:k].cpu().contiguous())
        vs.append(vh[:k].T.cpu().contiguous())
    return TaskSVDs(us, ss, vs, (m, d), name, "dense")


def task_svds_from_factors(
    factors: Sequence[LowRank], *, name: str = "", device: str | torch.device = "auto"
) -> TaskSVDs:
    """:class:`TaskSVDs` of tau_i = b_i @ a_i computed in factor space (module docstring)."""
    if not factors:
        raise InputError(f"weight {name!r}: no task vectors given (N = 0)")
    m, d = factors[0].shape
    dev = resolve_device(device)
    us, ss, vs = [], [], []
    for i, f in enumerate(factors):
        if f.shape != (m, d) or f.b.shape[1] != f.a.shape[0]:
            raise InputError(
                f"weight {name!r}: factors of expert {i} are {list(f.b.shape)} x {list(f.a.shape)}, "
                f"expected [{m}, r] x [r, {d}]"
            )
        if not (bool(torch.isfinite(f.a).all()) and bool(torch.isfinite(f.b).all())):
            raise InputError(f"weight {name!r}: non-finite values (NaN or inf) in the LoRA factors of expert {i}")
        if f.rank == 0:
            us.append(torch.zeros((m, 0)))
            ss.append(torch.zeros(0))
            vs.append(torch.zeros((d, 0)))
            continue
        qb, rb = torch.linalg.qr(f.b.to(dev, torch.float64))
        qa, ra = torch.linalg.qr(f.a.to(dev, torch.float64).T)
        x, s, yh = torch.linalg.svd(rb @ ra.T)
        k = _kept(s, m, d)
        us.append((qb @ x[:, :k]).to(torch.float32).cpu().contiguous())
        ss.append(s[:k].to(torch.float32).cpu().contiguous())
        vs.append((qa @ yh[:k].T).to(torch.float32).cpu().contiguous())
    return TaskSVDs(us, ss, vs, (m, d), name, "factors")

"""Thread budget: parallel workers x torch threads fit the cores the process may use.

A merge runs its per-layer tasks in parallel (a thread pool of ``workers``, or Dask worker threads)
and every task calls torch kernels (eigh, matmul) that are themselves multi-threaded. Left at
torch's default (one thread per core in every caller), ``workers`` callers each start ``cores``
OpenMP/MKL threads: the machine is oversubscribed and an eigh costs several times the CPU it needs.
This module computes the per-task thread count and applies it:

- :func:`available_cores` -- cores this process may use: CPU affinity, capped by a cgroup CPU
  quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``) of the process's cgroup or any ancestor.
- :func:`torch_threads_for` -- ``max(1, cores // workers)``, or an explicit setting (a warning is
  logged once when ``workers x threads`` exceeds the cores).
- :func:`threads_per_task` -- the number for a :class:`~swudi.config.MergeConfig`'s runner.
- :func:`apply_torch_threads` -- set torch's intra-op threads (and BLAS/OpenMP pools through
  ``threadpoolctl`` when it is installed) in the calling thread; idempotent and cheap, meant to be
  called at the start of every task body.

No Prefect here; Dask is imported only when the config's runner is a Dask scheduler address.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:
    from swudi.config.merge_config import MergeConfig

__all__ = [
    "apply_torch_threads",
    "available_cores",
    "cgroup_cpu_limit",
    "threads_per_task",
    "torch_threads_for",
]

logger = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
# cgroup v1 mounts the cpu controller under one of these names (alone or co-mounted with cpuacct).
_V1_CPU_DIRS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")

_warned: set[tuple[int, int, int]] = set()
_warned_lock = threading.Lock()
_interop_done = False
_interop_lock = threading.Lock()
_local = threading.local()  # .applied: the thread count last applied in this thread


# --------------------------------------------------------------------------------------------------
# Cores


def _own_cgroup_paths(proc_cgroup: Path) -> tuple[str, str]:
    """The process's cgroup path in the v2 hierarchy and in the v1 ``cpu`` hierarchy ("/" if unknown)."""
    v2, v1_cpu = "/", "/"
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return v2, v1_cpu
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1_cpu = path
    return v2, v1_cpu


def _self_and_ancestors(mount: Path, cgroup_path: str) -> list[Path]:
    """``mount/a/b``, ``mount/a``, ``mount`` for ``cgroup_path = /a/b`` (".." parts are dropped)."""
    parts = [part for part in cgroup_path.split("/") if part not in ("", ".", "..")]
    return [mount.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]


def _v2_limit(directory: Path) -> float | None:
    """Cores allowed by ``directory/cpu.max`` (``"<quota> <period>"`` or ``"max <period>"``)."""
    try:
        fields = (directory / "cpu.max").read_text().split()
    except OSError:
        return None
    if len(fields) != 2 or fields[0] == "max":
        return None
    return _ratio(fields[0], fields[1])


def _v1_limit(directory: Path) -> float | None:
    """Cores allowed by ``cpu.cfs_quota_us / cpu.cfs_period_us`` in ``directory`` (quota -1: none)."""
    try:
        quota = (directory / "cpu.cfs_quota_us").read_text().strip()
        period = (directory / "cpu.cfs_period_us").read_text().strip()
    except OSError:
        return None
    return _ratio(quota, period)


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        logger.debug("unreadable cgroup CPU quota %r / period %r; ignored", quota, period)
        return None
    if q <= 0 or p <= 0:
        return None
    return q / p


def cgroup_cpu_limit(cgroup_root: str | Path = CGROUP_ROOT, proc_cgroup: str | Path = PROC_SELF_CGROUP) -> float | None:
    """The CPU quota of this process in cores (e.g. 1.5), or None when no quota applies.

    Reads the cgroup v2 ``cpu.max`` and the cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``
    of the process's own cgroup (from ``proc_cgroup``) and of every ancestor up to ``cgroup_root``;
    the smallest quota found wins (the kernel enforces all of them). Missing or malformed files
    are ignored. ``cgroup_root`` and ``proc_cgroup`` exist for tests.
    """
    root = Path(cgroup_root)
    v2_path, v1_path = _own_cgroup_paths(Path(proc_cgroup))
    limits = [_v2_limit(directory) for directory in _self_and_ancestors(root, v2_path)]
    for name in _V1_CPU_DIRS:
        limits += [_v1_limit(directory) for directory in _self_and_ancestors(root / name, v1_path)]
    found = [limit for limit in limits if limit is not None]
    return min(found) if found else None


def _affinity_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)  # pragma: no cover - platforms without sched_getaffinity


def available_cores(cgroup_root: str | Path = CGROUP_ROOT, proc_cgroup: str | Path = PROC_SELF_CGROUP) -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup CPU quota; at least 1.

    A fractional quota is rounded down (1.5 cores -> 1): the budget is the number of threads that
    can run at full speed at the same time. Several processes on one machine (e.g. Dask workers
    started by hand) each see the whole machine unless they are pinned (affinity) or limited.
    """
    cores = _affinity_cores()
    limit = cgroup_cpu_limit(cgroup_root, proc_cgroup)
    if limit is not None:
        cores = min(cores, max(1, math.floor(limit)))
    return cores


# --------------------------------------------------------------------------------------------------
# Budget


def torch_threads_for(workers: int, setting: int | Literal["auto"] | None, cores: int | None = None) -> int:
    """Torch threads for each of ``workers`` parallel callers sharing ``cores`` (default: available).

    ``setting`` None or ``"auto"``: ``max(1, cores // workers)``, so ``workers x threads <= cores``
    whenever ``workers <= cores``. An explicit setting (>= 1) is returned as is; when
    ``workers x setting > cores`` a warning is logged (once per process for the same numbers).
    Raises ValueError for ``workers < 1`` or a setting that is not a positive int, None or "auto".
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if cores is None:
        cores = available_cores()
    if setting is None or setting == "auto":
        return max(1, cores // workers)
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1:
        raise ValueError(f"torch threads must be a positive int, None or 'auto', got {setting!r}")
    if workers * setting > cores:
        key = (workers, setting, cores)
        with _warned_lock:
            first = key not in _warned
            _warned.add(key)
        if first:
            logger.warning(
                "torch_threads=%d with %d parallel workers uses %d threads on %d available cores: "
                "oversubscribed, eigh and matmul will cost more CPU; leave torch_threads unset for %d",
                setting,
                workers,
                workers * setting,
                cores,
                max(1, cores // workers),
            )
    return setting


def _dask_worker_threads(default: int) -> int:
    """Threads of the Dask worker running this code, or ``default`` outside a Dask worker."""
    try:
        from distributed import get_worker
    except ImportError:  # pragma: no cover - distributed comes with the [dask] extra
        return default
    try:
        worker = get_worker()
    except ValueError:  # not running on a worker
        return default
    state = getattr(worker, "state", None)
    nthreads = getattr(state, "nthreads", None) or getattr(worker, "nthreads", None)
    return int(nthreads) if nthreads else default


def threads_per_task(config: MergeConfig) -> int:
    """Torch threads for one task of ``config``'s runner, in the process that runs the task.

    - ``task_runner.kind: threads``: the tasks share this process: ``torch_threads_for(workers)``.
    - Dask local cluster: ``n_workers`` processes x ``threads_per_worker`` threads share the
      machine: ``torch_threads_for(n_workers * threads_per_worker)``.
    - Dask scheduler ``address`` or ``cluster_class``: evaluated on the worker at run time with that worker's own cores
      and thread count (``threads_per_worker`` of the config outside a worker).

    ``config.torch_threads``, when set, is used as is (with the oversubscription warning).
    """
    runner = config.task_runner
    if runner.kind == "threads":
        parallel = config.workers
    elif runner.address is None and runner.cluster_class is None:
        parallel = runner.n_workers * runner.threads_per_worker
    else:
        parallel = _dask_worker_threads(runner.threads_per_worker)
    return torch_threads_for(parallel, config.torch_threads)


# --------------------------------------------------------------------------------------------------
# Apply


def _set_interop_once(threads: int) -> None:
    """Size torch's inter-op pool once per process; impossible once torch has started it."""
    global _interop_done
    with _interop_lock:
        if _interop_done:
            return
        _interop_done = True
        try:
            torch.set_num_interop_threads(threads)
        except RuntimeError as error:  # already started (or already set) in this process
            logger.debug("torch inter-op threads left as they are: %s", error)


def _limit_other_pools(threads: int) -> None:
    """Bound the BLAS/OpenMP pools torch does not own (e.g. numpy's OpenBLAS), if threadpoolctl is here."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: not a dependency of swudi
        return
    threadpool_limits(limits=threads)


def apply_torch_threads(threads: int) -> None:
    """Make torch kernels called from this thread use ``threads`` threads (>= 1).

    Sets ``torch.set_num_threads`` (OpenMP's count is per calling thread, so call this in the thread
    that runs the work: at the start of each task body), the inter-op pool once per process when
    torch has not started it, and, if ``threadpoolctl`` is installed, the BLAS/OpenMP pools it finds.
    Idempotent: a repeat call with the same number in the same thread only reads the current count.
    """
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    if getattr(_local, "applied", None) == threads and torch.get_num_threads() == threads:
        return
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    _set_interop_once(threads)
    _limit_other_pools(threads)
    _local.applied = threads
    logger.debug("torch threads set to %d in thread %s", threads, threading.current_thread().name)

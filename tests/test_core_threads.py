"""Thread budget: cores from affinity and cgroup quotas, threads per task, applying them to torch."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from swudi.config.merge_config import config_from_mapping
from swudi.core import threads
from swudi.core.threads import (
    apply_torch_threads,
    available_cores,
    cgroup_cpu_limit,
    threads_per_task,
    torch_threads_for,
)
from swudi.errors import ConfigError

# ------------------------------------------------------------------------------ torch_threads_for


@pytest.mark.parametrize(
    ("workers", "cores", "expected"),
    [
        (1, 2, 2),
        (2, 2, 1),  # the development box: 2 workers on 2 cores
        (3, 2, 1),  # more workers than cores: never below 1
        (2, 8, 4),
        (3, 8, 2),  # rounded down: 3 x 2 <= 8
        (16, 64, 4),
    ],
)
def test_auto_threads_divide_the_cores(workers, cores, expected):
    assert torch_threads_for(workers, None, cores=cores) == expected
    assert torch_threads_for(workers, "auto", cores=cores) == expected


def test_auto_threads_use_available_cores_by_default(monkeypatch):
    monkeypatch.setattr(threads, "available_cores", lambda: 6)
    assert torch_threads_for(2, None) == 3


@pytest.fixture
def fresh_warnings(monkeypatch) -> None:
    """Forget which oversubscription warnings this process already logged."""
    monkeypatch.setattr(threads, "_warned", set())


def test_explicit_setting_is_used_as_is_without_warning_when_it_fits(fresh_warnings, caplog):
    with caplog.at_level(logging.WARNING, logger="swudi.core.threads"):
        assert torch_threads_for(2, 3, cores=8) == 3
    assert not caplog.records


def test_oversubscription_is_used_and_warned_once(fresh_warnings, caplog):
    with caplog.at_level(logging.WARNING, logger="swudi.core.threads"):
        assert torch_threads_for(2, 2, cores=2) == 2
        assert torch_threads_for(2, 2, cores=2) == 2  # every task asks; one warning is enough
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "oversubscribed" in message and "4 threads on 2 available cores" in message


@pytest.mark.parametrize(("workers", "setting"), [(0, None), (-1, 2), (2, 0), (2, -3), (2, "four"), (2, True)])
def test_invalid_arguments_are_refused(workers, setting):
    with pytest.raises(ValueError):
        torch_threads_for(workers, setting, cores=4)


# ------------------------------------------------------------------------------ apply_torch_threads


@pytest.fixture
def restore_threads() -> Iterator[None]:
    """Put torch's (and threadpoolctl's) thread counts back as they were."""
    before = torch.get_num_threads()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        limits: Any = None
    else:
        limits = threadpool_limits(limits=None)  # records the current limits, changes nothing
    try:
        yield
    finally:
        torch.set_num_threads(before)
        if limits is not None:
            limits.restore_original_limits()
        threads._local.__dict__.clear()


def test_apply_changes_torch_threads_in_this_thread(restore_threads):
    target = 2 if torch.get_num_threads() == 1 else 1
    apply_torch_threads(target)
    assert torch.get_num_threads() == target


def test_apply_in_a_worker_thread(restore_threads):
    """A layer task runs in a pool thread: the count applies where the task calls it."""
    seen: list[int] = []

    def task() -> None:
        apply_torch_threads(1)
        seen.append(torch.get_num_threads())

    worker = threading.Thread(target=task)
    worker.start()
    worker.join()
    assert seen == [1]


def test_apply_is_idempotent_and_cheap(restore_threads, monkeypatch):
    apply_torch_threads(1)
    calls: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n))
    monkeypatch.setattr(threads, "_limit_other_pools", lambda n: calls.append(n))
    for _ in range(100):
        apply_torch_threads(1)
    assert calls == []


def test_apply_reapplies_when_torch_was_changed_behind_its_back(restore_threads):
    apply_torch_threads(1)
    torch.set_num_threads(2)
    apply_torch_threads(1)
    assert torch.get_num_threads() == 1


def test_apply_limits_blas_pools_when_threadpoolctl_is_installed(restore_threads):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    apply_torch_threads(1)
    assert all(pool["num_threads"] == 1 for pool in threadpoolctl.threadpool_info())


def test_interop_threads_set_at_most_once_and_never_raise(restore_threads, monkeypatch):
    calls: list[int] = []

    def refuse(n: int) -> None:
        calls.append(n)
        raise RuntimeError("Error: cannot set number of interop threads after parallel work has started")

    monkeypatch.setattr(threads, "_interop_done", False)
    monkeypatch.setattr(torch, "set_num_interop_threads", refuse)
    apply_torch_threads(1)
    threads._local.__dict__.clear()
    apply_torch_threads(2)
    assert calls == [1]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_apply_refuses_non_positive_counts(bad):
    with pytest.raises(ValueError):
        apply_torch_threads(bad)


# ------------------------------------------------------------------------------ cores and cgroups


@pytest.fixture
def eight_cpus(monkeypatch) -> None:
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(8)))


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _proc(tmp_path: Path, text: str = "0::/\n") -> Path:
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text(text)
    return proc


def test_cgroup_v2_quota_caps_the_cores(tmp_path, eight_cpus):
    _write(tmp_path / "cg" / "cpu.max", "300000 100000\n")
    assert cgroup_cpu_limit(tmp_path / "cg", _proc(tmp_path)) == 3.0
    assert available_cores(tmp_path / "cg", _proc(tmp_path)) == 3


def test_fractional_quota_rounds_down_but_never_below_one(tmp_path, eight_cpus):
    _write(tmp_path / "cg" / "cpu.max", "150000 100000\n")
    assert available_cores(tmp_path / "cg", _proc(tmp_path)) == 1
    _write(tmp_path / "cg" / "cpu.max", "50000 100000\n")
    assert available_cores(tmp_path / "cg", _proc(tmp_path)) == 1


def test_unlimited_missing_or_malformed_quota_leaves_the_affinity(tmp_path, eight_cpus):
    root = tmp_path / "cg"
    assert available_cores(root, _proc(tmp_path)) == 8  # no files at all
    _write(root / "cpu.max", "max 100000\n")
    assert cgroup_cpu_limit(root, _proc(tmp_path)) is None
    assert available_cores(root, _proc(tmp_path)) == 8
    _write(root / "cpu.max", "lots\n")
    assert available_cores(root, _proc(tmp_path)) == 8
    assert available_cores(root, tmp_path / "no_such_proc_file") == 8


def test_quota_below_the_affinity_only_caps(tmp_path, monkeypatch):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1})
    _write(tmp_path / "cg" / "cpu.max", "400000 100000\n")
    assert available_cores(tmp_path / "cg", _proc(tmp_path)) == 2


def test_own_cgroup_and_ancestors_smallest_quota_wins(tmp_path, eight_cpus):
    root = tmp_path / "cg"
    _write(root / "user.slice" / "cpu.max", "200000 100000\n")
    _write(root / "user.slice" / "job.scope" / "cpu.max", "max 100000\n")
    _write(root / "other.slice" / "cpu.max", "100000 100000\n")  # not ours
    proc = _proc(tmp_path, "0::/user.slice/job.scope\n")
    assert cgroup_cpu_limit(root, proc) == 2.0
    assert available_cores(root, proc) == 2


def test_cgroup_v1_cfs_quota(tmp_path, eight_cpus):
    root = tmp_path / "cg"
    _write(root / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_quota_us", "250000\n")
    _write(root / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_period_us", "100000\n")
    _write(root / "cpu,cpuacct" / "cpu.cfs_quota_us", "-1\n")
    _write(root / "cpu,cpuacct" / "cpu.cfs_period_us", "100000\n")
    proc = _proc(tmp_path, "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/\n")
    assert cgroup_cpu_limit(root, proc) == 2.5
    assert available_cores(root, proc) == 2


def test_this_machine_has_at_least_one_core():
    assert available_cores() >= 1


# ------------------------------------------------------------------------------ config


def _config(**extra: Any) -> Any:
    return config_from_mapping({"base": "/b", "experts": ["/e1", "/e2"], "output": "/out", **extra})


def test_config_torch_threads_default_and_explicit():
    assert _config().torch_threads is None
    assert _config(torch_threads=3).torch_threads == 3


@pytest.mark.parametrize("bad", [0, -2, "many"])
def test_config_refuses_bad_torch_threads(bad):
    with pytest.raises(ConfigError, match="torch_threads"):
        _config(torch_threads=bad)


def test_threads_per_task_thread_runner(monkeypatch, fresh_warnings):
    monkeypatch.setattr(threads, "available_cores", lambda: 8)
    assert threads_per_task(_config(workers=2)) == 4
    assert threads_per_task(_config(workers=3)) == 2
    assert threads_per_task(_config(workers=2, torch_threads=1)) == 1


def test_threads_per_task_local_dask_cluster(monkeypatch):
    monkeypatch.setattr(threads, "available_cores", lambda: 8)
    runner = {"kind": "dask", "n_workers": 2, "threads_per_worker": 2}
    assert threads_per_task(_config(task_runner=runner, workers=8)) == 2  # workers is the thread pool's


def test_threads_per_task_dask_address_uses_the_worker_at_run_time(monkeypatch):
    distributed = pytest.importorskip("distributed")
    monkeypatch.setattr(threads, "available_cores", lambda: 16)
    config = _config(task_runner={"kind": "dask", "address": "tcp://scheduler:8786", "threads_per_worker": 2})
    assert threads_per_task(config) == 8  # not on a worker: the config's threads_per_worker

    class FakeWorker:
        class state:  # mirrors distributed.Worker.state
            nthreads = 4

    monkeypatch.setattr(distributed, "get_worker", lambda: FakeWorker())
    assert threads_per_task(config) == 4

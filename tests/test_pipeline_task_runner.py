"""The task runner a config asks for: thread pool, a running Dask scheduler, or a Dask cluster
started per run by one of Dask's deploy tools (``cluster_class``)."""

from __future__ import annotations

import pytest

from flows.merge import task_runner
from swudi.config.merge_config import config_from_mapping
from swudi.core.threads import threads_per_task
from swudi.errors import ConfigError

DATA = {"base": "/m/base", "experts": ["/m/a"], "output": "/m/out"}


def test_cluster_class_builds_a_dask_runner_that_starts_that_cluster() -> None:
    from distributed import LocalCluster

    cfg = config_from_mapping(
        {
            **DATA,
            "task_runner": {
                "kind": "dask",
                "cluster_class": "distributed.LocalCluster",
                "cluster_kwargs": {"n_workers": 1, "processes": False},
                "adapt_kwargs": {"minimum": 1, "maximum": 3},
            },
        }
    )
    runner = task_runner(cfg)
    assert runner.resolved_cluster_class is LocalCluster and runner.address is None
    assert runner.cluster_kwargs == {"n_workers": 1, "processes": False}
    assert runner.adapt_kwargs == {"minimum": 1, "maximum": 3}
    assert threads_per_task(cfg) >= 1  # decided on the worker at run time, like an address


@pytest.mark.parametrize(
    ("runner", "message"),
    [
        ({"kind": "dask", "address": "tcp://s:8786", "cluster_class": "distributed.LocalCluster"}, "not both"),
        ({"kind": "dask", "cluster_kwargs": {"n_workers": 2}}, "need cluster_class"),
        ({"kind": "dask", "cluster_class": "LocalCluster"}, "dotted 'module.Class'"),
    ],
)
def test_cluster_settings_that_contradict_are_refused(runner: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_mapping({**DATA, "task_runner": runner})


def test_a_local_cluster_gets_s3_credentials_through_its_workers_environment() -> None:
    options = {
        "endpoint_url": "http://minio:9000",
        "key": "AKIA1",
        "secret": "s3cr3t",
        "client_kwargs": {"aws_session_token": "t0k"},
    }
    cfg = config_from_mapping({**DATA, "storage_options": options, "task_runner": {"kind": "dask", "n_workers": 2}})
    runner = task_runner(cfg)
    assert runner.cluster_kwargs["env"] == {
        "AWS_ACCESS_KEY_ID": "AKIA1",
        "AWS_SECRET_ACCESS_KEY": "s3cr3t",
        "AWS_SESSION_TOKEN": "t0k",
    }
    assert runner.cluster_kwargs["n_workers"] == 2 and runner.cluster_kwargs["processes"] is True
    plain = config_from_mapping({**DATA, "task_runner": {"kind": "dask"}})
    assert task_runner(plain).cluster_kwargs["env"] == {}

"""Credentials in storage options stay in the process that holds them (swudi.storage.held_options)."""

from __future__ import annotations

import pickle

from flows.parameters import config_parameter, hold_storage_options
from swudi.config.merge_config import config_from_mapping
from swudi.storage import held_options
from swudi.storage.retry import RETRY_KEY

OPTIONS = {
    "endpoint_url": "http://minio:9000",
    "key": "AKIA-not-public",
    "secret": "s3cr3t-value",
    "client_kwargs": {"region_name": "eu-west-1", "aws_session_token": "t0ken-value"},
    "profile": "swudi",
}


def _config(options=OPTIONS):
    return config_from_mapping({"base": "/m/base", "experts": ["/m/a"], "output": "/m/out", "storage_options": options})


def test_public_options_drop_every_credential_and_keep_the_rest() -> None:
    public = held_options.public_options(OPTIONS)
    assert public == {
        "endpoint_url": "http://minio:9000",
        "client_kwargs": {"region_name": "eu-west-1"},
        "profile": "swudi",
    }
    assert held_options.has_secrets(OPTIONS) and not held_options.has_secrets(public)


def test_tasks_get_the_held_options_here_and_only_public_ones_elsewhere() -> None:
    cfg = _config()
    with hold_storage_options(cfg) as (parameter, ref):
        assert ref is not None
        assert parameter["storage_options"] == held_options.public_options(OPTIONS)
        sent = held_options.without_secrets(config_parameter(parameter, ref))
        wire = pickle.dumps(sent)  # what a Dask worker in another process receives
        for secret in ("AKIA-not-public", "s3cr3t-value", "t0ken-value"):
            assert secret.encode() not in wire
        retry = {RETRY_KEY: cfg.storage_retry.model_dump()}  # the retry policy travels with either
        assert held_options.with_held_options(sent, ref).storage_options == {**OPTIONS, **retry}  # this process
        remote = pickle.loads(wire)
        held_options.release(ref)  # as in another process: nothing held under ref
        assert held_options.with_held_options(remote, ref).storage_options == {
            **held_options.public_options(OPTIONS),
            **retry,
        }


def test_options_without_credentials_need_no_reference() -> None:
    cfg = _config({"endpoint_url": "http://minio:9000"})
    with hold_storage_options(cfg) as (parameter, ref):
        assert ref is None and parameter["storage_options"] == {"endpoint_url": "http://minio:9000"}
        assert held_options.with_held_options(cfg, ref) is cfg

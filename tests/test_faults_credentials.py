"""Credentials are never at rest nor in logs: a merge, a sweep, a plan and a failing merge run with
recognisable fake secrets, then every byte they wrote is searched for them.

Secrets are put where users put them: `storage_options.secret` by value in the config, the
`AWS_SECRET_ACCESS_KEY` environment variable, and `user:password@` in an endpoint URL (refused at
config load since issue 24; the failing merge uses an unreachable endpoint). Searched: the work
folder and the output (S3 objects), the sweep folder, PREFECT_HOME (the Prefect server's SQLite
database with flow runs, task runs, logs, artifacts, blocks), and the captured stdout/stderr of
every command run at DEBUG level.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from flows.server import PrefectServer
from swudi.errors import ConfigError
from swudi.io.synthetic import SyntheticModel, write_synthetic_models
from swudi.publish.card import render_card
from swudi.storage.faults import mask_credentials, storage_fault
from swudi.storage.filesystem import resolve
from swudi.storage.redact import install_log_redaction, mask_in, url_secret
from swudi.storage.secrets import resolve_secret_refs

MODEL = SyntheticModel(layers=1, hidden=16, intermediate=32, vocab=16, positions=8)
SECRET_IN_CONFIG = "SWUDIFAKESECRETinCONFIG0123456789"
SECRET_IN_ENV = "SWUDIFAKESECRETinENVIRON987654321"
SECRET_IN_URL = "SWUDIFAKESECRETinURL55555"
SECRETS = (SECRET_IN_CONFIG, SECRET_IN_ENV, SECRET_IN_URL)


def test_secret_references_resolve_only_when_a_filesystem_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWUDI_TEST_KEY", "the-key")
    monkeypatch.setenv("SWUDI_TEST_SECRET", SECRET_IN_ENV)
    options = {"endpoint_url": "http://127.0.0.1:9", "key": {"from_env": "SWUDI_TEST_KEY"},
               "client_kwargs": {"aws_session_token": {"from_env": "SWUDI_TEST_SECRET"}}}
    assert resolve_secret_refs(options)["client_kwargs"] == {"aws_session_token": SECRET_IN_ENV}
    fs, _ = resolve("s3://bucket/x", options)
    assert fs.key == "the-key" and fs.client_kwargs["aws_session_token"] == SECRET_IN_ENV
    assert options["key"] == {"from_env": "SWUDI_TEST_KEY"}  # the config keeps the reference
    monkeypatch.delenv("SWUDI_TEST_KEY")
    with pytest.raises(ConfigError, match=r"storage_options\.key: environment variable SWUDI_TEST_KEY is not set"):
        resolve("s3://bucket/y", options)


def test_fault_messages_mask_credentials_in_urls() -> None:
    assert mask_credentials(f"http://admin:{SECRET_IN_URL}@minio:9000/b") == "http://***@minio:9000/b"
    try:
        raise ConnectionError(f"cannot reach http://admin:{SECRET_IN_URL}@minio:9000/bucket/key")
    except ConnectionError as error:
        fault = storage_fault(error)
    assert fault is not None and SECRET_IN_URL not in str(fault) and "***@minio" in str(fault)


def test_one_redaction_masks_userinfo_and_signed_query_parameters() -> None:
    secret = SECRET_IN_URL
    cases = {
        f"s3://AKIA:{secret}@bucket/x": "s3://***@bucket/x",
        f"https://h/o?X-Amz-Date=1&X-Amz-Signature={secret}": "https://h/o?X-Amz-Date=***&X-Amz-Signature=***",
        f"https://acct.blob/c/x?sv=2024&sig={secret}&se=1": "https://acct.blob/c/x?sv=2024&sig=***&se=1",
        f"see https://h/x?page=2&token={secret}#top": "see https://h/x?page=2&token=***#top",
        "s3://bucket/a@b?page=2": "s3://bucket/a@b?page=2",  # no credential: unchanged
    }
    for text, masked in cases.items():
        assert mask_credentials(text) == masked
        assert (url_secret(text) is None) == (text == masked)
    assert mask_in({"a": [f"http://u:{secret}@h/"], "n": 3}) == {"a": ["http://***@h/"], "n": 3}


def test_log_records_and_the_model_card_are_masked(caplog: pytest.LogCaptureFixture) -> None:
    install_log_redaction()
    with caplog.at_level(logging.INFO, logger="botocore.test"):
        logging.getLogger("botocore.test").info("GET %s failed", f"http://admin:{SECRET_IN_URL}@minio:9000/b")
    assert SECRET_IN_URL not in caplog.text and "http://***@minio:9000/b" in caplog.text
    report = {"version": "v1", "method": "task_arithmetic", "params": {}, "scale": 1.0,
              "inputs": {"base": {"url": f"https://h/b?sig={SECRET_IN_URL}", "fingerprint": "f0"},
                         "experts": [{"url": f"s3://k:{SECRET_IN_URL}@b/e", "fingerprint": "f1"}]},
              "routing": {"include": [], "exclude": [], "keep_base": [], "counts": {}}, "diagnostics": {},
              "evaluations": {}, "warnings": [], "output_dtype": "auto"}
    card = render_card(report, {"base_model": f"https://h/b?sig={SECRET_IN_URL}"})
    assert SECRET_IN_URL not in card and "sig=***" in card


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


@pytest.mark.faults
@pytest.mark.slow
def test_no_credential_is_written_anywhere_by_merge_sweep_plan_or_a_failing_merge(
    s3_bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "prefect-home"
    monkeypatch.setenv("PREFECT_HOME", str(home))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    server = PrefectServer()
    api = server.start()
    base, experts = write_synthetic_models(f"{s3_bucket.url}/in", 2, MODEL, storage_options=s3_bucket.storage_options)
    config: dict[str, Any] = {"base": base, "experts": experts, "output": f"{s3_bucket.url}/out", "device": "cpu",
              "workers": 1,
              "storage_options": {"endpoint_url": s3_bucket.endpoint_url, "key": "testing",
                                  "secret": SECRET_IN_CONFIG}}
    good = tmp_path / "merge.yaml"
    good.write_text(yaml.safe_dump(config))
    unreachable = {**config, "storage_options": {**config["storage_options"],
                                                 "endpoint_url": "http://127.0.0.1:9"},
                   "storage_retry": {"attempts": 1, "connect_timeout_s": 1, "read_timeout_s": 1}}
    bad = tmp_path / "unreachable.yaml"
    bad.write_text(yaml.safe_dump(unreachable))
    in_url = {**config, "storage_options": {**config["storage_options"],
                                            "endpoint_url": f"http://admin:{SECRET_IN_URL}@127.0.0.1:9"}}
    refused = tmp_path / "secret-in-url.yaml"
    refused.write_text(yaml.safe_dump(in_url))
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_HOME": str(home), "PREFECT_LOGGING_LEVEL": "DEBUG",
           "AWS_SECRET_ACCESS_KEY": SECRET_IN_ENV, "AWS_ACCESS_KEY_ID": "testing"}
    logs = tmp_path / "logs"
    logs.mkdir()
    commands = {"merge": ["merge", str(good), "-v"], "sweep": ["sweep", str(good), "--grid", "scale=0.5,1.0"],
                "plan": ["plan", str(good)], "failing": ["merge", str(bad), "-v"],
                "url-secret": ["merge", str(refused), "-v"]}
    try:
        for name, args in commands.items():
            done = subprocess.run([sys.executable, "-m", "swudi.cli", *args], env=env, capture_output=True,
                                  timeout=600)
            (logs / f"{name}.out").write_bytes(done.stdout + done.stderr)
            assert done.returncode == (2 if name in ("failing", "url-secret") else 0), (name, done.stderr[-3000:])
    finally:
        server.stop()
    stored = tmp_path / "bucket"
    s3_bucket.fs.get(f"{s3_bucket.name}/out", str(stored), recursive=True)
    searched = _files(stored) + _files(home) + _files(logs)
    assert any(p.name.endswith(".db") for p in searched), "the Prefect database was not found"
    assert any(p.name == "sweep.json" for p in searched) and any(p.name == "merge_report.json" for p in searched)
    leaks = [(str(p), s) for p in searched for s in SECRETS if s.encode() in p.read_bytes()]
    assert SECRET_IN_CONFIG.encode() in good.read_bytes()  # the search finds what is there (the config holds it)
    print(f"leak search: {len(searched)} files, {sum(p.stat().st_size for p in searched)} bytes, "
          f"{len(SECRETS)} secrets, leaks: {leaks}")
    assert not leaks

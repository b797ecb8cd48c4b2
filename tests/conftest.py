"""Shared pytest fixtures.

S3 tests talk to a real S3-compatible HTTP server: moto in server mode on 127.0.0.1 (random port),
started once per session. Each test that asks for `s3_bucket` gets a fresh, empty bucket.
`store` runs a test twice, on a local folder and on an S3 prefix.
Builders of tiny safetensors checkpoints live in `tests/helpers/builders.py`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

# Never let tests reach real AWS credentials or a model hub.
_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "SWUDI_LOCAL_PREFECT_API": "",  # never a developer's own Prefect server on port 4200
}
os.environ.update(_TEST_ENV)


# ------------------------------------------------------------------------------------------- S3
@dataclass(frozen=True)
class S3Bucket:
    """A fresh bucket on the session's moto server."""

    name: str
    endpoint_url: str
    storage_options: dict[str, Any] = field(repr=False)
    fs: Any = field(repr=False, compare=False)  # s3fs filesystem for direct inspection (no caches)

    @property
    def url(self) -> str:
        return f"s3://{self.name}"


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """Endpoint URL (http://127.0.0.1:PORT) of a moto S3 server living for the whole session."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one INFO line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="session")
def _moto_fs(moto_server: str):
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=moto_server, key="testing", secret="testing",
                             skip_instance_cache=True, use_listings_cache=False)


@pytest.fixture
def s3_bucket(moto_server: str, _moto_fs, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Bucket]:
    """A fresh empty bucket; `storage_options` are what a swudi config would pass to s3fs."""
    # A client built without these storage options hits a closed local port (fails at once)
    # instead of trying AWS.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    options = {"endpoint_url": moto_server, "key": "testing", "secret": "testing"}
    bucket = S3Bucket(f"swudi-test-{uuid.uuid4().hex[:12]}", moto_server, options, _moto_fs)
    _moto_fs.call_s3("create_bucket", Bucket=bucket.name)
    yield bucket
    with contextlib.suppress(Exception):  # cleanup only: free moto's memory (some tests store hundreds of MB)
        _moto_fs.rm(bucket.name, recursive=True)


# -------------------------------------------------------------------------------- local or S3
@dataclass(frozen=True)
class Store:
    """A root URL to read and write under, local or S3, with its storage options."""

    kind: str  # "local" | "s3"
    root: str
    storage_options: dict[str, Any] | None = None

    def url(self, *parts: str) -> str:
        from swudi.storage.filesystem import join_url

        return join_url(self.root, *parts)

    def fs(self):
        from swudi.storage.filesystem import resolve

        return resolve(self.root, self.storage_options)[0]


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path) -> Store:
    """Run the test on a local folder and on an S3 prefix."""
    if request.param == "local":
        root = tmp_path / "store"
        root.mkdir()
        return Store("local", str(root))
    bucket: S3Bucket = request.getfixturevalue("s3_bucket")
    return Store("s3", f"{bucket.url}/store", dict(bucket.storage_options))


# ------------------------------------------------------------------------------------- Prefect
@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prefect API (a server subprocess on SQLite in a temporary PREFECT_HOME) for the session.

    Started by swudi's own embedded-server code (`flows/server.py`: waits up to 600 s,
    where Prefect's test harness gives up after 90 s, which a loaded 2-core machine exceeds).
    Yields its URL; subprocesses that should report to the same API get it as PREFECT_API_URL.
    """
    home = tmp_path_factory.mktemp("prefect-home")
    os.environ.update({
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        "PREFECT_LOGGING_LEVEL": "WARNING",
    })
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.server import PrefectServer

    server = PrefectServer()
    url = server.start()
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
            _drain_prefect_workers()  # logs and events reach the server before it stops
    finally:
        server.stop()


def _drain_prefect_workers() -> None:
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for drain in (lambda: APILogWorker.drain_all(timeout=30), EventsWorker.drain_all):
        with contextlib.suppress(Exception):  # best effort at the end of the session
            drain()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Stop any Prefect ephemeral server still running in this process.

    Tests use the session's `prefect_api`. If some code path falls back to Prefect's own ephemeral
    server instead, Prefect stops it at interpreter exit. That hook logs to a console pytest has
    already closed, and in one full run (2026-11-28) the server was left orphaned. So it is stopped
    here, while the streams are open, and reported so the test that started it can be found.
    """
    try:
        from prefect.server.api.server import SubprocessASGIServer
    except ImportError:
        return
    for server in list(SubprocessASGIServer._instances.values()):
        if getattr(server, "server_process", None) is not None:
            print(f"\nconftest: stopping a Prefect ephemeral server left running on port {server.port}")
            try:
                server.stop()
            except Exception as error:  # noqa: BLE001 - best effort at the end of the session
                print(f"conftest: could not stop it: {error}")


# ------------------------------------------------------------------------------- the faults lane
LANE_MARKERS = ("faults",)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("swudi lanes")
    group.addoption(
        "--lane-sample",
        type=int,
        default=None,
        help="run only this many tests of the long lanes (marker 'faults'), drawn with --lane-seed; "
        "the other lane tests are deselected. Default: all that -m selects",
    )
    group.addoption(
        "--lane-seed",
        default=None,
        help="seed of the --lane-sample draw (default: $SWUDI_LANE_SEED, else today's UTC date, so that each "
        "day's CI runs another sample and a failing draw can be rerun with the seed it printed)",
    )


def _lane_seed(config: pytest.Config) -> str:
    import datetime

    return str(
        config.getoption("--lane-seed")
        or os.environ.get("SWUDI_LANE_SEED")
        or datetime.datetime.now(datetime.UTC).strftime("%Y%m%d")
    )


def lane_sample(nodeids: list[str], k: int, seed: str) -> list[str]:
    """``k`` of ``nodeids``, drawn by ``random.Random(seed)`` from the sorted ids (independent of the
    collection order, so a seed names the same tests on every machine)."""
    import random

    ids = sorted(nodeids)
    return sorted(random.Random(seed).sample(ids, min(k, len(ids))))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    k = config.getoption("--lane-sample")
    if k is None:
        return
    lane = [item for item in items if any(item.get_closest_marker(m) for m in LANE_MARKERS)]
    seed = _lane_seed(config)
    chosen = set(lane_sample([item.nodeid for item in lane], k, seed))
    dropped = [item for item in lane if item.nodeid not in chosen]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if item not in dropped]
    config._swudi_lane_note = (  # type: ignore[attr-defined]
        f"lane sample: {len(chosen)} of {len(lane)} lane tests, seed {seed} "
        f"(rerun: --lane-sample {k} --lane-seed {seed}): " + ", ".join(sorted(chosen))
    )


def pytest_report_collectionfinish(config: pytest.Config) -> str | None:
    return getattr(config, "_swudi_lane_note", None)

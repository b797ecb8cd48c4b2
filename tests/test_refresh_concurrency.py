"""Refreshes of one output started at the same moment (threads; local folder and S3 via moto).

The refresh lock makes the second wait for the first and then check again: it finds the version
already published (same inputs) or publishes its own on top (different settings); the output holds
complete versions only and `latest` names one of them.
"""

from __future__ import annotations

import contextvars
import threading
from typing import Any

import pytest

import flows.refresh as refresh_module
from flows.refresh import refresh, refresh_lock_url
from swudi.io.synthetic import SyntheticModel, write_synthetic_models
from swudi.publish.versions import is_version_complete, list_versions, read_latest
from swudi.storage.lock import acquire_lock, read_lock, release_lock

MODEL = SyntheticModel(layers=1, hidden=16, intermediate=32, vocab=16, positions=8)


def _config(root: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    base, experts = write_synthetic_models(f"{root}/in", 2, MODEL, storage_options=storage_options)
    return {"base": base, "experts": experts, "output": f"{root}/out", "method": "swudi", "device": "cpu",
            "workers": 1, "storage_options": storage_options or {}}


def _at_once(monkeypatch: pytest.MonkeyPatch, *configs: dict[str, Any]) -> list[dict[str, Any]]:
    """Run one refresh per config in its own thread; all reach the refresh lock at the same moment.

    Flow runs start with a skew of a second or more, longer than some of these merges: the barrier
    sits inside the flows, just before the lock, so that without the lock they would overlap.
    """
    barrier = threading.Barrier(len(configs))
    results: list[Any] = [None] * len(configs)
    resolve = refresh_module.resolve_config

    def resolve_together(*args: Any, **kwargs: Any) -> Any:
        barrier.wait(timeout=120)
        return resolve(*args, **kwargs)

    monkeypatch.setattr(refresh_module, "resolve_config", resolve_together)

    def work(i: int) -> None:
        try:
            results[i] = refresh(configs[i])
        except BaseException as error:  # noqa: BLE001 - reported below
            results[i] = error

    # Each thread runs in a copy of this context: Prefect's settings (the session's PREFECT_API_URL) live
    # in a context variable, which a new thread does not inherit; without it a flow run there starts
    # Prefect's own ephemeral server (seen: a timeout under load, and an orphaned server at exit).
    threads = [
        threading.Thread(target=contextvars.copy_context().run, args=(work, i)) for i in range(len(configs))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in threads), "a refresh did not finish"
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


def _assert_clean_output(config: dict[str, Any]) -> list[str]:
    """Every version folder is complete, latest names one, no lock is left behind."""
    out, options = config["output"], config["storage_options"]
    folders = list_versions(out, options, include_incomplete=True)
    assert folders and all(v["complete"] and is_version_complete(out, v["version"], options) for v in folders)
    assert read_latest(out, options)["version"] in {v["version"] for v in folders}
    assert read_lock(out, options) is None and read_lock(refresh_lock_url(out), options) is None
    return [v["version"] for v in folders]


@pytest.mark.slow
def test_same_inputs_at_once_one_publishes_the_other_finds_it_published(prefect_api: str, store,
                                                                         monkeypatch) -> None:
    config = _config(store.root, store.storage_options)
    results = _at_once(monkeypatch, config, config)
    assert sorted(r["status"] for r in results) == ["published", "unchanged"], results
    published, unchanged = sorted(results, key=lambda r: r["status"])
    assert published["previous"] is None and unchanged["previous"] == published["version"]
    assert unchanged["version"] == published["version"]
    assert _assert_clean_output(config) == [published["version"]]


@pytest.mark.slow
def test_different_settings_at_once_publish_one_after_the_other(prefect_api: str, tmp_path,
                                                               monkeypatch) -> None:
    config = _config(str(tmp_path))
    results = _at_once(monkeypatch, {**config, "params": {"t": 100.0}}, {**config, "params": {"t": 200.0}})
    assert [r["status"] for r in results] == ["published", "published"]
    first, second = sorted(results, key=lambda r: r["previous"] is not None)
    # The second checked only after the first had published: it saw the first's version as latest.
    assert first["previous"] is None and second["previous"] == first["version"] != second["version"]
    assert read_latest(config["output"])["version"] == second["version"]
    assert sorted(_assert_clean_output(config)) == sorted([first["version"], second["version"]])


def test_refresh_gives_up_cleanly_when_another_holds_the_output_too_long(prefect_api: str, tmp_path) -> None:
    config = _config(str(tmp_path))
    held = acquire_lock(refresh_lock_url(config["output"]), owner="another refresh")
    try:
        state = refresh(config, wait_s=1.0, return_state=True)
    finally:
        release_lock(held)
    assert state.is_failed()
    with pytest.raises(Exception, match="locked by another refresh"):
        state.result()
    assert read_latest(config["output"]) is None and list_versions(config["output"], include_incomplete=True) == []


def test_the_refresh_lock_is_the_output_lock_lease_and_notices_a_takeover(tmp_path) -> None:
    """The refresh lock is `swudi.storage.lock.output_lock` on OUTPUT/.refresh: renewed by its heartbeat
    (the document's expiry moves), and a takeover is noticed (`lock.check()` raises), so a refresh whose
    lock another run took never goes on to merge."""
    import time

    from flows.refresh import refresh_lock
    from swudi.config.merge_config import config_from_mapping
    from swudi.errors import PublishError

    cfg = config_from_mapping(_config(str(tmp_path)), "test")
    url = refresh_lock_url(cfg.output)
    with refresh_lock(cfg, "first refresh", wait_s=0, ttl_s=0.6) as (lock, waited):
        assert waited < 5 and read_lock(url)["owner"] == "first refresh"
        first_expiry = read_lock(url)["expires_at"]
        time.sleep(0.5)  # the heartbeat renews every ttl / 3 = 0.2 s
        assert read_lock(url)["expires_at"] > first_expiry
        lock.check()  # still ours
        release_lock(lock)  # as if its lease had run out and another refresh took it over
        other = acquire_lock(url, owner="second refresh", ttl_s=60)
        deadline = time.monotonic() + 10
        while not lock.lost.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(PublishError, match="lost"):
            lock.check()
    assert read_lock(url)["owner"] == "second refresh"  # the first one's exit left the new holder's lock
    release_lock(other)
    assert read_lock(url) is None

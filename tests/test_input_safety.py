"""Inputs that must be accepted, and the behaviour around refusals (issue 14, input half):
Hugging Face cache snapshots open, retention never prunes a version a running merge reads, input
errors are not retried, a method switch on the command line drops the file's params, evaluators are
part of a version's identity, `swudi report` works without matplotlib, TIES conventions are options,
and a full disk is one line with exit code 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from swudi.cli.app import app
from swudi.config.merge_config import EvaluatorConfig, config_from_mapping, load_config
from swudi.core.baselines import ties
from swudi.errors import CheckpointError, ConfigError, InputError, is_input_error
from swudi.io.checkpoint import Checkpoint
from swudi.io.writer import copy_extra_files, files_to_copy
from swudi.pipeline.plan import build_plan, version_id
from swudi.publish.readers import READERS, hold_versions, input_versions, read_versions, release_versions
from swudi.publish.versions import prune_versions, publish_version, read_latest
from swudi.storage.filesystem import resolve
from tests.helpers.builders import tiny_state_dict, write_reference, write_reference_checkpoint


def _models(root: Path, n: int = 2) -> tuple[str, list[str]]:
    base = tiny_state_dict(0)
    write_reference_checkpoint(str(root / "base"), base, extra_files={"config.json": b"{}"})
    experts = []
    for i in range(n):
        g = torch.Generator().manual_seed(i + 1)
        write_reference_checkpoint(str(root / f"expert-{i}"),
                                   {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()})
        experts.append(str(root / f"expert-{i}"))
    return str(root / "base"), experts


# ------------------------------------------------------------------------ Hugging Face hub cache
def _hub_snapshot(root: Path, tensors: dict[str, torch.Tensor], sharded: bool = False) -> Path:
    """``models--org--name/{blobs,snapshots/<sha>}`` as huggingface_hub lays it out: files are
    relative symbolic links into ../../blobs/."""
    repo = root / "models--org--name"
    staging = root / "staging"
    write_reference_checkpoint(str(staging), tensors,
                               shards=[list(tensors)[:3], list(tensors)[3:]] if sharded else None,
                               extra_files={"config.json": b'{"model_type": "bert"}'})
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted(staging.iterdir())):
        blob = repo / "blobs" / f"{i:040x}"
        shutil.move(file, blob)
        os.symlink(os.path.join("..", "..", "blobs", blob.name), snapshot / file.name)
    staging.rmdir()
    return snapshot


@pytest.mark.parametrize("sharded", [False, True])
def test_hub_cache_snapshot_opens_from_any_working_directory(tmp_path: Path, sharded: bool,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    tensors = tiny_state_dict(3)
    snapshot = _hub_snapshot(tmp_path, tensors, sharded)
    monkeypatch.chdir(tmp_path)  # fsspec resolved relative links against the working directory
    ckpt = Checkpoint.open(str(snapshot))
    assert set(ckpt.tensors) == set(tensors) and "config.json" in ckpt.extra_files
    for name, value in tensors.items():
        assert torch.equal(ckpt.read(name), value)


def test_hub_snapshot_as_base_plans_and_a_broken_link_is_named(tmp_path: Path) -> None:
    snapshot = _hub_snapshot(tmp_path, tiny_state_dict(0))
    _, experts = _models(tmp_path / "in")
    cfg = config_from_mapping({"base": str(snapshot), "experts": experts, "output": str(tmp_path / "out")})
    assert len(build_plan(cfg).jobs) == len(tiny_state_dict(0))
    (snapshot / "model.safetensors").unlink()
    os.symlink("../../blobs/missing", snapshot / "model.safetensors")
    with pytest.raises(CheckpointError, match="broken symbolic link"):
        Checkpoint.open(str(snapshot))


def test_index_escapes_are_still_refused_in_a_linked_folder(tmp_path: Path) -> None:
    tensors = tiny_state_dict(1)
    snapshot = _hub_snapshot(tmp_path, tensors, sharded=True)
    index = snapshot / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    doc["weight_map"] = {name: "../../blobs/" + os.readlink(snapshot / shard).rsplit("/", 1)[-1]
                         for name, shard in doc["weight_map"].items()}
    index.unlink()
    index.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=r"'\.\.'"):
        Checkpoint.open(str(snapshot))


# ----------------------------------------------------------------------------- retention vs readers
def resolve_path(url: str, options) -> str:
    return resolve(url, options)[1]


def _publish_copy(output: Path, version: str, source: str) -> None:
    def write_files(url: str) -> None:
        shutil.copytree(source, url, dirs_exist_ok=True)

    publish_version(str(output), version, write_files)


def test_reader_lease_keeps_a_version_from_pruning_until_released(store) -> None:
    out, options = store.url("out"), store.storage_options
    for version in ("v1", "v2", "v3"):
        publish_version(out, version, lambda url: write_reference(f"{url}/model.safetensors", tiny_state_dict(0),
                                                                  storage_options=options), storage_options=options)
    held = input_versions([store.url("out", "versions", "v1") + "/"], options)
    assert held == [(store.url("out"), "v1")]
    hold_versions(held, "run-a", options)
    assert prune_versions(out, 1, options) == ["v2"]  # v1 is read by run-a, v3 is latest
    assert store.fs().exists(resolve_path(store.url("out", "versions", "v1", "model.safetensors"), options))
    release_versions(held, "run-a", options)
    assert read_versions(out, options) == set()
    assert prune_versions(out, 1, options) == ["v1"]


def test_merge_whose_base_is_an_earlier_version_keeps_it(prefect_api: str, tmp_path: Path) -> None:
    from flows.merge import run_merge

    base, experts = _models(tmp_path / "in")
    out = tmp_path / "out"
    _publish_copy(out, "old", base)
    old = out / "versions" / "old"
    cfg = config_from_mapping({"base": str(old), "experts": experts, "output": str(out), "keep_versions": 1,
                               "workers": 1})
    result = run_merge(cfg)
    assert read_latest(str(out))["version"] == result["version"] != "old"
    assert (old / "model.safetensors").exists(), "retention pruned the base of the merge that read it"
    assert not any((out / READERS).iterdir())  # released after publishing
    # the no-op check of `swudi merge`: this config is up to date, the same one with an evaluator is not
    from swudi.cli.app import published_version

    assert published_version(cfg)["version"] == result["version"]
    evaluated = cfg.model_copy(update={"evaluators": [EvaluatorConfig(function="json:dumps")]})
    assert published_version(evaluated) is None
    assert prune_versions(str(out), 1) == ["old"]  # no longer read: retention applies again


def test_inputs_elsewhere_under_the_output_are_accepted(tmp_path: Path) -> None:
    base, experts = _models(tmp_path / "bucket" / "models")
    cfg = config_from_mapping({"base": base, "experts": experts, "output": str(tmp_path / "bucket")})
    assert cfg.base == base  # merges write versions/, sweeps/, latest.json and dot-files only
    shutil.copytree(base, tmp_path / "bucket" / "sweeps" / "copy")
    with pytest.raises(ConfigError, match="where merges write"):
        config_from_mapping({"base": str(tmp_path / "bucket" / "sweeps" / "copy"), "experts": experts,
                             "output": str(tmp_path / "bucket")})


# -------------------------------------------------------------------------------- no retry
def test_input_errors_are_not_retried_faults_are(prefect_api: str) -> None:
    from prefect import flow, task

    from tasks.retry import retry_unless_input_error

    calls: list[str] = []

    @task(retries=2, retry_condition_fn=retry_unless_input_error, persist_result=False)
    def fails(kind: str) -> None:
        calls.append(kind)
        if kind == "input":
            raise InputError("weight 'w': non-finite values")
        raise ConnectionResetError("reset by peer")

    @flow
    def run(kind: str) -> None:
        fails(kind)  # type: ignore[unused-coroutine]  # a sync task: Prefect's overloads include the async case

    for kind, attempts in (("input", 1), ("fault", 3)):
        with pytest.raises((InputError, ConnectionResetError)):
            run(kind)
        assert calls.count(kind) == attempts, calls


def test_every_retried_task_skips_input_errors() -> None:
    import flows.refresh
    import tasks
    from tasks.retry import retry_unless_input_error

    found = [getattr(tasks, name) for name in tasks.__all__] + [flows.refresh.detect_changes]
    retried = [t for t in found if t.retries]
    assert retried and all(t.retry_condition_fn is retry_unless_input_error for t in retried)


def test_which_errors_are_input_errors() -> None:
    import errno

    assert is_input_error(ConfigError("x")) and is_input_error(InputError("x"))
    assert is_input_error(OSError(errno.ENOSPC, "No space left on device"))
    assert is_input_error(PermissionError("denied"))
    assert is_input_error(CheckpointError("file not found"))
    wrapped = CheckpointError("cannot read header")
    wrapped.__cause__ = ConnectionResetError()
    assert not is_input_error(wrapped) and not is_input_error(TimeoutError())


# ------------------------------------------------------------------------------ method switch
def test_readme_override_example_switches_method_and_drops_file_params(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    base, experts = _models(tmp_path / "in")
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump({"base": base, "experts": experts, "output": str(tmp_path / "out"),
                                    "method": "swudi_a", "params": {"rank_rule": "participation_sqrt"}}))
    cfg = load_config(path, ["method=swudi", "params.t=300", "scale=0.5"])
    assert cfg.method == "swudi" and cfg.params == {"t": 300.0, "rank_ratio": 0.65, "init": "sum"}
    assert "rank_rule" in caplog.text and "dropped" in caplog.text
    assert load_config(path, ["params.min_rank=2"]).params["rank_rule"] == "participation_sqrt"  # same method: kept
    result = CliRunner().invoke(app, ["plan", str(path), "--method", "swudi", "--set", "params.t=300",
                                      "--set", "scale=0.5"])
    assert result.exit_code == 0, result.output
    assert "'t': 300.0" in result.output


def test_sweep_grid_value_that_is_not_yaml_is_one_line(tmp_path: Path) -> None:
    base, experts = _models(tmp_path / "in")
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump({"base": base, "experts": experts, "output": str(tmp_path / "out")}))
    for grid, expect in (("params.t=[1,", "--grid"), ("scale=1,.nan", "finite")):
        result = CliRunner().invoke(app, ["sweep", str(path), "--grid", grid])
        assert result.exit_code == 2 and expect in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------ evaluators and identity
def test_adding_an_evaluator_changes_the_version(tmp_path: Path) -> None:
    base, experts = _models(tmp_path / "in")
    data = {"base": base, "experts": experts, "output": str(tmp_path / "out")}
    plain = config_from_mapping(data)
    plan = build_plan(plain)
    with_eval = config_from_mapping({**data, "evaluators": [{"function": "mypkg.eval:run"}]})
    other = config_from_mapping({**data, "evaluators": [{"function": "mypkg.eval:run", "options": {"n": 2}}]})
    ids = {version_id(plain, plan), version_id(with_eval, plan), version_id(other, plan)}
    assert len(ids) == 3
    assert version_id(plain, plan) == version_id(config_from_mapping(data), plan)


# ------------------------------------------------------------------------ report without plots
def test_report_without_matplotlib_writes_tables_and_one_note(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "version"
    run.mkdir()
    (run / "merge_report.json").write_text(json.dumps({
        "version": "v1", "method": "swudi_a", "params": {},
        "diagnostics": {"mean_rank": 2.0, "mean_kept_mass": 0.9, "mean_interference_vs_sum": 0.5, "per_layer": {}}}))
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an environment without the extra does
    result = CliRunner().invoke(app, ["report", str(run), "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    assert "plots skipped" in result.output and "matplotlib" in result.output
    assert (tmp_path / "report" / "summary.md").exists()
    assert not list((tmp_path / "report").glob("*.png"))


# ------------------------------------------------------------------------------- TIES conventions
def test_ties_conventions_at_the_threshold_zero_sign_and_empty_trim() -> None:
    tv = torch.tensor([[1.0, 1.0, 1.0, -0.5], [-1.0, 0.2, 0.1, 0.5]])
    # density 0.5 -> k = 2; task 0 has three entries tied at the threshold 1.0
    exact = ties(tv, 0.5)  # keeps entries 0 and 1 of task 0 (index order), 0 and 3 of task 1
    keep = ties(tv, 0.5, trim="keep_tied")  # keeps 0, 1, 2 of task 0
    assert torch.equal(exact, torch.tensor([0.0, 1.0, 0.0, 0.5]))  # entry 0: 1 + -1 = 0 -> no sign
    assert torch.equal(keep, torch.tensor([0.0, 1.0, 1.0, 0.5]))
    positive = ties(tv, 0.5, zero_sign="positive")  # mergekit: a zero sum elects +
    assert torch.equal(positive, torch.tensor([1.0, 1.0, 0.0, 0.5]))
    small = torch.tensor([[0.3, -2.0, 0.1], [0.2, 0.4, -0.1]])  # density 0.2 of 3 entries -> k = 0
    assert torch.equal(ties(small, 0.2), torch.tensor([0.0, -2.0, 0.0]))  # keep_one: the largest of each
    assert torch.equal(ties(small, 0.2, empty_trim="base"), torch.zeros(3))
    with pytest.raises(InputError, match="keeps no entry"):
        ties(small, 0.2, empty_trim="error")


def test_ties_options_are_validated_in_the_config(tmp_path: Path) -> None:
    base, experts = _models(tmp_path / "in")
    data = {"base": base, "experts": experts, "output": str(tmp_path / "out"), "method": "ties"}
    assert config_from_mapping({**data, "params": {"trim": "keep_tied"}}).params["trim"] == "keep_tied"
    with pytest.raises(ConfigError, match="zero_sign"):
        config_from_mapping({**data, "params": {"zero_sign": "negative"}})


# ------------------------------------------------------------------------------------ full disk
def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True, check=False)
    return probe.returncode == 0


@pytest.mark.faults
@pytest.mark.slow
@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs user namespaces to mount a small tmpfs")
def test_full_disk_for_the_work_folder_is_one_line(tmp_path: Path) -> None:
    base, experts = _models(tmp_path / "in")
    full = tmp_path / "full"
    full.mkdir()
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump({"base": base, "experts": experts, "output": str(tmp_path / "out"),
                                      "work_dir": str(full / "work"), "workers": 1}))
    swudi = Path(sys.executable).with_name("swudi")
    env = {**os.environ, "PREFECT_API_URL": ""}
    env.pop("PREFECT_API_URL")
    script = f"mount -t tmpfs -o size=8k tmpfs {full} && exec {swudi} merge {config}"
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=env,
                            timeout=300, check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "no space left" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "latest.json").exists()


# ------------------------------------------------------------- what a version gets from its base
def test_a_hub_snapshot_linking_into_another_repository_is_refused_and_shards_may_be_linked(tmp_path: Path) -> None:
    """Links into the same repository's blobs are the hub cache's layout; into another one's, not.
    A weight shard (only read, never copied) may be linked from anywhere."""
    snapshot = _hub_snapshot(tmp_path, tiny_state_dict(0))
    _, experts = _models(tmp_path / "in")
    other = tmp_path / "models--evil--repo" / "blobs"
    other.mkdir(parents=True)
    (other / "deadbeef").write_text('{"x": "PRIVATE"}')
    os.symlink(os.path.join("..", "..", "..", "models--evil--repo", "blobs", "deadbeef"),
               snapshot / "tokenizer_config.json")
    cfg = config_from_mapping({"base": str(snapshot), "experts": experts, "output": str(tmp_path / "out")})
    with pytest.raises(CheckpointError, match=r"tokenizer_config\.json: symbolic link to .*outside the checkpoint"):
        build_plan(cfg)
    (snapshot / "tokenizer_config.json").unlink()
    assert "config.json" in build_plan(cfg).extra_files
    # a base whose weights are a link to a file elsewhere: planned
    linked = tmp_path / "linked-base"
    linked.mkdir()
    os.symlink(snapshot / "model.safetensors", linked / "model.safetensors")
    cfg = config_from_mapping({"base": str(linked), "experts": experts, "output": str(tmp_path / "out2")})
    assert len(build_plan(cfg).jobs) == len(tiny_state_dict(0))


def test_only_the_architecture_files_of_a_base_are_copied_never_the_products_own(tmp_path: Path) -> None:
    """A published adapter-merge version used as a base holds swudi's own files; a folder may hold
    notes and scripts: none is copied. Config, tokenizer and sentence-transformers settings are."""
    base = tmp_path / "base"
    files = {"config.json": b"{}", "tokenizer.json": b"{}", "special_tokens_map.json": b"{}",
             "modules.json": b"[]", "swudi_version.json": b"{}", "merge_report.json": b"{}",
             "notes.txt": b"private notes", "run.sh": b"rm -rf /"}
    write_reference_checkpoint(str(base), tiny_state_dict(0), extra_files=files)
    for sub, name, data in [("adapter", "adapter_config.json", b'{"r": 4}'), ("1_Pooling", "config.json", b"{}")]:
        (base / sub).mkdir()
        (base / sub / name).write_bytes(data)
    (base / "README.md").write_text("# the base's card")
    ckpt = Checkpoint.open(str(base))
    expected = ["1_Pooling/config.json", "config.json", "modules.json", "special_tokens_map.json", "tokenizer.json"]
    assert sorted(files_to_copy(ckpt)) == expected
    copied = copy_extra_files(ckpt, str(tmp_path / "dst"))
    assert sorted(copied) == expected
    written = (tmp_path / "dst").rglob("*")
    assert sorted(str(p.relative_to(tmp_path / "dst")) for p in written if p.is_file()) == expected

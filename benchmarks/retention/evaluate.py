"""Accuracy of an encoder (base, expert or merged) on the benchmark tasks, with each task's own head.

``encoder`` may be a Hugging Face folder, a pipeline output folder (``OUTPUT/latest.json`` ->
``OUTPUT/versions/<id>/``), or an fsspec URL of either (``s3://...``, ``memory://...``), which is
copied to a temporary local folder first. A folder without tokenizer files (merged outputs need not
carry one) uses the tokenizer of the build's ``base/`` beside ``heads/``.

For the pipeline's user-evaluator hook: ``benchmarks.retention.evaluate:evaluate``.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch

from benchmarks.aggregate import mean_over_tasks

from . import data as data_mod
from .model import Head, accuracy, has_tokenizer, load_encoder, quiet_transformers

DEFAULT_BUILD = Path(__file__).resolve().parents[1] / ".cache" / "retention"
ENV_BUILD = "SWUDI_RETENTION_DIR"  # build folder used when no heads_dir is given


def default_heads_dir() -> Path:
    return Path(os.environ.get(ENV_BUILD, DEFAULT_BUILD)) / "heads"


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _resolve_latest(fs, root: str) -> str:
    """Follow ``latest.json`` (``{"path": "versions/<id>", ...}``) when ``root`` is an output folder."""
    pointer = root.rstrip("/") + "/latest.json"
    if fs.exists(pointer):
        with fs.open(pointer, "r") as f:
            rel = json.load(f).get("path")
        if not rel:
            raise ValueError(f"{pointer} has no 'path' entry")
        return root.rstrip("/") + "/" + rel.strip("/")
    return root


@contextlib.contextmanager
def local_model_dir(location: str | os.PathLike, storage_options: Mapping | None = None) -> Iterator[Path]:
    """A local folder holding the model at ``location`` (see the module docstring)."""
    import fsspec

    url = os.fspath(location)
    fs, root = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    folder = _resolve_latest(fs, root)
    if not fs.exists(folder.rstrip("/") + "/config.json"):
        raise FileNotFoundError(
            f"{url}: no config.json at {folder} (expected a Hugging Face "
            "model folder or a pipeline output with latest.json)"
        )
    if _is_local(url):
        yield Path(folder)
        return
    with tempfile.TemporaryDirectory(prefix="swudi-eval-") as tmp:
        for remote in fs.find(folder):
            rel = remote[len(folder.rstrip("/")) + 1 :]
            if rel.endswith(".safetensors") or rel.endswith(".json") or rel.endswith(".txt"):
                (Path(tmp) / rel).parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(remote, str(Path(tmp) / rel))
        yield Path(tmp)


def available_tasks(heads_dir: str | Path) -> list[str]:
    heads_dir = Path(heads_dir)
    return sorted(p.name.removesuffix(".safetensors") for p in heads_dir.glob("*.safetensors"))


def evaluate_encoder(
    encoder: str | os.PathLike,
    heads_dir: str | os.PathLike,
    tasks: Sequence[str] | None = None,
    split: str = "test",
    *,
    max_examples: int | None = None,
    batch_size: int = 64,
    storage_options: Mapping | None = None,
    seed: int | None = None,
) -> dict[str, dict[str, float]]:
    """``{task: {"accuracy": a}}`` of ``encoder`` + each task's head on ``split``.

    ``tasks`` defaults to every head in ``heads_dir``; ``max_examples`` takes the first examples of
    the split (the same ones every time). The data are rebuilt from the Debian files with the seed
    the head was trained with, and their fingerprint must match the head's.
    """
    heads_dir = Path(heads_dir)
    tasks = list(tasks) if tasks is not None else available_tasks(heads_dir)
    if not tasks:
        raise FileNotFoundError(
            f"no heads in {heads_dir}: build the experts first (python -m benchmarks.retention.build_experts --out DIR)"
        )
    heads = {t: Head.load(heads_dir / f"{t}.safetensors") for t in tasks}
    results = {}
    with local_model_dir(encoder, storage_options) as folder:
        tok = None if has_tokenizer(folder) else heads_dir.parent / "base"
        model, tokenizer = load_encoder(folder, tok)
        for task, head in heads.items():
            d = data_mod.load_task(task, seed=int(head.meta.get("seed", 0)) if seed is None else seed)
            if head.meta.get("data_fingerprint", d.fingerprint) != d.fingerprint:
                raise ValueError(
                    f"task {task}: the data differ from those the head {heads_dir / task}.safetensors "
                    f"was trained on (fingerprint {d.fingerprint} != {head.meta['data_fingerprint']}): "
                    "other Debian package versions? Rebuild the experts."
                )
            if tuple(head.labels) != d.label_names:
                raise ValueError(f"task {task}: head labels {head.labels} != data labels {d.label_names}")
            s = d.split(split)
            n = len(s) if max_examples is None else min(len(s), max_examples)
            acc = accuracy(model, tokenizer, head, s.texts[:n], s.labels[:n], batch_size=batch_size)
            results[task] = {"accuracy": acc, "n": float(n)}
    return results


def normalized_accuracy(
    merged: Mapping[str, Mapping[str, float] | float], experts: Mapping[str, Mapping[str, float] | float]
) -> dict:
    """``{"per_task": {task: merged / expert}, "mean": average over tasks}`` (retention).

    Accepts ``evaluate_encoder`` results or plain ``{task: accuracy}`` maps; every merged task
    needs an expert accuracy.
    """

    def acc(v) -> float:
        return float(v["accuracy"] if isinstance(v, Mapping) else v)

    missing = sorted(set(merged) - set(experts))
    if missing:
        raise KeyError(f"no expert accuracy for tasks {missing}")
    if not merged:
        raise ValueError("no tasks to normalise")
    per_task = {}
    for task, v in merged.items():
        e = acc(experts[task])
        if e <= 0:
            raise ValueError(f"expert accuracy of {task} is {e}: cannot normalise")
        per_task[task] = acc(v) / e
    return {"per_task": per_task, "mean": sum(per_task.values()) / len(per_task)}


def evaluate(model_path: str, **options) -> dict[str, dict[str, float]]:
    """User-evaluator entry point (``benchmarks.retention.evaluate:evaluate``).

    Options: ``heads_dir`` (default ``$SWUDI_RETENTION_DIR/heads`` or
    ``benchmarks/.cache/retention/heads``), ``tasks`` (default: every head), ``split`` ("test"),
    ``max_examples``, ``batch_size``, ``threads``, ``storage_options``, ``aggregate``. Each task's metrics
    are ``accuracy`` and, when the build's manifest recorded the expert's accuracy on the same examples,
    ``expert_accuracy`` and ``normalized_accuracy``. With ``aggregate=True`` a task ``all`` holds the
    mean over tasks of each metric every task has (objective
    ``benchmarks.retention.evaluate:evaluate:all.normalized_accuracy``).
    """
    known = {"heads_dir", "tasks", "split", "max_examples", "batch_size", "threads", "storage_options", "aggregate"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown evaluator options {unknown}; known: {sorted(known)}")
    heads_dir = Path(options.get("heads_dir") or default_heads_dir())
    split = options.get("split", "test")
    max_examples = options.get("max_examples")
    if options.get("threads"):
        torch.set_num_threads(int(options["threads"]))
    results = evaluate_encoder(
        model_path,
        heads_dir,
        options.get("tasks"),
        split,
        max_examples=max_examples,
        batch_size=options.get("batch_size", 64),
        storage_options=options.get("storage_options"),
    )
    expert = recorded_expert_accuracy(heads_dir.parent, split, {t: int(r["n"]) for t, r in results.items()})
    for task, r in results.items():
        if task in expert:
            r["expert_accuracy"] = expert[task]
            r["normalized_accuracy"] = r["accuracy"] / expert[task] if expert[task] > 0 else float("nan")
    return {**results, "all": mean_over_tasks(results)} if options.get("aggregate") else results


def recorded_expert_accuracy(build_dir: str | Path, split: str, n: Mapping[str, int]) -> dict[str, float]:
    """Expert accuracies from ``build_dir/manifest.json`` measured on the same first ``n[task]``
    examples of ``split`` (tasks measured on other examples are left out)."""
    path = Path(build_dir) / "manifest.json"
    if not path.exists() or split not in ("val", "test"):
        return {}
    tasks = json.loads(path.read_text()).get("tasks", {})
    return {
        t: e["metrics"][f"expert_{split}"]
        for t, e in tasks.items()
        if t in n and e.get("n_eval", {}).get(split) == n[t] and f"expert_{split}" in e["metrics"]
    }


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m benchmarks.retention.evaluate", description="Accuracy of an encoder with each task's head."
    )
    p.add_argument("encoder", help="model folder, output folder with latest.json, or URL")
    p.add_argument("--heads-dir", default=None)
    p.add_argument("--tasks", nargs="+", default=None)
    p.add_argument("--split", default="test", choices=data_mod.SPLITS)
    p.add_argument("--max-examples", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    quiet_transformers()
    results = evaluate(
        args.encoder,
        heads_dir=args.heads_dir,
        tasks=args.tasks,
        split=args.split,
        max_examples=args.max_examples,
        threads=args.threads,
    )
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

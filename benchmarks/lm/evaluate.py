"""Per-domain held-out loss, perplexity and next-token accuracy of a causal LM (base, expert or merged).

For the pipeline's user-evaluator hook: ``benchmarks.lm.evaluate:evaluate``. The model may be a
Hugging Face folder or a pipeline output folder (``latest.json``) or an fsspec URL of either
(``benchmarks.retention.evaluate.local_model_dir``). No tokenizer is needed: the evaluation blocks
are the build's cached token streams (``BUILD/data/tokens.safetensors``), the first
``eval_blocks`` non-overlapping blocks of ``seq_len`` tokens of each domain's split.

With the build's references (``BUILD/manifest.json``, measured on the same blocks) each domain also gets

    normalized_accuracy = acc_merged / acc_expert                  (the domain's own expert)
    loss_gap_closed     = (L_base - L_merged) / (L_base - L_expert)

(1 = as good as the expert, 0 = no better than the base, < 0 = worse than the base), and
``expert_loss``, ``expert_accuracy``, ``base_loss``, ``base_accuracy``. With ``aggregate=True`` a task
``all`` holds the mean over domains of every metric that every domain has (an objective for
``swudi tune`` / ``gate:``, e.g. ``benchmarks.lm.evaluate:evaluate:all.loss_gap_closed``). ``reference="lora"``
normalises against the domain's LoRA adapter (merged into the base by PEFT) instead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.aggregate import mean_over_tasks
from benchmarks.retention.evaluate import local_model_dir

from .model import eval_blocks, load_causal_lm, quiet_transformers, score_blocks

DEFAULT_BUILD = Path(__file__).resolve().parents[1] / ".cache" / "lm"
ENV_BUILD = "SWUDI_LM_BUILD"


def default_build() -> Path:
    return Path(os.environ.get(ENV_BUILD, DEFAULT_BUILD))


def read_manifest(build: str | Path) -> dict[str, Any]:
    path = Path(build) / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: build the benchmark first (python -m benchmarks.lm.build --out DIR)"
        )
    return json.loads(path.read_text())


def domain_blocks(
    build: str | Path, split: str, domains: Sequence[str] | None = None, max_blocks: int | None = None
) -> dict[str, torch.Tensor]:
    """``{domain: [B, seq_len] token ids}``: the evaluation blocks of ``split`` (see module docstring)."""
    from safetensors.torch import load_file

    settings = read_manifest(build)["settings"]
    streams = load_file(str(Path(build) / "data" / "tokens.safetensors"))
    n = settings["eval_blocks"] if max_blocks is None else min(max_blocks, settings["eval_blocks"])
    return {d: eval_blocks(streams[f"{split}/{d}"], settings["seq_len"], n) for d in (domains or settings["domains"])}


def normalize(scores: Mapping[str, float], base: Mapping[str, float], expert: Mapping[str, float]) -> dict[str, float]:
    """The normalised metrics of one domain (module docstring) from raw ``loss`` / ``accuracy`` maps."""
    gap = base["loss"] - expert["loss"]
    return {
        "normalized_accuracy": scores["accuracy"] / expert["accuracy"] if expert["accuracy"] > 0 else float("nan"),
        "loss_gap_closed": (base["loss"] - scores["loss"]) / gap if gap != 0 else float("nan"),
        "expert_loss": expert["loss"],
        "expert_accuracy": expert["accuracy"],
        "base_loss": base["loss"],
        "base_accuracy": base["accuracy"],
    }


def evaluate_model(
    model_path: str | os.PathLike,
    build: str | Path,
    *,
    domains: Sequence[str] | None = None,
    split: str = "test",
    seed: int = 0,
    reference: str = "expert",
    max_blocks: int | None = None,
    storage_options: Mapping | None = None,
) -> dict[str, dict[str, float]]:
    """``{domain: {"loss", "perplexity", "accuracy", "tokens", + normalised metrics}}`` (module docstring).

    The normalised metrics use the references of experts (or adapters) of ``seed``; they are left out
    when fewer blocks than the build's are scored (the references would be on other tokens)."""
    if reference not in ("expert", "lora"):
        raise ValueError(f"reference must be 'expert' or 'lora', not {reference!r}")
    manifest = read_manifest(build)
    blocks = domain_blocks(build, split, domains, max_blocks)
    ref = manifest["reference"].get(split, {})
    with local_model_dir(model_path, storage_options) as folder:
        model = load_causal_lm(folder)
        results: dict[str, dict[str, float]] = {}
        for d, b in blocks.items():
            r = score_blocks(model, b)
            own = ref.get(reference, {}).get(str(seed), {}).get(d)
            if own is not None and d in ref.get("base", {}) and b.shape[0] == ref["blocks"][d]:
                r.update(normalize(r, ref["base"][d], own))
            results[d] = r
    return results


def evaluate(model_path: str, **options: Any) -> dict[str, dict[str, float]]:
    """User-evaluator entry point (``benchmarks.lm.evaluate:evaluate``).

    Options: ``build`` (default ``$SWUDI_LM_BUILD`` or ``benchmarks/.cache/lm``), ``domains`` (default:
    every domain of the build), ``split`` ("test"), ``seed`` (whose experts normalise: 0),
    ``reference`` ("expert" or "lora"), ``max_blocks``, ``threads``, ``storage_options``.
    """
    known = {"build", "domains", "split", "seed", "reference", "max_blocks", "threads", "storage_options", "aggregate"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown evaluator options {unknown}; known: {sorted(known)}")
    if options.get("threads"):
        torch.set_num_threads(int(options["threads"]))
    quiet_transformers()
    results = evaluate_model(
        model_path,
        options.get("build") or default_build(),
        domains=options.get("domains"),
        split=options.get("split", "test"),
        seed=int(options.get("seed", 0)),
        reference=options.get("reference", "expert"),
        max_blocks=options.get("max_blocks"),
        storage_options=options.get("storage_options"),
    )
    return {**results, "all": mean_over_tasks(results)} if options.get("aggregate") else results


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m benchmarks.lm.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="model folder, output folder with latest.json, or URL")
    p.add_argument("--build", default=None)
    p.add_argument("--domains", nargs="+", default=None)
    p.add_argument("--split", default="test", choices=("val", "test"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference", default="expert", choices=("expert", "lora"))
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    print(
        json.dumps(
            evaluate(
                args.model,
                build=args.build,
                domains=args.domains,
                split=args.split,
                seed=args.seed,
                reference=args.reference,
                threads=args.threads,
            ),
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

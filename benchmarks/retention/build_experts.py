"""python -m benchmarks.retention.build_experts --out DIR [--seeds 0 1 2] [--tasks ...] [--steps S] ...

Builds, for every seed k, ``DIR/seed<k>/base``, ``DIR/seed<k>/heads/<task>.safetensors`` and
``DIR/seed<k>/experts/<task>/`` with ``DIR/seed<k>/manifest.json`` (see ``experts.py``); experts
already built with the same settings, data and base are skipped, so a re-run resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time

from .data import DEFAULT_TASKS, TASKS, MissingDataError
from .experts import ExpertSettings, build_experts, results_table, seed_dir
from .model import quiet_transformers

DEFAULT_OUT = "benchmarks/.cache/retention"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = ExpertSettings()
    p = argparse.ArgumentParser(prog="python -m benchmarks.retention.build_experts",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=DEFAULT_OUT, help=f"build folder (default {DEFAULT_OUT})")
    p.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), choices=list(TASKS),
                   metavar="TASK", help=f"default: all ({', '.join(TASKS)})")
    p.add_argument("--steps", type=int, default=d.steps, help="fine-tuning steps per expert")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--head-lr-mult", type=float, default=d.head_lr_mult, help="head lr = lr x this")
    p.add_argument("--logit-scale", type=float, default=d.logit_scale)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio)
    p.add_argument("--max-length", type=int, default=d.max_length, help="tokens per text")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="one build per seed under OUT/seed<k> (data split, head init, batch order)")
    p.add_argument("--train-layers", type=int, default=None,
                   help="fine-tune only the top K transformer layers (default: the whole encoder)")
    p.add_argument("--max-train-examples", type=int, default=None, help="cap the training split")
    p.add_argument("--eval-examples", type=int, default=d.eval_examples,
                   help="cap val/test for the accuracies recorded in the manifest")
    p.add_argument("--eval-val", action="store_true", help="also record val accuracies in the manifest")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--force", action="store_true", help="rebuild even when cached")
    return p.parse_args(argv)



def _log_seed(seed: int, message: str) -> None:
    print(f"[seed {seed}] {message}", flush=True)

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_transformers()
    fields = {f.name for f in dataclasses.fields(ExpertSettings)}
    settings = ExpertSettings(**{k: v for k, v in vars(args).items() if k in fields})
    t0 = time.perf_counter()
    for seed in args.seeds:
        out = seed_dir(args.out, seed)
        try:
            manifest = build_experts(out, args.tasks, dataclasses.replace(settings, seed=seed),
                                     threads=args.threads, force=args.force,
                                     log=functools.partial(_log_seed, seed))
        except MissingDataError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"\nseed {seed} ({out}):\n{results_table(manifest, args.tasks)}\n", flush=True)
    print(f"settings: {json.dumps(dataclasses.asdict(settings))}")
    print(f"built in {time.perf_counter() - t0:.0f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

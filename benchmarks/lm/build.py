"""Build the language-model benchmark: data, tokenizer, a briefly pretrained base, full fine-tuned
domain experts (one per domain and seed) and PEFT LoRA adapters of the same domains.

    python -m benchmarks.lm.build --out benchmarks/.cache/lm [--seeds 0 1 2] [--threads 1]

Steps, each recorded in ``OUT/manifest.json`` when done (a re-run skips what is done, so an
interrupted build resumes; a manifest written with other settings is refused):

1. ``data``: every domain read and split by document (``benchmarks.lm.data``), cached in
   ``OUT/data/docs.json``.
2. ``tokenizer``: byte-level BPE trained on the training split of every domain (``--tokenizer-chars``
   per domain), saved with the base; token streams of every split in ``OUT/data/tokens.safetensors``.
3. ``base``: ``LlamaForCausalLM`` initialised with seed 1234, pretrained for ``--pretrain-steps`` on
   the mix (every batch holds the domains in equal shares), so the base knows every domain a little.
4. ``expert:<seed>:<domain>``: the base fully fine-tuned for ``--expert-steps`` on one domain; the
   seed sets the data order (``OUT/experts/seed<s>/<domain>``).
5. ``lora:<seed>:<domain>``: a PEFT LoRA adapter (rank ``--lora-rank`` on q/k/v/o/gate/up/down,
   alpha = 2 r) of the base trained on the domain (``OUT/lora/seed<s>/<domain>``).
6. references: the base on every domain, and each expert and adapter on its own domain right after
   it is trained, on the evaluation blocks of the val and test splits (``manifest["reference"]``;
   ``benchmarks.lm.evaluate`` normalises with these). Adapters of a seed are trained right after the
   experts of that seed, so the benchmark of seed 0 can start while later seeds still build.

Optimiser: AdamW (betas 0.9/0.95, weight decay 0.01), linear warm-up over 10 % of the steps then
cosine decay to 10 % of the peak learning rate, gradient norm clipped at 1.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import data as data_mod
from .model import (
    ModelShape,
    encode_stream,
    eval_blocks,
    llama_config,
    load_causal_lm,
    quiet_transformers,
    sample_windows,
    score_blocks,
    train_tokenizer,
)

log = logging.getLogger(__name__)

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BUILD_VERSION = 1
BASE_INIT_SEED = 1234


@dataclass(frozen=True)
class BuildSettings:
    """Everything that decides what the build produces (its digest guards the manifest)."""

    domains: tuple[str, ...] = data_mod.DEFAULT_DOMAINS
    seeds: tuple[int, ...] = (0, 1, 2)
    lora_seeds: tuple[int, ...] = (0,)
    shape: ModelShape = field(default_factory=ModelShape)
    seq_len: int = 128
    batch: int = 8
    pretrain_steps: int = 500
    pretrain_lr: float = 3e-3
    expert_steps: int = 80
    expert_lr: float = 1e-3
    lora_steps: int = 80
    lora_lr: float = 4e-3
    lora_rank: int = 8
    max_train_chars: int = data_mod.MAX_TRAIN_CHARS
    max_eval_chars: int = data_mod.MAX_EVAL_CHARS
    tokenizer_chars: int = 400_000
    eval_blocks: int = 48

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["domains"], d["seeds"], d["lora_seeds"] = list(self.domains), list(self.seeds), list(self.lora_seeds)
        return d

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps([BUILD_VERSION, self.as_dict()], sort_keys=True).encode()).hexdigest()[:16]


#: Settings that only the experts and adapters depend on.
BASE_INDEPENDENT = ("seeds", "lora_seeds", "expert_steps", "expert_lr", "lora_steps", "lora_lr", "lora_rank")
BASE_STEPS = ("data", "tokenizer", "base", "reference:base")


def reuse_base(source: Path, out: Path, settings: BuildSettings) -> None:
    """Start the build ``out`` from the data, tokenizer and base of the build ``source`` (their
    settings must be equal: only expert / adapter settings may differ); copies, so ``source`` stays."""
    import shutil

    src = json.loads((source / "manifest.json").read_text())
    if (
        BuildSettings(
            **{**settings.as_dict(), **{k: src["settings"][k] for k in BASE_INDEPENDENT}, "shape": settings.shape}
        ).digest
        != src["settings_digest"]
    ):
        raise SystemExit(f"{source}: its data / tokenizer / base settings differ from these; cannot reuse its base")
    if not all(step in src["steps"] for step in BASE_STEPS):
        raise SystemExit(f"{source}: its base is not finished")
    if (out / "manifest.json").exists():
        return
    out.mkdir(parents=True, exist_ok=True)
    for folder in ("data", "tokenizer", "base"):
        shutil.copytree(source / folder, out / folder)
    m = Manifest(out, settings)
    m.data["domains"] = src["domains"]
    m.data["reused_base_from"] = str(source)
    m.data["reference"] = {split: {**r, "expert": {}, "lora": {}} for split, r in src["reference"].items()}
    for step in BASE_STEPS:
        m.record(step, **src["steps"][step], reused=True)


class Manifest:
    """``OUT/manifest.json``: settings, domains, and one entry per finished step (written atomically)."""

    def __init__(self, out: Path, settings: BuildSettings) -> None:
        self.path = out / "manifest.json"
        if self.path.exists():
            self.data = json.loads(self.path.read_text())
            if self.data.get("settings_digest") != settings.digest:
                raise SystemExit(
                    f"{self.path} was written with other settings ({self.data.get('settings')}); "
                    "use another --out or delete it"
                )
        else:
            self.data = {
                "schema": "swudi-lm-build/1",
                "settings_digest": settings.digest,
                "settings": settings.as_dict(),
                "steps": {},
                "domains": {},
                "reference": {},
            }

    def done(self, step: str) -> bool:
        return step in self.data["steps"]

    def record(self, step: str, **info: Any) -> None:
        self.data["steps"][step] = info
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)


def _timed(fn: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, {
        "wall_seconds": round(time.perf_counter() - wall, 2),
        "cpu_seconds": round(time.process_time() - cpu, 2),
    }


def lr_at(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over the first 10 % of the steps, cosine decay to 0.1 * peak at the end."""
    warm = max(1, steps // 10)
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(
    model: Any,
    streams: Sequence[torch.Tensor],
    *,
    steps: int,
    lr: float,
    batch: int,
    seq_len: int,
    seed: int,
    label: str,
) -> list[float]:
    """Train the parameters of ``model`` that require grad for ``steps`` steps of next-token loss.

    Row ``i`` of step ``k`` is a window of ``streams[(k * batch + i) % len(streams)]`` (equal shares
    of a mix), at offsets drawn from ``torch.Generator().manual_seed(seed)``. Returns the losses.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    started = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        rows = [sample_windows(streams[(step * batch + i) % len(streams)], 1, seq_len, gen) for i in range(batch)]
        x = torch.cat(rows)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            log.info(
                "%s step %d/%d loss %.3f (%.2f s/step)",
                label,
                step + 1,
                steps,
                losses[-1],
                (time.perf_counter() - started) / (step + 1),
            )
    model.eval()
    return losses


def _mean(xs: Sequence[float], n: int = 20) -> float:
    tail = list(xs)[-n:]
    return round(sum(tail) / len(tail), 4)


def load_streams(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "data" / "tokens.safetensors"))


def reference_blocks(out: Path, split: str, domain: str, max_blocks: int, seq_len: int) -> torch.Tensor:
    """The evaluation blocks of ``domain`` on ``split`` (the first ``max_blocks`` blocks of its stream)."""
    return eval_blocks(load_streams(out)[f"{split}/{domain}"], seq_len, max_blocks)


def build(out: Path, settings: BuildSettings) -> dict[str, Any]:
    """Run every step not yet done (module docstring); return the manifest."""
    quiet_transformers()
    out.mkdir(parents=True, exist_ok=True)
    m = Manifest(out, settings)
    (out / "data").mkdir(exist_ok=True)
    docs_path = out / "data" / "docs.json"

    if not m.done("data"):

        def read() -> dict[str, Any]:
            return {
                d: data_mod.load_domain(
                    d, max_train_chars=settings.max_train_chars, max_eval_chars=settings.max_eval_chars
                )
                for d in settings.domains
            }

        domains, t = _timed(read)
        docs_path.write_text(
            json.dumps({d: {s: list(v.split(s)) for s in data_mod.SPLITS} for d, v in domains.items()})
        )
        m.data["domains"] = {d: v.summary() for d, v in domains.items()}
        m.record("data", **t)
    docs = json.loads(docs_path.read_text())

    if not m.done("tokenizer"):

        def tok() -> Any:
            from safetensors.torch import save_file

            def texts():
                for d in settings.domains:
                    used = 0
                    for doc in docs[d]["train"]:
                        if used >= settings.tokenizer_chars:
                            break
                        used += len(doc)
                        yield doc

            tokenizer = train_tokenizer(texts(), settings.shape.vocab)
            tokenizer.save_pretrained(str(out / "tokenizer"))
            streams = {
                f"{s}/{d}": encode_stream(tokenizer, docs[d][s]) for d in settings.domains for s in data_mod.SPLITS
            }
            save_file(streams, str(out / "data" / "tokens.safetensors"))
            return {k: int(v.numel()) for k, v in streams.items()}

        counts, t = _timed(tok)
        m.record("tokenizer", tokens=counts, **t)

    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    streams = load_streams(out)
    train_streams = [streams[f"train/{d}"] for d in settings.domains]

    if not m.done("base"):

        def pretrain() -> list[float]:
            cfg = llama_config(settings.shape, len(tokenizer), tokenizer.eos_token_id)
            torch.manual_seed(BASE_INIT_SEED)
            model = LlamaForCausalLM(cfg)
            losses = train(
                model,
                train_streams,
                steps=settings.pretrain_steps,
                lr=settings.pretrain_lr,
                batch=settings.batch,
                seq_len=settings.seq_len,
                seed=BASE_INIT_SEED,
                label="base",
            )
            model.save_pretrained(str(out / "base"))
            tokenizer.save_pretrained(str(out / "base"))
            return losses

        losses, t = _timed(pretrain)
        m.record(
            "base",
            final_train_loss=_mean(losses),
            steps=settings.pretrain_steps,
            parameters=sum(p.numel() for p in load_causal_lm(out / "base").parameters()),
            **t,
        )

    base = load_causal_lm(out / "base")
    blocks = {
        split: {
            d: eval_blocks(streams[f"{split}/{d}"], settings.seq_len, settings.eval_blocks) for d in settings.domains
        }
        for split in ("val", "test")
    }
    ref = m.data["reference"]
    for split in blocks:
        ref.setdefault(
            split,
            {"blocks": {d: int(b.shape[0]) for d, b in blocks[split].items()}, "base": {}, "expert": {}, "lora": {}},
        )
    if not m.done("reference:base"):
        for split, by_domain in blocks.items():
            ref[split]["base"] = {d: score_blocks(base, b) for d, b in by_domain.items()}
        m.record("reference:base")

    def score_own(kind: str, seed: int, d: str, model: Any) -> None:
        for split, by_domain in blocks.items():
            ref[split][kind].setdefault(str(seed), {})[d] = score_blocks(model, by_domain[d])

    for seed in settings.seeds:
        for i, d in enumerate(settings.domains):
            step = f"expert:{seed}:{d}"
            if m.done(step):
                continue

            def finetune(d: str = d, i: int = i, seed: int = seed) -> tuple[list[float], Any]:
                model = copy.deepcopy(base)
                losses = train(
                    model,
                    [streams[f"train/{d}"]],
                    steps=settings.expert_steps,
                    lr=settings.expert_lr,
                    batch=settings.batch,
                    seq_len=settings.seq_len,
                    seed=1000 * seed + i + 1,
                    label=f"expert seed {seed} {d}",
                )
                model.save_pretrained(str(out / "experts" / f"seed{seed}" / d))
                return losses, model

            (losses, model), t = _timed(finetune)
            score_own("expert", seed, d, model)
            m.record(step, final_train_loss=_mean(losses), **t)
        if seed not in settings.lora_seeds:
            continue
        for i, d in enumerate(settings.domains):
            step = f"lora:{seed}:{d}"
            if m.done(step):
                continue

            def lora(d: str = d, i: int = i, seed: int = seed) -> list[float]:
                from peft import LoraConfig, get_peft_model

                torch.manual_seed(5000 + 1000 * seed + i)
                model = get_peft_model(
                    copy.deepcopy(base),
                    LoraConfig(
                        r=settings.lora_rank,
                        lora_alpha=2 * settings.lora_rank,
                        lora_dropout=0.0,
                        target_modules=list(LORA_TARGETS),
                    ),
                )
                losses = train(
                    model,
                    [streams[f"train/{d}"]],
                    steps=settings.lora_steps,
                    lr=settings.lora_lr,
                    batch=settings.batch,
                    seq_len=settings.seq_len,
                    seed=1000 * seed + i + 1,
                    label=f"lora seed {seed} {d}",
                )
                model.save_pretrained(str(out / "lora" / f"seed{seed}" / d))
                return losses

            losses, t = _timed(lora)
            score_own("lora", seed, d, load_lora_merged(out, seed, d))
            m.record(step, final_train_loss=_mean(losses), **t)

    total = {k: round(sum(s.get(k, 0.0) for s in m.data["steps"].values()), 1) for k in ("wall_seconds", "cpu_seconds")}
    m.data["total"] = total
    m.save()
    return m.data


def load_lora_merged(out: Path, seed: int, domain: str) -> Any:
    """The base with the LoRA adapter of ``domain`` merged in (PEFT's own ``merge_and_unload``)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_causal_lm(out / "base"), str(out / "lora" / f"seed{seed}" / domain))
    return model.merge_and_unload().eval()


def settings_from_args(args: argparse.Namespace) -> BuildSettings:
    shape = ModelShape(
        layers=args.layers,
        hidden=args.hidden,
        heads=args.heads,
        kv_heads=args.kv_heads,
        intermediate=args.intermediate,
        vocab=args.vocab,
    )
    return BuildSettings(
        domains=tuple(args.domains),
        seeds=tuple(args.seeds),
        lora_seeds=tuple(args.lora_seeds),
        shape=shape,
        seq_len=args.seq_len,
        batch=args.batch,
        pretrain_steps=args.pretrain_steps,
        expert_steps=args.expert_steps,
        lora_steps=args.lora_steps,
        lora_rank=args.lora_rank,
        max_train_chars=args.max_train_chars,
        max_eval_chars=args.max_eval_chars,
        tokenizer_chars=args.tokenizer_chars,
        eval_blocks=args.eval_blocks,
        pretrain_lr=args.pretrain_lr,
        expert_lr=args.expert_lr,
        lora_lr=args.lora_lr,
    )


def parser() -> argparse.ArgumentParser:
    d, s = BuildSettings(), ModelShape()
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.lm.build", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, default=Path("benchmarks/.cache/lm"))
    p.add_argument("--domains", nargs="+", default=list(d.domains), choices=list(data_mod.READERS))
    p.add_argument("--seeds", nargs="+", type=int, default=list(d.seeds))
    p.add_argument("--lora-seeds", nargs="*", type=int, default=list(d.lora_seeds))
    for name in ("layers", "hidden", "heads", "kv_heads", "intermediate", "vocab"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(s, name))
    for name in (
        "seq_len",
        "batch",
        "pretrain_steps",
        "expert_steps",
        "lora_steps",
        "lora_rank",
        "max_train_chars",
        "max_eval_chars",
        "tokenizer_chars",
        "eval_blocks",
    ):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name))
    for name in ("pretrain_lr", "expert_lr", "lora_lr"):
        p.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(d, name))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--reuse-base",
        type=Path,
        default=None,
        help="start from the data, tokenizer and base of this finished build (other expert settings)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    settings = settings_from_args(args)
    if args.reuse_base is not None:
        reuse_base(args.reuse_base, args.out, settings)
    manifest = build(args.out, settings)
    print(json.dumps({"total": manifest["total"], "base": manifest["steps"].get("base")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

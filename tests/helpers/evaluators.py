"""A user evaluator as a real one is written: ``module:function(model_path, **options)``."""

from __future__ import annotations

from swudi.io.checkpoint import Checkpoint


def weight_norms(model_path: str, names: tuple[str, ...] = ()) -> dict[str, dict[str, float]]:
    """Frobenius norm of the named weights of the model at ``model_path`` (one task per weight)."""
    checkpoint = Checkpoint.open(model_path)
    return {name: {"frobenius_norm": float(checkpoint.read(name).float().norm())} for name in names}


def fails(model_path: str) -> dict[str, dict[str, float]]:
    """An evaluator with a bug: it raises."""
    raise RuntimeError(f"cannot score {model_path}: tokenizer missing")


def not_a_number(model_path: str) -> dict[str, dict[str, object]]:
    """An evaluator that returns a word where a number belongs."""
    return {"task": {"accuracy": "high"}}

"""A user evaluator as a real one is written: ``module:function(model_path, **options)``."""

from __future__ import annotations

from swudi.io.checkpoint import Checkpoint


def weight_norms(model_path: str, names: tuple[str, ...] = ()) -> dict[str, dict[str, float]]:
    """Frobenius norm of the named weights of the model at ``model_path`` (one task per weight)."""
    checkpoint = Checkpoint.open(model_path)
    return {name: {"frobenius_norm": float(checkpoint.read(name).float().norm())} for name in names}

"""A user evaluator as a real one is written: ``module:function(model_path, **options)``."""

from __future__ import annotations

from swudi.io.checkpoint import Checkpoint


def weight_norms(model_path: str, names: tuple[str, ...] = ()) -> dict[str, dict[str, float]]:
    """Frobenius norm of the named weights of the model at ``model_path`` (one task per weight)."""
    checkpoint = Checkpoint.open(model_path)
    return {name: {"frobenius_norm": float(checkpoint.read(name).float().norm())} for name in names}


def distance_to_target(
    model_path: str,
    target: str,
    names: tuple[str, ...] = (),
    log: str | None = None,
    storage_options: dict | None = None,
) -> dict[str, dict[str, float]]:
    """How far the named weights of the model are from those of a target checkpoint (a model the
    merge should approach): ``distance`` = sqrt(sum of squared Frobenius distances), computed in
    float64, and ``closeness`` = 1 / (1 + distance). Appends ``model_path`` to ``log`` when given
    (the tests count the calls)."""
    if log:
        with open(log, "a") as f:
            f.write(model_path + "\n")
    model = Checkpoint.open(model_path, storage_options)
    reference = Checkpoint.open(target, storage_options)
    total = sum(
        float((model.read(name).double() - reference.read(name).double()).pow(2).sum()) for name in names
    )
    distance = total**0.5
    return {"all": {"distance": distance, "closeness": 1.0 / (1.0 + distance)}}


def fixed_metrics(model_path: str, metrics: dict | None = None) -> dict:
    """Returns ``metrics`` as given, whatever the model (to test how results are checked)."""
    return dict(metrics or {})


def nan_unless(model_path: str, base: str) -> dict[str, dict[str, float]]:
    """``all.distance`` 0 on ``base`` and NaN on any other model (a merge that diverged)."""
    return {"all": {"distance": 0.0 if model_path == base else float("nan")}}


def fails(model_path: str) -> dict[str, dict[str, float]]:
    """An evaluator with a bug: it raises."""
    raise RuntimeError(f"cannot score {model_path}: tokenizer missing")


def not_a_number(model_path: str) -> dict[str, dict[str, object]]:
    """An evaluator that returns a word where a number belongs."""
    return {"task": {"accuracy": "high"}}

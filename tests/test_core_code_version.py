"""Cache keys follow the code: a change of the maths changes the keys, a comment does not."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from swudi import steps
from swudi.code_version import code_digest, merge_code, module_digest
from swudi.config import config_from_mapping
from swudi.synthetic import SyntheticModel, write_synthetic_models

ORIGINAL = '''"""A module."""


def f(x):
    """Double it."""
    return 2 * x
'''
COSMETIC = '''"""The same module, documented differently."""

# a comment


def f(x):   # another comment
    """Twice x, in other words."""
    return (2 * x)
'''
CHANGED = '''"""A module."""


def f(x):
    """Double it."""
    return 3 * x
'''


@pytest.fixture
def modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(tmp_path))
    for name, text in (("cv_original", ORIGINAL), ("cv_cosmetic", COSMETIC), ("cv_changed", CHANGED)):
        (tmp_path / f"{name}.py").write_text(text)
    importlib.invalidate_caches()
    yield tmp_path
    for name in ("cv_original", "cv_cosmetic", "cv_changed"):
        sys.modules.pop(name, None)


def test_digest_ignores_docstrings_comments_and_layout_but_not_code(modules: Path) -> None:
    assert module_digest("cv_original") == module_digest("cv_cosmetic")
    assert module_digest("cv_original") != module_digest("cv_changed")
    assert code_digest(["cv_original", "cv_original"]) == code_digest(["cv_original"])


def test_the_numerical_modules_are_in_the_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, experts = write_synthetic_models(str(tmp_path / "in"), 2, SyntheticModel(layers=1, hidden=8,
                                                                                   intermediate=16, vocab=8,
                                                                                   positions=4))
    cfg = config_from_mapping({"base": base, "experts": experts, "output": str(tmp_path / "out")})
    from swudi.plan import build_plan

    plan = build_plan(cfg)
    job, group = plan.layer_jobs[0], plan.group_jobs[0]
    before = (steps.decomposition_key(job, cfg), steps.layer_merge_key(job, cfg), steps.group_merge_key(group, cfg),
              steps.delta_key(group, cfg))
    assert merge_code("swudi_a") == merge_code("swudi")  # both declared in swudi.methods
    monkeypatch.setattr(steps, "decomposition_code", lambda: "changed-decomposition-code")
    assert steps.decomposition_key(job, cfg) != before[0]
    assert steps.layer_merge_key(job, cfg) == before[1]  # a merge key does not use this digest...
    monkeypatch.setattr(steps, "merge_code", lambda method=None: "changed-merge-code")
    after = (steps.layer_merge_key(job, cfg), steps.group_merge_key(group, cfg), steps.delta_key(group, cfg))
    assert all(a != b for a, b in zip(after, before[1:], strict=True))  # ...but this one


def test_merge_code_covers_the_module_that_declares_a_user_method(modules: Path) -> None:
    import torch

    from swudi.registry import MethodParams, MethodSpec, registered_method

    class P(MethodParams):
        """No parameters."""

    original = importlib.import_module("cv_original")
    changed = importlib.import_module("cv_changed")

    def merge_a(tv: torch.Tensor, p: P) -> torch.Tensor:
        return tv.mean(dim=0)

    merge_a.__module__ = original.__name__

    def merge_b(tv: torch.Tensor, p: P) -> torch.Tensor:
        return tv.mean(dim=0)

    merge_b.__module__ = changed.__name__
    with registered_method(MethodSpec("tmp_code_a", "elementwise", P, "test", merge=merge_a)):
        with registered_method(MethodSpec("tmp_code_b", "elementwise", P, "test", merge=merge_b)):
            assert merge_code("tmp_code_a") != merge_code("tmp_code_b")
            assert merge_code("tmp_code_a") != merge_code("mean")

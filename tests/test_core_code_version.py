"""Cache keys follow the code: a change of the maths changes the keys, a comment does not."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from swudi.config.merge_config import config_from_mapping
from swudi.io.synthetic import SyntheticModel, write_synthetic_models
from swudi.pipeline import keys as cache_keys
from swudi.pipeline.code_version import code_digest, merge_code, module_digest
from swudi.pipeline.keys import decomposition_key, delta_key, group_merge_key, layer_merge_key

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
def modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
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
    from swudi.pipeline.plan import build_plan

    plan = build_plan(cfg)
    job, group = plan.layer_jobs[0], plan.group_jobs[0]
    before = (decomposition_key(job, cfg), layer_merge_key(job, cfg), group_merge_key(group, cfg),
              delta_key(group, cfg))
    assert merge_code("swudi_a") == merge_code("swudi")  # both declared in swudi.methods
    monkeypatch.setattr(cache_keys, "decomposition_code", lambda: "changed-decomposition-code")
    assert decomposition_key(job, cfg) != before[0]
    assert layer_merge_key(job, cfg) == before[1]  # a merge key does not use this digest...
    monkeypatch.setattr(cache_keys, "merge_code", lambda method=None: "changed-merge-code")
    after = (layer_merge_key(job, cfg), group_merge_key(group, cfg), delta_key(group, cfg))
    assert all(a != b for a, b in zip(after, before[1:], strict=True))  # ...but this one


def test_merge_code_covers_the_module_that_declares_a_user_method(modules: Path) -> None:
    import torch

    from swudi.methods.registry import MethodParams, MethodSpec, registered_method

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
    with (
        registered_method(MethodSpec("tmp_code_a", "elementwise", P, "test", merge=merge_a)),
        registered_method(MethodSpec("tmp_code_b", "elementwise", P, "test", merge=merge_b)),
    ):
        assert merge_code("tmp_code_a") != merge_code("tmp_code_b")
        assert merge_code("tmp_code_a") != merge_code("mean")


MOVED_BEFORE = '''"""Before the move."""
from swudi.errors import InputError
import torch


def f(x):
    from swudi.core.task_vectors import LowRank
    return torch.zeros(2) * x
'''
MOVED_AFTER = '''"""After the move: other first-party import paths, another order."""
import torch
from swudi.core.errors import InputError  # moved


def f(x):
    from swudi.core.task_vectors import LowRank
    return torch.zeros(2) * x
'''
THIRD_PARTY_CHANGED = MOVED_BEFORE.replace("import torch", "import numpy as torch")


def test_digest_ignores_where_swudi_modules_live_but_not_third_party_imports(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    for name, text in (("cv_moved_before", MOVED_BEFORE), ("cv_moved_after", MOVED_AFTER),
                       ("cv_third_party", THIRD_PARTY_CHANGED)):
        (tmp_path / f"{name}.py").write_text(text)
    importlib.invalidate_caches()
    assert module_digest("cv_moved_before") == module_digest("cv_moved_after")
    assert module_digest("cv_moved_before") != module_digest("cv_third_party")


GOLDEN = Path(__file__).parent / "data" / "cache_keys.json"


def current_cache_keys(tmp_path: Path) -> dict[str, str]:
    """The code digests and the four artefact keys of one fixed job (inputs fingerprinted by name only:
    a file's fingerprint holds its mtime and inode)."""
    from swudi.methods import METHODS
    from swudi.pipeline.code_version import decomposition_code, task_svd_code
    from swudi.pipeline.plan import TensorJob, build_plan

    base, experts = write_synthetic_models(str(tmp_path / "in"), 2, SyntheticModel(layers=1, hidden=8,
                                                                                   intermediate=16, vocab=8,
                                                                                   positions=4))
    cfg = config_from_mapping({"base": base, "experts": experts, "output": "/golden/out", "work_dir": "/golden/work"})
    plan = build_plan(cfg)
    job, group = plan.layer_jobs[0], plan.group_jobs[0]
    fixed_input = property(lambda self: f"golden-input:{self.name}")
    original, TensorJob.input_key = TensorJob.input_key, fixed_input  # type: ignore[method-assign,assignment]
    try:
        keys = _keys(job, group, cfg)
    finally:
        TensorJob.input_key = original  # type: ignore[method-assign]
    keys["decomposition_code"] = decomposition_code()
    keys["task_svd_code"] = task_svd_code()
    keys.update({f"merge_code:{name}": merge_code(name) for name in sorted(METHODS)})
    return keys


def _keys(job, group, cfg) -> dict[str, str]:
    return {"decomposition_key": decomposition_key(job, cfg), "layer_merge_key": layer_merge_key(job, cfg),
            "group_merge_key": group_merge_key(group, cfg), "delta_key": delta_key(group, cfg),
            "task_svd_key": cache_keys.task_svd_key(job)}


def test_cache_keys_equal_the_recorded_ones(tmp_path: Path) -> None:
    """Moving or re-importing modules changes no cache key. A deliberate change of the maths changes these:
    regenerate with ``python -m tests.test_core_code_version`` and say so in the commit (artefacts recompute)."""
    import json

    assert current_cache_keys(tmp_path) == json.loads(GOLDEN.read_text())


if __name__ == "__main__":
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        GOLDEN.write_text(json.dumps(current_cache_keys(Path(tmp)), indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")

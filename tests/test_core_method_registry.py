"""One declaration per method: a throwaway method, registered in a test, works everywhere."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from pydantic import Field
from typer.testing import CliRunner

import swudi
from swudi import ConfigError, decompose, merge_decomposition, merge_elementwise, merge_matrix, merge_state_dicts
from swudi.cli.app import app
from swudi.config.merge_config import config_from_mapping
from swudi.methods import (
    METHODS,
    MethodParams,
    MethodSpec,
    elementwise_method,
    get_method,
    register_method,
    registered_method,
    spectral_method,
    unregister_method,
    validate_params,
)

README = Path(__file__).resolve().parents[1] / "README.md"
BUILTIN = ("swudi_a", "swudi", "swudi_soft", "pinv", "wudi", "optmerge", "task_arithmetic", "ties", "mean")


def make_tv(n: int, m: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, m, d, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------ throwaway methods
class HalfTopTwoParams(MethodParams):
    """f = ``level`` on the top two eigendirections, 0 elsewhere (no ``init``: theta0 = sum)."""

    level: float = Field(0.5, gt=0.0, le=1.0)


def _half_top_two(lam: torch.Tensor, shape: tuple[int, int], p: HalfTopTwoParams) -> torch.Tensor:
    f = torch.zeros_like(lam, dtype=torch.float32)
    f[:2] = p.level
    return f


class MaxParams(MethodParams):
    """theta = scale * (entrywise max over tasks)."""

    scale: float = 1.0


def _max_merge(tv: torch.Tensor, p: MaxParams) -> torch.Tensor:
    return tv.max(dim=0).values * p.scale


class HalfSumParams(MethodParams):
    """theta = factor * sum / 2."""

    factor: float = Field(1.0, ge=0.0)


def _half_sum_from_sum(s: torch.Tensor, n: int, p: HalfSumParams) -> torch.Tensor:
    return s * (0.5 * p.factor)


@pytest.fixture
def top_two() -> Iterator[str]:
    spectral_method("tmp_top_two", HalfTopTwoParams, "test: f = level on the top 2 directions")(_half_top_two)
    yield "tmp_top_two"
    unregister_method("tmp_top_two")


@pytest.fixture
def entry_max() -> Iterator[str]:
    with registered_method(MethodSpec("tmp_max", "elementwise", MaxParams, "test: entrywise max", merge=_max_merge)):
        yield "tmp_max"


@pytest.fixture
def half_sum() -> Iterator[str]:
    elementwise_method("tmp_half_sum", HalfSumParams, "test: half the sum", from_sum=_half_sum_from_sum)(
        lambda tv, p: tv.sum(dim=0) * (0.5 * p.factor)
    )
    yield "tmp_half_sum"
    unregister_method("tmp_half_sum")


@pytest.fixture(autouse=True)
def registry_is_restored() -> Iterator[None]:
    before = dict(METHODS)
    yield
    assert before == METHODS, "a test left the registry changed"


# ------------------------------------------------------------------------------- (1) spectral
def reference_filtered(tv: torch.Tensor, f_top: torch.Tensor) -> torch.Tensor:
    """theta = S - S Q diag(f) Q^T + D Q diag(f / lambda) Q^T with C, D formed directly (float64)."""
    x = tv.double()
    w = 1.0 / x.square().sum(dim=(1, 2))
    c = torch.einsum("i,imd,ime->de", w, x, x)
    dmat = torch.einsum("i,imn,ind->md", w, x @ x.transpose(1, 2), x)
    lam, q = torch.linalg.eigh(c)
    lam, q = lam.flip(0), q.flip(1)  # descending
    k = f_top.shape[0]
    qk, lk, f = q[:, :k], lam[:k], f_top.double()
    s = x.sum(dim=0)
    return s - (s @ qk) * f @ qk.T + (dmat @ qk) * (f / lk) @ qk.T


def test_registered_spectral_method_matches_the_formula(top_two: str) -> None:
    tv = make_tv(3, 6, 5, seed=1)
    expected = reference_filtered(tv, torch.tensor([0.5, 0.5]))
    direct = merge_matrix(tv, top_two, device="cpu")
    from_dec = merge_decomposition(decompose(tv, device="cpu"), top_two, device="cpu")
    for theta in (direct, from_dec):
        assert theta.shape == (6, 5) and theta.dtype == torch.float32
        assert torch.allclose(theta.double(), expected, rtol=1e-4, atol=1e-5)
    expected = reference_filtered(tv, torch.tensor([0.25, 0.25]))
    assert torch.allclose(merge_matrix(tv, top_two, level=0.25, device="cpu").double(), expected, atol=1e-5)
    f = swudi.spectral_filter(torch.tensor([3.0, 1.0, 0.5]), (4, 3), top_two)
    assert f.tolist() == [0.5, 0.5, 0.0]
    assert get_method(top_two).kind == "spectral" and not get_method(top_two).needs_task_vectors


# ----------------------------------------------------------------------------- (2) elementwise
def tiny_models(n: int = 3) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(5)
    base = {
        "embeddings.word_embeddings.weight": torch.randn(10, 4, generator=g),
        "layer.0.dense.weight": torch.randn(4, 4, generator=g),
        "layer.0.dense.bias": torch.randn(4, generator=g),
        "embeddings.position_ids": torch.arange(6),
    }
    experts = []
    for _ in range(n):
        experts.append({k: v + torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
                        for k, v in base.items()})
    return base, experts


def test_elementwise_method_without_from_sum(entry_max: str) -> None:
    tv = make_tv(3, 4, 5, seed=2)
    with pytest.raises(ConfigError, match=r"'tmp_max'.*task vectors.*merge_matrix"):
        merge_decomposition(decompose(tv, device="cpu"), entry_max)
    assert torch.equal(merge_matrix(tv, entry_max, scale=2.0), tv.max(dim=0).values * 2.0)
    assert torch.equal(merge_elementwise(tv[:, 0], entry_max), tv[:, 0].max(dim=0).values)

    base, experts = tiny_models()
    merged = merge_state_dicts(base, experts, entry_max, scale=0.5, method_params={"scale": 2.0})
    for key, w0 in base.items():
        if not w0.is_floating_point():
            assert torch.equal(merged[key], w0)
            continue
        tau_max = torch.stack([e[key] - w0 for e in experts]).max(dim=0).values
        assert torch.allclose(merged[key], w0 + 0.5 * 2.0 * tau_max, atol=1e-6), key  # embeddings too


# ------------------------------------------------------------------------------ (3) from_sum
def test_elementwise_method_with_from_sum(half_sum: str) -> None:
    tv = make_tv(4, 5, 3, seed=3)
    expected = tv.sum(dim=0) * 0.5 * 3.0
    dec = decompose(tv, device="cpu")
    assert torch.allclose(merge_decomposition(dec, half_sum, factor=3.0), expected, atol=1e-5)
    assert torch.allclose(merge_matrix(tv, half_sum, factor=3.0), expected, atol=1e-5)
    # built-ins declared the same way
    assert torch.allclose(merge_decomposition(dec, "mean"), tv.mean(dim=0), atol=1e-6)
    assert torch.allclose(merge_decomposition(dec, "task_arithmetic", scale=0.7), tv.sum(dim=0) * 0.7, atol=1e-5)


def test_from_sum_alone_defines_the_merge() -> None:
    spec = MethodSpec("tmp_sum_only", "elementwise", HalfSumParams, "test: from_sum only", from_sum=_half_sum_from_sum)
    tv = make_tv(2, 3, 4, seed=4)
    with registered_method(spec):
        assert torch.allclose(merge_elementwise(tv[:, 0, :], "tmp_sum_only"), tv[:, 0, :].sum(0) * 0.5)
        assert torch.allclose(merge_matrix(tv, "tmp_sum_only", factor=2.0), tv.sum(0), atol=1e-6)
    assert "tmp_sum_only" not in METHODS


def test_a_method_returning_the_wrong_shape_is_named() -> None:
    spec = MethodSpec("tmp_bad_shape", "elementwise", MaxParams, "test: bad shape", merge=lambda tv, p: tv.sum())
    with registered_method(spec), pytest.raises(ConfigError, match=r"'tmp_bad_shape'.*merge returned \(\)"):
        merge_matrix(make_tv(2, 3, 4, seed=5), "tmp_bad_shape")


# ------------------------------------------------------------------- (4) CLI and configuration
def test_registered_method_is_listed_and_configurable(top_two: str, entry_max: str) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["methods"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert re.search(r"tmp_top_two\s.*spectral\s.*test: f = level on the top 2 directions.*level=0\.5", result.output)
    assert re.search(r"tmp_max\s.*elementwise", result.output)
    markdown = runner.invoke(app, ["methods", "--markdown"]).output
    assert "| `tmp_top_two` | spectral | test: f = level on the top 2 directions | – | `level=0.5` |" in markdown  # noqa: RUF001

    data = {"base": "/b", "experts": ["/e1", "/e2"], "output": "/out"}
    cfg = config_from_mapping({**data, "method": top_two, "params": {"level": 0.75}})
    assert cfg.method == top_two and cfg.params == {"level": 0.75}
    assert config_from_mapping({**data, "method": entry_max}).params == {"scale": 1.0}
    with pytest.raises(ConfigError, match=r"tmp_top_two.*'level'"):
        config_from_mapping({**data, "method": top_two, "params": {"level": 2.0}})
    with pytest.raises(ConfigError, match=r"unknown parameter 'lvl'.*Valid parameters: level"):
        config_from_mapping({**data, "method": top_two, "params": {"lvl": 0.5}})


def test_method_help_lists_the_registry() -> None:
    result = CliRunner().invoke(app, ["merge", "--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0
    assert all(name in result.output for name in BUILTIN)


# -------------------------------------------------------------------------------- (5) README
def test_readme_table_is_swudi_methods_markdown() -> None:
    text = README.read_text()
    match = re.search(r"<!-- methods:start -->\n(.*?)<!-- methods:end -->", text, re.S)
    assert match, "README.md lacks the <!-- methods:start --> / <!-- methods:end --> markers"
    table = CliRunner().invoke(app, ["methods", "--markdown"]).output
    assert match.group(1) == table, "README methods table is stale: paste `swudi methods --markdown` into it"


# ------------------------------------------------------------------- (6) declarations checked
def test_duplicate_registration_is_refused_unless_replace(top_two: str) -> None:
    with pytest.raises(ConfigError, match="'tmp_top_two' is already registered"):
        spectral_method(top_two, HalfTopTwoParams, "again")(_half_top_two)
    with pytest.raises(ConfigError, match="'swudi' is already registered"):
        register_method(MethodSpec("swudi", "elementwise", MaxParams, "clash", merge=_max_merge))
    assert get_method("swudi").kind == "spectral"
    replacement = MethodSpec(top_two, "elementwise", MaxParams, "replaced", merge=_max_merge)
    with registered_method(replacement, replace=True):
        assert get_method(top_two) is replacement
    assert get_method(top_two).kind == "spectral"  # the previous declaration is back
    with pytest.raises(ConfigError, match="not registered"):
        unregister_method("tmp_never_registered")


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"kind": "spectral"}, "needs a filter"),
        ({"kind": "elementwise"}, "needs merge"),
        ({"kind": "iterative", "filter": _half_top_two}, "no spectral filter"),
        ({"kind": "spectral", "filter": _half_top_two, "merge": _max_merge}, "filter alone"),
        ({"kind": "fancy", "merge": _max_merge}, "kind 'fancy'"),
        ({"kind": "elementwise", "merge": _max_merge, "name": "bad name"}, "the name"),
        ({"kind": "elementwise", "merge": _max_merge, "description": ""}, "description"),
        ({"kind": "elementwise", "merge": "not callable"}, "callable"),
    ],
)
def test_bad_declarations_fail_when_declared(kwargs: dict, problem: str) -> None:
    fields = {"name": "tmp_bad", "params_model": MaxParams, "description": "test", **kwargs}
    with pytest.raises(ConfigError, match=problem):
        MethodSpec(**fields)
    assert "tmp_bad" not in METHODS


def test_parameter_models_must_be_strict_and_defaulted() -> None:
    from pydantic import BaseModel

    class Loose(BaseModel):
        scale: float = 1.0

    class NoDefault(MethodParams):
        scale: float

    with pytest.raises(ConfigError, match="reject unknown keys"):
        MethodSpec("tmp_loose", "elementwise", Loose, "test", merge=_max_merge)
    with pytest.raises(ConfigError, match="no default for scale"):
        MethodSpec("tmp_nodefault", "elementwise", NoDefault, "test", merge=_max_merge)


def test_builtin_kinds_and_iterative_methods_need_task_vectors() -> None:
    assert {name: get_method(name).kind for name in BUILTIN} == {
        "swudi_a": "spectral", "swudi": "spectral", "swudi_soft": "spectral", "pinv": "spectral",
        "wudi": "iterative", "optmerge": "iterative",
        "task_arithmetic": "elementwise", "ties": "elementwise", "mean": "elementwise",
    }
    assert [n for n in BUILTIN if get_method(n).needs_task_vectors] == ["wudi", "optmerge", "ties"]
    assert validate_params("mean", {}) == {}


def test_method_modules_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = tmp_path / "tmp_user_methods.py"
    module.write_text(
        "from swudi.methods import MethodParams, elementwise_method\n\n"
        "class P(MethodParams):\n    scale: float = 2.0\n\n"
        "@elementwise_method('tmp_env_double', P, 'test: scale * sum')\n"
        "def double(tv, p):\n    return tv.sum(0) * p.scale\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("SWUDI_METHOD_MODULES", "tmp_user_methods")
    try:
        tv = make_tv(2, 3, 4, seed=6)
        assert torch.allclose(merge_matrix(tv, "tmp_env_double"), tv.sum(0) * 2.0)
        assert "tmp_env_double" in CliRunner().invoke(app, ["methods", "--markdown"]).output
        monkeypatch.setenv("SWUDI_METHOD_MODULES", "tmp_no_such_module")
        with pytest.raises(ConfigError, match="cannot import merge-method module 'tmp_no_such_module'"):
            get_method("swudi")
    finally:
        if "tmp_env_double" in METHODS:
            unregister_method("tmp_env_double")
        sys.modules.pop("tmp_user_methods", None)
        monkeypatch.delenv("SWUDI_METHOD_MODULES")
        get_method("swudi")  # resets the record of imported modules

"""The conformance lane: every family of :mod:`tests.conformance.families` merged by swudi.

For each family (base + 3 experts built offline by transformers): `swudi plan` names every tensor's
treatment (and the orientation of every merged weight); `swudi merge` with swudi_a, task_arithmetic
and ties publishes a version that `from_pretrained` loads with no missing, unexpected or mismatched
key and that runs a forward pass; every published tensor equals the float64 reference of
:mod:`tests.conformance.reference` computed in the right orientation; tied weights stay tied (saved
once, as the family saves them). Families stored [in, out] also show that the wrong orientation gives
another merge. One record per family goes to $SWUDI_CONFORMANCE_RESULTS (JSON lines) for
`python -m tests.conformance.report`, which writes docs/conformance.md.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from typer.testing import CliRunner

from flows.merge import run_merge
from swudi.cli.app import app
from swudi.config.merge_config import load_config
from tests.conformance.families import FAMILIES, Family, build_family, expert_tensors
from tests.conformance.reference import expected_treatment, matches, reference_tensor

pytestmark = pytest.mark.conformance

METHODS: dict[str, dict[str, Any]] = {
    "swudi_a": {},
    "task_arithmetic": {"scale": 0.5},
    "ties": {"density": 0.5, "scale": 1.0},
}


def _close(got: torch.Tensor, ref: torch.Tensor) -> tuple[bool, float]:
    """Float32 compute: |got - ref| <= 1e-4 |ref| + 1e-5 max|ref|; bfloat16 output: within the
    rounding of the output dtype (2^-8 relative) of the float64 reference."""
    ref_out = ref.to(got.dtype).double()
    scale = float(ref.abs().max()) or 1.0
    rtol, atol = (1e-4, 1e-5 * scale) if got.dtype == torch.float32 else (2**-7, 2**-8 * scale)
    err = (got.double() - ref_out).abs()
    return bool((err <= atol + rtol * ref.abs()).all()), float(err.max()) if err.numel() else 0.0


def _write_config(folder: Path, base: Path, experts: list[Path], method: str, out: Path) -> Path:
    path = folder / f"{method}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "base": str(base),
                "experts": [str(e) for e in experts],
                "output": str(out),
                "method": method,
                "params": METHODS[method],
                "device": "cpu",
                "workers": 2,
                "max_shard_size": "16KB",
            }
        )
    )
    return path


def _check_plan(family: Family, config: Path, method: str, base: dict[str, torch.Tensor]) -> dict[str, int]:
    """`swudi plan --json`: one row per base tensor, the treatment the spec expects, and the
    orientation of each merged weight. Returns the tensor count per treatment."""
    result = CliRunner().invoke(app, ["plan", str(config), "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.output)["tensors"]}
    assert sorted(rows) == sorted(base), "the plan names every tensor of the base, once"
    counts: dict[str, int] = {}
    for name, row in rows.items():
        want = expected_treatment(name, tuple(base[name].shape), method, family.fused)
        counts[want] = counts.get(want, 0) + 1
        got = row["treatment"]
        if want == "experts":
            assert got.startswith("layer per expert"), (name, got)
        elif want == "method":  # an elementwise method: a 2-D weight is a layer task, the rest a group
            assert got == ("layer" if base[name].dim() == 2 else "method"), (name, got)
        else:
            assert got == want, (name, got)
        if want in ("layer", "experts"):
            assert row["orientation"] == ("in_out" if matches(name, family.in_out) else "out_in"), (name, row)
            counts["in_out"] = counts.get("in_out", 0) + (row["orientation"] == "in_out")
    return counts


def _check_loads(family: Family, version: Path, base_dir: Path) -> None:
    """from_pretrained with no missing / unexpected / mismatched keys, a finite forward pass, ties kept."""
    cls = family.model_class()
    model, info = cls.from_pretrained(version, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info.get("mismatched_keys"), info
    model.eval()
    with torch.no_grad():
        out = model(**family.inputs(model, model.config))
    first = out[0] if isinstance(out, tuple) else next(iter(out.values()))
    assert torch.isfinite(first.float()).all()
    reference = cls.from_pretrained(base_dir)
    out_emb, ref_out_emb = model.get_output_embeddings(), reference.get_output_embeddings()
    if ref_out_emb is not None and ref_out_emb.weight is reference.get_input_embeddings().weight:
        assert out_emb.weight is model.get_input_embeddings().weight, "tied output embeddings came apart"


def _record(record: dict[str, Any]) -> None:
    path = os.environ.get("SWUDI_CONFORMANCE_RESULTS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


@pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
def test_family_merges_correctly(family: Family, prefect_api: str, tmp_path: Path) -> None:
    started = time.perf_counter()
    record: dict[str, Any] = {
        "family": family.name,
        "model_type": family.model_type,
        "note": family.note,
        "status": "fail",
    }
    try:
        base_dir, expert_dirs = build_family(family, tmp_path / "in")
        base = expert_tensors(base_dir)
        experts = [expert_tensors(e) for e in expert_dirs]
        record["tensors"] = len(base)
        record["shards"] = len(list(base_dir.glob("*.safetensors")))
        record["methods"] = {}
        for method, params in METHODS.items():
            config = _write_config(tmp_path, base_dir, expert_dirs, method, tmp_path / f"out-{method}")
            counts = _check_plan(family, config, method, base)
            result = run_merge(load_config(config))
            version = Path(result["url"])
            merged = expert_tensors(version)
            assert sorted(merged) == sorted(base), "published tensors are the base's (tied weights saved once)"
            worst = 0.0
            for name, w0 in base.items():
                treatment = expected_treatment(name, tuple(w0.shape), method, family.fused)
                ref = reference_tensor(
                    name, w0, [e[name] for e in experts], method, params, treatment, matches(name, family.in_out)
                )
                assert merged[name].dtype == w0.dtype, name
                ok, err = _close(merged[name], ref)
                assert ok, f"{family.name} {method} {name}: max |merged - reference| = {err:.3g}"
                worst = max(worst, err / (float(ref.abs().max()) or 1.0))
                if method == "swudi_a" and treatment in ("layer", "experts") and matches(name, family.in_out):
                    wrong = reference_tensor(name, w0, [e[name] for e in experts], method, params, treatment, False)
                    assert not _close(merged[name], wrong)[0], f"{name}: the wrong orientation gives the same merge"
            _check_loads(family, version, base_dir)
            record["methods"][method] = {"counts": counts, "max_rel_error": worst}
        record["status"] = "pass"
    except BaseException as error:
        record["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
        raise
    finally:
        record["seconds"] = round(time.perf_counter() - started, 1)
        _record(record)

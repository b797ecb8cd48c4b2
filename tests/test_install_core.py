"""The core install: swudi without extras in a fresh virtual environment (uv), as a user installs it.

`pip install swudi` must be enough for `swudi merge` on local folders (Prefect's embedded server
included) and for the Python API; the Python API must not import Prefect; a Dask runner asked for
without the `[dask]` extra fails with one line naming the extra. Versions are held to
requirements.lock (`-c`), torch from pip's configured find-links folder (the CPU wheel), so uv
installs from its cache. In the services lane (CI runs it on every run; about two minutes).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from swudi.io.synthetic import SyntheticModel, write_synthetic_models

pytestmark = [pytest.mark.slow, pytest.mark.services]

REPO = Path(__file__).resolve().parents[1]
MODEL = SyntheticModel(layers=1, hidden=16, intermediate=32, vocab=16, positions=8)
#: import names of the extras' packages: none may come with the core install
EXTRA_MODULES = ("s3fs", "dask", "distributed", "prefect_dask", "transformers", "matplotlib", "sklearn", "peft")

API_CHECK = """
import json, sys
import torch
import swudi
g = torch.Generator().manual_seed(0)
base = {"w": torch.randn(6, 4, generator=g), "b": torch.randn(4, generator=g)}
experts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
merged = swudi.merge_state_dicts(base, experts, "mean", scale=0.5, device="cpu")
# independent formula, float64: W0 + 0.5 * mean_i (W_i - W0)
want = {k: base[k].double() + 0.5 * sum(e[k].double() - base[k].double() for e in experts) / 3 for k in base}
err = max(float((merged[k].double() - want[k]).abs().max()) for k in base)
print(json.dumps({"err": err, "prefect": sorted(m for m in sys.modules if m.split(".")[0] == "prefect")}))
"""


def _find_links() -> str:
    # the system's pip, as scripts/bootstrap.sh asks it (the project's .venv, made by uv, has none)
    done = subprocess.run(
        ["python3", "-m", "pip", "config", "get", "global.find-links"], capture_output=True, text=True, check=False
    )
    return done.stdout.strip() if done.returncode == 0 else ""


@pytest.fixture(scope="module")
def core_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not installed (scripts/bootstrap.sh installs it)")
    venv = tmp_path_factory.mktemp("core") / "venv"
    subprocess.run([uv, "venv", "--quiet", "--python", sys.executable, str(venv)], check=True, timeout=120)
    links = _find_links()
    command = [
        uv,
        "pip",
        "install",
        "--quiet",
        "--python",
        str(venv / "bin" / "python"),
        "-c",
        str(REPO / "requirements.lock"),
        *(["--find-links", links] if links else []),
        str(REPO),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return venv


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "PYTHON", "VIRTUAL_ENV"))}
    env.update(
        {"PREFECT_HOME": str(tmp / "prefect-home"), "SWUDI_LOCAL_PREFECT_API": "", "PREFECT_LOGGING_LEVEL": "WARNING"}
    )
    return env


def test_the_core_install_has_no_extra_and_the_python_api_imports_no_prefect(core_venv: Path, tmp_path: Path) -> None:
    python = str(core_venv / "bin" / "python")
    found = subprocess.run(
        [python, "-c", f"import importlib.util as u; print([m for m in {EXTRA_MODULES!r} if u.find_spec(m)])"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert found.stdout.strip() == "[]", found.stdout
    done = subprocess.run(
        [python, "-c", API_CHECK],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["prefect"] == [] and result["err"] < 1e-6, result


def test_swudi_merge_runs_on_the_core_install_and_a_dask_runner_names_its_extra(
    core_venv: Path, tmp_path: Path
) -> None:
    base, experts = write_synthetic_models(str(tmp_path / "in"), 2, MODEL)
    config = tmp_path / "merge.yaml"
    config.write_text(
        yaml.safe_dump(
            {"base": base, "experts": experts, "output": str(tmp_path / "out"), "device": "cpu", "workers": 1}
        )
    )
    swudi = str(core_venv / "bin" / "swudi")
    refused = subprocess.run(
        [swudi, "merge", str(config), "--set", "task_runner.kind=dask"],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert refused.returncode == 2 and "pip install 'swudi[dask]'" in " ".join(refused.stderr.split()), refused.stderr
    assert not (tmp_path / "out").exists()
    done = subprocess.run(
        [swudi, "merge", str(config)],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    latest = json.loads((tmp_path / "out" / "latest.json").read_text())
    assert done.stdout.strip().endswith(latest["version"])

"""The library (`swudi/`) imports no Prefect: the layering rule of docs/design.md, checked two ways.

1. In a fresh interpreter, importing `swudi` and every module under it leaves `prefect` out of
   `sys.modules`.
2. No module under `swudi/` imports Prefect, `flows`, `tasks` or `deployments`, even inside a
   function, except the two allowed places: the command line's bridge to the flows
   (`swudi/cli/flows_bridge.py`, `flows.commands` inside functions) and the resolution of a
   `from_prefect_secret` reference (`swudi/storage/secrets.py`, inside that function).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ORCHESTRATION = ("prefect", "prefect_dask", "flows", "tasks", "deployments")
#: (file, function) -> the top-level packages it may import inside that function
ALLOWED = {
    ("swudi/cli/flows_bridge.py", "run_merge_and_settle"): {"flows"},
    ("swudi/cli/flows_bridge.py", "run_sweep_and_settle"): {"flows"},
    ("swudi/cli/flows_bridge.py", "run_tune_and_settle"): {"flows"},
    ("swudi/cli/flows_bridge.py", "run_refresh"): {"flows"},
    ("swudi/cli/flows_bridge.py", "serve_refresh_deployment"): {"flows"},
    ("swudi/storage/secrets.py", "_load_prefect_secret"): {"prefect"},
}

IMPORT_ALL = """
import importlib, json, pkgutil, sys
ORCHESTRATION = tuple(sys.argv[1:])
import swudi
# (a __main__ module runs the command line when imported)
names = sorted(m.name for m in pkgutil.walk_packages(swudi.__path__, "swudi.") if not m.name.endswith(".__main__"))
for name in names:
    importlib.import_module(name)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ORCHESTRATION)
print(json.dumps({"modules": names, "prefect": loaded}))
"""


def test_importing_every_library_module_imports_no_prefect() -> None:
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL, *ORCHESTRATION],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.splitlines()[-1])
    assert len(found["modules"]) > 50 and "swudi.cli.app" in found["modules"]  # the walk saw the package
    assert found["prefect"] == []


def _imports(tree: ast.AST) -> list[tuple[str, int, str]]:
    """(top-level package, line, enclosing function or "<module>") of every import in ``tree``."""
    found: list[tuple[str, int, str]] = []

    def visit(node: ast.AST, where: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, child.name)
                continue
            if isinstance(child, ast.Import):
                found.extend((alias.name.split(".")[0], child.lineno, where) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.append((child.module.split(".")[0], child.lineno, where))
            visit(child, where)

    visit(tree, "<module>")
    return found


@pytest.mark.parametrize("path", sorted(p.relative_to(REPO).as_posix() for p in (REPO / "swudi").rglob("*.py")))
def test_no_library_module_imports_orchestration_outside_the_allowed_places(path: str) -> None:
    tree = ast.parse((REPO / path).read_text(), filename=path)
    wrong = [
        f"{path}:{line} imports {package} in {where}"
        for package, line, where in _imports(tree)
        if package in ORCHESTRATION and package not in ALLOWED.get((path, where), set())
    ]
    assert not wrong, wrong

"""Every benchmark script's ``if __name__ == "__main__":`` block is its last statement.

Run as ``python -m benchmarks...``, a module executes top to bottom, so ``main()`` called from that
block cannot see a function defined below it (a NameError that tests calling ``main()`` after an
import never meet: the LM runner's ``study_vs_default`` stood there once).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p for p in (ROOT / "benchmarks").rglob("*.py") if "__main__" in p.read_text())


def _is_main_guard(node: ast.stmt) -> bool:
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
    )


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_main_guard_is_the_last_statement(path: Path) -> None:
    body = ast.parse(path.read_text()).body
    guards = [i for i, node in enumerate(body) if _is_main_guard(node)]
    assert guards, f"{path}: '__main__' appears but no module-level guard was found"
    after = [getattr(node, "name", type(node).__name__) for node in body[guards[-1] + 1 :]]
    assert not after, f"{path}: defined after the __main__ guard, unseen by `python -m`: {after}"


def test_the_check_sees_a_function_below_the_guard(tmp_path: Path) -> None:
    script = tmp_path / "late.py"
    script.write_text(
        'def main():\n    return late()\n\n\nif __name__ == "__main__":\n    main()\n\n\ndef late():\n    return 0\n'
    )
    with pytest.raises(AssertionError, match="late"):
        test_main_guard_is_the_last_statement(script)

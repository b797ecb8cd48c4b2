"""Digests of the numerical code, so that cache keys follow the code.

A stored decomposition or merged tensor is valid only for the code that computed it. Instead of a
constant bumped by hand, the artefact keys include a digest of the modules that compute each step.
The digest is taken from each module's syntax tree with docstrings removed: a change of the maths
changes the keys, while comments, docstrings and formatting do not.

- :func:`decomposition_code`: what a decomposition depends on (the eigendecomposition and the
  task-vector arithmetic).
- :func:`merge_code`: what a merged tensor depends on (the above, the filters, rank rules,
  methods, baselines and diagnostics), plus the module that declares the method used, so that a
  method registered from a user's module is keyed on that module's code too.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import logging
from collections.abc import Iterable

__all__ = ["DECOMPOSITION_MODULES", "MERGE_MODULES", "module_digest", "code_digest", "decomposition_code", "merge_code"]

log = logging.getLogger(__name__)

DECOMPOSITION_MODULES = ("swudi.decomposition", "swudi.lowrank", "swudi.task_vectors")
MERGE_MODULES = (
    *DECOMPOSITION_MODULES,
    "swudi.spectral",
    "swudi.rank",
    "swudi.methods",
    "swudi.baselines",
    "swudi.diagnostics",
)


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if (
                body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                node.body = body[1:] or [ast.Pass()]
    return tree


@functools.cache
def module_digest(module: str) -> str:
    """sha256 of a module's syntax tree without docstrings (its name when the source is not found)."""
    spec = importlib.util.find_spec(module)
    origin = getattr(spec, "origin", None)
    if not origin or not origin.endswith(".py"):
        log.warning("no Python source for module %r; its cache keys use the module name only", module)
        return hashlib.sha256(f"module:{module}".encode()).hexdigest()
    with open(origin, "rb") as f:
        tree = _strip_docstrings(ast.parse(f.read(), filename=origin))
    return hashlib.sha256(ast.dump(tree, annotate_fields=False).encode()).hexdigest()


def code_digest(modules: Iterable[str]) -> str:
    """One digest over several modules (order-free, duplicates ignored), 16 hex digits."""
    h = hashlib.sha256()
    for module in sorted(set(modules)):
        h.update(f"{module}={module_digest(module)}\n".encode())
    return h.hexdigest()[:16]


def decomposition_code() -> str:
    """Digest of the code a decomposition depends on."""
    return code_digest(DECOMPOSITION_MODULES)


def merge_code(method: str | None = None) -> str:
    """Digest of the code a merged tensor depends on (with the module declaring ``method``)."""
    modules = list(MERGE_MODULES)
    if method is not None:
        modules.extend(_method_modules(method))
    return code_digest(modules)


def _method_modules(method: str) -> list[str]:
    from swudi.methods import get_method  # lazy: methods imports this module's users

    spec = get_method(method)
    found = []
    for attr in ("filter", "merge", "from_sum"):
        fn = getattr(spec, attr, None)
        module = getattr(fn, "__module__", None)
        if module:
            found.append(module)
    return found

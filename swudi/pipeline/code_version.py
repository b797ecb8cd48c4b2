"""Digests of the numerical code, so that cache keys follow the code.

A stored decomposition or merged tensor is valid only for the code that computed it. Instead of a
constant bumped by hand, the artefact keys include a digest of the modules that compute each step.
The digest is taken from each module's syntax tree with docstrings and swudi's own import lines
removed, under a logical name that does not depend on where the module lives: a change of the maths
changes the keys, while comments, docstrings, formatting and moving a module to another package do not.
Imports of third-party packages stay in the digest (``torch.linalg`` vs ``scipy.linalg`` is maths).

- :func:`decomposition_code`: what a decomposition depends on (the eigendecomposition and the
  task-vector arithmetic).
- :func:`task_svd_code`: what the per-task SVDs (subspace methods, post-filters) depend on.
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

__all__ = [
    "DECOMPOSITION_MODULES",
    "MERGE_MODULES",
    "TASK_SVD_MODULES",
    "code_digest",
    "decomposition_code",
    "merge_code",
    "module_digest",
    "task_svd_code",
]

log = logging.getLogger(__name__)

#: Logical name (part of the digest) -> the module that holds that code now. Moving a module changes
#: only the right-hand side, never a cache key.
NUMERICAL_MODULES: dict[str, str] = {
    "decomposition": "swudi.core.decomposition",
    "lowrank": "swudi.core.lowrank",
    "task_vectors": "swudi.core.task_vectors",
    "spectral": "swudi.core.spectral",
    "rank": "swudi.core.rank",
    "methods": "swudi.methods.declarations",
    "baselines": "swudi.core.baselines",
    "diagnostics": "swudi.core.diagnostics",
    "task_svd": "swudi.core.task_svd",
    "subspace": "swudi.core.subspace",
}
DECOMPOSITION_MODULES = ("decomposition", "lowrank", "task_vectors")
TASK_SVD_MODULES = ("task_svd", "task_vectors")
MERGE_MODULES = (
    *DECOMPOSITION_MODULES,
    *TASK_SVD_MODULES,
    "spectral",
    "rank",
    "methods",
    "baselines",
    "diagnostics",
    "subspace",
)
_LOGICAL_NAME = {module: name for name, module in NUMERICAL_MODULES.items()}
FIRST_PARTY = "swudi"


def _is_first_party_import(node: ast.stmt) -> bool:
    if isinstance(node, ast.ImportFrom):
        return node.level > 0 or (node.module or "").split(".")[0] == FIRST_PARTY
    if isinstance(node, ast.Import):
        return all(alias.name.split(".")[0] == FIRST_PARTY for alias in node.names)
    return False


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    """Remove docstrings and swudi's own import statements (at any depth) from ``tree``."""
    for node in ast.walk(tree):
        for attr in ("body", "orelse", "finalbody"):
            block = getattr(node, attr, None)
            if isinstance(block, list) and any(isinstance(n, ast.stmt) and _is_first_party_import(n) for n in block):
                kept = [n for n in block if not (isinstance(n, ast.stmt) and _is_first_party_import(n))]
                setattr(node, attr, kept or [ast.Pass()])
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
    """sha256 of a module's syntax tree without docstrings and swudi imports (its name when no source).

    ``module`` is a logical name of :data:`NUMERICAL_MODULES` or a dotted module path (a user's module).
    """
    spec = importlib.util.find_spec(NUMERICAL_MODULES.get(module, module))
    origin = getattr(spec, "origin", None)
    if not origin or not origin.endswith(".py"):
        log.warning("no Python source for module %r; its cache keys use the module name only", module)
        return hashlib.sha256(f"module:{module}".encode()).hexdigest()
    with open(origin, "rb") as f:
        tree = _strip_docstrings(ast.parse(f.read(), filename=origin))
    return hashlib.sha256(ast.dump(tree, annotate_fields=False).encode()).hexdigest()


def code_digest(modules: Iterable[str]) -> str:
    """One digest over several modules (order-free, duplicates ignored), 16 hex digits.

    Each module enters under its logical name (:data:`NUMERICAL_MODULES`), a user's module under its path.
    """
    h = hashlib.sha256()
    for module in sorted({_LOGICAL_NAME.get(m, m) for m in modules}):
        h.update(f"{module}={module_digest(module)}\n".encode())
    return h.hexdigest()[:16]


def decomposition_code() -> str:
    """Digest of the code a decomposition depends on."""
    return code_digest(DECOMPOSITION_MODULES)


def task_svd_code() -> str:
    """Digest of the code per-task SVDs depend on."""
    return code_digest(TASK_SVD_MODULES)


def merge_code(method: str | None = None) -> str:
    """Digest of the code a merged tensor depends on (with the module declaring ``method``)."""
    modules = list(MERGE_MODULES)
    if method is not None:
        modules.extend(_method_modules(method))
    return code_digest(modules)


def _method_modules(method: str) -> list[str]:
    from swudi.methods import get_method

    spec = get_method(method)
    found = []
    for attr in ("filter", "merge", "from_sum", "from_svds"):
        fn = getattr(spec, attr, None)
        module = getattr(fn, "__module__", None)
        if module:
            found.append(module)
    return found

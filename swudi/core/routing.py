"""Which tensor of a model gets what: the merge method, the mean of task vectors, or the base value.

Rules, in order, for a tensor ``name`` (patterns are :func:`fnmatch.fnmatchcase` globs on the
full tensor name, e.g. ``"*.lm_head.*"`` or ``"model.layers.0.*"``):

1. non-floating dtype (integer buffers, masks, ...)            -> ``"base"``
2. matches a ``keep_base`` pattern                               -> ``"base"`` (left untouched)
3. matches an ``exclude`` pattern                                -> ``"mean"``
4. ``include`` is non-empty and the name matches none of it      -> ``"mean"``
5. elementwise method (task_arithmetic, mean, ties)              -> ``"method"``
6. matrix method (spectral / iterative):
   - a fused mixture-of-experts tensor [E, m, d]
     (:func:`is_fused_experts`)                                   -> ``"method"`` (E weights, each its own)
   - not a non-empty 2-D tensor                                  -> ``"mean"``
   - matches a default exclude (:data:`DEFAULT_EXCLUDE`: ``lm_head``, embeddings, stacked
     per-expert biases [E, m]) and no ``include`` pattern                                         -> ``"mean"``
   - otherwise                                                   -> ``"method"``

So ``include`` both restricts the method to the named tensors and, for a matrix method, opts
them back in past the default excludes (e.g. ``include=("*",)`` merges ``lm_head`` with SWUDI
too); ``exclude`` always wins over ``include``; ``keep_base`` wins over everything.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase
from typing import Literal

import torch

from swudi.methods import get_method

__all__ = ["Route", "DEFAULT_EXCLUDE", "FUSED_EXPERTS", "route_tensor", "matches_any", "is_fused_experts"]

Route = Literal["method", "mean", "base"]

#: Names a matrix method leaves to the mean by default: the output head and embeddings
#: (``embed_tokens``, ``word_embeddings``, ``position_embeddings``, ...), as the reference code does.
#: ``*bias``: the per-expert biases of a fused MoE layer are 2-D ([E, m], one bias per row).
DEFAULT_EXCLUDE: tuple[str, ...] = ("*lm_head*", "*embed*", "*bias")

#: Names of fused mixture-of-experts tensors [E, m, d] (E experts' 2-D weights in one tensor), as
#: transformers 5.x saves them (gpt-oss, Llama 4: ``*.experts.gate_up_proj``; GraniteMoE:
#: ``*.block_sparse_moe.input_linear.weight``). A matrix method merges each expert on its own.
FUSED_EXPERTS: tuple[str, ...] = (
    "*.experts.gate_up_proj",
    "*.experts.down_proj",
    "*.experts.gate_proj",
    "*.experts.up_proj",
    "*.block_sparse_moe.input_linear.weight",
    "*.block_sparse_moe.output_linear.weight",
)


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    """True when ``name`` matches one of the glob ``patterns`` (case-sensitive)."""
    return any(fnmatchcase(name, pattern) for pattern in patterns)


def is_fused_experts(name: str, shape: Sequence[int]) -> bool:
    """True for a non-empty 3-D tensor named like fused experts (:data:`FUSED_EXPERTS`)."""
    return len(shape) == 3 and 0 not in tuple(shape) and matches_any(name, FUSED_EXPERTS)


def route_tensor(
    name: str,
    shape: Sequence[int],
    dtype: torch.dtype,
    method: str,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    keep_base: Iterable[str] = (),
) -> Route:
    """The route of one tensor under ``method`` (see the module docstring for the rules)."""
    spec = get_method(method)
    include = tuple(include)
    if not (dtype.is_floating_point if isinstance(dtype, torch.dtype) else False):
        return "base"
    if matches_any(name, keep_base):
        return "base"
    if matches_any(name, exclude):
        return "mean"
    included = matches_any(name, include)
    if include and not included:
        return "mean"
    if spec.kind == "elementwise":
        return "method"
    shape = tuple(int(s) for s in shape)
    if is_fused_experts(name, shape):
        return "method"
    if len(shape) != 2 or 0 in shape:
        return "mean"
    if matches_any(name, DEFAULT_EXCLUDE) and not included:
        return "mean"
    return "method"

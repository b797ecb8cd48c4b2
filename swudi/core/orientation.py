"""Which way round a stored weight is: ``out_in`` ([out, in], ``nn.Linear``) or ``in_out`` ([in, out]).

Every spectral method works on an m x d = out x in weight: its Gram matrix C = sum_i w_i tau_i^T tau_i
is over the *input* dimension d (method.md). Most checkpoints store ``nn.Linear`` weights as
[out, in]; GPT-2-style ``Conv1D`` stores [in, out], and some fused mixture-of-experts tensors store
each expert as [in, out] too (``hidden @ W``). Such a weight is transposed to [out, in] for the
decomposition and the merge, and back for the output.

The orientation of a tensor comes from, in order:

1. the config's ``orientation`` patterns (``{"*.c_attn.weight": "in_out"}``; the first matching
   pattern, in the order given, wins);
2. the architecture: the base ``config.json``'s ``model_type`` and :data:`ARCHITECTURE_IN_OUT`;
3. ``out_in``.

For a fused expert tensor [E, a, b] the orientation is that of each expert's [a, b] weight.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from swudi.core.routing import matches_any

__all__ = ["Orientation", "ORIENTATIONS", "ARCHITECTURE_IN_OUT", "orientation_of"]

Orientation = Literal["out_in", "in_out"]
ORIENTATIONS: tuple[str, ...] = ("out_in", "in_out")

#: transformers' ``Conv1D`` layers (``transformers.pytorch_utils.Conv1D``: weight [in, out]).
_CONV1D = ("*.c_attn.weight", "*.q_attn.weight", "*.c_proj.weight", "*.c_fc.weight")
#: Fused expert tensors applied as ``hidden @ W[e]`` (weight [E, in, out]).
_FUSED_IN_OUT = ("*.experts.gate_up_proj", "*.experts.down_proj")

#: model_type -> the tensor-name patterns stored [in, out] in that family's checkpoints (checked
#: against transformers 5.x: the model classes that build ``Conv1D`` or fused ``hidden @ W`` experts).
ARCHITECTURE_IN_OUT: dict[str, tuple[str, ...]] = {
    "gpt2": _CONV1D,
    "openai-gpt": _CONV1D,
    "imagegpt": _CONV1D,
    "decision_transformer": _CONV1D,
    "clvp": _CONV1D,
    "clvp_decoder": _CONV1D,
    "gpt_oss": _FUSED_IN_OUT,
    "llama4": _FUSED_IN_OUT,
    "llama4_text": _FUSED_IN_OUT,
}


def orientation_of(name: str, model_type: str | None, overrides: Mapping[str, str] | None = None) -> Orientation:
    """The orientation of tensor ``name`` (see the module docstring for the order of the rules)."""
    for pattern, orientation in (overrides or {}).items():
        if matches_any(name, (pattern,)):
            return "in_out" if orientation == "in_out" else "out_in"
    if model_type is not None and matches_any(name, ARCHITECTURE_IN_OUT.get(model_type, ())):
        return "in_out"
    return "out_in"

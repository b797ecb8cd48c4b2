"""The merge report: what was merged, how, and what came out (written beside each version)."""

from __future__ import annotations

import platform
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import torch

from swudi import __version__
from swudi.config.merge_config import MergeConfig
from swudi.pipeline.code_version import decomposition_code, merge_code
from swudi.pipeline.plan import MergePlan
from swudi.pipeline.records import MergedRecord
from swudi.storage.redact import mask_in


def build_report(
    config: MergeConfig,
    plan: MergePlan,
    version: str,
    merged: Sequence[MergedRecord],
    diagnostics: Mapping[str, Any],
    evaluations: Mapping[str, Any] | None = None,
    timings: Mapping[str, Any] | None = None,
    io: Mapping[str, Any] | None = None,
    work_folder: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A JSON-able record of one merged version: inputs, parameters, per-layer results, bytes read
    by the run that published it, the work folder's size, software. Credentials in any URL are
    masked (:func:`swudi.storage.redact.mask_in`)."""
    return mask_in(
        {
            "version": version,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "inputs": {
                "base": {"url": plan.base_url, "fingerprint": plan.base_fingerprint},
                "experts": [
                    {"url": url, "fingerprint": fp}
                    for url, fp in zip(plan.expert_urls, plan.expert_fingerprints, strict=True)
                ],
                "fingerprint": plan.inputs_fingerprint,
            },
            "method": config.method,
            "params": config.params,
            "scale": config.scale,
            "routing": {
                "include": config.include,
                "exclude": config.exclude,
                "keep_base": config.keep_base,
                "counts": plan.counts(),
            },
            "output_dtype": config.output_dtype,
            "warnings": list(plan.warnings),
            "diagnostics": dict(diagnostics),
            "evaluations": dict(evaluations or {}),
            "timings": {
                "merge_seconds_computed": round(sum(r.seconds for r in merged), 3),
                **{k: round(v, 3) if isinstance(v, float) else v for k, v in (timings or {}).items()},
            },
            "io": dict(io or {}),
            "work_folder": dict(work_folder or {}),
            "software": {
                "swudi": __version__,
                "merge_code": merge_code(config.method),
                "decomposition_code": decomposition_code(),
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
        }
    )

"""The publish gate: a complete version becomes ``latest`` only if its objective passes every bound.

The config's ``gate`` (:class:`~swudi.config.merge_config.GateConfig`) names an objective
(:mod:`swudi.evaluators.objective`) of one of the config's evaluators. Its value on the staged
version comes from the version's report (the evaluators ran while it was written) or, for a version
found complete, from the report stored beside it. The bounds, with ``+`` the direction in which the
objective is better (higher; lower with ``minimize``) and ``t`` the tolerance:

- ``at_least`` / ``at_most``: value >= at_least, value <= at_most;
- ``no_worse_than: base``: value >= base's value - t (minimize: <= base's + t); the base checkpoint
  is evaluated once, its score cached by the base's fingerprint and the evaluator
  (:func:`swudi.evaluators.objective.checkpoint_value`, ``WORK/evaluations``);
- ``no_worse_than: latest``: the same against the version ``latest.json`` names, read from its
  report when that recorded the same evaluator (function and options), else evaluated (cached the
  same way). With nothing published yet there is no reference: the bound is skipped (logged).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from swudi.config.merge_config import MergeConfig
from swudi.evaluators.objective import Objective, checkpoint_value, objective_value, parse_objective
from swudi.publish.versions import REPORT_NAME, read_latest
from swudi.storage.filesystem import join_url, resolve

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GateResult:
    """The gate's verdict: the objective's value, the bounds checked, and a one-line reason."""

    passed: bool
    objective: str
    value: float
    bounds: list[dict[str, Any]] = field(default_factory=list)  # {"name", "bound", "reference"?, "passed"}
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "objective": self.objective,
            "value": self.value,
            "bounds": self.bounds,
            "reason": self.reason,
        }


def _report(url: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    fs, path = resolve(join_url(url, REPORT_NAME), storage_options)
    try:
        data = json.loads(fs.cat_file(path))
    except (FileNotFoundError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _value_from_report(objective: Objective, report: Mapping[str, Any], url: str) -> float | None:
    """The objective's value recorded in a version's report, when the same evaluator (function and
    options) produced it; else None."""
    recorded = (report.get("evaluator_keys") or {}).get(objective.evaluator.function)
    metrics = (report.get("evaluations") or {}).get(objective.evaluator.function)
    if recorded != objective.evaluator_key or metrics is None:
        return None
    return objective_value(objective, metrics, url)


def version_value(
    config: MergeConfig, objective: Objective, url: str, report: Mapping[str, Any] | None = None
) -> float:
    """The objective on a published version: from its report, else evaluated (cached by the
    version's fingerprint and the evaluator, :func:`~swudi.evaluators.objective.checkpoint_value`)."""
    report = report if report is not None else _report(url, config.storage_options)
    value = _value_from_report(objective, report, url)
    if value is not None:
        return value
    return checkpoint_value(objective, url, config.resolved_work_dir, config.storage_options)


def base_value(config: MergeConfig, objective: Objective) -> float:
    """The objective on the base checkpoint (cached by the base's fingerprint and the evaluator)."""
    return checkpoint_value(objective, config.base, config.resolved_work_dir, config.storage_options)


def check_gate(config: MergeConfig, version_url: str, report: Mapping[str, Any] | None = None) -> GateResult:
    """Check the config's gate on the version at ``version_url`` (module doc); never raises for a
    failed bound (see :attr:`GateResult.passed`)."""
    gate = config.gate
    if gate is None:
        raise ValueError("the config has no gate")
    objective = parse_objective(gate.objective, config.evaluators, gate.minimize, where="gate.objective")
    version = version_url.rstrip("/").rsplit("/", 1)[-1]
    value = version_value(config, objective, version_url, report)
    sign = -1.0 if gate.minimize else 1.0  # sign * (value - bound) >= 0 passes
    bounds: list[dict[str, Any]] = []
    if gate.at_least is not None:
        bounds.append({"name": "at_least", "bound": gate.at_least, "what": f"at_least {gate.at_least:.6g}"})
    if gate.at_most is not None:
        bounds.append({"name": "at_most", "bound": gate.at_most, "what": f"at_most {gate.at_most:.6g}"})
    if gate.no_worse_than == "base":
        ref = base_value(config, objective)
        bounds.append(_relative("the base's", ref, gate.tolerance, sign))
    elif gate.no_worse_than == "latest":
        latest = read_latest(config.output, config.storage_options)
        if latest is None:
            log.info("gate: nothing published yet under %s; no_worse_than: latest is skipped", config.output)
        elif latest["version"] != version:
            ref = version_value(config, objective, latest["url"])
            bounds.append(_relative(f"latest version {latest['version']}'s", ref, gate.tolerance, sign))
    for bound in bounds:
        bound["passed"] = sign * (value - bound["bound"]) >= 0
    failed = [b for b in bounds if not b["passed"]]
    spec = objective.spec
    if failed:
        word = "above" if gate.minimize else "below"
        reason = f"gate refused the version: {spec} = {value:.6g} is {word} " + "; and ".join(b["what"] for b in failed)
    else:
        checked = ", ".join(b["what"] for b in bounds) or "no bound applied"
        reason = f"gate passed: {spec} = {value:.6g} ({checked})"
    return GateResult(not failed, spec, value, bounds, reason)


def _relative(whose: str, reference: float, tolerance: float, sign: float) -> dict[str, Any]:
    bound = reference - sign * tolerance
    return {
        "name": "no_worse_than",
        "reference": reference,
        "bound": bound,
        "what": f"{whose} {reference:.6g} {'-' if sign > 0 else '+'} tolerance {tolerance:.6g} = {bound:.6g}",
    }


__all__ = ["GateResult", "check_gate", "base_value", "version_value"]

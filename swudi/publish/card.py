"""The model card (``README.md``) of a published version, ready for the Hugging Face Hub.

The card is built from the version's merge report (:mod:`swudi.publish.report`) alone, so it says exactly
what the report says: YAML front matter that the Hub reads (``base_model``,
``base_model_relation: merge``, ``library_name``, ``tags``, optional ``license`` / ``language``),
then the method and its parameters, the experts with their content fingerprints, the data-free
diagnostics (per-layer rank, kept eigenvalue mass, WUDI interference relative to the sum of task
vectors) and the user evaluators' results. Nothing time-dependent is written: the same merge gives
the same card.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import yaml

from swudi.methods.registry import METHODS
from swudi.storage.redact import mask_credentials

CARD_NAME = "README.md"
#: A Hub repository id: ``name`` or ``owner/name``.
HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")


def is_hub_id(value: str) -> bool:
    """True when ``value`` has the shape of a Hub model id (``owner/name``), not a URL or a path."""
    return bool(HUB_ID.match(value)) and "--" not in value and ".." not in value


def base_model_id(report: Mapping[str, Any], declared: str | None, base_config: Mapping[str, Any] | None) -> str:
    """The card's ``base_model``: the declared Hub id; else the base's ``config.json``
    ``_name_or_path`` when it is a Hub id; else the base checkpoint's URL."""
    if declared:
        return declared
    name = (base_config or {}).get("_name_or_path")
    if isinstance(name, str) and "/" in name and is_hub_id(name):
        return name
    return str(report["inputs"]["base"]["url"])


def front_matter(
    report: Mapping[str, Any],
    base_model: str,
    library_name: str,
    tags: list[str],
    license: str | None = None,
    language: str | list[str] | None = None,
) -> dict[str, Any]:
    """The card's metadata, in the order the Hub shows it."""
    data: dict[str, Any] = {"base_model": base_model, "base_model_relation": "merge", "library_name": library_name}
    if license:
        data["license"] = license
    if language:
        data["language"] = language
    data["tags"] = list(dict.fromkeys(["merge", "model-merging", "swudi", str(report["method"]), *tags]))
    return data


def render_card(report: Mapping[str, Any], metadata: Mapping[str, Any], title: str | None = None) -> str:
    """The whole ``README.md``: ``---`` front matter ``---`` then the Markdown body; credentials in
    any URL masked (:func:`swudi.storage.redact.mask_credentials`)."""
    head = yaml.safe_dump(dict(metadata), sort_keys=False, allow_unicode=True).strip()
    return mask_credentials(f"---\n{head}\n---\n\n" + _body(report, title or f"swudi merge {report['version']}"))


def _body(report: Mapping[str, Any], title: str) -> str:
    method = str(report["method"])
    spec = METHODS.get(method)
    lines = [
        f"# {title}",
        "",
        f"A data-free merge of {len(report['inputs']['experts'])} fine-tuned experts of one base model, "
        f"made with [swudi](https://pypi.org/project/swudi/) (version `{report['version']}`).",
        "",
        "## Method",
        "",
        f"`{method}`" + (f" ({spec.kind}): {spec.description}." if spec else "."),
        "Every merged weight is `W = W0 + scale * theta`, with `theta` computed from the task vectors "
        "`W_i - W0` alone (no data).",
        "",
        "## Parameters",
        "",
        "| parameter | value |",
        "|---|---|",
        *(f"| `{name}` | `{value}` |" for name, value in sorted(dict(report["params"]).items())),
        f"| `scale` | `{report['scale']}` |",
        f"| `output_dtype` | `{report['output_dtype']}` |",
    ]
    routing = report.get("routing") or {}
    for key in ("include", "exclude", "keep_base"):
        if routing.get(key):
            lines.append(f"| `{key}` | `{', '.join(routing[key])}` |")
    lines += ["", "## Models merged", "", "| role | checkpoint | fingerprint |", "|---|---|---|"]
    inputs = report["inputs"]
    lines.append(f"| base | `{inputs['base']['url']}` | `{inputs['base']['fingerprint']}` |")
    lines += [
        f"| expert {i} | `{expert['url']}` | `{expert['fingerprint']}` |" for i, expert in enumerate(inputs["experts"])
    ]
    lines += _diagnostics(report.get("diagnostics") or {})
    lines += _evaluations(report.get("evaluations") or {})
    lines += _tuning(report.get("tuning") or {})
    if report.get("gate"):
        lines += ["", "## Publish gate", "", str(report["gate"].get("reason", ""))]
    lines += _relative(report.get("relative_evaluations") or {})
    software = report.get("software") or {}
    lines += [
        "",
        "## Reproducing",
        "",
        f"- swudi {software.get('swudi', '?')}, merge code `{software.get('merge_code', '?')}`, "
        f"torch {software.get('torch', '?')}",
        f"- inputs fingerprint `{inputs.get('fingerprint', '?')}`",
        "- the full record is `merge_report.json` beside this card",
        "",
    ]
    return "\n".join(lines)


def _number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _diagnostics(diagnostics: Mapping[str, Any]) -> list[str]:
    per_layer = diagnostics.get("per_layer") or {}
    lines = ["", "## Data-free diagnostics", ""]
    if not per_layer:
        return [*lines, "No weight was merged with a matrix method (no spectral diagnostics)."]
    lines += [
        "Interference is the WUDI loss of the merged weight relative to that of the sum of task vectors "
        "(task arithmetic): below 1, the merge interferes less than summing.",
        "",
        f"- weights: {diagnostics.get('layers')}; mean rank kept: {_number(diagnostics.get('mean_rank'), 1)}; "
        f"mean eigenvalue mass kept: {_number(diagnostics.get('mean_kept_mass'))}",
        f"- mean interference vs sum: {_number(diagnostics.get('mean_interference_vs_sum'))}",
    ]
    # Not the per-expert means: they cover only the weights whose task vectors were in memory, which a
    # resumed merge (decompositions from the cache) does not re-read, so they would make a resumed
    # version's card differ from an uninterrupted one's. They stay in merge_report.json.
    lines += ["", "| weight | rank | kept mass | interference vs sum |", "|---|---:|---:|---:|"]
    lines += [
        f"| `{name}` | {_number(values.get('rank'))} | {_number(values.get('kept_mass'))} | "
        f"{_number(values.get('interference_vs_sum'))} |"
        for name, values in per_layer.items()
    ]
    return lines


def _evaluations(evaluations: Mapping[str, Any]) -> list[str]:
    if not evaluations:
        return ["", "## Evaluation", "", "No evaluator was configured for this merge."]
    lines = ["", "## Evaluation"]
    for evaluator, tasks in evaluations.items():
        lines += ["", f"`{evaluator}`", "", "| task | metric | value |", "|---|---|---:|"]
        lines += [
            f"| {task} | {metric} | {_number(value)} |"
            for task, metrics in tasks.items()
            for metric, value in metrics.items()
        ]
    return lines


def _tuning(tuning: Mapping[str, Any]) -> list[str]:
    """The table of ``swudi tune``: every candidate's settings, score and seconds; the winner marked."""
    rows = tuning.get("candidates") or []
    if not rows:
        return []
    objective = tuning.get("objective") or {}
    direction = "lower is better" if objective.get("minimize") else "higher is better"
    lines = [
        "",
        "## Tuning",
        "",
        f"Chosen by `swudi tune` among {len(rows)} candidates on `{objective.get('objective', '?')}` ({direction}); "
        f"the base model scores {_number(tuning.get('base_score'))}. Tune `{tuning.get('tune_id', '?')}`"
        + (f", plot `{tuning['plot']}`." if tuning.get("plot") else "."),
        "",
        "| candidate | method | params | scale | score | seconds | |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    winner = tuning.get("winner", {}).get("label")
    lines += [
        f"| {row['label']} | `{row['method']}` | `{row['params']}` | {_number(row['scale'])} | "
        f"{_number(row['score'])} | {_number(row['seconds'], 1)} | {'**winner**' if row['label'] == winner else ''} |"
        for row in rows
    ]
    return lines


def _relative(relative: Mapping[str, Any]) -> list[str]:
    """The merged model against the base and the experts (:mod:`swudi.evaluators.relative`)."""
    if not relative:
        return []
    lines = [
        "",
        "## Against the base and the experts",
        "",
        "gap closed = (base - merged) / (base - expert) for losses (1: as good as the expert, 0: no better "
        "than the base); normalized = merged / expert for accuracies. The expert of a task is the one named "
        "in `task_experts`, else the only expert, else the best one.",
    ]
    for evaluator, result in relative.items():
        lines += [
            "",
            f"`{evaluator}`",
            "",
            "| task | metric | merged | base | expert | vs expert | best expert | vs best |",
            "|---|---|---:|---:|---|---:|---|---:|",
        ]
        for task, metrics in (result.get("tasks") or {}).items():
            for metric, e in metrics.items():
                measure = "gap_closed" if "gap_closed" in e else "normalized"
                lines.append(
                    f"| {task} | {metric} ({measure.replace('_', ' ')}) | {_number(e['merged'])} | "
                    f"{_number(e['base'])} | {e['expert_index']}: {_number(e['expert'])} | {_number(e[measure])} | "
                    f"{e['best_expert_index']}: {_number(e['best_expert'])} | {_number(e[f'{measure}_best'])} |"
                )
        for metric, mean in (result.get("mean") or {}).items():
            measure = "gap_closed" if "gap_closed" in mean else "normalized"
            lines.append(
                f"| mean of {mean['tasks']} | {metric} ({measure.replace('_', ' ')}) | | | | "
                f"{_number(mean[measure])} | | |"
            )
    return lines

"""Pictures and tables of merges and sweeps (``swudi report``).

Inputs are the JSON files the pipeline writes: ``merge_report.json`` of a version and
``sweep.json`` of a sweep; eigenvalue spectra are read from the stored decompositions (one tensor
each). matplotlib is imported lazily and drawn off-screen (Agg).
"""

from __future__ import annotations

import html
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from swudi.errors import parse_json
from swudi.io.checkpoint import Checkpoint
from swudi.publish.versions import read_latest
from swudi.storage.filesystem import join_url, resolve

log = logging.getLogger(__name__)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def load_run(run: str, storage_options: Mapping[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """``("sweep", sweep.json)``, ``("merge", merge_report.json)`` or ``("benchmark", results.json)``
    for a sweep file/folder, a version folder, an output folder with ``latest.json``, or a benchmark's
    results file/folder (the shared format with a ``schema`` key, :mod:`swudi.reporting.benchmark_report`)."""
    fs, path = resolve(run, storage_options)
    candidates: list[tuple[str, str | None]] = [(run, None)]  # (url, kind; None: from the content)
    if not path.endswith(".json"):
        candidates = [
            (join_url(run, "sweep.json"), "sweep"),
            (join_url(run, "merge_report.json"), "merge"),
            (join_url(run, "results.json"), "benchmark"),
        ]
        latest = read_latest(run, storage_options) if fs.exists(join_url(path, "latest.json")) else None
        if latest:
            candidates.append((join_url(latest["url"], "merge_report.json"), "merge"))
    for url, kind in candidates:
        fs_, p = resolve(url, storage_options)
        if fs_.exists(p):
            data = parse_json(fs_.cat_file(p), url)
            if kind is None:
                kind = "benchmark" if "schema" in data else ("sweep" if "points" in data else "merge")
            return kind, data
    raise FileNotFoundError(f"{run}: no sweep.json, merge_report.json, latest.json or results.json found")


def _task_metric(evaluations: Mapping[str, Any]) -> tuple[str, dict[str, float]]:
    """(metric name, {task: value}) from a report's evaluations: normalized accuracy if present."""
    for metrics in evaluations.values():
        for name in ("normalized_accuracy", "accuracy"):
            values = {task: m[name] for task, m in metrics.items() if name in m}
            if values:
                return name, values
    return "", {}


def plot_sweep(summary: Mapping[str, Any], out: Path) -> list[Path]:
    """One PNG per swept parameter: retention per task (or, without evaluations, the mean WUDI
    interference per task) against that parameter, other parameters at their first grid value."""
    plt = _pyplot()
    grid = [(k, v) for k, v in summary["grid"]]
    written = []
    for key, values in grid:
        others = {k: v[0] for k, v in grid if k != key}
        rows = [r for r in summary["points"] if all(r["point"].get(k) == v for k, v in others.items())]
        rows.sort(key=lambda r: values.index(r["point"][key]))
        if not rows:
            continue
        series: dict[str, list[float | None]] = {}
        metric = ""
        # per-task interference exists only for layers whose task vectors were in memory (a point
        # that reused stored decompositions has the total only): then every point shows the total
        every_layer_per_task = all(
            r["diagnostics"].get("layers_with_per_task_interference") == r["diagnostics"].get("layers") for r in rows
        )
        for r in rows:
            metric_name, per_task = _task_metric(r.get("evaluations", {}))
            if not per_task:
                metric_name = "interference vs sum (WUDI loss ratio, lower is better)"
                if every_layer_per_task:
                    interference = r["diagnostics"].get("mean_interference_vs_sum_per_task") or []
                    per_task = {f"task {i}": v for i, v in enumerate(interference)}
                else:
                    per_task = {"all tasks": r["diagnostics"].get("mean_interference_vs_sum")}
            metric = metric_name
            for task, value in per_task.items():
                series.setdefault(task, []).append(value)
        fig, ax = plt.subplots(figsize=(7, 4.5))
        x = [r["point"][key] for r in rows]
        numeric = all(isinstance(v, (int, float)) for v in x)
        positions = x if numeric else list(range(len(x)))
        for task, ys in series.items():
            ax.plot(positions, ys, marker="o", label=task)
        if not numeric:
            ax.set_xticks(positions, [str(v) for v in x])
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        fixed = ", ".join(f"{k}={v}" for k, v in others.items())
        ax.set_title(f"{metric.split(' (')[0]} vs {key}" + (f" ({fixed})" if fixed else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = out / f"sweep_{key.split('.')[-1]}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def plot_tune(rows: Sequence[Mapping[str, Any]], objective: str, winner: str | None = None) -> bytes:
    """PNG bytes of ``swudi tune``: the score against the scale, one line per method and parameter
    setting (grid points and refinement probes together, sorted by scale); the winner circled and
    the base model's score, when a row ``{"label": "base", "score"}`` is given, as a dashed line."""
    import io

    plt = _pyplot()
    lines: dict[str, list[tuple[float, float]]] = {}
    base = next((r["score"] for r in rows if r.get("label") == "base"), None)
    for row in rows:
        if row.get("label") == "base":
            continue
        params = ", ".join(f"{k}={v}" for k, v in sorted(dict(row.get("params") or {}).items()))
        name = f"{row['method']}" + (f" ({params})" if params else "")
        lines.setdefault(name, []).append((float(row["scale"]), float(row["score"])))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in lines.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    for row in rows:
        if winner is not None and row.get("label") == winner:
            ax.plot(
                [row["scale"]],
                [row["score"]],
                marker="o",
                markersize=14,
                fillstyle="none",
                color="black",
                linestyle="none",
                label=f"winner: {winner}",
            )
    if base is not None:
        ax.axhline(base, linestyle="--", color="grey", label="base model")
    ax.set_xlabel("scale")
    ax.set_ylabel(objective)
    ax.set_title(f"swudi tune: {objective} vs scale")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def plot_ranks(report: Mapping[str, Any], out: Path) -> Path | None:
    """Bar chart of the rank chosen for every layer (SWUDI-A), layers in checkpoint order."""
    per_layer = report.get("diagnostics", {}).get("per_layer", {})
    layers = [(name, v["rank"]) for name, v in per_layer.items() if v.get("rank") is not None]
    if not layers:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(7, len(layers) * 0.18), 4.5))
    ax.bar(range(len(layers)), [r for _, r in layers], color="#4477aa")
    ax.set_xticks(range(len(layers)), [n.replace(".weight", "") for n, _ in layers], rotation=90, fontsize=6)
    ax.set_ylabel("rank kept")
    ax.set_title(f"rank per layer: {report.get('method')} {report.get('params', {}).get('rank_rule', '')}")
    fig.tight_layout()
    path = out / "ranks_per_layer.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_spectra(
    report: Mapping[str, Any], out: Path, count: int = 4, storage_options: Mapping[str, Any] | None = None
) -> Path | None:
    """Eigenvalue spectra of ``count`` layers (spread over the model) with the rank cut marked."""
    per_layer = [
        (n, v) for n, v in report.get("diagnostics", {}).get("per_layer", {}).items() if v.get("decomposition")
    ]
    if not per_layer:
        return None
    step = max(1, len(per_layer) // count)
    chosen = per_layer[::step][:count]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, values in chosen:
        eigenvalues = Checkpoint.open(values["decomposition"], storage_options).read("eigenvalues")
        (line,) = ax.semilogy(range(1, len(eigenvalues) + 1), eigenvalues.numpy(), label=name)
        if values.get("rank"):
            ax.axvline(values["rank"], color=line.get_color(), linestyle="--", alpha=0.7)
    ax.set_xlabel("eigenvalue index k")
    ax.set_ylabel("lambda_k of C (sum = N)")
    ax.set_title("spectra of C; dashed: rank kept")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "spectra.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary_rows(kind: str, data: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Table rows: one per sweep point (or the one merge) with diagnostics and task metrics."""
    items = data["points"] if kind == "sweep" else [{"label": data.get("version"), **data}]
    rows = []
    for item in items:
        diag = item.get("diagnostics", {})
        metric, per_task = _task_metric(item.get("evaluations", {}))
        row = {
            "run": item.get("label"),
            "method": item.get("method"),
            "mean rank": diag.get("mean_rank"),
            "kept mass": diag.get("mean_kept_mass"),
            "interference vs sum": diag.get("mean_interference_vs_sum"),
        }
        row.update({f"{task} ({metric})": value for task, value in per_task.items()})
        if per_task:
            row[f"mean {metric}"] = sum(per_task.values()) / len(per_task)
        rows.append(row)
    return rows


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("" if value is None else str(value))


def markdown_table(columns: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table (no trailing newline); ``|`` inside a cell is escaped."""

    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(v.replace("|", "\\|") for v in values) + " |"

    return "\n".join([line(columns), "|" + "---|" * len(columns)] + [line(row) for row in cells])


def write_tables(rows: Sequence[Mapping[str, Any]], out: Path) -> tuple[Path, Path]:
    """``summary.md`` and ``summary.html`` of the rows."""
    columns = list(dict.fromkeys(c for row in rows for c in row))
    table = markdown_table(columns, [[_fmt(row.get(c)) for c in columns] for row in rows])
    (out / "summary.md").write_text(table + "\n")
    cells = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(row.get(c)))}</td>" for c in columns) + "</tr>" for row in rows
    )
    (out / "summary.html").write_text(
        f"<!doctype html><meta charset=utf-8><title>swudi report</title>"
        f"<table border=1 cellpadding=4><tr>{cells}</tr>{body}</table>\n"
    )
    return out / "summary.md", out / "summary.html"


def plotting_missing() -> str | None:
    """None when matplotlib can be imported, else a one-line note saying how to install it."""
    try:
        _pyplot()
    except ImportError as error:
        return (
            f"plots skipped: {error.name or 'matplotlib'} is not installed "
            "(pip install matplotlib, or the swudi[bench] extra); the summary tables are written"
        )
    return None


def write_report(run: str, out: Path, storage_options: Mapping[str, Any] | None = None) -> list[Path]:
    """All pictures and tables for a sweep, a merged version or a benchmark's results, written under ``out``.

    Without matplotlib (an optional extra) only the tables are written, with one warning
    (:func:`plotting_missing`).
    """
    kind, data = load_run(run, storage_options)
    if kind == "benchmark":
        from swudi.reporting.benchmark_report import write_benchmark_report

        return write_benchmark_report(data, out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    missing = plotting_missing()
    if missing:
        log.warning("%s", missing)
        written += list(write_tables(summary_rows(kind, data), out))
        return written
    if kind == "sweep":
        written += plot_sweep(data, out)
        first = data["points"][0] if data["points"] else None
        report = (
            {"method": first["method"], "params": first["params"], "diagnostics": first["diagnostics"]} if first else {}
        )
    else:
        report = data
    for path in (plot_ranks(report, out), plot_spectra(report, out, storage_options=storage_options)):
        if path:
            written.append(path)
    written += list(write_tables(summary_rows(kind, data), out))
    log.info("report of %s written to %s", run, out)
    return written

"""Benchmark reports: the table and plots of a ``results.json`` in the shared benchmark format.

Input: ``{"schema": "swudi-benchmark/1", "benchmark", "title", "primary", "metrics", "tasks",
"seeds", "runs": [{"label", "kind", "seed", "per_task", "summary", "merge_seconds", ...}]}`` (one
run per label and seed; ``kind`` is ``reference``, ``method`` or ``study``).

Aggregates per label over its seeds: mean and sample standard deviation (ddof=1; none for 1 seed).

Noise rule (paired over seeds). Every row is compared with the best merge B (the method or study
row with the best mean primary metric) on the seeds both have, seed by seed (the same seed's experts
and data): d_s = m_row(s) - m_B(s), mean d, SE = sd(d, ddof=1) / sqrt(n). The difference is *beyond
noise* when n >= 2 and |mean d| > t(0.975, n-1) * SE, a two-sided paired t-test at 5 % (t = 4.30
for 3 seeds, 12.71 for 2); with one common seed it is "n/a". Each comparison is on its own (no
correction for the number of rows).

Outputs (:func:`write_benchmark_report`): ``results.md``, ``summary.json``, ``primary.png``,
``per_task.png``, ``time_vs_primary.png`` and, when runs carry a per-task ``loss``,
``per_task_loss.png``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from swudi.errors import SwudiError

log = logging.getLogger(__name__)

SCHEMA = "swudi-benchmark/1"
KINDS = ("reference", "method", "study")
#: Method names drawn as baselines in the per-task plots (when present).
BASELINE_METHODS = ("mean", "task_arithmetic", "ties")


class BenchmarkResultsError(SwudiError, ValueError):
    """A results.json that does not follow the shared benchmark format (the message names the key/label)."""


# ------------------------------------------------------------------------------------- statistics
def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p in (0.5, 1)) of Student's t with ``df`` >= 1 degrees of freedom.

    Solves P(|T| < q) = 2p - 1 by bisection on the closed form for integer df (Abramowitz & Stegun
    26.7.3-4): with c = cos(atan(q / sqrt(df))), s = sin(...),
    df odd:  P = (2/pi) (atan(q/sqrt(df)) + s (c + 2/3 c^3 + ... + (2*4...(df-3))/(1*3...(df-2)) c^(df-2)))
    df even: P = s (1 + 1/2 c^2 + 1*3/(2*4) c^4 + ... + (1*3...(df-3))/(2*4...(df-2)) c^(df-2)).
    """
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df >= 1 (got p={p}, df={df})")
    target = 2 * p - 1

    def central(q: float) -> float:
        theta = math.atan(q / math.sqrt(df))
        s, c = math.sin(theta), math.cos(theta)
        if df % 2:
            total, term = 0.0, c
            for k in range(1, (df - 1) // 2 + 1):  # terms c, 2/3 c^3, ... up to c^(df-2)
                if k > 1:
                    term *= c * c * (2 * k - 2) / (2 * k - 1)
                total += term
            return (2 / math.pi) * (theta + s * total) if df > 1 else 2 * theta / math.pi
        total, term = 1.0, 1.0
        for k in range(1, df // 2):  # terms 1/2 c^2, 1*3/(2*4) c^4, ... up to c^(df-2)
            term *= c * c * (2 * k - 1) / (2 * k)
            total += term
        return s * total

    lo, hi = 0.0, 1.0
    while central(hi) < target:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if central(mid) < target:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return (lo + hi) / 2


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (ddof=1; None for n < 2) of n values."""

    mean: float
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        n = len(values)
        mean = sum(values) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n >= 2 else None
        return cls(mean, std, n)

    def as_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "n": self.n}


@dataclass(frozen=True)
class Comparison:
    """Paired comparison of a row with the best merge over their common seeds (see the module doc)."""

    n: int
    mean_diff: float
    se: float | None
    threshold: float | None  # t(0.975, n-1) * SE
    beyond_noise: bool | None  # None: fewer than 2 common seeds

    def as_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "mean_diff": self.mean_diff,
            "se": self.se,
            "threshold": self.threshold,
            "beyond_noise": self.beyond_noise,
        }


def paired_comparison(row: Mapping[Any, float], best: Mapping[Any, float], level: float = 0.975) -> Comparison:
    """Paired t-comparison of ``row`` against ``best`` (both {seed: value}) on their common seeds.

    d_s = row[s] - best[s]; beyond noise when n >= 2 and |mean d| > t(level, n-1) * sd(d)/sqrt(n).
    """
    seeds = [s for s in row if s in best]
    if not seeds:
        raise BenchmarkResultsError("paired comparison: the two rows share no seed")
    diffs = [row[s] - best[s] for s in seeds]
    stat = Stat.of(diffs)
    if stat.std is None:
        return Comparison(stat.n, stat.mean, None, None, None)
    se = stat.std / math.sqrt(stat.n)
    threshold = t_quantile(level, stat.n - 1) * se
    return Comparison(stat.n, stat.mean, se, threshold, abs(stat.mean) > threshold)


# ---------------------------------------------------------------------------------- loading + checks
def _need(mapping: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in mapping:
        raise BenchmarkResultsError(f"{where}: missing key {key!r}")
    return mapping[key]


def _finite(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BenchmarkResultsError(f"{where}: expected a finite number, got {value!r}")
    return float(value)


def validate_results(results: Mapping[str, Any]) -> None:
    """Raise :class:`BenchmarkResultsError` naming the key or label at fault when ``results`` does not
    follow the format: schema, primary in metrics and in every run's summary, known kinds (one per
    label), one run per (label, seed), the same task set for all runs of a label, finite numbers."""
    schema = _need(results, "schema", "results")
    if schema != SCHEMA:
        raise BenchmarkResultsError(f"results: unknown schema {schema!r} (this swudi reads {SCHEMA!r})")
    primary = _need(results, "primary", "results")
    metrics = _need(results, "metrics", "results")
    if not isinstance(metrics, Mapping) or primary not in metrics:
        raise BenchmarkResultsError(f"results: primary metric {primary!r} is not a key of 'metrics'")
    for name, spec in metrics.items():
        if not isinstance(spec, Mapping) or not isinstance(spec.get("higher_is_better"), bool):
            raise BenchmarkResultsError(f"results: metrics[{name!r}] needs 'higher_is_better': true/false")
    runs = _need(results, "runs", "results")
    if not isinstance(runs, list) or not runs:
        raise BenchmarkResultsError("results: 'runs' must be a non-empty list")
    seen: set[tuple[str, Any]] = set()
    task_sets: dict[str, tuple[frozenset[str], Any]] = {}
    kinds: dict[str, str] = {}
    for i, run in enumerate(runs):
        label = _need(run, "label", f"runs[{i}]")
        where = f"run {label!r}"
        kind = _need(run, "kind", where)
        if kind not in KINDS:
            raise BenchmarkResultsError(f"{where}: unknown kind {kind!r} (one of {', '.join(KINDS)})")
        seed = _need(run, "seed", where)
        where = f"run {label!r} seed {seed}"
        if (label, seed) in seen:
            raise BenchmarkResultsError(f"{where}: two runs with the same label and seed")
        seen.add((label, seed))
        summary = _need(run, "summary", where)
        _finite(_need(summary, primary, f"{where} summary"), f"{where} summary[{primary!r}]")
        for metric, value in summary.items():
            if metric not in metrics:
                raise BenchmarkResultsError(f"{where} summary: metric {metric!r} is not declared in 'metrics'")
            _finite(value, f"{where} summary[{metric!r}]")
        per_task = run.get("per_task") or {}
        for task, values in per_task.items():
            for metric, value in values.items():
                if metric not in metrics:
                    raise BenchmarkResultsError(f"{where} per_task[{task!r}]: metric {metric!r} is not declared")
                _finite(value, f"{where} per_task[{task!r}][{metric!r}]")
        tasks = frozenset(per_task)
        if label in task_sets and task_sets[label][0] != tasks:
            other_seed = task_sets[label][1]
            raise BenchmarkResultsError(
                f"label {label!r}: runs for different task sets (seed {other_seed}: "
                f"{sorted(task_sets[label][0])}, seed {seed}: {sorted(tasks)})"
            )
        task_sets.setdefault(label, (tasks, seed))
        if kinds.setdefault(label, kind) != kind:
            raise BenchmarkResultsError(f"label {label!r}: runs of different kinds ({kinds[label]!r} and {kind!r})")
        if run.get("merge_seconds") is not None:
            _finite(run["merge_seconds"], f"{where} merge_seconds")


def load_results(results: Path | Mapping[str, Any]) -> dict[str, Any]:
    """The validated results dict from a path or a dict (see :func:`validate_results`)."""
    if isinstance(results, Mapping):
        data = dict(results)
    else:
        try:
            data = json.loads(Path(results).read_text())
        except json.JSONDecodeError as error:
            raise BenchmarkResultsError(f"{results}: not valid JSON ({error})") from error
        if not isinstance(data, dict):
            raise BenchmarkResultsError(f"{results}: expected a JSON object")
    validate_results(data)
    return data


# --------------------------------------------------------------------------------------- aggregates
@dataclass
class Row:
    """All runs of one label, aggregated over seeds."""

    label: str
    kind: str
    method: str | None
    seeds: list[Any]
    primary_by_seed: dict[Any, float]
    metrics: dict[str, Stat]
    per_task: dict[str, dict[str, Stat]]
    merge_seconds: Stat | None
    comparison: Comparison | None = None
    is_best: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def aggregate(results: Mapping[str, Any]) -> list[Row]:
    """One :class:`Row` per label (in the order labels first appear), each compared with the best merge."""
    primary = results["primary"]
    by_label: dict[str, list[Mapping[str, Any]]] = {}
    for run in results["runs"]:
        by_label.setdefault(run["label"], []).append(run)
    rows = []
    for label, runs in by_label.items():
        metric_names = list(dict.fromkeys(m for r in runs for m in r["summary"]))
        metrics = {m: Stat.of([r["summary"][m] for r in runs if m in r["summary"]]) for m in metric_names}
        tasks = list(dict.fromkeys(t for r in runs for t in (r.get("per_task") or {})))
        per_task: dict[str, dict[str, Stat]] = {}
        for task in tasks:
            names = list(dict.fromkeys(m for r in runs for m in r["per_task"][task]))
            per_task[task] = {
                m: Stat.of([r["per_task"][task][m] for r in runs if m in r["per_task"][task]]) for m in names
            }
        seconds = [float(r["merge_seconds"]) for r in runs if r.get("merge_seconds") is not None]
        rows.append(
            Row(
                label=label,
                kind=runs[0]["kind"],
                method=runs[0].get("method"),
                seeds=[r["seed"] for r in runs],
                primary_by_seed={r["seed"]: float(r["summary"][primary]) for r in runs},
                metrics=metrics,
                per_task=per_task,
                merge_seconds=Stat.of(seconds) if seconds else None,
                extra={k: runs[0][k] for k in ("params", "config") if k in runs[0]},
            )
        )
    best = best_merge(rows, results)
    if best is not None:
        best.is_best = True
        for row in rows:
            if row is not best and any(s in best.primary_by_seed for s in row.primary_by_seed):
                row.comparison = paired_comparison(row.primary_by_seed, best.primary_by_seed)
    return rows


def _sign(results: Mapping[str, Any], metric: str) -> float:
    """+1 when higher is better for ``metric``, -1 otherwise."""
    return 1.0 if results["metrics"][metric]["higher_is_better"] else -1.0


def best_merge(rows: Sequence[Row], results: Mapping[str, Any]) -> Row | None:
    """The method or study row with the best mean primary metric (None when there is none)."""
    merges = [r for r in rows if r.kind != "reference"]
    sign = _sign(results, results["primary"])
    return max(merges, key=lambda r: sign * r.metrics[results["primary"]].mean, default=None)


def ordered(rows: Sequence[Row], results: Mapping[str, Any]) -> list[Row]:
    """References in file order, then methods, then study runs, each best first."""
    sign = _sign(results, results["primary"])
    primary = results["primary"]
    out = [r for r in rows if r.kind == "reference"]
    for kind in ("method", "study"):
        out += sorted((r for r in rows if r.kind == kind), key=lambda r: -sign * r.metrics[primary].mean)
    return out


# ------------------------------------------------------------------------------------------ table
def _pm(stat: Stat | None, digits: int) -> str:
    if stat is None:
        return ""
    if stat.std is None:
        return f"{stat.mean:.{digits}f}"
    return f"{stat.mean:.{digits}f} ± {stat.std:.{digits}f}"


def _md(text: str) -> str:
    """``text`` with markdown emphasis characters escaped (labels such as ``study:include=*embed*``)."""
    return text.replace("*", "\\*")


def _verdict(row: Row, sign: float) -> tuple[str, str]:
    """(difference cell, beyond-noise cell) of a row; ``sign`` +1 when higher is better."""
    if row.is_best:
        return "0 (best)", "best"
    c = row.comparison
    if c is None:
        return "", "n/a (no common seed)"
    if c.se is None:
        return f"{c.mean_diff:+.4f}", "n/a (1 seed)"
    if not c.beyond_noise:
        return f"{c.mean_diff:+.4f} ± {c.se:.4f}", "no"
    return f"{c.mean_diff:+.4f} ± {c.se:.4f}", "**yes, " + ("better**" if c.mean_diff * sign > 0 else "worse**")


def per_task_metric(results: Mapping[str, Any]) -> str | None:
    """The per-task counterpart of the primary metric: the primary itself when runs report it per task."""
    primary = results["primary"]
    has = any(primary in values for run in results["runs"] for values in (run.get("per_task") or {}).values())
    return primary if has else None


def table_rows(rows: Sequence[Row], results: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(columns, cells) of the results table."""
    primary = results["primary"]
    label = results["metrics"][primary].get("label", primary)
    task_metric = per_task_metric(results)
    tasks = list(results.get("tasks") or []) if task_metric else []
    columns = ["run", "kind", "seeds", f"{label} (mean ± std)"]
    columns += [*tasks, "merge s (mean)", "Δ vs best (paired ± SE)", "beyond noise"]
    cells = []
    for row in ordered(rows, results):
        diff, verdict = _verdict(row, _sign(results, primary))
        line = [_md(row.label), row.kind, str(len(row.seeds)), _pm(row.metrics[primary], 4)]
        line += [_pm(row.per_task.get(t, {}).get(task_metric or ""), 3) for t in tasks]
        line += [f"{row.merge_seconds.mean:.1f}" if row.merge_seconds else "", diff, verdict]
        cells.append(line)
    return columns, cells


def noise_rule_text(rows: Sequence[Row]) -> str:
    """The rule under the table, in words, with the t values for the numbers of common seeds present."""
    counts = sorted({r.comparison.n for r in rows if r.comparison is not None and r.comparison.n >= 2})
    ts = ", ".join(f"t = {t_quantile(0.975, n - 1):.2f} for {n} seeds" for n in counts)
    return (
        "Mean ± sample standard deviation (ddof = 1) over seeds. *Δ vs best*: paired over seeds against "
        "the best merge (the method or study row with the best mean): d_s = row(s) - best(s) on the seeds "
        "both have, mean d ± SE with SE = sd(d)/√n. *Beyond noise* = yes when |mean d| > t(0.975, n-1) · SE "
        f"(two-sided paired t-test at 5 %{'; ' + ts if ts else ''}); n/a with one common seed. "
        "Each row is tested on its own, without a correction for the number of rows."
    )


def best_line(rows: Sequence[Row], results: Mapping[str, Any]) -> str:
    """ "Best: X; within noise of it: ...; beyond noise: k rows"."""
    primary = results["primary"]
    best = next((r for r in rows if r.is_best), None)
    if best is None:
        return "No method rows."
    merges = [r for r in ordered(rows, results) if r.kind != "reference" and r is not best]
    within = [_md(r.label) for r in merges if r.comparison is not None and r.comparison.beyond_noise is False]
    untested = [_md(r.label) for r in merges if r.comparison is None or r.comparison.beyond_noise is None]
    beyond = [r for r in merges if r.comparison is not None and r.comparison.beyond_noise]
    text = f"**Best: {_md(best.label)}** ({_pm(best.metrics[primary], 4)}). "
    text += f"Within noise of the best: {', '.join(within) if within else 'none'}. "
    text += f"Beyond noise (worse): {len(beyond)} row(s)."
    if untested:
        text += f" Not testable (one common seed): {', '.join(untested)}."
    return text


def markdown(results: Mapping[str, Any], rows: Sequence[Row]) -> str:
    """The whole ``results.md``."""
    from swudi.reporting.plots import markdown_table

    primary = results["primary"]
    columns, cells = table_rows(rows, results)
    task_metric = per_task_metric(results)
    parts = [f"# {results.get('title') or results.get('benchmark', 'benchmark')}", ""]
    parts.append(
        f"Primary metric: {results['metrics'][primary].get('label', primary)} "
        f"({'higher' if results['metrics'][primary]['higher_is_better'] else 'lower'} is better); "
        f"seeds: {', '.join(str(s) for s in results.get('seeds') or [])}."
        + (f" Task columns: {task_metric} per task (mean ± std)." if task_metric else "")
        + " *merge s*: the run's merge seconds as the benchmark records them (see its README)."
    )
    parts += ["", best_line(rows, results), "", markdown_table(columns, cells), "", noise_rule_text(rows), ""]
    return "\n".join(parts)


def summary_dict(results: Mapping[str, Any], rows: Sequence[Row]) -> dict[str, Any]:
    """The aggregates as JSON: per label its kind, seeds, metrics, per-task metrics, merge seconds and
    the comparison with the best merge."""
    return {
        "schema": "swudi-benchmark-summary/1",
        "benchmark": results.get("benchmark"),
        "primary": results["primary"],
        "best": next((r.label for r in rows if r.is_best), None),
        "labels": {
            r.label: {
                "kind": r.kind,
                "method": r.method,
                **r.extra,
                "seeds": r.seeds,
                "metrics": {m: s.as_dict() for m, s in r.metrics.items()},
                "per_task": {t: {m: s.as_dict() for m, s in v.items()} for t, v in r.per_task.items()},
                "merge_seconds": r.merge_seconds.as_dict() if r.merge_seconds else None,
                "vs_best": r.comparison.as_dict() if r.comparison else None,
            }
            for r in ordered(rows, results)
        },
    }


# ------------------------------------------------------------------------------------------ plots
_METHOD_COLOR, _STUDY_COLOR, _BEST_COLOR = "#4477aa", "#66ccee", "#228833"
_REFERENCE_STYLES = ("--", ":", "-.")


def _err(stat: Stat) -> float:
    return stat.std or 0.0


def plot_primary(results: Mapping[str, Any], rows: Sequence[Row], out: Path) -> Path:
    """Horizontal bars of the primary metric per merge (mean, std error bars), best at the top;
    reference rows as vertical lines."""
    from swudi.reporting.plots import _pyplot

    plt = _pyplot()
    primary = results["primary"]
    spec = results["metrics"][primary]
    merges = [r for r in ordered(rows, results) if r.kind != "reference"]
    merges.sort(key=lambda r: (1 if spec["higher_is_better"] else -1) * r.metrics[primary].mean)
    refs = [r for r in rows if r.kind == "reference" and primary in r.metrics]
    fig, ax = plt.subplots(figsize=(8, max(3.0, 0.34 * len(merges) + 1.6)))
    colors = [_BEST_COLOR if r.is_best else (_STUDY_COLOR if r.kind == "study" else _METHOD_COLOR) for r in merges]
    means = [r.metrics[primary].mean for r in merges]
    errs = [_err(r.metrics[primary]) for r in merges]
    y = range(len(merges))
    ax.barh(y, means, xerr=errs, color=colors, capsize=3, error_kw={"elinewidth": 1})
    ax.set_yticks(list(y), [r.label for r in merges], fontsize=8)
    values = means + [r.metrics[primary].mean for r in refs]
    lo = min(m - e for m, e in zip(means, errs, strict=True))
    lo = min([lo, *(r.metrics[primary].mean for r in refs)])
    hi = max(m + e for m, e in zip(means, errs, strict=True))
    hi = max([hi, *values])
    pad = 0.08 * (hi - lo or abs(hi) or 1.0)
    ax.set_xlim(lo - pad, hi + pad)
    for i, ref in enumerate(refs):
        ax.axvline(
            ref.metrics[primary].mean,
            color="0.3",
            linestyle=_REFERENCE_STYLES[i % len(_REFERENCE_STYLES)],
            linewidth=1.2,
            label=f"{ref.label} ({ref.metrics[primary].mean:.3f})",
        )
    from matplotlib.patches import Patch

    handles, _ = ax.get_legend_handles_labels()
    handles += [Patch(color=_BEST_COLOR, label="best"), Patch(color=_METHOD_COLOR, label="method")]
    if any(r.kind == "study" for r in merges):
        handles.append(Patch(color=_STUDY_COLOR, label="study run"))
    ax.legend(handles=handles, fontsize=7, loc="lower right", framealpha=0.9)
    n = max((len(r.seeds) for r in merges), default=0)
    ax.set_xlabel(f"{spec.get('label', primary)}\n(mean ± std over {n} seeds; axis does not start at 0)")
    ax.set_title(f"{results.get('benchmark', '')}: {spec.get('label', primary)} per method", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path = out / "primary.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def chosen_methods(results: Mapping[str, Any], rows: Sequence[Row], best_few: int = 4) -> list[Row]:
    """The best ``best_few`` merges plus the best run of each baseline method (mean, TA, TIES)."""
    merges = [r for r in ordered(rows, results) if r.kind != "reference"]
    sign = _sign(results, results["primary"])
    merges.sort(key=lambda r: -sign * r.metrics[results["primary"]].mean)
    chosen = merges[:best_few]
    for baseline in BASELINE_METHODS:
        candidates = [r for r in merges if r.method == baseline or (r.method is None and r.label == baseline)]
        if candidates and candidates[0] not in chosen:
            chosen.append(candidates[0])
    return chosen


def _reference_marks(
    ax: Any, tasks: Sequence[str], rows: Sequence[Row], metric: str, group: float = 0.84
) -> list[float]:
    """Each reference row's per-task ``metric`` as a black line across its task's bar group (solid,
    dashed, dotted for the first, second, third reference); returns the values drawn."""
    drawn = []
    refs = [r for r in rows if r.kind == "reference" and any(metric in r.per_task.get(t, {}) for t in tasks)]
    for i, ref in enumerate(refs):
        points = [(k, ref.per_task[t][metric].mean) for k, t in enumerate(tasks) if metric in ref.per_task.get(t, {})]
        ax.hlines(
            [v for _, v in points],
            [k - group / 2 for k, _ in points],
            [k + group / 2 for k, _ in points],
            colors="black",
            linestyles=("solid", "dashed", "dotted")[i % 3],
            linewidth=1.8,
            zorder=5,
            label=f"{ref.label} (reference)",
        )
        drawn += [v for _, v in points]
    return drawn


#: Bar colours of the chosen merges (tab10 without its grey, which reads as "reference").
_SERIES_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf")


def _grouped_bars(
    ax: Any, tasks: Sequence[str], series: Sequence[tuple[str, list[float], list[float], str | None]]
) -> None:
    width = 0.8 / max(1, len(series))
    for i, (name, means, errs, color) in enumerate(series):
        xs = [t + (i - (len(series) - 1) / 2) * width for t in range(len(tasks))]
        ax.bar(xs, means, width, yerr=errs, label=name, color=color, capsize=2, error_kw={"elinewidth": 0.8})
    ax.set_xticks(range(len(tasks)), list(tasks), rotation=25, ha="right", fontsize=8)


def plot_per_task(results: Mapping[str, Any], rows: Sequence[Row], out: Path, metric: str) -> Path:
    """Grouped bars: ``metric`` per task for the chosen merges (best few + baselines), std error bars;
    reference rows as black lines across each group."""
    return _per_task_bars(results, rows, out, metric, "per_task.png", "task")


def _per_task_bars(
    results: Mapping[str, Any], rows: Sequence[Row], out: Path, metric: str, name: str, axis: str
) -> Path:
    from swudi.reporting.plots import _pyplot

    plt = _pyplot()
    tasks = list(results.get("tasks") or [])
    series = []
    for i, row in enumerate(chosen_methods(results, rows)):
        stats = [row.per_task.get(t, {}).get(metric) for t in tasks]
        means = [s.mean if s else float("nan") for s in stats]
        series.append((row.label, means, [_err(s) if s else 0.0 for s in stats], _SERIES_COLORS[i % 9]))
    fig, ax = plt.subplots(figsize=(max(8.0, 1.1 * len(tasks) + 3), 4.8))
    _grouped_bars(ax, tasks, series)
    values = _reference_marks(ax, tasks, rows, metric)
    values += [m - e for _, ms, es, _ in series for m, e in zip(ms, es, strict=True) if math.isfinite(m)]
    values += [m + e for _, ms, es, _ in series for m, e in zip(ms, es, strict=True) if math.isfinite(m)]
    if values:
        pad = 0.05 * (max(values) - min(values) or 1.0)
        ax.set_ylim(min(values) - pad, max(values) + pad)
    spec = results["metrics"][metric]
    label = spec.get("label", metric)
    better = "higher" if spec["higher_is_better"] else "lower"
    ax.set_ylabel(f"{label}\n(mean ± std, {better} is better; axis does not start at 0)", fontsize=8)
    ax.set_xlabel(axis)
    ax.set_title(f"{results.get('benchmark', '')}: {label} per {axis} (best merges and baselines)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.22))
    fig.tight_layout()
    path = out / name
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _place_labels(fig: Any, ax: Any, points: Sequence[tuple[str, float, float]], fontsize: float = 7) -> None:
    """Annotate each (text, x, y) point, right of it, moving a label down (with a leader line) until it
    overlaps no label placed before it; points are taken from the top."""
    fig.canvas.draw()  # fixes the limits, so that data -> pixel is final
    to_points = 72.0 / fig.dpi
    height = fontsize * 1.25 / to_points  # pixels
    placed: list[tuple[float, float, float, float]] = []
    for text, x, y in sorted(points, key=lambda p: -p[2]):
        px, py = ax.transData.transform((x, y))
        width = 0.62 * fontsize * len(text) / to_points
        lx, ly = px + 6, py + 3
        while any(lx < x1 and lx + width > x0 and ly < y1 and ly + height > y0 for x0, x1, y0, y1 in placed):
            ly -= height
        placed.append((lx, lx + width, ly, ly + height))
        moved = abs(ly - (py + 3)) > 0.5
        ax.annotate(
            text,
            (x, y),
            textcoords="offset points",
            xytext=((lx - px) * to_points, (ly - py) * to_points),
            fontsize=fontsize,
            va="bottom",
            arrowprops={"arrowstyle": "-", "color": "0.6", "linewidth": 0.6} if moved else None,
        )


def plot_time_vs_primary(results: Mapping[str, Any], rows: Sequence[Row], out: Path) -> Path | None:
    """Merge seconds (log x, std error bars) vs the primary metric (std error bars), one labelled
    point per method row; references as horizontal lines. None when no method has a merge time."""
    from swudi.reporting.plots import _pyplot

    primary = results["primary"]
    points = [r for r in rows if r.kind == "method" and r.merge_seconds and r.merge_seconds.mean > 0]
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5.2))
    for row in points:
        assert row.merge_seconds is not None
        x, y = row.merge_seconds.mean, row.metrics[primary].mean
        xerr = min(_err(row.merge_seconds), 0.95 * x)  # a log axis cannot show a bar below 0
        ax.errorbar(
            x,
            y,
            xerr=xerr,
            yerr=_err(row.metrics[primary]),
            fmt="o",
            color=_BEST_COLOR if row.is_best else _METHOD_COLOR,
            capsize=3,
            markersize=5,
        )
    for i, ref in enumerate(r for r in rows if r.kind == "reference" and primary in r.metrics):
        ax.axhline(
            ref.metrics[primary].mean,
            color="0.4",
            linestyle=_REFERENCE_STYLES[i % len(_REFERENCE_STYLES)],
            linewidth=1,
            label=f"{ref.label} ({ref.metrics[primary].mean:.3f})",
        )
    ax.set_xscale("log")
    labels = [(r.label, r.merge_seconds.mean, r.metrics[primary].mean) for r in points if r.merge_seconds]
    _place_labels(fig, ax, labels)
    spec = results["metrics"][primary]
    ax.set_xlabel("merge time (s, log scale; mean ± std over seeds)")
    ax.set_ylabel(f"{spec.get('label', primary)} (mean ± std)")
    ax.set_title(f"{results.get('benchmark', '')}: merge time vs {spec.get('label', primary)}", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = out / "time_vs_primary.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_per_task_loss(results: Mapping[str, Any], rows: Sequence[Row], out: Path) -> Path | None:
    """Grouped bars of the per-task (per-domain) ``loss`` for the chosen merges; reference rows (base,
    experts) as black lines across each group. None when no run has a per-task loss."""
    if "loss" not in results["metrics"] or not any("loss" in v for r in rows for v in r.per_task.values()):
        return None
    return _per_task_bars(results, rows, out, "loss", "per_task_loss.png", "domain")


# ------------------------------------------------------------------------------------------- entry
def write_benchmark_report(results: Path | Mapping[str, Any], out_dir: Path, *, plots: bool = True) -> list[Path]:
    """Write ``results.md``, ``summary.json`` and (``plots``) the PNG plots of a benchmark's results under
    ``out_dir``; return the paths written.

    Without matplotlib (an optional extra) only ``results.md`` and ``summary.json`` are written, with
    one warning. Raises :class:`BenchmarkResultsError` naming the key or label of malformed results.
    """
    from swudi.reporting.plots import plotting_missing

    data = load_results(results)
    rows = aggregate(data)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "results.md", out_dir / "summary.json"]
    written[0].write_text(markdown(data, rows))
    written[1].write_text(json.dumps(summary_dict(data, rows), indent=2) + "\n")
    if not plots:
        return written
    missing = plotting_missing()
    if missing:
        log.warning("%s", missing)
        return written
    written.append(plot_primary(data, rows, out_dir))
    task_metric = per_task_metric(data)
    if task_metric and data.get("tasks"):
        written.append(plot_per_task(data, rows, out_dir, task_metric))
    for path in (plot_time_vs_primary(data, rows, out_dir), plot_per_task_loss(data, rows, out_dir)):
        if path:
            written.append(path)
    log.info("benchmark report of %s written to %s", data.get("benchmark"), out_dir)
    return written

"""The ``swudi`` command line: plan, merge, methods, demo.

The commands that run flows reach them through :mod:`swudi.cli.flows_bridge` (the library imports
no Prefect; ``swudi plan`` needs headers alone). Without ``PREFECT_API_URL`` (and no
``prefect server start`` on this machine) the flows run on an embedded server (:mod:`flows.server`).
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NoReturn, ParamSpec, TypeVar

import typer
import yaml
from rich.console import Console
from rich.table import Table

from swudi.cli.flows_bridge import (
    run_merge_and_settle,
    run_refresh,
    run_sweep_and_settle,
    run_tune_and_settle,
    serve_refresh_deployment,
)
from swudi.config.merge_config import MergeConfig, load_config
from swudi.errors import ConfigError, GateError, PublishError, SwudiError, is_input_error
from swudi.evaluators.runner import check_evaluators
from swudi.methods.registry import method_choices
from swudi.storage.faults import storage_fault
from swudi.storage.redact import install_log_redaction, mask_credentials
from swudi.units import format_bytes

if TYPE_CHECKING:  # the plan and the results pull in the whole pipeline: imported by the commands that run it
    from swudi.pipeline.plan import TensorRow
    from swudi.pipeline.results import MergeResult, TimeSplit

install_log_redaction()  # no credential of a URL in any log record of a swudi command

P = ParamSpec("P")
R = TypeVar("R")

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Data-free model merging with SWUDI / SWUDI-A as resumable Prefect flows.",
)
console = Console(stderr=True)
out = Console()

#: Help text of the ``--method`` options, from the method registry.
METHOD_HELP = f"merge method: {method_choices()} (see `swudi methods`)"


def _load(config: Path, method: str | None, overrides: list[str]) -> MergeConfig:
    extra = [f"method={method}"] if method else []
    return load_config(config, [*extra, *overrides])


#: Exit code of a version refused by the publish gate (``latest`` unchanged); input errors exit 2.
GATE_EXIT_CODE = 3


def _fail(error: Exception) -> NoReturn:
    """One line (or one line per problem) on stderr, exit code 2 (3 for a version the gate refused)."""
    from rich.text import Text

    message = _os_message(error) if isinstance(error, OSError) else str(error)
    console.print(Text.assemble(("error:", "red"), " ", mask_credentials(message)), soft_wrap=True)
    raise typer.Exit(GATE_EXIT_CODE if isinstance(error, GateError) else 2)


def _os_message(error: OSError) -> str:
    """An operating-system error as one line naming the file and what to do."""
    where = f" {error.filename}" if error.filename else ""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"no space left on the device of{where or ' the work folder or output'}: "
            "free space there, or point work_dir / output elsewhere"
        )
    if isinstance(error, PermissionError) or error.errno in (errno.EACCES, errno.EPERM):
        return (
            f"access denied to{where or ' a location of the config'}: "
            "check the permissions or storage_options credentials"
        )
    if error.errno == errno.EROFS:
        return f"read-only file system at{where}: choose a writable work_dir / output"
    return f"{error.strerror or error}{':' + where if where else ''}"


def _refuse(error: BaseException) -> NoReturn:
    """Exit 2 with one line for an input error (:func:`swudi.errors.is_input_error`); re-raise a fault."""
    if isinstance(error, SwudiError) or is_input_error(error):
        _fail(error)  # type: ignore[arg-type]
    raise error


def storage_faults_fail_cleanly(command: Callable[P, R]) -> Callable[P, R]:
    """A command whose storage faults (after every retry) end in one line and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except (typer.Exit, KeyboardInterrupt):
            raise
        except Exception as error:
            fault = storage_fault(error)
            if fault is None:
                raise
            _fail(fault)

    return wrapper


def print_result(result: MergeResult) -> None:
    """Human summary of a merge on stderr; the version URL alone on stdout."""
    diag = {k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in result["diagnostics"].items()}
    io = result["io"]
    console.print(
        f"[green]published[/green] version {result['version']} at {result['url']}\n"
        f"  layers: {result['layers']} (+{result['groups']} groups of small tensors); computed now: "
        f"{result['computed']} merges, {result['decompositions_computed']} decompositions; "
        f"reused: {result['reused']} merges, {result['decompositions_reused']} decompositions\n"
        f"  mean rank {diag.get('mean_rank')}, mean kept eigenvalue mass {diag.get('mean_kept_mass')}, "
        f"mean WUDI interference vs sum {diag.get('mean_interference_vs_sum')}\n"
        f"{_split(result['time_split'])}\n"
        f"  read {format_bytes(io['input_bytes'])} of the inputs ({format_bytes(io['header_bytes'])} headers) "
        f"and {format_bytes(io['work_bytes'])} of the work folder"
    )
    out.print(result["url"], soft_wrap=True)


def _split(split: TimeSplit) -> str:
    """Two lines: the run's wall seconds (plan, publish, orchestration = what the work does not explain,
    of it the flow run's start and finish), then the task seconds summed over the merge tasks (they
    run in parallel: their sum may exceed the wall)."""
    wall = (
        f"  {split['wall']:.1f} s wall: plan {split['plan']:.1f} s, publish {split['publish']:.1f} s, "
        f"orchestration {split['orchestration']:.1f} s (of it {split['flow_run']:.1f} s starting and "
        f"finishing the flow run), the rest merge tasks"
    )
    tasks = {"read": split["read"], "decompose": split["decompose"], "merge": split["merge"]}
    tasks.update(diagnostics=split["diagnostics"], write=split["write"])
    phases = ", ".join(f"{k} {v:.1f} s" for k, v in tasks.items())
    return f"{wall}\n  task seconds summed over the merge tasks ({split['tasks_in_parallel']} in parallel): {phases}"


@app.command()
@storage_faults_fail_cleanly
def merge(
    config: Path = typer.Argument(..., help="YAML merge config"),
    method: str | None = typer.Option(None, "--method", help=f"override the config's {METHOD_HELP}"),
    overrides: list[str] = typer.Option([], "--set", help="key=value override (dotted keys)"),
    verbose: bool = typer.Option(False, "-v", "--verbose"),
) -> None:
    """Merge base + experts as configured and publish a new version; print its location.

    When the version these inputs and settings give is already published, complete and `latest`,
    nothing runs (not even Prefect): the command says so and prints its location.
    """
    if verbose:
        logging.getLogger("swudi").setLevel(logging.DEBUG)
    try:
        cfg = _load(config, method, overrides)
        check_evaluators(cfg.evaluators, cfg.storage_options)
        if _report_up_to_date(cfg):
            return
        result = run_merge_and_settle(cfg)
    except (SwudiError, OSError) as error:
        _refuse(error)
    print_result(result)


def _report_up_to_date(cfg: MergeConfig) -> bool:
    """Say so and print the location when this config's version is already published (no Prefect)."""
    published = published_version(cfg)
    if published is None:
        return False
    console.print(
        f"[green]up to date[/green]: version {published['version']} is published, complete and latest; nothing to merge"
    )
    out.print(published["url"], soft_wrap=True)
    return True


def published_version(cfg: MergeConfig) -> dict[str, Any] | None:
    """``latest.json`` (with ``url``) when it names the complete version of this config's inputs and
    settings (from headers and object metadata alone), else None."""
    from swudi.pipeline.plan import build_plan, version_id
    from swudi.pipeline.preflight import check_before_merge
    from swudi.publish.versions import is_version_complete, read_latest

    check_before_merge(cfg)
    plan = build_plan(cfg)  # headers only: every input error of the plan is one line before Prefect starts
    latest = read_latest(cfg.output, cfg.storage_options)
    if latest is None:
        return None
    version = version_id(cfg, plan)
    if latest["version"] != version or not is_version_complete(cfg.output, version, cfg.storage_options):
        return None
    return latest


@app.command()
@storage_faults_fail_cleanly
def plan(
    config: Path = typer.Argument(..., help="YAML merge config"),
    method: str | None = typer.Option(None, "--method", help=f"override the config's {METHOD_HELP}"),
    overrides: list[str] = typer.Option([], "--set", help="key=value override (dotted keys)"),
    as_json: bool = typer.Option(False, "--json", help="print the plan as JSON"),
) -> None:
    """Validate config and checkpoints from headers alone and print the plan (no weights read)."""
    from swudi.methods import get_method
    from swudi.pipeline.plan import build_plan, describe_plan

    try:
        cfg = _load(config, method, overrides)
        plan_ = build_plan(cfg)
    except (SwudiError, OSError) as error:
        _refuse(error)
    summary = describe_plan(cfg, plan_)
    work = work_folder_state(cfg, plan_)
    if as_json:
        out.print_json(json.dumps({**summary, "work_folder": work}))
        return
    table = Table(title=f"swudi plan: {cfg.method} ({get_method(cfg.method).kind}) {cfg.params}")
    lora = any("adapter_ranks" in row for row in summary["tensors"])  # LoRA experts: ranks and path
    for column in ("tensor", "shape", "dtype", "treatment", *(("LoRA ranks", "decomposition") if lora else ())):
        table.add_column(column)
    for row in summary["tensors"]:
        treatment = row["treatment"]
        if "rows" in row:  # a vocab tensor of vocab-extended experts
            rows = row["rows"]
            treatment += f" ({rows['merged']} rows) + {rows['appended']} appended + {rows['padding']} padding rows"
        cells = [row["name"], "x".join(map(str, row["shape"])), row["dtype"], treatment]
        if lora:
            cells += _lora_cells(row)
        table.add_row(*cells)
    out.print(table)
    out.print(
        f"counts: {summary['counts']}; reads about {format_bytes(summary['estimated_read_bytes'])}; "
        f"decompositions about {summary['estimated_decomposition_gflop']} GFLOP"
    )
    if summary["estimated_task_svd_bytes"]:
        what = f"{cfg.method}" + (f" + post {cfg.post}" if cfg.post else "")
        out.print(
            f"per-task SVDs ({what}): at most {summary['estimated_task_svd_bytes'] / 1e6:.1f} MB extra in the work "
            "folder (WORK/task_svds), shared by every subspace method and post-filter"
        )
    if "vocab" in summary:
        out.print(_vocab_line(summary["vocab"]))
    out.print(
        f"work folder {work['url']}: {work['files']} artefacts, {format_bytes(work['bytes'])}; for this "
        f"setting {work['stored']['merged']} of {work['needed']['merged']} merged and "
        f"{work['stored']['decompositions']} of {work['needed']['decompositions']} decompositions "
        + (
            f"and {work['stored']['task_svds']} of {work['needed']['task_svds']} per-task SVDs "
            if work["needed"].get("task_svds")
            else ""
        )
        + "are stored (`swudi gc` removes what no setting needs)"
    )
    for warning in summary["warnings"]:
        out.print(f"[yellow]warning:[/yellow] {warning}")


def _vocab_line(vocab: dict[str, Any]) -> str:
    """One line on vocab-extended experts: rows merged / appended / padding, tokenizer, per expert."""
    experts = "; ".join(
        f"{e['url']}: {e['rows']} rows, {e['appended_tokens']} appended tokens, "
        f"{e['padding_rows_taken']} padding rows taken"
        for e in vocab["experts"]
    )
    return (
        f"vocab: {vocab['base_rows']} -> {vocab['rows']} rows ({vocab['rows_merged']} merged, "
        f"{vocab['rows_appended']} appended token rows = mean of the experts that have the token, "
        f"{vocab['rows_padding']} padding rows from the first expert that has them); tokenizer from "
        f"{vocab['tokenizer_from']}; {experts}"
    )


def _lora_cells(row: TensorRow) -> list[str]:
    """``4+0+full`` (each expert's LoRA rank, "full" for a full tensor) and the decomposition path."""
    ranks = row.get("adapter_ranks")
    if ranks is None:
        return ["", ""]
    path = row.get("path", "")
    if path:
        gflop = f", {row['decomposition_gflop']:g} GFLOP" if "decomposition_gflop" in row else ""
        path += gflop + (f" ({row['path_reason']})" if "path_reason" in row else "")
    return ["+".join("full" if r is None else str(r) for r in ranks), path]


@app.command("methods")
def list_methods(
    markdown: bool = typer.Option(False, "--markdown", help="print a Markdown table (the README's)"),
) -> None:
    """List the registered merge methods: name, kind, description, parameters with their defaults."""
    from rich.text import Text

    from swudi.methods.registry import import_method_modules, method_rows, methods_markdown

    try:
        import_method_modules()  # methods registered by $SWUDI_METHOD_MODULES
    except (SwudiError, OSError) as error:
        _refuse(error)
    if markdown:
        typer.echo(methods_markdown())
        return
    table = Table(title="swudi merge methods")
    for column in ("method", "kind", "description", "source", "parameters (defaults)"):
        table.add_column(column, no_wrap=column in ("method", "kind"), overflow="fold")
    for row in method_rows():
        table.add_row(
            *(
                Text(text)
                for text in (
                    row["name"],
                    row["kind"],
                    row["description"],
                    row["source"] or "-",
                    ", ".join(row["parameters"]) or "-",
                )
            )
        )
    out.print(table)


def work_folder_state(cfg: MergeConfig, plan_: Any) -> dict[str, Any]:
    """The work folder's size and, per artefact kind, how many of this setting's artefacts exist."""
    from swudi.pipeline.keys import artefact_keys
    from swudi.pipeline.workdir import list_artefacts, usage

    keys = artefact_keys(plan_.layer_jobs, plan_.group_jobs, cfg)
    state = usage(cfg)
    state["needed"] = {kind: len(values) for kind, values in keys.items()}
    state["stored"] = {kind: len(values & set(list_artefacts(cfg, kind))) for kind, values in keys.items()}
    return state


@app.command()
@storage_faults_fail_cleanly
def gc(
    config: Path = typer.Argument(..., help="YAML merge config (its output, work folder and setting)"),
    min_age: float = typer.Option(3600.0, "--min-age", min=0, help="seconds: younger unneeded artefacts are kept too"),
    dry_run: bool = typer.Option(False, "--dry-run", help="only list what would be removed"),
    overrides: list[str] = typer.Option([], "--set", help="key=value override (dotted keys)"),
) -> None:
    """Remove work-folder artefacts that neither this setting, nor a kept version, nor a running merge needs."""
    from swudi.pipeline.workdir import collect_garbage, usage

    try:
        cfg = _load(config, None, overrides)
        result = collect_garbage(cfg, min_age_s=min_age, dry_run=dry_run)
    except (SwudiError, OSError) as error:
        _refuse(error)
    verb = "would remove" if dry_run else "removed"
    console.print(
        f"{verb} {len(result.removed)} artefacts ({format_bytes(result.freed_bytes)}); kept "
        f"{result.kept_files} ({format_bytes(result.kept_bytes)}, {result.young_files} of them only "
        f"because they are younger than {min_age:.0f} s)"
    )
    for name in result.removed:
        out.print(name, soft_wrap=True)
    if not dry_run:
        after = usage(cfg)
        console.print(f"work folder {after['url']}: {after['files']} artefacts, {format_bytes(after['bytes'])}")


@app.command()
@storage_faults_fail_cleanly
def demo(
    folder: Path = typer.Option(Path(".swudi-demo"), "--dir", help="where models are written"),
    experts: int = typer.Option(4, min=2, help="number of generated experts"),
    layers: int = typer.Option(4, min=1),
    hidden: int = typer.Option(128, min=8),
    method: str = typer.Option("swudi_a", help=METHOD_HELP),
) -> None:
    """Generate a small base and experts, merge them end to end, publish to a local folder."""
    from swudi.io.synthetic import SyntheticModel, write_synthetic_models

    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # the demo shows its own summary
    folder = folder.resolve()
    model = SyntheticModel(layers=layers, hidden=hidden, intermediate=4 * hidden)
    checkpoints = folder / "checkpoints"
    settings = {"experts": experts, "model": model.__dict__}
    stamp = checkpoints / "generated.json"
    if stamp.exists() and json.loads(stamp.read_text()) == settings:
        console.print(f"reusing the generated base and {experts} experts in {checkpoints}")
        base, expert_urls = str(checkpoints / "base"), [str(checkpoints / f"expert-{i}") for i in range(experts)]
    else:  # written once: unchanged files keep their fingerprints, so a second demo reuses everything
        console.print(f"generating a base and {experts} experts ({layers} layers, hidden {hidden}) in {checkpoints}")
        base, expert_urls = write_synthetic_models(str(checkpoints), experts, model)
        stamp.write_text(json.dumps(settings))
    config_path = folder / "merge.yaml"
    config_path.write_text(
        yaml.safe_dump(
            {"base": base, "experts": expert_urls, "method": method, "output": str(folder / "merged"), "workers": 2}
        )
    )
    console.print(f"config written to {config_path}; merging with {method} (Prefect, embedded server)")
    try:
        cfg = load_config(config_path)
        if _report_up_to_date(cfg):
            return
        result = run_merge_and_settle(cfg)
    except (SwudiError, OSError) as error:
        _refuse(error)
    print_result(result)


@app.command()
@storage_faults_fail_cleanly
def refresh(
    config: Path = typer.Argument(..., help="YAML merge config"),
    overrides: list[str] = typer.Option([], "--set", help="key=value override (dotted keys)"),
    wait: float = typer.Option(3600.0, "--wait", min=0, help="seconds to wait for another refresh of the same output"),
    verbose: bool = typer.Option(False, "-v", "--verbose"),
) -> None:
    """Publish a new version if an input or a setting changed since `latest`; otherwise do nothing."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING)
    try:
        load_config(config, overrides)  # a bad config fails here, before Prefect starts
        result = run_refresh(config, overrides, wait)
    except (SwudiError, OSError) as error:
        _refuse(error)
    if result["status"] == "unchanged":
        console.print(
            f"[green]up to date[/green]: version {result['version']} already published; nothing changed, nothing merged"
        )
    else:
        console.print(
            f"[green]published[/green] version {result['version']} (previous: "
            f"{result['previous']}): {'; '.join(result['changes'])}\n"
            f"  computed now: {result['computed']} merges, "
            f"{result['decompositions_computed']} decompositions; reused: {result['reused']}"
        )
    if result["pruned"]:
        console.print(f"  pruned: {', '.join(result['pruned'])}")
    out.print(result["url"], soft_wrap=True)


@app.command()
def serve(
    config: Path = typer.Argument(..., help="YAML merge config (re-read at every run)"),
    cron: str = typer.Option("0 3 * * *", "--cron", help="cron schedule of the refresh"),
    timezone: str | None = typer.Option(None, "--timezone", help="IANA zone of the cron (default UTC)"),
    name: str = typer.Option("nightly", "--name", help="deployment name (flow swudi-refresh)"),
    overrides: list[str] = typer.Option([], "--set", help="key=value override (dotted keys)"),
    collision: str = typer.Option(
        "enqueue", "--collision", help="a run that would overlap: enqueue (wait) or cancel_new"
    ),
    no_schedule: bool = typer.Option(False, "--no-schedule", help="no schedule: runs start by hand"),
    wait: float = typer.Option(
        3600.0, "--wait", min=0, help="seconds a run waits for another refresh of the same output"
    ),
) -> None:
    """Serve the refresh flow as a scheduled deployment, one run at a time, until stopped."""
    logging.basicConfig(level=logging.WARNING)
    if collision not in ("enqueue", "cancel_new"):
        _fail(SwudiError(f"--collision must be enqueue or cancel_new, not {collision!r}"))
    strategy: Literal["enqueue", "cancel_new"] = "cancel_new" if collision == "cancel_new" else "enqueue"
    try:
        load_config(config, overrides)
        serve_refresh_deployment(config, None if no_schedule else cron, name, overrides, timezone, strategy, wait)
    except (SwudiError, OSError) as error:
        _refuse(error)


@app.command()
@storage_faults_fail_cleanly
def sweep(
    config: Path = typer.Argument(..., help="YAML merge config (the grid's base settings)"),
    grid: list[str] = typer.Option(..., "--grid", help="key=v1,v2,... (repeatable; cartesian product)"),
    overrides: list[str] = typer.Option([], "--set", help="key=value override (dotted keys)"),
) -> None:
    """Merge a grid of settings reusing cached decompositions; write OUTPUT/sweeps/<id>/sweep.json."""
    from swudi.config.grid import parse_grid, point_configs

    try:
        cfg = _load(config, None, overrides)
        points = point_configs(cfg, parse_grid(grid))
        summary = run_sweep_and_settle(cfg, grid)
    except (SwudiError, OSError) as error:
        _refuse(error)
    table = Table(title=f"swudi sweep: {len(points)} points")
    for column in ("point", "version", "mean rank", "interference vs sum", "decompositions computed", "s"):
        table.add_column(column)
    for row in summary["points"]:
        diag = row["diagnostics"]
        table.add_row(
            row["label"],
            row["version"],
            _num(diag.get("mean_rank")),
            _num(diag.get("mean_interference_vs_sum")),
            str(row["decompositions_computed"]),
            _num(row["seconds"]),
        )
    console.print(table)
    out.print(summary["url"], soft_wrap=True)


@app.command()
@storage_faults_fail_cleanly
def tune(
    config: Path = typer.Argument(..., help="YAML merge config (the base settings; evaluators and output)"),
    objective: str = typer.Option(
        ..., "--objective", help="module:function:TASK.METRIC, the function one of the config's evaluators"
    ),
    grid: list[str] = typer.Option([], "--grid", help="key=v1,v2,... (scale, method, params.*; repeatable)"),
    minimize: bool = typer.Option(False, "--minimize", help="lower is better (a loss); default: higher is better"),
    refine: int = typer.Option(0, "--refine", min=0, help="up to N more scales around the best grid point"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the candidates; merge nothing"),
    overrides: list[str] = typer.Option([], "--set", help="key=value override (dotted keys)"),
) -> None:
    """Merge each grid point from the cached decompositions, score it with the objective, publish the winner.

    Candidates are staged in the work folder and deleted once scored; scores are cached, so a
    killed tune resumes. Writes WORK/tune/<id>/tune.json and tune.png; prints the winner's URL.
    """
    from swudi.tuning.candidates import describe_candidates, prepare_tune

    try:
        cfg = _load(config, None, overrides)
        setup = prepare_tune(cfg, objective, grid, refine, minimize)
        if dry_run:  # one line per candidate (greppable), nothing merged or evaluated
            console.print(f"swudi tune {setup.tune_id}: {len(setup.candidates)} candidates on {objective}")
            for row in describe_candidates(setup.candidates):
                out.print(
                    f"{row['label']}  method={row['method']} params={row['params']} scale={row['scale']}",
                    soft_wrap=True,
                    markup=False,
                )
            if refine:
                out.print(f"then up to {refine} more scales around the best (bracketing + golden section)")
            return
        result = run_tune_and_settle(cfg, objective, grid, refine, minimize)
        published = result["published"]
    except (SwudiError, OSError) as error:
        _refuse(error)
    table = Table(title=f"swudi tune {result['tune_id']}: {objective} (base model: {_num(result['base_score'])})")
    for column in ("candidate", "stage", "method", "scale", "score", "s", "cached", ""):
        table.add_column(column)
    for row in result["rows"]:
        won = "winner" if row["label"] == result["winner"]["label"] else ""
        table.add_row(
            row["label"], row["stage"], row["method"], _num(row["scale"]), _num(row["score"]),
            _num(row["seconds"]), str(row["cached"]), won,
        )  # fmt: skip
    console.print(table)
    console.print(f"results {result['results']}; plot {result['plot']}")
    console.print(f"[green]published[/green] the winner {result['winner']['label']} as version {published['version']}")
    out.print(published["url"], soft_wrap=True)


def _num(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


@app.command()
@storage_faults_fail_cleanly
def report(
    run: str = typer.Argument(
        ..., help="sweep folder/sweep.json, version folder, output folder, or a benchmark's results.json/its folder"
    ),
    out_dir: Path | None = typer.Option(None, "--out", help="where the files go (default: ./swudi-report)"),
    config: Path | None = typer.Option(None, "--config", help="config whose storage_options to use"),
) -> None:
    """Write PNG plots (retention vs t / rank_ratio, rank per layer, spectra) and summary tables.

    For a benchmark's results.json: results.md (mean ± std over seeds, which differences exceed the
    noise), summary.json and the plots of docs/results/README.md, "Benchmark reports".
    """
    from swudi.reporting.plots import plotting_missing, write_report

    target = out_dir or Path("swudi-report")
    try:
        options = load_config(config).storage_options if config else None
        written = write_report(run, target, options)
    except (SwudiError, FileNotFoundError) as error:
        _fail(error)
    except OSError as error:
        hint = "" if config else " (a remote location needs its storage options: pass --config merge.yaml)"
        _fail(SwudiError(f"{run}: cannot be read: {_os_message(error)}{hint}"))
    except Exception as error:  # e.g. botocore's NoCredentialsError for an S3 URL without --config
        if config or "://" not in run:
            raise
        _fail(
            SwudiError(
                f"{run}: cannot be read ({type(error).__name__}): pass --config merge.yaml for its storage options"
            )
        )
    if note := plotting_missing():
        console.print(f"[yellow]note:[/yellow] {note}")
    for path in written:
        out.print(str(path), soft_wrap=True)


@app.command()
def push(
    config: Path = typer.Argument(..., help="YAML merge config with push_to_hub"),
    version: str | None = typer.Option(None, "--version", help="a published version id (default: latest)"),
    overrides: list[str] = typer.Option([], "--set", help="key=value override (dotted keys)"),
) -> None:
    """Upload a published version to the config's push_to_hub repository (again), without merging.

    `swudi merge` pushes each version it publishes; use this after a failed push, or to push an older
    version. Prints the Hub commit URL.
    """
    from swudi.publish.hub import push_version
    from swudi.publish.versions import is_version_complete, read_latest, version_url

    try:
        cfg = _load(config, None, overrides)
        if cfg.push_to_hub is None:
            raise ConfigError(f"{config}: push_to_hub is not set (push_to_hub: {{repo_id: owner/name}})")
        if version is None:
            latest = read_latest(cfg.output, cfg.storage_options)
            if latest is None:
                raise PublishError(f"{cfg.output}: nothing published yet (no latest.json)")
            version = str(latest["version"])
        if not is_version_complete(cfg.output, version, cfg.storage_options):
            raise PublishError(f"{cfg.output}: version {version} is not a complete published version")
        url = push_version(version_url(cfg.output, version), version, cfg.push_to_hub, cfg.storage_options)
    except SwudiError as error:
        _fail(error)
    console.print(url)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()

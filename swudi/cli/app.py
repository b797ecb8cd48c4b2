"""The ``swudi`` command line: plan, merge, methods, demo.

Prefect is imported only by the commands that run flows; ``swudi plan`` needs headers alone.
Without ``PREFECT_API_URL`` the flows run on Prefect's embedded (ephemeral) server.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, NoReturn, ParamSpec, TypeVar

import typer
import yaml
from rich.console import Console
from rich.table import Table

from swudi.config.merge_config import MergeConfig, load_config
from swudi.errors import ConfigError, PublishError, SwudiError, is_input_error
from swudi.evaluators.runner import check_evaluators
from swudi.methods.registry import method_choices
from swudi.storage.faults import mask_credentials, storage_fault

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

#: Defaults for Prefect on these machines (a cold ephemeral server needs ~15 s; no telemetry).
PREFECT_DEFAULTS = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "swudi",
}


#: Where ``prefect server start`` listens by default.
LOCAL_PREFECT_API = "http://127.0.0.1:4200/api"


def local_prefect_server(api_url: str = LOCAL_PREFECT_API, timeout_s: float = 0.3) -> str | None:
    """``api_url`` when a Prefect server answers its health check there, else None (fast: loopback)."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout_s) as response:
            return api_url if response.read(16).strip() == b"true" else None
    except (OSError, ValueError):
        return None


def prepare_prefect_environment(local_api: str | None = None) -> None:
    """Apply :data:`PREFECT_DEFAULTS` where the user has not set them (before importing Prefect).

    Without ``PREFECT_API_URL``, a Prefect server already running on this machine's default port
    (``prefect server start``) is used instead of starting an embedded one for every command.
    ``SWUDI_LOCAL_PREFECT_API`` names another address to look at; set to an empty string, it
    turns the look-up off (always the embedded server).
    """
    for key, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if local_api is None:
        local_api = os.environ.get("SWUDI_LOCAL_PREFECT_API", LOCAL_PREFECT_API)
    if local_api and not os.environ.get("PREFECT_API_URL") and (found := local_prefect_server(local_api)):
        os.environ["PREFECT_API_URL"] = found
        console.print(f"using the Prefect server at {found} (runs are kept in its history)")


def ensure_prefect_api() -> None:
    """:func:`prepare_prefect_environment`, then, if no Prefect API is named or found, start an embedded
    server for this command (:mod:`flows.server`: bounded start-up, stopped with the command)."""
    prepare_prefect_environment()
    if not os.environ.get("PREFECT_API_URL") and not _prefect_api_in_settings():
        from flows.server import start_embedded_server

        console.print("starting an embedded Prefect server for this command (`prefect server start` avoids it)")
        start_embedded_server()


def _prefect_api_in_settings() -> bool:
    """True when Prefect is already imported in this process and its settings name an API (an
    in-process caller such as a test harness); never imports Prefect itself."""
    if "prefect.settings" not in sys.modules:
        return False
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value())


def _load(config: Path, method: str | None, overrides: list[str]) -> MergeConfig:
    extra = [f"method={method}"] if method else []
    return load_config(config, [*extra, *overrides])


def _fail(error: Exception) -> NoReturn:
    """One line (or one line per problem) on stderr, exit code 2."""
    from rich.text import Text

    message = _os_message(error) if isinstance(error, OSError) else str(error)
    console.print(Text.assemble(("error:", "red"), " ", mask_credentials(message)), soft_wrap=True)
    raise typer.Exit(2)


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


def run_flow_and_settle(config: MergeConfig, grid: list[str] | None = None) -> dict[str, Any]:
    """Run the merge flow (or, with a ``grid``, the sweep flow), then wait until every task run it
    submitted is in the run history (:mod:`flows.history`), before the process exits."""
    ensure_prefect_api()
    if grid is None:
        from flows.merge import run_merge

        result = run_merge(config)
    else:
        from flows.sweep import run_sweep

        result = run_sweep(config, grid)
    from flows.history import wait_for_run_history

    points = [result] if grid is None else result["points"]
    wait_for_run_history({p["flow_run_id"]: p["task_runs"] for p in points})
    return result


def print_result(result: dict[str, Any]) -> None:
    """Human summary of a merge on stderr; the version URL alone on stdout."""
    diag = {k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in result.get("diagnostics", {}).items()}
    console.print(
        f"[green]published[/green] version {result['version']} at {result['url']}\n"
        f"  layers: {result['layers']} (+{result['groups']} groups of small tensors); computed now: "
        f"{result['computed']} merges, {result.get('decompositions_computed', 0)} decompositions; "
        f"reused: {result['reused']} merges, {result.get('decompositions_reused', 0)} decompositions\n"
        f"  mean rank {diag.get('mean_rank')}, mean kept eigenvalue mass {diag.get('mean_kept_mass')}, "
        f"mean WUDI interference vs sum {diag.get('mean_interference_vs_sum')}\n"
        f"  {result['seconds']} s in the flow: {_split(result.get('time_split', {}))}\n"
        f"  read {_mb(result['io']['input_bytes'])} of the inputs ({_mb(result['io']['header_bytes'])} headers) "
        f"and {_mb(result['io']['work_bytes'])} of the work folder"
    )
    out.print(result["url"], soft_wrap=True)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _split(split: dict[str, float]) -> str:
    """``read 1.2 s, decompose 3.4 s, ...`` (task phases are summed over parallel tasks)."""
    order = ("plan", "read", "decompose", "merge", "diagnostics", "write", "publish", "orchestration")
    return ", ".join(f"{k} {split[k]:.1f} s" for k in order if k in split) or "-"


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
        result = run_flow_and_settle(cfg)
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
    latest = read_latest(cfg.output, cfg.storage_options)
    if latest is None:
        return None
    version = version_id(cfg, build_plan(cfg))
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
    summary["work_folder"] = work_folder_state(cfg, plan_)
    if as_json:
        out.print_json(json.dumps(summary))
        return
    table = Table(title=f"swudi plan: {cfg.method} ({get_method(cfg.method).kind}) {cfg.params}")
    lora = any("adapter_ranks" in row for row in summary["tensors"])  # LoRA experts: ranks and path
    for column in ("tensor", "shape", "dtype", "treatment", *(("LoRA ranks", "decomposition") if lora else ())):
        table.add_column(column)
    for row in summary["tensors"]:
        # "\[": a literal bracket, not Rich markup
        treatment = row["treatment"] + (r" \[in, out]" if row.get("orientation") == "in_out" else "")
        if "rows" in row:  # a vocab tensor of vocab-extended experts
            rows = row["rows"]
            treatment += f" ({rows['merged']} rows) + {rows['appended']} appended + {rows['padding']} padding rows"
        cells = [row["name"], "x".join(map(str, row["shape"])), row["dtype"], treatment]
        if lora:
            cells += _lora_cells(row)
        table.add_row(*cells)
    out.print(table)
    out.print(
        f"counts: {summary['counts']}; reads about {summary['estimated_read_bytes'] / 1e6:.1f} MB; "
        f"decompositions about {summary['estimated_decomposition_gflop']} GFLOP"
    )
    if "vocab" in summary:
        out.print(_vocab_line(summary["vocab"]))
    work = summary["work_folder"]
    out.print(
        f"work folder {work['url']}: {work['files']} artefacts, {work['bytes'] / 1e6:.1f} MB; for this "
        f"setting {work['stored']['merged']} of {work['needed']['merged']} merged and "
        f"{work['stored']['decompositions']} of {work['needed']['decompositions']} decompositions "
        f"are stored (`swudi gc` removes what no setting needs)"
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


def _lora_cells(row: dict[str, Any]) -> list[str]:
    """``4+0+full`` (each expert's LoRA rank, "full" for a full tensor) and the decomposition path."""
    ranks = row.get("adapter_ranks")
    if ranks is None:
        return ["", ""]
    path = row.get("path", "")
    if path:
        path += f", {row['decomposition_gflop']:g} GFLOP" + (f" ({row['path_reason']})" if "path_reason" in row else "")
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
    for column in ("method", "kind", "description", "parameters (defaults)"):
        table.add_column(column, no_wrap=column in ("method", "kind"), overflow="fold")
    for row in method_rows():
        table.add_row(
            *(
                Text(text)
                for text in (row["name"], row["kind"], row["description"], ", ".join(row["parameters"]) or "-")
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
        f"{verb} {len(result.removed)} artefacts ({result.freed_bytes / 1e6:.1f} MB); kept "
        f"{result.kept_files} ({result.kept_bytes / 1e6:.1f} MB, {result.young_files} of them only "
        f"because they are younger than {min_age:.0f} s)"
    )
    for name in result.removed:
        out.print(name, soft_wrap=True)
    if not dry_run:
        after = usage(cfg)
        console.print(f"work folder {after['url']}: {after['files']} artefacts, {after['bytes'] / 1e6:.1f} MB")


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
        result = run_flow_and_settle(cfg)
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
        ensure_prefect_api()
        from flows.refresh import refresh as refresh_flow

        result = refresh_flow(str(config.resolve()), overrides, wait)
    except (SwudiError, OSError) as error:
        _refuse(error)
    from flows.history import wait_for_run_history

    merge_run = {result["merge_flow_run_id"]: result["merge_task_runs"]} if "merge_flow_run_id" in result else {}
    wait_for_run_history(merge_run)  # every task run reaches the run history before the process exits
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
    prepare_prefect_environment()
    if collision not in ("enqueue", "cancel_new"):
        _fail(SwudiError(f"--collision must be enqueue or cancel_new, not {collision!r}"))
    strategy: Literal["enqueue", "cancel_new"] = "cancel_new" if collision == "cancel_new" else "enqueue"
    try:
        load_config(config, overrides)
    except (SwudiError, OSError) as error:
        _refuse(error)
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        _fail(
            SwudiError(
                "swudi serve needs a Prefect server (an embedded one runs no schedules): "
                "run `prefect server start` (found on 127.0.0.1:4200 by itself) or set PREFECT_API_URL"
            )
        )
    from deployments.serve import serve_refresh

    serve_refresh(config, None if no_schedule else cron, name, overrides, timezone, strategy, wait)


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
        summary = run_flow_and_settle(cfg, grid)
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

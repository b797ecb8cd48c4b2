"""Publish a merged model: write the version folder in the Hugging Face layout, then move `latest`.

The version folder gets the shards (read one tensor at a time from the merged artefacts, or from
the base for tensors kept at base), the base's non-weight files, the user evaluators' metrics and
the merge report; `latest.json` moves last (see :mod:`swudi.publish.versions`). The output's lock
is held meanwhile, so two merges into one output never interleave.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any, TypedDict

from swudi.config.merge_config import MergeConfig
from swudi.errors import GateError
from swudi.evaluators.objective import evaluator_key
from swudi.evaluators.relative import relative_evaluations
from swudi.evaluators.runner import run_evaluators
from swudi.io.adapter import input_nbytes
from swudi.io.checkpoint import Checkpoint
from swudi.io.writer import copy_extra_files, files_to_copy, write_sharded
from swudi.pipeline.keys import artefact_keys
from swudi.pipeline.merged_reader import MergedTensorReader
from swudi.pipeline.plan import MergePlan, output_dtype, version_id
from swudi.pipeline.records import MergedRecord
from swudi.pipeline.vocab_rows import appended_bytes
from swudi.pipeline.workdir import usage
from swudi.publish.adapter_output import write_merged_adapter
from swudi.publish.card import CARD_NAME, base_model_id, front_matter, render_card
from swudi.publish.gate import GateResult, check_gate
from swudi.publish.report import build_report
from swudi.publish.versions import REPORT_NAME, prune_versions, publish_version, version_url
from swudi.publish.vocab_files import write_vocab_files
from swudi.storage.filesystem import join_url, resolve, write_bytes_atomic
from swudi.storage.lock import output_lock

log = logging.getLogger(__name__)

#: How long a publish waits for another one on the same output to finish.
LOCK_WAIT_S = 600.0


class IoSummary(TypedDict):
    """Bytes a merge run read (:func:`io_summary`)."""

    input_bytes: int  # tensors + headers of the input checkpoints
    input_tensor_bytes: int
    header_bytes: int
    work_bytes: int  # artefacts read back from the work folder
    per_checkpoint: list[dict[str, Any]]


class PublishResult(TypedDict):
    """What :func:`publish_merged_model` published: the ``latest.json`` pointer, the version's URL,
    its merge report, the seconds the publish took and the bytes this run read."""

    version: str
    path: str  # relative to the output: versions/<id>
    url: str
    published_at: str
    completed_at: str
    previous: str | None  # the version latest named before
    method: str
    report: dict[str, Any]
    seconds: float
    io: IoSummary


def publish_merged_model(
    config: MergeConfig,
    plan: MergePlan,
    merged: Sequence[MergedRecord],
    diagnostics: Mapping[str, Any],
    timings: Mapping[str, Any] | None = None,
    io: Mapping[str, Any] | None = None,
    tuning: Mapping[str, Any] | None = None,
) -> PublishResult:
    """Write (or find) this merge's version under ``config.output`` and point ``latest.json`` at it.

    With a ``gate`` in the config, the complete version must pass it (:mod:`swudi.publish.gate`)
    before ``latest.json`` moves: a refused version stays for inspection and
    :class:`~swudi.errors.GateError` is raised. ``tuning`` (the table of ``swudi tune``, with its
    ``tune_id``) goes into the report and the model card, and the tune's id into the version id.

    ``io`` holds the bytes this run read so far (:func:`swudi.pipeline.bytes_read` + ``headers``);
    the base tensors read while publishing are added. Returns the pointer (``version``, ``path``,
    ``url``...) plus ``report``, the merge report of the version (that of the earlier publish when
    the version was already complete) and ``io``, this run's bytes read (:func:`io_summary`).
    """
    started = time.perf_counter()
    version = version_id(config, plan, tuning["tune_id"] if tuning else None)
    report: dict[str, Any] = {}
    gate_results: list[GateResult] = []
    reads = {"base": 0, "experts": [0] * len(plan.expert_urls), "work": 0, "headers": [], **(io or {})}

    def write_files(version_url: str) -> None:
        specs = [(job.name, output_dtype(config, job), plan.output_shape(job)) for job in plan.jobs]
        reader = MergedTensorReader(merged, plan.jobs, config, plan.vocab)
        write_sharded(version_url, specs, reader, config.max_shard_size, config.storage_options)
        if config.output_format == "adapter":  # also the merged update as a PEFT LoRA adapter
            report["adapter"] = write_merged_adapter(version_url, plan, merged, reader.tensor, config)
        reads["base"] += reader.base_bytes_read
        reads["work"] += reader.work_bytes_read
        reads["experts"] = [a + b for a, b in zip(reads["experts"], reader.expert_bytes_read, strict=True)]
        base = Checkpoint.open(config.base, config.storage_options)
        # config, tokenizer, generation config... by the copy policy, links checked (never weights)
        names = list(files_to_copy(base))
        if plan.vocab is not None:  # the largest expert tokenizer, config.json's vocab_size
            names = write_vocab_files(plan.vocab, plan.expert_urls, base, names, version_url, config)
        copy_extra_files(base, version_url, config.storage_options, names=names)
        evaluations = run_evaluators(config.evaluators, version_url, config.storage_options)
        report.update(
            build_report(
                config, plan, version, merged, diagnostics, evaluations, timings, io_summary(plan, reads), usage(config)
            )
        )
        if any(e.relative for e in config.evaluators):  # base and experts too (cached): gap closed per task
            report["relative_evaluations"] = relative_evaluations(config, evaluations)
        keys = artefact_keys(plan.layer_jobs, plan.group_jobs, config)
        report["artefacts"] = {kind: sorted(values) for kind, values in keys.items()}  # kept by `swudi gc`
        report["evaluator_keys"] = {e.function: evaluator_key(e) for e in config.evaluators}
        if tuning:
            report["tuning"] = dict(tuning)
        if config.gate is not None:  # the bounds as they stand now, recorded for inspection
            gate_results.append(check_gate(config, version_url, report))
            report["gate"] = gate_results[0].as_dict()
        write_bytes_atomic(
            join_url(version_url, REPORT_NAME),
            (json.dumps(report, indent=2, sort_keys=True) + "\n").encode(),
            config.storage_options,
        )
        write_model_card(config, base, report, version_url)

    def gate(version_url: str) -> None:
        """Before latest moves: the gate's result of this run, or (a version found complete) a new one."""
        if config.gate is None:
            return
        result = gate_results[0] if gate_results else check_gate(config, version_url)
        if not result.passed:
            log.error("%s", result.reason)
            raise GateError(result.reason)
        log.info("%s", result.reason)

    with output_lock(config.output, storage_options=config.storage_options, wait_s=LOCK_WAIT_S) as lock:
        pointer = publish_version(
            config.output,
            version,
            write_files,
            storage_options=config.storage_options,
            pointer_extra={"method": config.method},
            guard=lock.check,
            check=gate,
        )
        if config.keep_versions:
            lock.check()
            removed = prune_versions(config.output, config.keep_versions, config.storage_options)
            if removed:
                log.info("%s: pruned versions %s", config.output, ", ".join(removed))
    if not report:
        report = read_report(config.output, version, config.storage_options)
    return PublishResult(
        version=str(pointer["version"]),
        path=str(pointer["path"]),
        url=str(pointer.get("url") or join_url(config.output, pointer["path"])),
        published_at=str(pointer["published_at"]),
        completed_at=str(pointer["completed_at"]),
        previous=pointer.get("previous"),
        method=str(pointer.get("method", config.method)),
        report=report,
        seconds=time.perf_counter() - started,
        io=io_summary(plan, reads),
    )


def write_model_card(config: MergeConfig, base: Checkpoint, report: Mapping[str, Any], version_url: str) -> str:
    """Write the version's ``README.md`` (:mod:`swudi.publish.card`) from its report; return its URL.

    ``library_name`` is ``transformers`` when the base has a ``config.json`` (the folder then loads
    with ``from_pretrained``), else ``safetensors``; ``base_model`` as :func:`base_model_id` says.
    """
    base_config: dict[str, Any] | None = None
    if "config.json" in base.extra_files:
        fs, path = resolve(base.file_url("config.json"), base.storage_options)
        try:
            loaded = json.loads(fs.cat_file(path))
            base_config = loaded if isinstance(loaded, dict) else None
        except ValueError:
            log.warning("%s: config.json is not JSON; the model card names the base by its URL", config.base)
    card = config.model_card
    metadata = front_matter(
        report,
        base_model_id(report, card.base_model, base_config),
        "transformers" if base_config is not None else "safetensors",
        card.tags,
        card.license,
        card.language,
    )
    url = join_url(version_url, CARD_NAME)
    write_bytes_atomic(url, render_card(report, metadata, card.title).encode(), config.storage_options)
    return url


def io_summary(plan: MergePlan, reads: Mapping[str, Any]) -> IoSummary:
    """Bytes read per input checkpoint (tensor data and headers), from the work folder, and in total."""
    headers = list(reads.get("headers") or [0] * (len(plan.expert_urls) + 1))
    tensors = [int(reads["base"]), *(int(n) for n in reads["experts"])]
    roles = ["base", *(f"expert {i}" for i in range(len(plan.expert_urls)))]
    per_checkpoint = [
        {"role": role, "url": url, "tensor_bytes": t, "header_bytes": h, "tensor_bytes_needed": total}
        for role, url, t, h, total in zip(
            roles, [plan.base_url, *plan.expert_urls], tensors, headers, _needed_tensor_bytes(plan), strict=True
        )
    ]
    return IoSummary(
        input_bytes=sum(tensors) + sum(headers),
        input_tensor_bytes=sum(tensors),
        header_bytes=sum(headers),
        work_bytes=int(reads["work"]),
        per_checkpoint=per_checkpoint,
    )


def _needed_tensor_bytes(plan: MergePlan) -> list[int]:
    """Bytes of the tensors a merge needs from each checkpoint (base, expert 0, ...): every base
    tensor, the experts' tensors that are merged (not those kept at the base value), and the
    experts' vocab rows past the base's."""
    merged = [job for job in plan.jobs if job.route != "base"]
    vocab = plan.vocab
    return [
        sum(job.base.nbytes for job in plan.jobs),
        *(
            sum(input_nbytes(job.experts[i]) for job in merged) + (appended_bytes(vocab, i) if vocab else 0)
            for i in range(len(plan.expert_urls))
        ),
    ]


def read_report(output_url: str, version: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The merge report of a published version ({} if it has none)."""
    fs, path = resolve(join_url(version_url(output_url, version), REPORT_NAME), storage_options)
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return {}

"""The merged model as a PEFT LoRA adapter (``output_format: adapter``), beside the dense model.

A 2-D weight decomposed in factor space (:mod:`swudi.core.lowrank`) has a merged update of rank at most
R = sum_i r_i: theta = (theta Q) Q^T with Q ``[d, R]`` the stored eigenvectors and theta Q the
filtered projection (:func:`swudi.core.spectral.filtered_projection`, the mean's S Q / N for an all-zero
layer). So W = W0 + scale * theta is the LoRA update

    lora_B = scale * theta Q  [m, R],   lora_A = Q^T  [R, d],   r = lora_alpha = R (scaling 1)

(``fan_in_fan_out`` layers: lora_A = (scale * theta Q)^T, lora_B = Q). Embeddings (experts with
``lora_embedding_A/B``; the weight is [vocab, dim] and PEFT's update is (B A)^T) are written the way
PEFT loads them back: ``lora_embedding_A`` = (scale * theta Q)^T ``[R, vocab]``, ``lora_embedding_B``
= Q ``[dim, R]``, so (B A)^T = scale * theta Q Q^T. Tensors the experts saved
in full (``modules_to_save``) go to the merged adapter's ``modules_to_save`` with their merged
values. Everything else is the base value. The adapter is written to ``VERSION/adapter/``
(``adapter_config.json`` + ``adapter_model.safetensors``); PEFT loads it onto the base.

:func:`swudi.pipeline.plan.adapter_output_problems` says, from the plan alone, why a merge cannot be written this way
(a dense-path layer, a non-spectral method, a LoRA update merged as a group).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from swudi.config.merge_config import MergeConfig
from swudi.core.decomposition import Decomposition
from swudi.core.spectral import filtered_projection
from swudi.io.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, LoraAdapter, LoraFactors
from swudi.io.artifacts import save_tensors
from swudi.io.checkpoint import Checkpoint
from swudi.pipeline.layer_step import rank_choice
from swudi.pipeline.plan import MergePlan
from swudi.pipeline.records import MergedRecord
from swudi.storage.filesystem import join_url, write_bytes_atomic

__all__ = ["ADAPTER_FOLDER", "write_merged_adapter"]

log = logging.getLogger(__name__)

ADAPTER_FOLDER = "adapter"


def _factors(dec: Decomposition, config: MergeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale * theta Q [m, R], Q [d, R]) of a factored decomposition merged as configured."""
    if dec.all_zero:
        projection = dec.sum_q / dec.num_tasks
    else:
        f = rank_choice(dec, config).filter
        projection = filtered_projection(dec, f, str(config.params.get("init", "sum")), device=config.device)
    return (projection * float(config.scale)).contiguous(), dec.eigenvectors


def write_merged_adapter(
    version_url: str,
    plan: MergePlan,
    records: Sequence[MergedRecord],
    read_merged: Callable[[str], torch.Tensor],
    config: MergeConfig,
) -> dict[str, Any]:
    """Write ``VERSION/adapter/`` from the stored decompositions (and the merged full tensors,
    read with ``read_merged``); return a summary (URL, ranks, bytes)."""
    url = join_url(version_url, ADAPTER_FOLDER)
    experts = [LoraAdapter.open(u, config.storage_options) for u in config.experts]
    factors = [(n, x) for e in experts for n, x in e.inputs.items() if isinstance(x, LoraFactors)]
    embeddings = {n for n, x in factors if x.embedding}
    transposed = {n for n, x in factors if x.transposed and not x.embedding}  # fan_in_fan_out layers
    by_name = {name: record for record in records for name in record.names}
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    modules_to_save: set[str] = set()
    for job in plan.jobs:
        if job.route == "base":
            continue
        module = job.name.rsplit(".", 1)[0]
        if not job.is_matrix:  # tensors the experts saved in full: their merged value
            tensors[f"{PEFT_PREFIX}{job.name}"] = read_merged(job.name).contiguous()
            modules_to_save.add(module)
            continue
        record = by_name[job.name]
        if record.decomposition_url is None:
            raise ValueError(f"{job.name}: no decomposition recorded; cannot write it as a LoRA update")
        artefact = Checkpoint.open(record.decomposition_url, config.storage_options)
        dec = Decomposition.from_tensors(artefact.state_dict(), dict(artefact.metadata))
        b, q = _factors(dec, config)
        ranks[module] = int(q.shape[1])
        if job.name in embeddings:
            tensors[f"{PEFT_PREFIX}{module}.lora_embedding_A"] = b.T.contiguous()
            tensors[f"{PEFT_PREFIX}{module}.lora_embedding_B"] = q.contiguous()
            continue
        if job.name in transposed:
            b, q = q, b
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = q.T.contiguous()
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b.contiguous()
    first = experts[0].config
    rank = max(ranks.values(), default=1)
    adapter_config = {
        "peft_type": "LORA",
        "task_type": first.get("task_type"),
        "base_model_name_or_path": first.get("base_model_name_or_path"),
        "r": rank,
        "lora_alpha": rank,
        "rank_pattern": {module: r for module, r in ranks.items() if r != rank},
        "alpha_pattern": {module: r for module, r in ranks.items() if r != rank},
        "target_modules": sorted(ranks),
        "modules_to_save": sorted(modules_to_save) or None,
        "fan_in_fan_out": bool(transposed),
        "use_rslora": False,
        "lora_dropout": 0.0,
        "bias": "none",
        "inference_mode": True,
    }
    metadata = {"format": "pt", "swudi_method": config.method, "swudi_scale": repr(float(config.scale))}
    save_tensors(join_url(url, ADAPTER_WEIGHTS), tensors, metadata, config.storage_options)
    write_bytes_atomic(
        join_url(url, ADAPTER_CONFIG), (json.dumps(adapter_config, indent=2) + "\n").encode(), config.storage_options
    )
    summary = {
        "url": url,
        "max_rank": rank,
        "target_modules": len(ranks),
        "modules_to_save": sorted(modules_to_save),
        "bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
    }
    log.info("merged adapter: %s", summary)
    return summary

"""The merge flow's steps run in-process without Prefect: plan, layer merges, group merges, publish."""

from __future__ import annotations

from swudi.config.merge_config import MergeConfig
from swudi.pipeline.group_step import merge_group
from swudi.pipeline.layer_step import merge_layers
from swudi.pipeline.plan import build_plan
from swudi.pipeline.summary import bytes_read, summarize_layers
from swudi.publish.publish_model import PublishResult, publish_merged_model


def merge_without_prefect(cfg: MergeConfig) -> PublishResult:
    """Plan ``cfg``, merge every layer and group in this process, publish; the publish result."""
    plan = build_plan(cfg)
    records = merge_layers(plan.layer_jobs, cfg) + [merge_group(group, cfg) for group in plan.group_jobs]
    io = {**bytes_read(records, "", len(plan.expert_urls)), "headers": list(plan.header_bytes)}
    return publish_merged_model(cfg, plan, records, summarize_layers(records), io=io)

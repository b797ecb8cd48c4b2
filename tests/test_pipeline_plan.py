"""Grouping of the small tensors of a plan."""

from __future__ import annotations

from swudi.core.routing import Route
from swudi.io.checkpoint import TensorLocation
from swudi.pipeline.plan import GROUP_BYTES, MergePlan, TensorJob


def _job(name: str, nbytes: int, route: Route = "mean", shape: tuple[int, ...] = (4,)) -> TensorJob:
    loc = TensorLocation(name, "mem://x", "U8", (nbytes,), 0, nbytes, "fp")
    return TensorJob(name, shape, "U8", route, loc, (loc,))


def test_groups_are_bounded_skip_layers_and_base_and_keep_order() -> None:
    half = GROUP_BYTES // 2
    jobs = (_job("a", half), _job("w", 10, "method", (2, 2)), _job("b", half), _job("c", 1),
            _job("k", 5, "base"), _job("big", 3 * GROUP_BYTES), _job("d", 1))
    plan = MergePlan("base", ("e",), "fb", ("fe",), jobs, ())
    groups = [[j.name for j in g] for g in plan.group_jobs]
    assert groups == [["a", "b"], ["c"], ["big"], ["d"]]
    assert [j.name for j in plan.layer_jobs] == ["w"]


def test_layers_are_batched_by_whole_blocks_in_order() -> None:
    import tempfile

    from swudi.config.merge_config import config_from_mapping
    from swudi.io.synthetic import SyntheticLlama, write_synthetic_models
    from swudi.pipeline.plan import batch_blocks, block_of, build_plan

    with tempfile.TemporaryDirectory() as tmp:
        base, experts = write_synthetic_models(tmp, 2, SyntheticLlama(layers=12, hidden=16, intermediate=32,
                                                                     heads=2, kv_heads=1, vocab=16))
        plan = build_plan(config_from_mapping({"base": base, "experts": experts, "output": f"{tmp}/out"}))
    jobs = plan.layer_jobs
    assert block_of(jobs[0].name) == "model.layers.0" and block_of("lm_head.weight") == "lm_head.weight"
    batches = batch_blocks(jobs, 2, workers=2)
    assert [job for batch in batches for job in batch] == jobs  # every weight once, in order
    seen: set[str] = set()
    for batch in batches:  # a block is never split across tasks
        blocks = {block_of(job.name) for job in batch}
        assert not blocks & seen
        seen |= blocks
    assert len(batches) == 6  # 12 equal blocks, 2 workers x 4 tasks: 1.5 blocks a task -> pairs
    assert len(batch_blocks(jobs, 2, workers=4)) == 12  # enough workers: one task per block


def test_memory_budget_bounds_the_tasks_in_flight(tmp_path) -> None:
    from swudi.config.merge_config import config_from_mapping
    from swudi.io.synthetic import SyntheticLlama, write_synthetic_models
    from swudi.pipeline.plan import build_plan, task_memory_bytes, workers_within_budget

    base, experts = write_synthetic_models(str(tmp_path), 3, SyntheticLlama(layers=1, hidden=64, intermediate=128,
                                                                           heads=4, kv_heads=2, vocab=32))

    def cfg(**extra):
        return config_from_mapping({"base": base, "experts": experts, "output": str(tmp_path / "out"),
                                    "workers": 4, **extra})

    plan = build_plan(cfg())
    gate = next(job for job in plan.layer_jobs if job.name.endswith("gate_proj.weight"))  # 128 x 64, N = 3
    # inputs twice (4 x 128 x 64 x 4 B each), task vectors, 3 k d with k = min(64, 384), 4 m d results
    assert task_memory_bytes(gate, 3) == 2 * 4 * 128 * 64 * 4 + 4 * (3 * 128 * 64 + 3 * 64 * 64 + 4 * 128 * 64)
    peak = max(task_memory_bytes(job, 3) for job in plan.layer_jobs)
    assert workers_within_budget(plan, cfg()) == 4  # no budget: the configured workers
    assert workers_within_budget(plan, cfg(memory_budget=10 * peak)) == 4
    assert workers_within_budget(plan, cfg(memory_budget=2 * peak + 1)) == 2
    assert workers_within_budget(plan, cfg(memory_budget=1)) == 1  # never below one task
    assert cfg(memory_budget="2GB").memory_budget == 2 * 10**9

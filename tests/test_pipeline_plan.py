"""Grouping of the small tensors of a plan."""

from __future__ import annotations

from swudi.checkpoint import TensorLocation
from swudi.plan import GROUP_BYTES, MergePlan, TensorJob


def _job(name: str, nbytes: int, route: str = "mean", shape: tuple[int, ...] = (4,)) -> TensorJob:
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

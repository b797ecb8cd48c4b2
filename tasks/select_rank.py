"""SWUDI-A (and SWUDI) rank selection from a stored decomposition's eigenvalues."""

from __future__ import annotations

from prefect import task

from swudi import steps
from swudi.config import MergeConfig
from tasks.caching import cache_key


@task(name="select-rank", cache_key_fn=cache_key("rank", steps.rank_key, "dec", "config"),
      persist_result=True)
def select_rank(dec: steps.DecompositionRecord, config: MergeConfig) -> steps.RankRecord:
    """Rank kept by the method's spectral filter and its share of the eigenvalue mass."""
    return steps.select_rank(dec, config)

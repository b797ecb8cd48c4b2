"""The rows of a vocab tensor past the base's (appended tokens and padding), from the experts' rows.

Row r >= V0 of the output (:class:`swudi.io.vocab.VocabPlan`) is

    W[r] = (1 / |S_r|) sum_{i in S_r} E_i[r]

over the experts S_r whose tokenizer names token r (float32 sum, then the output dtype), or the row
of the first expert that has it when r is padding (|S_r| = 1). These are the experts' values, not
task vectors: the base has no row r. ``scale`` does not apply.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

from swudi.io.checkpoint import read_tensor
from swudi.io.vocab import VocabPlan
from swudi.pipeline.plan import row_chunks

__all__ = ["appended_rows", "appended_bytes"]


def appended_bytes(vocab: VocabPlan, expert: int) -> int:
    """Bytes of ``expert``'s rows past the base's, over every vocab tensor (what :func:`appended_rows` reads)."""
    total = 0
    for _, locations in vocab.locations:
        loc = locations[expert]
        if loc is not None:
            total += loc.rows(vocab.base_rows, loc.shape[0]).nbytes
    return total


def appended_rows(
    vocab: VocabPlan,
    name: str,
    dtype: torch.dtype,
    storage_options: Mapping[str, Any],
    read_bytes: list[int],
    max_bytes: int,
) -> Iterator[torch.Tensor]:
    """Rows ``[V0, V)`` of vocab tensor ``name`` in ``dtype``, in chunks of about ``max_bytes`` of
    expert rows; each expert's bytes read are added to ``read_bytes[expert]``."""
    locations = dict(vocab.locations)[name]
    widest = next(loc for loc in locations if loc is not None)
    row_bytes = widest.nbytes // widest.shape[0]
    extra = vocab.rows - vocab.base_rows
    users = sum(loc is not None for loc in locations)
    for start, stop in row_chunks((extra,), row_bytes * users + 8 * row_bytes, max_bytes):
        lo, hi = vocab.base_rows + start, vocab.base_rows + stop
        rows: dict[int, torch.Tensor] = {}
        for i, loc in enumerate(locations):
            if loc is None or loc.shape[0] <= lo:
                continue
            part = loc.rows(lo, min(hi, loc.shape[0]))
            read_bytes[i] += part.nbytes
            rows[i] = read_tensor(part, storage_options).to(torch.float32)
        out = torch.empty((stop - start, *widest.shape[1:]), dtype=torch.float32)
        for k in range(start, stop):
            sources = vocab.sources[k]
            total = rows[sources[0]][k - start].clone()
            for i in sources[1:]:
                total += rows[i][k - start]
            out[k - start] = total / len(sources)
        yield out.to(dtype)

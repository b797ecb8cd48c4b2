"""The publisher's reader of merged artefacts: merged tensors (or their row chunks) streamed into the
output, the base tensor where nothing was merged."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from swudi.config.merge_config import MergeConfig
from swudi.errors import CheckpointError, InputError
from swudi.io.checkpoint import Checkpoint, TensorLocation, read_tensor
from swudi.io.vocab import VocabPlan
from swudi.io.writer import TensorData
from swudi.pipeline.plan import (
    TensorJob,
    chunk_budget,
    row_chunks,
)
from swudi.pipeline.records import MergedRecord
from swudi.pipeline.vocab_rows import appended_rows

log = logging.getLogger(__name__)


class MergedTensorReader:
    """``read(name) -> Tensor or its row chunks`` over the merged artefacts, falling back to the base
    tensor.

    Artefacts are opened from their headers once and read one tensor at a time, a large tensor
    (embeddings, lm_head) in row chunks, so publishing holds at most one chunk in memory.
    ``base_bytes_read`` counts the base tensors read (those kept at the base value);
    ``work_bytes_read`` the merged tensors. With ``vocab`` (vocab-extended experts), a vocab
    tensor's merged base rows are followed by its appended and padding rows
    (:mod:`swudi.pipeline.vocab_rows`), read from the experts (``expert_bytes_read``).
    """

    def __init__(
        self,
        records: Sequence[MergedRecord],
        jobs: Sequence[TensorJob],
        config: MergeConfig,
        vocab: VocabPlan | None = None,
    ):
        self._where = {name: record.url for record in records for name in record.names}
        self._base = {job.name: job.base for job in jobs}
        self._options = config.storage_options
        self._chunk = chunk_budget(config)
        self._opened: dict[str, Checkpoint] = {}
        self.base_bytes_read = 0
        self.work_bytes_read = 0
        self._vocab = vocab
        self.expert_bytes_read = [0] * (len(jobs[0].experts) if jobs else 0)

    def __call__(self, name: str) -> TensorData:
        data = self._merged_or_base(name)
        if self._vocab is None or name not in self._vocab.tensors:
            return data
        return self._with_appended_rows(name, data)

    def _with_appended_rows(self, name: str, data: TensorData) -> Iterator[torch.Tensor]:
        assert self._vocab is not None
        dtype = None
        for chunk in [data] if isinstance(data, torch.Tensor) else data:
            dtype = chunk.dtype
            yield chunk
        assert dtype is not None
        yield from appended_rows(self._vocab, name, dtype, self._options, self.expert_bytes_read, self._chunk)

    def _merged_or_base(self, name: str) -> TensorData:
        url = self._where.get(name)
        if url is None:
            self.base_bytes_read += self._base[name].nbytes
            location = self._base[name]
            data = _read_rows(location, self._options, self._chunk)
            if isinstance(data, torch.Tensor):
                return _finite_base(data, location)
            return (_finite_base(chunk, location) for chunk in data)
        if url not in self._opened:
            try:
                self._opened[url] = Checkpoint.open(url, self._options)
            except CheckpointError as error:
                raise CheckpointError(
                    f"merged artefact of {name!r} is missing or damaged ({error}); run the merge again to recompute it"
                ) from None
        location = self._opened[url].location(name)
        self.work_bytes_read += location.nbytes
        return _read_rows(location, self._options, self._chunk)

    def tensor(self, name: str) -> torch.Tensor:
        """The whole tensor ``name`` (its row chunks joined)."""
        data = self(name)
        return data if isinstance(data, torch.Tensor) else torch.cat(list(data))


def _read_rows(location: TensorLocation, storage_options: Mapping[str, Any], max_bytes: int) -> TensorData:
    """The tensor at ``location``: whole, or as row chunks of at most ``max_bytes``."""
    rows = location.shape[0] if location.shape else 0
    chunks = row_chunks(location.shape, location.nbytes // max(1, rows), max_bytes)
    if len(chunks) == 1:
        return read_tensor(location, storage_options)
    return (read_tensor(location.rows(start, stop), storage_options) for start, stop in chunks)


def _finite_base(tensor: torch.Tensor, location: Any) -> torch.Tensor:
    """A tensor kept at the base value, unless it holds NaN or inf (:class:`InputError` naming it)."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise InputError(
            f"tensor {location.name!r} (kept at the base value): the base checkpoint holds non-finite values "
            f"(NaN or inf) in {location.shard_url}; repair the base checkpoint"
        )
    return tensor

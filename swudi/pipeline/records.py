"""What a merge step records: :class:`MergedRecord` (what one artefact holds, in its metadata), the
spectral :class:`RankChoice`, the phases a step's time is split into, the artefact kinds and formats."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)


DECOMPOSITIONS, DELTAS, MERGED, TASK_SVDS = "decompositions", "deltas", "merged", "task_svds"
ARTEFACT_KINDS = (DECOMPOSITIONS, DELTAS, MERGED, TASK_SVDS)
MERGED_FORMAT, DELTA_FORMAT, RECORD_FORMAT_VERSION = "swudi.merged", "swudi.delta", "1"


@dataclass(frozen=True)
class MergedRecord:
    """Merged tensors written to one artefact (a 2-D weight, or a group of small tensors).

    ``bytes_read`` counts the tensor bytes this step read from (base, expert 0, ..., expert N-1);
    ``work_bytes_read`` the bytes of stored decompositions and deltas it read. A record loaded from
    an existing artefact keeps the figures of the run that computed it (``computed_in``).
    """

    key: str
    url: str
    names: tuple[str, ...]
    method: str
    rank: int | None = None
    kept_mass: float | None = None
    interference: float | None = None  # L(theta) / L(sum of task vectors), WUDI loss
    task_interference: tuple[float | None, ...] | None = None  # the same ratio per task
    decomposition_url: str | None = None
    decomposed: bool = False  # this step read the experts and built the decomposition / delta
    seconds: float = 0.0
    decompose_seconds: float = 0.0
    bytes_read: tuple[int, ...] = ()
    work_bytes_read: int = 0
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase (PHASES)
    computed_in: str = ""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> MergedRecord:
        data = json.loads(text)
        if not isinstance(data, dict) or set(data) - {f.name for f in dataclasses.fields(cls)}:
            raise ValueError("not a merged record")
        for name in ("names", "bytes_read", "task_interference"):
            if data.get(name) is not None:
                data[name] = tuple(data[name])
        return cls(**data)


@dataclass(frozen=True)
class RankChoice:
    """What a spectral method keeps of one weight: its filter, the rank (non-zero f_k) and their
    share of trace(C). The merge applies exactly this filter."""

    filter: torch.Tensor
    rank: int
    kept_mass: float


#: The phases a step's time is split into (``MergedRecord.phases``).
PHASES = ("read", "decompose", "merge", "diagnostics", "write")

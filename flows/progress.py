"""Progress of a merge for a person watching it: a terminal bar, log lines and a Prefect artifact.

One :class:`MergeProgress` per merge flow run counts the weights (2-D weights and groups of small
tensors) finished in this run against those submitted, with the rate, the estimated time left and
the input bytes read so far. It shows them

- as a rich progress bar on a terminal (stderr is a TTY);
- as log lines (at most one every ``log_every_s`` seconds, and the last one), which the Prefect UI
  and a worker's log show;
- as a Prefect progress artifact (key ``swudi-merge-progress``) updated as tasks finish: the flow
  run's page shows the percentage and the same figures in its description.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable
from types import TracebackType
from typing import Any
from uuid import UUID

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from swudi.pipeline.records import MergedRecord
from swudi.units import format_bytes

ARTIFACT_KEY = "swudi-merge-progress"

log = logging.getLogger(__name__)


class MergeProgress:
    """Weights done / total in this run, rate, ETA and bytes read, on three channels (see module)."""

    def __init__(
        self, total: int, reused: int, logger: Any = None, log_every_s: float = 10.0, artifact_every_s: float = 1.0
    ) -> None:
        self.total = total
        self.reused = reused
        self.done = 0
        self.bytes_read = 0
        self._logger = logger or log
        self._log_every_s = log_every_s
        self._started = time.perf_counter()
        self._artifact_every_s = artifact_every_s
        self._last_log = self._last_artifact = float("-inf")
        self._logged = self._shown = -1  # the count last logged / shown in the artifact
        self._artifact: UUID | None = None
        self._bar = Progress(
            TextColumn("[bold]merging"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("weights {task.fields[rate]}"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("read {task.fields[read]}"),
            disable=not sys.stderr.isatty(),
        )
        self._bar_id = self._bar.add_task("merge", total=max(total, 1), rate="", read="0 B", start=False)

    def __enter__(self) -> MergeProgress:
        self._bar.start()
        self._bar.start_task(self._bar_id)
        try:
            # async_dispatch types this as UUID | Coroutine; from sync code it is the former
            self._artifact = create_progress_artifact(  # type: ignore[assignment]
                0.0, key=ARTIFACT_KEY, description=self.describe()
            )
            self._shown = 0
        except Exception as error:  # noqa: BLE001 - progress must never fail a merge
            self._logger.warning("could not create the progress artifact: %s", error)
        self._logger.info("%s", self.describe())
        self._logged = 0
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self._bar.stop()
        if kind is None:
            self._report(force=True)

    @property
    def rate(self) -> float:
        """Weights finished per second in this run."""
        return self.done / max(time.perf_counter() - self._started, 1e-9)

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the current rate (None before the first weight finishes)."""
        return (self.total - self.done) / self.rate if self.done else None

    def describe(self) -> str:
        """One line: ``merge progress: 12/48 weights (25%), 1.30/s, ETA 27 s, read 120.5 MB; 5 reused ...``."""
        percent = 100.0 * self.done / self.total if self.total else 100.0
        eta = "?" if self.eta_s is None else f"{self.eta_s:.0f} s"
        reused = f"; {self.reused} reused from the work folder" if self.reused else ""
        return (
            f"merge progress: {self.done}/{self.total} weights ({percent:.0f}%), {self.rate:.2f}/s, "
            f"ETA {eta}, read {format_bytes(self.bytes_read)}{reused}"
        )

    def finished(self, records: Iterable[MergedRecord]) -> None:
        """Count the records of one finished task."""
        for record in records:
            self.done += 1
            self.bytes_read += sum(record.bytes_read) + record.work_bytes_read
        self._bar.update(
            self._bar_id,
            completed=self.done,
            rate=f"{self.rate:.2f}/s",
            read=format_bytes(self.bytes_read),
        )
        self._report()

    def _report(self, force: bool = False) -> None:
        now = time.perf_counter()
        line = self.describe()
        due = force or self.done >= self.total
        if (due or now - self._last_log >= self._log_every_s) and self._logged != self.done:
            self._last_log, self._logged = now, self.done
            self._logger.info("%s", line)
        show = due or now - self._last_artifact >= self._artifact_every_s
        if self._artifact is not None and self._shown != self.done and show:
            self._last_artifact, self._shown = now, self.done
            try:
                progress = 100.0 * self.done / self.total if self.total else 100.0
                update_progress_artifact(self._artifact, progress, description=line)
            except Exception as error:  # noqa: BLE001 - progress must never fail a merge
                self._logger.warning("could not update the progress artifact: %s", error)
                self._artifact = None

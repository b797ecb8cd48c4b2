"""Prefect logs an input error once, as one line: no traceback.

Prefect logs a failed task or flow run with its traceback. For an input error
(:func:`swudi.errors.is_input_error`: a NaN in a weight, a bad config, a full disk) the traceback
says nothing the message does not, and the user would read the same error several times; the
record keeps its message and loses ``exc_info``. Faults keep their tracebacks.
"""

from __future__ import annotations

import logging

from swudi.errors import is_input_error
from swudi.storage.redact import install_log_redaction

__all__ = ["InputErrorTracebackFilter", "install"]

#: The loggers of Prefect's task and flow run engines.
RUN_LOGGERS = ("prefect.task_runs", "prefect.flow_runs", "prefect.task_engine", "prefect.flow_engine")


class InputErrorTracebackFilter(logging.Filter):
    """Drop the traceback of a record whose exception is an input error (the record is kept)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and is_input_error(exc):
            record.exc_info = None
            record.exc_text = None
        return True


_FILTER = InputErrorTracebackFilter()


def install() -> None:
    """Add the filter to Prefect's run loggers, and mask credentials in every record (idempotent)."""
    install_log_redaction()
    for name in RUN_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)

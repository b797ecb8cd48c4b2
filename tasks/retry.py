"""The retry condition of swudi's tasks: faults are retried, input errors never.

A NaN in a weight, a bad config or a full disk fails the same way on every attempt; retrying it only
repeats the traceback in the log and delays the one-line error (:func:`swudi.errors.is_input_error`).
"""

from __future__ import annotations

from typing import Any

from swudi.errors import is_input_error


def retry_unless_input_error(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: False when the failed state holds an input error."""
    exc = state.data if isinstance(getattr(state, "data", None), BaseException) else None
    if exc is None:
        try:
            state.result(raise_on_failure=True)
        except BaseException as raised:  # noqa: BLE001 - the state's own exception, inspected only
            exc = raised
    return exc is None or not is_input_error(exc)

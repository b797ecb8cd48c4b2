"""Value checks shared by the config models and the method parameter models."""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

__all__ = ["refuse_bool_for_number", "StrictModel"]


def refuse_bool_for_number(annotation: Any, value: Any) -> Any:
    """``value``, unless it is a boolean given for a numeric field.

    pydantic would take YAML ``true`` as 1 for an ``int`` or ``float`` field (``max_shard_size:
    true`` would be one byte per shard); raises ``ValueError`` instead.
    """
    if isinstance(value, bool):
        origin = typing.get_origin(annotation)
        members = typing.get_args(annotation) if origin in (typing.Union, types.UnionType) else (annotation,)
        if bool not in members and any(m in (int, float) for m in members):
            raise ValueError(f"expected a number, got the boolean {str(value).lower()}")
    return value


class StrictModel(BaseModel):
    """Base of swudi's settings models (the config's sections, method parameters): unknown keys are
    errors, values are immutable, NaN and infinities are refused (``allow_inf_nan``), and so is a
    boolean given for a number (:func:`refuse_bool_for_number`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        assert info.field_name is not None
        return refuse_bool_for_number(cls.model_fields[info.field_name].annotation, value)

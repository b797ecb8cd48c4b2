"""validate_checkpoints: every mismatch in one error, dtype differences as warnings."""

from __future__ import annotations

import logging

import pytest
import torch

from swudi.errors import CheckpointMismatchError, InputError
from swudi.io.checkpoint import Checkpoint
from swudi.io.validate import validate_checkpoints
from tests.helpers.builders import tiny_state_dict, write_reference_checkpoint


def _open(store, name, tensors):
    write_reference_checkpoint(store.url(name), tensors, None, store.storage_options)
    return Checkpoint.open(store.url(name), store.storage_options)


def test_matching_checkpoints_pass(store):
    base = _open(store, "base", tiny_state_dict(0))
    experts = [_open(store, f"e{i}", tiny_state_dict(i + 1)) for i in range(2)]
    assert validate_checkpoints(base, experts) == []


def test_every_mismatch_is_reported_at_once(store):
    base_sd = tiny_state_dict(0)
    e1 = tiny_state_dict(1)
    del e1["norm.weight"]                       # missing
    e1["extra.bias"] = torch.zeros(3)           # extra
    e2 = tiny_state_dict(2)
    e2["embed.weight"] = torch.zeros(12, 8)     # shape
    e2["layer.0.attn.q.bias"] = torch.zeros(9)  # shape
    base = _open(store, "base", base_sd)
    experts = [_open(store, "e1", e1), _open(store, "e2", e2)]
    with pytest.raises(CheckpointMismatchError) as err:
        validate_checkpoints(base, experts)
    problems = err.value.problems
    assert len(problems) == 4
    message = str(err.value)
    assert "4 mismatch(es)" in message
    for line in (f"{experts[0].url}: tensor 'norm.weight' is missing",
                 f"{experts[0].url}: tensor 'extra.bias' is not in the base",
                 f"{experts[1].url}: tensor 'embed.weight' has shape [12, 8], the base {base.url} has [11, 8]",
                 f"{experts[1].url}: tensor 'layer.0.attn.q.bias' has shape [9]"):
        assert line in message, line


def test_mixed_dtypes_warn_and_log(store, caplog):
    base = _open(store, "base", tiny_state_dict(0))
    half = _open(store, "bf16", tiny_state_dict(1, dtype=torch.bfloat16))
    with caplog.at_level(logging.WARNING, logger="swudi.io.validate"):
        warnings = validate_checkpoints(base, [half])
    assert len(warnings) == 1
    assert half.url in warnings[0] and "6 tensor(s) differ in dtype" in warnings[0]
    assert "BF16 (base F32)" in warnings[0] and "upcast to float32" in warnings[0]
    assert warnings[0] in caplog.text


def test_no_experts_and_duplicates(store):
    base = _open(store, "base", tiny_state_dict(0))
    with pytest.raises(InputError, match="no expert"):
        validate_checkpoints(base, [])
    e1 = _open(store, "e1", tiny_state_dict(1))
    warnings = validate_checkpoints(base, [e1, Checkpoint.open(store.url("e1"), store.storage_options)])
    assert any("same fingerprint" in w for w in warnings)

"""Every output dtype's range is checked with the float16 refusal (issue 24): float8 casts saturate
or give NaN instead of inf, integer casts wrap; nothing may be clamped silently."""

from __future__ import annotations

import pytest
import torch

from swudi.errors import InputError
from swudi.pipeline.output_range import merged_in_range

# The largest finite values, from each format's bit layout (not from torch.finfo):
# E4M3FN: exponent bias 7, max 1.75 * 2**8; E4M3FNUZ: bias 8, max 1.875 * 2**7;
# E5M2 / E5M2FNUZ: max 1.75 * 2**15; float16: (2 - 2**-10) * 2**15; int8: 127.
LARGEST = {
    torch.float8_e4m3fn: 1.75 * 2**8,
    torch.float8_e4m3fnuz: 1.875 * 2**7,
    torch.float8_e5m2: 1.75 * 2**15,
    torch.float8_e5m2fnuz: 1.75 * 2**15,
    torch.float16: (2 - 2**-10) * 2**15,
}


@pytest.mark.parametrize("dtype", list(LARGEST), ids=str)
def test_values_beyond_the_largest_are_refused_and_within_it_kept(dtype: torch.dtype) -> None:
    base = torch.zeros(3, 4)
    theta = torch.zeros(3, 4)
    theta[1, 2] = LARGEST[dtype] * 0.5
    inside = merged_in_range(base, theta, 2.0, dtype, name="w")  # exactly the largest value
    assert inside.dtype == dtype and float(inside.float()[1, 2]) == LARGEST[dtype]
    theta[1, 2] = -LARGEST[dtype] * 0.6  # beyond, negative side
    with pytest.raises(InputError, match=r"'w'") as caught:
        merged_in_range(base, theta, 2.0, dtype, name="w")
    assert "exceed the range" in str(caught.value) and "output_dtype" in str(caught.value)


def test_an_integer_output_is_never_a_merged_weight() -> None:
    with pytest.raises(InputError, match=r"exceed the range of torch\.int8"):
        merged_in_range(torch.zeros(2), torch.tensor([100.0, 30.0]), 2.0, torch.int8, name="w")
    with pytest.raises(InputError, match="integer tensor"):
        merged_in_range(torch.zeros(2), torch.tensor([1.0, 3.0]), 2.0, torch.int8, name="w")

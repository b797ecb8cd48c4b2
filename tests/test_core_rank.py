"""SWUDI-A rank rules on spectra whose answers are worked out by hand."""

from __future__ import annotations

import pytest
import torch

from swudi import ConfigError, InputError, select_rank
from swudi.core.rank import gavish_donoho_omega

# lambda = [4, 1, 1, 1, 1]: sum 8, sum of squares 20, sqrt = [2, 1, 1, 1, 1]
SPECTRUM = [4.0, 1.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ("participation_sqrt", 5),  # (2+1+1+1+1)^2 / 8 = 36/8 = 4.5 -> 5
        ("participation", 4),  # 8^2 / 20 = 3.2 -> 4
        ("entropy", 4),  # p = [1/2, 1/8 x4]: H = 0.5 ln 2 + 0.5 ln 8 = 2 ln 2 -> exp(H) = 4 exactly
        ("stable_rank", 2),  # 20 / 16 = 1.25 -> 2
        ("cumvar_0.5", 1),  # 4 >= 0.5 * 8
        ("cumvar_0.6", 2),  # need 4.8: 4, 5
        ("cumvar_0.95", 5),  # need 7.6: 4, 5, 6, 7, 8
        ("cumvar_1.0", 5),
        ("gavish_donoho", 1),  # beta = 1: omega = sqrt(16/3) / sqrt(2 + sqrt 3) = 1.1954; y > 1.1954: [2]
    ],
)
def test_rules_on_hand_computed_spectrum(rule, expected):
    assert select_rank(torch.tensor(SPECTRUM), rule, (5, 5)) == expected


def test_input_order_does_not_matter():
    assert select_rank([1.0, 4.0, 1.0, 1.0, 1.0], "stable_rank", (3, 5)) == 2


def test_gavish_donoho_omega_by_hand():
    # beta = 0.35: lambda* = sqrt(2.7 + 2.8 / (1.35 + sqrt(6.0225))) = 1.853659...
    #              mu = sqrt(0.65^2 + 0.35) = sqrt(0.7725) = 0.878920...
    assert gavish_donoho_omega(0.35) == pytest.approx(1.853659 / 0.878920, rel=1e-5)
    # beta = 1: lambda* = sqrt(4 + 8/6), mu = sqrt(2 + sqrt 3)
    assert gavish_donoho_omega(1.0) == pytest.approx((16 / 3) ** 0.5 / (2 + 3**0.5) ** 0.5, rel=1e-12)


def test_gavish_donoho_threshold_rectangular():
    # shape (20, 7): beta = 0.35, omega = 2.10901; sqrt(lambda) = [5, 3, 2.1, 1, 1, 1, 0.5], median 1
    lam = torch.tensor([25.0, 9.0, 2.1**2, 1.0, 1.0, 1.0, 0.25])
    assert select_rank(lam, "gavish_donoho", (20, 7)) == 2  # 2.1 < 2.109 is cut
    lam[2] = 2.12**2
    assert select_rank(lam, "gavish_donoho", (20, 7)) == 3


def test_gavish_donoho_square_tight_threshold():
    # beta = 1: omega = 1.19537; sqrt(lambda) = [3, 1.2, 1, 1, 1], median 1 -> [3, 1.2]
    lam = torch.tensor([9.0, 1.44, 1.0, 1.0, 1.0])
    assert select_rank(lam, "gavish_donoho", (5, 5)) == 2
    lam[1] = 1.19**2
    assert select_rank(lam, "gavish_donoho", (5, 5)) == 1


def test_clamping():
    lam = torch.tensor(SPECTRUM)
    assert select_rank(lam, "stable_rank", (5, 5), min_rank=3) == 3  # 2 -> 3
    assert select_rank(lam, "participation_sqrt", (5, 5), max_rank_ratio=0.4) == 2  # 5 -> round(2.0)
    assert select_rank(lam, "participation_sqrt", (5, 5), max_rank_ratio=0.5) == 2  # round(2.5) = 2
    # min_rank wins over a smaller max_rank_ratio bound
    assert select_rank(lam, "participation_sqrt", (5, 5), min_rank=3, max_rank_ratio=0.2) == 3
    assert select_rank(lam, "stable_rank", (5, 5), min_rank=0) == 2
    assert select_rank(lam, "stable_rank", (5, 5), min_rank=9) == 5  # never above d


def test_floor_applies_to_tiny_eigenvalues():
    # [1, 0]: floored to [1, 1e-8]; stable rank (1 + 1e-16) / 1 -> ceil with float tolerance = 1
    assert select_rank([1.0, 0.0], "stable_rank", (2, 2)) == 1
    # cumvar_1.0 needs the floored eigenvalue too: 1 / (1 + 1e-8) < 1
    assert select_rank([1.0, 0.0], "cumvar_1.0", (2, 2)) == 2
    assert select_rank([1.0, 0.0], "cumvar_0.9999", (2, 2)) == 1


@pytest.mark.parametrize("rule", ["nope", "cumvar_", "cumvar_abc", "cumvar_1.5", "cumvar_0", "", None])
def test_unknown_rule_raises_config_error(rule):
    with pytest.raises(ConfigError, match=r"participation_sqrt|cumvar"):
        select_rank(torch.ones(3), rule, (3, 3))


def test_bad_arguments():
    with pytest.raises(InputError, match="expected 4"):
        select_rank(torch.ones(3), "entropy", (2, 4))
    with pytest.raises(ConfigError, match="max_rank_ratio"):
        select_rank(torch.ones(3), "entropy", (3, 3), max_rank_ratio=0.0)
    with pytest.raises(ConfigError, match="min_rank"):
        select_rank(torch.ones(3), "entropy", (3, 3), min_rank=-1)
    with pytest.raises(InputError, match="non-finite"):
        select_rank(torch.tensor([1.0, float("nan"), 1.0]), "entropy", (3, 3))

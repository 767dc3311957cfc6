"""The benches' one percentile definition and their confidence intervals."""

import math

import pytest

from tests.bench.stats import bootstrap_interval, percentile, ratio_interval


def test_percentile_interpolates_linearly_between_ranks() -> None:
    values = [5.0, 1.0, 4.0, 2.0, 3.0]  # order does not matter
    assert percentile(values, 0) == 1.0
    assert percentile(values, 50) == 3.0
    assert percentile(values, 100) == 5.0
    # rank (5 - 1) * 0.95 = 3.8: 80% of the way from the 4th (4.0) to the 5th value (5.0)
    assert percentile(values, 95) == pytest.approx(4.8)
    # rank 9 * 0.95 = 8.55 over 1..10
    assert percentile(list(range(1, 11)), 95) == pytest.approx(9.55)


def test_percentile_of_one_value_is_that_value() -> None:
    assert percentile([0.7], 95) == 0.7


@pytest.mark.parametrize("q", [-1, 101])
def test_percentile_rejects_q_outside_0_100(q: float) -> None:
    with pytest.raises(ValueError, match="q must be in"):
        percentile([1.0, 2.0], q)


def test_percentile_rejects_an_empty_sample() -> None:
    with pytest.raises(ValueError, match="empty"):
        percentile([], 50)


def test_bootstrap_interval_brackets_the_mean_and_is_reproducible() -> None:
    values = [1.0, 1.2, 0.9, 1.1, 1.05, 0.95, 1.15, 0.85]
    mean, low, high = bootstrap_interval(values)
    assert mean == pytest.approx(sum(values) / len(values))
    assert low < mean < high
    assert 0.85 <= low and high <= 1.2  # a mean's interval lies inside the sample's range
    assert bootstrap_interval(values) == (mean, low, high)  # fixed seed


def test_bootstrap_interval_of_a_constant_sample_is_a_point() -> None:
    assert bootstrap_interval([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)


def test_bootstrap_interval_narrows_with_more_rounds() -> None:
    few = [1.0, 1.3, 0.8, 1.2]
    many = few * 8
    _, lo_few, hi_few = bootstrap_interval(few)
    _, lo_many, hi_many = bootstrap_interval(many)
    assert hi_many - lo_many < hi_few - lo_few


def test_ratio_interval_is_symmetric_in_log_space() -> None:
    # 0.8x and 1.25x are equally far from 1: their geometric mean is exactly 1
    mid, low, high = ratio_interval([0.8, 1.25, 0.8, 1.25])
    assert mid == pytest.approx(1.0)
    assert low < 1.0 < high
    assert math.log(high) == pytest.approx(-math.log(low), rel=0.2)


def test_ratio_interval_rejects_non_positive_ratios() -> None:
    with pytest.raises(ValueError, match="positive"):
        ratio_interval([1.0, 0.0])

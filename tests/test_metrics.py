"""Metrics on hand-computed accuracy matrices."""

import numpy as np
import pytest

from promptcl import metrics

# acc[t, i]: accuracy on task i after training through task t (upper triangle ignored)
ACC = np.array([
    [90.0, 0.0, 0.0],
    [80.0, 70.0, 0.0],
    [85.0, 60.0, 50.0],
])


def test_final_average_accuracy():
    assert metrics.final_average_accuracy(ACC) == pytest.approx((85 + 60 + 50) / 3)


def test_cumulative_average_accuracy():
    # mean of 90, (80+70)/2 = 75, (85+60+50)/3 = 65
    assert metrics.cumulative_average_accuracy(ACC) == pytest.approx((90 + 75 + 65) / 3)


def test_forgetting_uses_the_max_over_all_rows():
    # task 0: max(90, 80, 85) - 85 = 5; task 1: max(70, 60) - 60 = 10
    assert metrics.forgetting(ACC) == pytest.approx(7.5)
    # task 0 peaks after it was learnt: max(90, 95, 85) - 85 = 10 (its diagonal alone gives 5)
    later_peak = np.array([[90.0, 0.0, 0.0], [95.0, 70.0, 0.0], [85.0, 60.0, 50.0]])
    assert metrics.forgetting(later_peak) == pytest.approx(10.0)


def test_forgetting_is_never_negative_when_accuracy_rises():
    rising = np.array([[50.0, 0.0], [70.0, 80.0]])
    assert metrics.forgetting(rising) == 0.0
    assert metrics.backward_transfer(rising) == pytest.approx(20.0)


def test_canonical_forgetting_takes_the_max_before_the_last_task():
    # Chaudhry et al.: a task that improved counts negatively, max(50) - 70 = -20
    assert metrics.forgetting_canonical(np.array([[50.0, 0.0], [70.0, 80.0]])) == pytest.approx(-20.0)
    # task 0: max(90, 80) - 85 = 5; task 1: max(70) - 60 = 10, as FM (the last row never peaks here)
    assert metrics.forgetting_canonical(ACC) == pytest.approx(7.5)
    # a last-row peak: FM floors task 0 at 0, the canonical figure keeps max(90, 80) - 95 = -5
    late_rise = np.array([[90.0, 0.0, 0.0], [80.0, 70.0, 0.0], [95.0, 60.0, 50.0]])
    assert metrics.forgetting(late_rise) == pytest.approx((0 + 10) / 2)
    assert metrics.forgetting_canonical(late_rise) == pytest.approx((-5 + 10) / 2)


def test_backward_transfer():
    # (85 - 90) + (60 - 70) over 2
    assert metrics.backward_transfer(ACC) == pytest.approx(-7.5)


def test_single_task():
    one = np.array([[42.0]])
    assert metrics.summarize(one) == {"final_average_accuracy": 42.0, "cumulative_average_accuracy": 42.0,
                                      "forgetting": 0.0, "forgetting_canonical": 0.0, "backward_transfer": 0.0}


def test_upper_triangle_is_ignored():
    noisy = ACC.copy()
    noisy[0, 1:] = 99.0
    noisy[1, 2] = -5.0
    assert metrics.summarize(noisy) == metrics.summarize(ACC)


@pytest.mark.parametrize("bad", [np.zeros((2, 3)), np.zeros(3), np.zeros((0, 0))])
def test_bad_shapes(bad):
    with pytest.raises(ValueError, match="square"):
        metrics.summarize(bad)

"""The training curriculum and learning-rate schedule of `training.train`."""

from __future__ import annotations

import pytest

from training.train import CURRICULUM, learning_rate, phase_index


def test_phases_follow_the_clock_when_unlocked():
    last = len(CURRICULUM) - 1
    assert phase_index(0.0, last, 1 << 20) == 0
    assert phase_index(0.99, last, 1 << 20) == last
    starts = [ph.start for ph in CURRICULUM]
    assert starts == sorted(starts) and starts[0] == 0.0
    for i, ph in enumerate(CURRICULUM):
        assert phase_index(ph.start, last, 1 << 20) == i


def test_locked_phase_waits_and_max_len_caps():
    assert phase_index(0.99, 1, 1 << 20) == 1, "not yet unlocked: stays on phase 1"
    capped = phase_index(0.99, len(CURRICULUM) - 1, 2048)
    assert CURRICULUM[capped].length == 2048


@pytest.mark.parametrize("peak", [1e-3, 3e-3])
def test_learning_rate_warms_up_then_decays_to_a_tenth(peak):
    assert learning_rate(0, 0.0, peak, 100) == pytest.approx(peak / 100)
    assert learning_rate(99, 0.01, peak, 100) == pytest.approx(peak)
    assert learning_rate(500, 0.5, peak, 100) == pytest.approx(0.55 * peak)
    assert learning_rate(900, 1.0, peak, 100) == pytest.approx(0.1 * peak)

"""Standard errors of the KL diagnostic and of the paired gap closure."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from opsd_core.diagnostics.kl import KlEstimate, _linearised, _standard_error, gap_closure, gap_closure_standard_error


def _estimate(per_sample):
    mean, influences = _linearised(per_sample)
    return KlEstimate(mean, _standard_error(influences), per_sample)


def test_with_one_row_per_sample_the_error_is_that_of_a_plain_mean():
    values = [0.1, 0.5, 0.3, 0.9, 0.2]
    estimate = _estimate([(v, 1) for v in values])
    assert estimate.mean == pytest.approx(statistics.mean(values))
    assert estimate.standard_error == pytest.approx(statistics.stdev(values) / math.sqrt(len(values)))


def _jackknife(before, after):
    n = len(before)
    leave_out = []
    for i in range(n):
        b = [x for j, x in enumerate(before) if j != i]
        a = [x for j, x in enumerate(after) if j != i]
        leave_out.append(gap_closure(_estimate(b).mean, _estimate(a).mean))
    mean = statistics.mean(leave_out)
    return math.sqrt((n - 1) / n * sum((x - mean) ** 2 for x in leave_out))


def test_the_paired_closure_error_matches_a_jackknife_and_beats_an_unpaired_one():
    rng = random.Random(0)
    before, after, shuffled = [], [], []
    for _ in range(400):
        rows = rng.randint(5, 40)
        difficulty = rng.uniform(0.05, 0.6)  # shared by both models: this is what pairing removes
        before.append((difficulty * rows * rng.uniform(0.9, 1.1), rows))
        after.append((0.6 * difficulty * rows * rng.uniform(0.9, 1.1), rows))
    paired = gap_closure_standard_error(_estimate(before), _estimate(after))
    assert paired == pytest.approx(_jackknife(before, after), rel=0.05)
    shuffled = after[:]
    random.Random(1).shuffle(shuffled)
    assert gap_closure_standard_error(before, shuffled) > 3 * paired


def test_paired_estimates_need_the_same_samples():
    with pytest.raises(ValueError, match="same samples"):
        gap_closure_standard_error([(1.0, 2)] * 3, [(1.0, 2)] * 4)


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_a_diverged_sample_makes_the_error_nan_not_a_crash(bad):
    assert math.isnan(_standard_error([0.1, bad, 0.3]))

"""The shuffled-VT control's derangement: no fixed point, a function of (seed, step), and the
same split over ranks as the problems it pairs with."""

from pathlib import Path

import pytest

from opsd_core.config import load_config
from opsd_core.contexts.shuffled import derangement, donors
from opsd_core.errors import ConfigError
from opsd_core.runtime import Ranks

QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "quickstart.toml"


@pytest.mark.parametrize("size", [2, 3, 4, 7, 64, 129])
def test_no_problem_keeps_its_own_visual_thought(size):
    for seed in range(3):
        for step in range(20):
            order = derangement(size, seed, step)
            assert sorted(order) == list(range(size))
            assert all(order[i] != i for i in range(size))


def test_the_derangement_is_a_function_of_seed_and_step():
    assert derangement(16, 3, 7) == derangement(16, 3, 7)  # what a resumed run draws again
    assert len({tuple(derangement(16, 3, step)) for step in range(10)}) > 1
    assert derangement(16, 3, 7) != derangement(16, 4, 7)


def test_two_ranks_pair_their_own_problems_with_the_global_derangement():
    step_problems = [f"problem-{i}" for i in range(8)]
    whole = donors(step_problems, seed=0, step=5)
    shares = []
    for rank in range(2):
        ranks = Ranks(rank=rank, world_size=2)
        mine, their_donors = ranks.local_slice(step_problems), ranks.local_slice(whole)
        assert all(problem != donor for problem, donor in zip(mine, their_donors))
        shares += list(zip(mine, their_donors))
    assert shares == list(zip(step_problems, whole))
    assert sorted(whole) == sorted(step_problems)


def test_one_problem_per_step_is_refused():
    with pytest.raises(ValueError, match="at least 2"):
        derangement(1, 0, 0)
    with pytest.raises(ConfigError, match="shuffled_vt_control needs at least 2 problems per step"):
        load_config(QUICKSTART, ["experiment.shuffled_vt_control=true", "train.samples_per_step=1"])

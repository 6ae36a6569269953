"""The functional divergence API: argument checking, shapes, dtypes, registration."""

import pytest
import torch

from opsd_core.divergences import generalized_jsd, kl_divergence

S, T = torch.randn(2, 3, 7), torch.randn(2, 3, 7)


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"beta": -0.1}, "beta"),
        ({"beta": 1.5}, "beta"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 8}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"clip": 0.0}, "clip"),
        ({"clip": -1.0}, "clip"),
        ({"temperature": 0.0}, "temperature"),
        ({"clip_mode": "row"}, "clip_mode"),
        ({"reduction": "max"}, "reduction"),
        ({"mask": torch.ones(2, 4, dtype=torch.bool)}, "mask"),
        ({"mask": torch.ones(2, 3)}, "mask"),
        ({"chunk_size": 0}, "chunk_size"),
    ],
)
def test_invalid_jsd_arguments_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        generalized_jsd(S, T, **kwargs)


@pytest.mark.parametrize(
    "args, kwargs, argument",
    [
        ((S, T), {"direction": "sideways"}, "direction"),
        ((S, T[..., :5]), {}, "same shape"),
        ((S.long(), T.long()), {}, "floating point"),
        ((S, T), {"temperature": -2.0}, "temperature"),
    ],
)
def test_invalid_kl_arguments_name_the_argument(args, kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        kl_divergence(*args, **kwargs)


def test_shapes_of_each_reduction():
    assert generalized_jsd(S, T, reduction="none").shape == (2, 3)
    assert generalized_jsd(S, T, reduction="sum").shape == ()
    assert generalized_jsd(S[0, 0], T[0, 0], reduction="none").shape == ()
    assert kl_divergence(S, T).dtype == torch.float32


def test_identical_defaults_to_paper_values_in_params():
    from opsd_core.divergences.params import JsdParams

    params = JsdParams()
    assert (params.beta, params.top_k, params.clip, params.clip_mode, params.temperature) == (0.5, 256, 0.05, "entry", 1.0)


def test_top_k_larger_than_a_small_vocabulary_means_full_in_the_registered_class():
    from opsd_core.divergences.classes import JsdDivergence
    from opsd_core.divergences.params import JsdParams

    rows = JsdDivergence(JsdParams(top_k=256, clip=None)).per_token(S, T)
    torch.testing.assert_close(rows, generalized_jsd(S, T, reduction="none"))

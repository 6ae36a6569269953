"""The example divergence passes the framework's divergence contract."""

import pytest
import torch

from opsd_core.testing.divergence_contract import check_divergence_contract
from opsd_example_plugin.config import TotalVariationParams
from opsd_example_plugin.divergence import TotalVariation


@pytest.mark.parametrize("top_k", [None, 3])
def test_total_variation_passes_the_contract(top_k):
    check_divergence_contract(TotalVariation(TotalVariationParams(top_k=top_k)))


def test_total_variation_is_bounded_by_one():
    student = torch.tensor([[10.0, -10.0]])
    teacher = torch.tensor([[-10.0, 10.0]])
    assert 0.99 < float(TotalVariation().per_token(student, teacher)) <= 1.0

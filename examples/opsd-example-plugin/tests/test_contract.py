"""The example divergence honours opsd's Divergence contract and is found by its entry point."""

import pytest
import torch
from opsd_example_plugin.config import TotalVariationParams
from opsd_example_plugin.divergence import TotalVariation

from opsd_core.testing.divergence_contract import DivergenceContract, check_divergence_contract


class TestTotalVariationContract(DivergenceContract):
    @pytest.fixture(params=[None, 3, 256], ids=["full", "top3", "top256"])
    def divergence(self, request):
        return TotalVariation(TotalVariationParams(top_k=request.param))


def test_the_contract_also_runs_in_one_call():
    check_divergence_contract(TotalVariation())


def test_disjoint_distributions_are_at_distance_one():
    student = torch.tensor([[30.0, -30.0]])
    teacher = torch.tensor([[-30.0, 30.0]])
    assert float(TotalVariation().per_token(student, teacher)) == pytest.approx(1.0)


def test_registered_through_the_entry_point():
    from opsd_core.testing.cli import build_plugin_manager, fill_registries

    registries = fill_registries(build_plugin_manager({"OPSD_LOAD_PLUGINS": "example"}))
    entry = registries.divergence.get("total-variation")
    assert entry.plugin == "example"
    assert entry.resolve() is TotalVariation and entry.params is TotalVariationParams

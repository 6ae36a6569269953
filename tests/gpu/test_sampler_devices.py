"""Sampling with logits and generator on different devices (needs CUDA: ``pytest -m gpu``)."""

import pytest
import torch

from opsd_core.sampling.sampler import choose_tokens

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("generator_device", ["cpu", "cuda"])
def test_choose_tokens_accepts_a_generator_on_either_device(generator_device):
    logits = torch.randn(8, 50, device="cuda")
    first = choose_tokens(logits, 1.0, torch.Generator(generator_device).manual_seed(3))
    second = choose_tokens(logits, 1.0, torch.Generator(generator_device).manual_seed(3))
    assert first.device == logits.device
    assert torch.equal(first, second)
    assert int(first.max()) < 50

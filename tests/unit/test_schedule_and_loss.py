"""The lr schedule and the step-loss reduction."""

import math

import pytest
import torch

from opsd_core.trainer.loss import micro_batch_loss, per_sample_mean
from opsd_core.trainer.schedule import build_scheduler, warmup_cosine_factor


def test_warmup_is_linear_and_reaches_peak():
    assert warmup_cosine_factor(0, 4, 10, 0.0) == pytest.approx(0.25)
    assert warmup_cosine_factor(3, 4, 10, 0.0) == pytest.approx(1.0)


def test_cosine_reaches_floor_at_total_and_stays():
    assert warmup_cosine_factor(4, 4, 10, 0.01) == pytest.approx(1.0)
    assert warmup_cosine_factor(7, 4, 10, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert warmup_cosine_factor(10, 4, 10, 0.01) == pytest.approx(0.01)
    assert warmup_cosine_factor(50, 4, 10, 0.01) == pytest.approx(0.01)


def test_scheduler_applies_peak_and_floor():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=1e-3)
    scheduler = build_scheduler(optimizer, warmup_steps=2, total_steps=6, peak_lr=1e-3, min_lr=1e-5)
    lrs = []
    for _ in range(8):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(5e-4) and lrs[1] == pytest.approx(1e-3)
    assert lrs[6] == pytest.approx(1e-5) and lrs[7] == pytest.approx(1e-5)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


def test_per_sample_mean_ignores_masked_rows():
    per_row = torch.tensor([[1.0, 3.0, 100.0], [2.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert per_sample_mean(per_row, mask).tolist() == [2.0, 2.0]
    assert per_sample_mean(per_row, torch.zeros_like(mask)).tolist() == [0.0, 0.0]


def test_any_split_into_micro_batches_gives_the_same_loss_and_gradient():
    torch.manual_seed(0)
    values = torch.randn(8, 5, requires_grad=True)
    mask = torch.rand(8, 5) > 0.3
    mask[:, 0] = True
    whole = micro_batch_loss(values.square(), mask, samples_per_step=8)
    (gradient_whole,) = torch.autograd.grad(whole, values)
    for split in (1, 2, 4):
        parts = [
            micro_batch_loss(values[i : i + split].square(), mask[i : i + split], samples_per_step=8)
            for i in range(0, 8, split)
        ]
        total = sum(parts)
        (gradient,) = torch.autograd.grad(total, values)
        torch.testing.assert_close(total, whole)
        torch.testing.assert_close(gradient, gradient_whole)

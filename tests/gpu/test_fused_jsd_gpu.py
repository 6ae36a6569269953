"""The fused top-K JSD on CUDA (``pytest -m gpu``): the Triton student pass against the torch
one in float32 and bf16, and the fused loss against ``generalized_jsd`` on full logits."""

import importlib.util

import pytest
import torch

from opsd_core.divergences import fused_topk_jsd, generalized_jsd

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")


def _inputs(dtype, rows=(3, 101), hidden=200, vocab=5003, seed=0):
    """D and V that no kernel block divides; a mask with an empty sample."""
    generator = torch.Generator(device="cuda").manual_seed(seed)
    kwargs = {"device": "cuda", "generator": generator}
    student = torch.randn(*rows, hidden, **kwargs).to(dtype).requires_grad_()
    teacher = torch.randn(*rows, hidden, **kwargs).to(dtype)
    weight = (torch.randn(vocab, hidden, **kwargs) * (3.0 / hidden**0.5)).to(dtype).requires_grad_()
    teacher_weight = (weight.detach() + 0.3 * torch.randn(vocab, hidden, **kwargs).to(dtype) / hidden**0.5).contiguous()
    mask = torch.rand(*rows, device="cuda", generator=generator) > 0.2
    mask[0] = False
    return student, teacher, weight, teacher_weight, mask


def _value_and_grads(impl, inputs, chunk_size=None, **kwargs):
    student, teacher, weight, teacher_weight, mask = inputs
    kwargs = {"mask": mask, **kwargs}
    loss = fused_topk_jsd(
        student, teacher, weight, teacher_weight=teacher_weight, impl=impl, chunk_size=chunk_size, **kwargs
    )
    return (loss, *torch.autograd.grad(loss, (student, weight)))


def _relative_error(got, expected):
    return float((got.float() - expected.float()).norm() / expected.float().norm().clamp(min=1e-30))


@needs_triton
def test_triton_student_pass_equals_torch_in_float32():
    inputs = _inputs(torch.float32)
    kwargs = {"beta": 0.5, "top_k": 256, "clip": 0.05, "temperature": 1.3}
    triton_loss, *triton_grads = _value_and_grads("triton", inputs, **kwargs)
    torch_loss, *torch_grads = _value_and_grads("torch", inputs, chunk_size=37, **kwargs)
    torch.testing.assert_close(triton_loss, torch_loss, rtol=1e-5, atol=1e-6)
    for got, expected in zip(triton_grads, torch_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


@needs_triton
def test_triton_gathered_logits_equal_a_float64_product():
    from opsd_core.divergences import _fused_triton

    student, _, weight, _, _ = _inputs(torch.float32)
    hidden = student.detach().reshape(-1, student.shape[-1])
    support = torch.randint(0, weight.shape[0], (hidden.shape[0], 77), device="cuda")
    got = _fused_triton.gathered_logits(hidden, weight.detach(), support, torch.float32)
    expected = torch.einsum("nd,nkd->nk", hidden.double(), weight.detach().double()[support])
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


@needs_triton
def test_triton_student_pass_matches_torch_in_bf16():
    inputs = _inputs(torch.bfloat16, seed=1)
    kwargs = {"beta": 0.5, "top_k": 256, "clip": 0.05}
    triton_loss, *triton_grads = _value_and_grads("triton", inputs, **kwargs)
    torch_loss, *torch_grads = _value_and_grads("torch", inputs, **kwargs)
    assert triton_grads[1].dtype == torch.bfloat16
    # Both round the K logits to bf16 (as the unfused path's bf16 logits are); the sums differ
    # in order and accumulation precision only.
    torch.testing.assert_close(triton_loss, torch_loss, rtol=2e-2, atol=1e-3)
    for got, expected in zip(triton_grads, torch_grads):
        assert _relative_error(got, expected) < 3e-2


@pytest.mark.parametrize("impl", ["auto", "torch"])
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_fused_equals_generalized_jsd_on_cuda(impl, dtype, tolerance):
    student, teacher, weight, teacher_weight, mask = _inputs(dtype, seed=2)
    kwargs = {"beta": 0.3, "top_k": 64, "clip": 0.05, "clip_mode": "entry", "temperature": 0.8, "mask": mask}
    fused = _value_and_grads(impl, (student, teacher, weight, teacher_weight, mask), **kwargs)
    plain_loss = generalized_jsd(student @ weight.T, teacher @ teacher_weight.T, **kwargs)
    plain = (plain_loss, *torch.autograd.grad(plain_loss, (student, weight)))
    for got, expected in zip(fused, plain):
        torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance * 1e-2)


def test_fused_bf16_stays_close_to_the_unfused_bf16_loss():
    student, teacher, weight, teacher_weight, mask = _inputs(torch.bfloat16, seed=3)
    kwargs = {"beta": 0.5, "top_k": 256, "clip": 0.05, "mask": mask}
    fused = _value_and_grads("auto", (student, teacher, weight, teacher_weight, mask), **kwargs)
    plain_loss = generalized_jsd(student @ weight.T, teacher @ teacher_weight.T, **kwargs)
    plain = (plain_loss, *torch.autograd.grad(plain_loss, (student, weight)))
    torch.testing.assert_close(fused[0], plain[0], rtol=2e-2, atol=1e-3)
    for got, expected in zip(fused[1:], plain[1:]):
        assert _relative_error(got, expected) < 5e-2


@needs_triton
def test_triton_weight_gradient_with_rows_shared_by_many_tokens():
    # Real supports overlap: a few vocabulary rows are in nearly every token's top-K. One row
    # here has 303 entries (many loop iterations of its program), others one or none.
    from opsd_core.divergences import _fused_triton

    generator = torch.Generator(device="cuda").manual_seed(4)
    rows, top_k, hidden, vocab = 303, 40, 200, 997
    support = torch.randint(0, vocab, (rows, top_k), device="cuda", generator=generator)
    support[:, :5] = torch.tensor([3, 17, 500, 996, 0], device="cuda")
    grad = torch.randn(rows, top_k, device="cuda", generator=generator)
    states = torch.randn(rows, hidden, device="cuda", generator=generator).to(torch.bfloat16)
    got = _fused_triton.gathered_logits_grad_weight(grad, states, support, vocab, torch.bfloat16)
    expected = torch.zeros(vocab, hidden, dtype=torch.float64, device="cuda")
    outer = grad.double().unsqueeze(-1) * states.double().unsqueeze(1)  # (N, K, D)
    expected.index_add_(0, support.reshape(-1), outer.reshape(-1, hidden))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), expected.to(torch.bfloat16).double(), rtol=1e-2, atol=1e-2)
    unused = torch.ones(vocab, dtype=torch.bool, device="cuda")
    unused[support.reshape(-1)] = False
    assert bool((got[unused] == 0).all())

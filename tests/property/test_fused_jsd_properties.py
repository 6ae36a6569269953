"""Property: the fused top-K JSD from hidden states equals ``generalized_jsd`` on the full
logits ``hidden @ weight.T``, in value and in the gradients w.r.t. the student's hidden states
and the lm_head weight, over random shapes, beta (endpoints included), clip modes, tau, masks
(empty samples included), reductions and row chunks; the teacher's side receives nothing.

Float64 throughout, so the tolerances are tight.
"""

import torch
from hypothesis import given
from hypothesis import strategies as st

from opsd_core.divergences import fused_topk_jsd, generalized_jsd

betas = st.sampled_from([0.0, 1.0, 0.5]) | st.floats(1e-6, 1 - 1e-6)
temperatures = st.sampled_from([1.0, 0.5, 3.0]) | st.floats(0.2, 5.0)
TIGHT = {"rtol": 1e-9, "atol": 1e-11}


@st.composite
def cases(draw):
    batch = draw(st.integers(1, 3), label="batch")
    tokens = draw(st.integers(1, 6), label="tokens")
    hidden = draw(st.integers(1, 8), label="hidden")
    vocab = draw(st.integers(1, 40), label="vocab")
    seed = draw(st.integers(0, 2**31 - 1), label="seed")
    scale = draw(st.sampled_from([0.1, 1.0, 4.0]), label="scale")
    generator = torch.Generator().manual_seed(seed)
    student = scale * torch.randn(batch, tokens, hidden, generator=generator, dtype=torch.float64)
    teacher = scale * torch.randn(batch, tokens, hidden, generator=generator, dtype=torch.float64)
    weight = torch.randn(vocab, hidden, generator=generator, dtype=torch.float64)
    own_teacher_weight = draw(st.booleans(), label="own teacher weight")
    teacher_weight = torch.randn(vocab, hidden, generator=generator, dtype=torch.float64) if own_teacher_weight else None
    mask = draw(st.none() | st.just("random"), label="mask")
    if mask is not None:
        mask = torch.rand(batch, tokens, generator=generator) > 0.4
        if draw(st.booleans(), label="an empty sample"):
            mask[0] = False
    beta = draw(betas, label="beta")
    clip = draw(st.none() | st.sampled_from([0.05, 1e-3]) | st.floats(1e-4, 2.0), label="clip")
    # entry clipping of a KL (beta 0 or 1) is allowed by the functional API; both paths agree on it
    clip_mode = draw(st.sampled_from(["entry", "token"]), label="clip_mode")
    return {
        "student": student,
        "teacher": teacher,
        "weight": weight,
        "teacher_weight": teacher_weight,
        "kwargs": {
            "beta": beta,
            "top_k": draw(st.integers(1, vocab), label="top_k"),
            "clip": clip,
            "clip_mode": clip_mode,
            "temperature": draw(temperatures, label="temperature"),
            "mask": mask,
            "reduction": draw(st.sampled_from(["none", "sum", "mean"]), label="reduction"),
        },
        "chunk_size": draw(st.none() | st.integers(1, 7), label="chunk_size"),
    }


@given(cases())
def test_fused_equals_generalized_jsd_on_full_logits(case):
    student = case["student"].clone().requires_grad_()
    weight = case["weight"].clone().requires_grad_()
    teacher = case["teacher"].clone().requires_grad_()
    teacher_weight = case["teacher_weight"]
    if teacher_weight is not None:
        teacher_weight = teacher_weight.clone().requires_grad_()
    kwargs = case["kwargs"]

    fused = fused_topk_jsd(
        student, teacher, weight, teacher_weight=teacher_weight, chunk_size=case["chunk_size"], **kwargs
    )
    *fused_grads, teacher_grad, teacher_weight_grad = torch.autograd.grad(
        fused.sum(), (student, weight, teacher, teacher_weight if teacher_weight is not None else teacher),
        allow_unused=True,
    )
    teacher_head = (weight if teacher_weight is None else teacher_weight).detach()
    plain = generalized_jsd(student @ weight.T, teacher.detach() @ teacher_head.T, **kwargs)
    plain_grads = torch.autograd.grad(plain.sum(), (student, weight))

    assert fused.dtype == plain.dtype == torch.float64 and fused.shape == plain.shape
    torch.testing.assert_close(fused, plain, **TIGHT)
    for got, expected in zip(fused_grads, plain_grads):
        torch.testing.assert_close(got, expected, **TIGHT)
    assert teacher_grad is None and teacher_weight_grad is None  # nothing flows to the teacher

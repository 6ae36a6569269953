"""Property-based tests of the divergences (DESIGN.md section 4)."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from opsd_core.divergences import generalized_jsd, kl_divergence
from opsd_core.divergences.classes import ForwardKlDivergence, JsdDivergence, ReverseKlDivergence
from opsd_core.divergences.params import JsdParams, KlParams
from opsd_core.testing.divergence_contract import check_divergence_contract
from opsd_core.testing.strategies import logits_pairs

# Interior betas stay away from 0 and 1 by more than float rounding: 1 - 1e-308 == 1.0 would
# silently turn the swapped beta into the reverse-KL endpoint.
betas = st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]) | st.floats(1e-6, 1 - 1e-6)
inner_betas = st.floats(0.01, 0.99)
temperatures = st.sampled_from([0.5, 1.0, 2.0])


# ---------------------------------------------------------------- independent float64 reference
def reference(student, teacher, *, kind="jsd", beta=0.5, top_k=None, clip=None, clip_mode="entry", temperature=1.0):
    """Row losses from the plain formulas, one row at a time, in float64."""
    out = []
    for s_row, t_row in zip(student.double(), teacher.double()):
        if top_k is not None:
            support = torch.argsort(t_row, descending=True, stable=True)[:top_k]
            s_row, t_row = s_row[support], t_row[support]
        p = torch.exp(t_row / temperature) / torch.exp(t_row / temperature).sum()
        q = torch.exp(s_row / temperature) / torch.exp(s_row / temperature).sum()
        if kind == "forward" or (kind == "jsd" and beta == 0):
            terms = p * torch.log(p / q)
        elif kind == "reverse" or (kind == "jsd" and beta == 1):
            terms = q * torch.log(q / p)
        else:
            m = beta * p + (1 - beta) * q
            terms = beta * p * torch.log(p / m) + (1 - beta) * q * torch.log(q / m)
        if clip is not None and clip_mode == "entry":
            terms = torch.minimum(terms, torch.tensor(clip, dtype=terms.dtype))
        total = terms.sum()
        if clip is not None and clip_mode == "token":
            total = torch.minimum(total, torch.tensor(clip, dtype=total.dtype))
        out.append(total * temperature**2)
    return torch.stack(out)


def _distinct(teacher):
    """Teacher rows with distinct values, so that the top-K set is unambiguous."""
    ranks = torch.argsort(torch.argsort(teacher, dim=-1), dim=-1).to(teacher.dtype)
    return teacher + ranks * 1e-3


# ---------------------------------------------------------------- basic properties
@given(logits_pairs(), betas, temperatures)
def test_non_negative(pair, beta, temperature):
    student, teacher, _ = pair
    assert (generalized_jsd(student, teacher, beta=beta, temperature=temperature, reduction="none") >= -1e-12).all()
    for direction in ("forward", "reverse"):
        assert (kl_divergence(student, teacher, direction=direction, reduction="none") >= -1e-12).all()


@given(logits_pairs(), betas)
def test_zero_for_identical_inputs(pair, beta):
    student, _, _ = pair
    rows = generalized_jsd(student, student.clone(), beta=beta, reduction="none")
    assert float(rows.abs().max()) < 1e-10


@given(logits_pairs(), inner_betas, temperatures)
def test_bounded_by_binary_entropy(pair, beta, temperature):
    student, teacher, _ = pair
    bound = -(beta * math.log(beta) + (1 - beta) * math.log(1 - beta)) * temperature**2
    rows = generalized_jsd(student, teacher, beta=beta, temperature=temperature, reduction="none")
    assert float(rows.max()) <= bound + 1e-9


@given(logits_pairs(), betas)
def test_swap_symmetry(pair, beta):
    student, teacher, _ = pair
    forward = generalized_jsd(student, teacher, beta=beta, reduction="none")
    swapped = generalized_jsd(teacher, student, beta=1 - beta, reduction="none")
    torch.testing.assert_close(forward, swapped, rtol=1e-9, atol=1e-11)
    half = generalized_jsd(student, teacher, beta=0.5, reduction="none")
    torch.testing.assert_close(half, generalized_jsd(teacher, student, beta=0.5, reduction="none"))


@given(logits_pairs(), temperatures)
def test_endpoints_are_exactly_forward_and_reverse_kl(pair, temperature):
    student, teacher, _ = pair
    common = dict(temperature=temperature, reduction="none")
    assert torch.equal(
        generalized_jsd(student, teacher, beta=0.0, **common), kl_divergence(student, teacher, direction="forward", **common)
    )
    assert torch.equal(
        generalized_jsd(student, teacher, beta=1.0, **common), kl_divergence(student, teacher, direction="reverse", **common)
    )


# ---------------------------------------------------------------- top-K and clipping
@given(logits_pairs(), betas)
def test_top_k_of_full_vocabulary_equals_full(pair, beta):
    student, teacher, _ = pair
    full = generalized_jsd(student, teacher, beta=beta, reduction="none")
    torch.testing.assert_close(generalized_jsd(student, teacher, beta=beta, top_k=student.shape[-1], reduction="none"), full)


@given(logits_pairs(min_vocab=3), betas, st.data())
def test_top_k_equals_divergence_of_explicitly_renormalised_entries(pair, beta, data):
    student, teacher, _ = pair
    teacher = _distinct(teacher)
    k = data.draw(st.integers(1, student.shape[-1]))
    support = teacher.topk(k, dim=-1).indices
    ours = generalized_jsd(student, teacher, beta=beta, top_k=k, reduction="none")
    explicit = generalized_jsd(student.gather(-1, support), teacher.gather(-1, support), beta=beta, reduction="none")
    torch.testing.assert_close(ours, explicit)


@given(logits_pairs(min_vocab=3), st.data())
def test_student_logits_outside_top_k_get_no_gradient(pair, data):
    student, teacher, _ = pair
    teacher = _distinct(teacher)
    k = data.draw(st.integers(1, student.shape[-1] - 1))
    student = student.clone().requires_grad_(True)
    generalized_jsd(student, teacher, top_k=k).backward()
    outside = torch.ones_like(student, dtype=torch.bool).scatter(-1, teacher.topk(k, dim=-1).indices, False)
    assert torch.count_nonzero(student.grad[outside]) == 0


@given(logits_pairs(), st.floats(1e-3, 0.5), inner_betas, st.data())
def test_clip_bounds(pair, clip, beta, data):
    student, teacher, _ = pair
    vocab = student.shape[-1]
    k = data.draw(st.integers(1, vocab))
    entry = generalized_jsd(student, teacher, beta=beta, top_k=k, clip=clip, clip_mode="entry", reduction="none")
    token = generalized_jsd(student, teacher, beta=beta, top_k=k, clip=clip, clip_mode="token", reduction="none")
    assert float(entry.max()) <= k * clip + 1e-12
    assert float(token.max()) <= clip + 1e-12
    unclipped = generalized_jsd(student, teacher, beta=beta, top_k=k, reduction="none")
    assert (entry <= unclipped + 1e-12).all() and (token <= unclipped + 1e-12).all()


def test_capped_terms_pass_no_gradient():
    student = torch.tensor([[8.0, -8.0, 0.0]], dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor([[-8.0, 8.0, 0.0]], dtype=torch.float64)
    generalized_jsd(student, teacher, clip=1e-6, clip_mode="token").backward()
    assert torch.count_nonzero(student.grad) == 0
    student.grad = None
    generalized_jsd(student, teacher, clip=1e-9, clip_mode="entry").backward()
    assert torch.count_nonzero(student.grad) == 0


# ---------------------------------------------------------------- invariances and scaling
@given(logits_pairs(), betas, st.floats(-100, 100), st.floats(-100, 100))
def test_invariant_to_adding_a_constant_to_a_row(pair, beta, shift_student, shift_teacher):
    student, teacher, _ = pair
    base = generalized_jsd(student, teacher, beta=beta, top_k=2, reduction="none")
    moved = generalized_jsd(student + shift_student, teacher + shift_teacher, beta=beta, top_k=2, reduction="none")
    torch.testing.assert_close(moved, base, rtol=1e-7, atol=1e-9)


@given(logits_pairs(), betas, st.floats(0.25, 4.0))
def test_temperature_scaling(pair, beta, temperature):
    student, teacher, _ = pair
    scaled = generalized_jsd(student, teacher, beta=beta, temperature=temperature, reduction="none")
    plain = generalized_jsd(student / temperature, teacher / temperature, beta=beta, reduction="none")
    torch.testing.assert_close(scaled, temperature**2 * plain)


# ---------------------------------------------------------------- masks, reductions, gradients
@given(logits_pairs(), betas)
def test_masked_rows_contribute_nothing_and_get_no_gradient(pair, beta):
    student, teacher, mask = pair
    student = student.clone().requires_grad_(True)
    rows = generalized_jsd(student, teacher, beta=beta, mask=mask, reduction="none")
    assert (rows[~mask] == 0).all()
    generalized_jsd(student, teacher, beta=beta, mask=mask, reduction="mean").backward()
    assert torch.count_nonzero(student.grad[~mask]) == 0
    garbage = teacher.clone()
    garbage[~mask] = 1e3
    torch.testing.assert_close(
        generalized_jsd(student, garbage, beta=beta, mask=mask), generalized_jsd(student, teacher, beta=beta, mask=mask)
    )


@given(logits_pairs(), betas)
def test_reductions(pair, beta):
    student, teacher, mask = pair
    rows = generalized_jsd(student, teacher, beta=beta, mask=mask, reduction="none")
    torch.testing.assert_close(generalized_jsd(student, teacher, beta=beta, mask=mask, reduction="sum"), rows.sum())
    torch.testing.assert_close(
        generalized_jsd(student, teacher, beta=beta, mask=mask, reduction="mean"), rows.sum() / mask.sum()
    )


def test_mean_with_no_valid_rows_is_zero():
    student, teacher = torch.randn(3, 5), torch.randn(3, 5)
    assert float(generalized_jsd(student, teacher, mask=torch.zeros(3, dtype=torch.bool))) == 0.0


@given(logits_pairs(max_rows=7), betas, st.sampled_from([None, 2]), st.sampled_from([None, 0.05]), st.integers(1, 4))
def test_chunked_equals_unchunked(pair, beta, top_k, clip, chunk):
    student, teacher, mask = pair
    results = []
    for chunk_size in (chunk, student.shape[0]):
        leaf = student.clone().requires_grad_(True)
        loss = generalized_jsd(leaf, teacher, beta=beta, top_k=top_k, clip=clip, mask=mask, chunk_size=chunk_size)
        loss.backward()
        results.append((loss.detach(), leaf.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-12, atol=1e-14)


@given(
    logits_pairs(min_vocab=3),
    betas,
    st.sampled_from([None, 1, 2]),
    st.sampled_from([None, 0.02, 0.3]),
    st.sampled_from(["entry", "token"]),
    temperatures,
)
def test_agrees_with_independent_float64_reference(pair, beta, top_k, clip, clip_mode, temperature):
    student, teacher, _ = pair
    teacher = _distinct(teacher)
    options = dict(beta=beta, top_k=top_k, clip=clip, clip_mode=clip_mode, temperature=temperature)
    ours = generalized_jsd(student, teacher, reduction="none", **options)
    torch.testing.assert_close(ours, reference(student, teacher, **options), rtol=1e-7, atol=1e-9)
    for direction in ("forward", "reverse"):
        kl = kl_divergence(student, teacher, direction=direction, top_k=top_k, temperature=temperature, reduction="none")
        expected = reference(student, teacher, kind=direction, top_k=top_k, temperature=temperature)
        torch.testing.assert_close(kl, expected, rtol=1e-7, atol=1e-9)


@given(logits_pairs(max_vocab=6, max_rows=3), inner_betas | st.sampled_from([0.0, 1.0]), st.sampled_from([None, 2]))
def test_gradient_matches_gradcheck(pair, beta, top_k):
    student, teacher, mask = pair
    teacher = _distinct(teacher)
    student = student.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda s: generalized_jsd(s, teacher, beta=beta, top_k=top_k, mask=mask, reduction="none", chunk_size=1),
        (student,),
    )


def test_teacher_never_receives_gradient():
    student = torch.randn(4, 6, requires_grad=True)
    teacher = torch.randn(4, 6, requires_grad=True)
    (generalized_jsd(student, teacher) + kl_divergence(student, teacher, direction="reverse")).backward()
    assert teacher.grad is None and student.grad is not None


def test_bf16_inputs_give_float32_close_to_float32_inputs():
    student, teacher = torch.randn(8, 50), torch.randn(8, 50)
    low = generalized_jsd(student.bfloat16(), teacher.bfloat16(), top_k=8, clip=0.05, reduction="none")
    assert low.dtype == torch.float32
    high = generalized_jsd(student.bfloat16().float(), teacher.bfloat16().float(), top_k=8, clip=0.05, reduction="none")
    torch.testing.assert_close(low, high)
    leaf = student.bfloat16().requires_grad_(True)
    generalized_jsd(leaf, teacher.bfloat16()).backward()
    assert leaf.grad.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "divergence",
    [JsdDivergence(JsdParams()), JsdDivergence(JsdParams(top_k=3, clip=0.05)), ForwardKlDivergence(KlParams()),
     ReverseKlDivergence(KlParams(top_k=4))],
    ids=["jsd", "jsd-top3", "kl", "reverse-kl-top4"],
)
def test_builtin_divergences_pass_the_contract(divergence):
    check_divergence_contract(divergence)

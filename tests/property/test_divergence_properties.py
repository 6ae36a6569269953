"""Property-based tests of the divergences' numerics (docs/architecture.md, "Numerics").

Inputs come from :mod:`opsd_core.testing.strategies` in float64, so tolerances are tight;
the float32 and bf16 behaviour is covered by the unit tests and the contract. The
independent reference below uses plain Python floats and explicit formulas, sharing no code
with the implementation.
"""

import math

import numpy as np
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from opsd_core.divergences import generalized_jsd, kl_divergence
from opsd_core.testing.strategies import logits_pairs, separate_ranks

# 1 - (1 - beta) must not round to 0 or 1, or the swapped beta would become an endpoint.
interior_betas = st.sampled_from([0.5, 0.1, 0.9]) | st.floats(1e-6, 1 - 1e-6)
betas = st.sampled_from([0.0, 1.0]) | interior_betas
temperatures = st.sampled_from([1.0, 0.5, 2.0]) | st.floats(0.1, 10.0)
clips = st.none() | st.sampled_from([0.05, 1e-3]) | st.floats(1e-4, 2.0)
clip_modes = st.sampled_from(["entry", "token"])
directions = st.sampled_from(["forward", "reverse"])
TIGHT = dict(rtol=1e-9, atol=1e-12)


def draw_top_k(data, vocab: int, allow_none: bool = True):
    choices = st.integers(1, vocab)
    return data.draw(st.none() | choices if allow_none else choices, label="top_k")


# ------------------------------------------------------------ independent float64 reference
def _softmax(values):
    top = max(values)
    weights = [math.exp(value - top) for value in values]
    total = math.fsum(weights)
    return [weight / total for weight in weights]


def _kl_term(p, q):
    return p * math.log(p / q) if p > 0 else 0.0


def _entry_term(kind, beta, t, s):
    if kind == "forward" or (kind == "jsd" and beta == 0):
        return _kl_term(t, s)
    if kind == "reverse" or (kind == "jsd" and beta == 1):
        return _kl_term(s, t)
    m = beta * t + (1 - beta) * s
    return beta * _kl_term(t, m) + (1 - beta) * _kl_term(s, m)


def reference_terms(student, teacher, *, kind="jsd", beta=0.5, top_k=None, temperature=1.0):
    """Per row of float (..., V) logits, the list of its unclipped entry terms (Python floats)."""
    vocab = student.shape[-1]
    rows = []
    for s_row, t_row in zip(student.reshape(-1, vocab).tolist(), teacher.reshape(-1, vocab).tolist()):
        if top_k is not None:
            support = sorted(range(vocab), key=lambda index: t_row[index], reverse=True)[:top_k]
            s_row, t_row = [s_row[i] for i in support], [t_row[i] for i in support]
        p_t = _softmax([value / temperature for value in t_row])
        p_s = _softmax([value / temperature for value in s_row])
        rows.append([_entry_term(kind, beta, t, s) for t, s in zip(p_t, p_s)])
    return rows


def reference(student, teacher, *, kind="jsd", beta=0.5, top_k=None, clip=None, clip_mode="entry", temperature=1.0):
    """float64 (...) row losses of float (..., V) logits, one row at a time in Python floats."""
    losses = []
    for terms in reference_terms(student, teacher, kind=kind, beta=beta, top_k=top_k, temperature=temperature):
        if clip is not None and clip_mode == "entry":
            terms = [min(term, clip) for term in terms]
        total = math.fsum(terms)
        if clip is not None and clip_mode == "token":
            total = min(total, clip)
        losses.append(total * temperature**2)
    return torch.tensor(losses, dtype=torch.float64).reshape(student.shape[:-1])


def binary_entropy(beta):
    return -(beta * math.log(beta) + (1 - beta) * math.log(1 - beta))


# ------------------------------------------------------------ agreement with the reference
@given(logits_pairs(distinct_teacher=True), betas, clips, clip_modes, temperatures, st.data())
def test_jsd_agrees_with_independent_reference(pair, beta, clip, clip_mode, temperature, data):
    student, teacher, _ = pair
    options = dict(beta=beta, top_k=draw_top_k(data, student.shape[-1]), clip=clip, clip_mode=clip_mode, temperature=temperature)
    ours = generalized_jsd(student, teacher, reduction="none", **options)
    torch.testing.assert_close(ours, reference(student, teacher, **options), **TIGHT)


@given(logits_pairs(distinct_teacher=True), directions, temperatures, st.data())
def test_kl_agrees_with_independent_reference(pair, direction, temperature, data):
    student, teacher, _ = pair
    top_k = draw_top_k(data, student.shape[-1])
    ours = kl_divergence(student, teacher, direction=direction, top_k=top_k, temperature=temperature, reduction="none")
    expected = reference(student, teacher, kind=direction, top_k=top_k, temperature=temperature)
    torch.testing.assert_close(ours, expected, **TIGHT)


# ------------------------------------------------------------ sign, zero, bound
@given(logits_pairs(), betas, temperatures, st.data())
def test_non_negative(pair, beta, temperature, data):
    student, teacher, _ = pair
    top_k = draw_top_k(data, student.shape[-1])
    assert (generalized_jsd(student, teacher, beta=beta, top_k=top_k, temperature=temperature, reduction="none") >= -1e-12).all()
    for direction in ("forward", "reverse"):
        rows = kl_divergence(student, teacher, direction=direction, top_k=top_k, temperature=temperature, reduction="none")
        assert (rows >= -1e-12).all()


@given(logits_pairs(), betas, temperatures, st.data())
def test_zero_for_identical_inputs(pair, beta, temperature, data):
    student, _, _ = pair
    top_k = draw_top_k(data, student.shape[-1])
    rows = generalized_jsd(student, student.clone(), beta=beta, top_k=top_k, temperature=temperature, reduction="none")
    assert float(rows.abs().max()) <= 1e-12
    for direction in ("forward", "reverse"):
        rows = kl_divergence(student, student.clone(), direction=direction, top_k=top_k, reduction="none")
        assert float(rows.abs().max()) <= 1e-12


@given(logits_pairs(), interior_betas, temperatures, st.data())
def test_bounded_by_binary_entropy(pair, beta, temperature, data):
    student, teacher, _ = pair
    top_k = draw_top_k(data, student.shape[-1])
    rows = generalized_jsd(student, teacher, beta=beta, top_k=top_k, temperature=temperature, reduction="none")
    assert float(rows.max()) <= temperature**2 * binary_entropy(beta) + 1e-12


# ------------------------------------------------------------ symmetries and endpoints
@given(logits_pairs(), betas, temperatures)
def test_swapping_inputs_swaps_beta(pair, beta, temperature):
    student, teacher, _ = pair
    forward = generalized_jsd(student, teacher, beta=beta, temperature=temperature, reduction="none")
    swapped = generalized_jsd(teacher, student, beta=1 - beta, temperature=temperature, reduction="none")
    torch.testing.assert_close(forward, swapped, rtol=1e-8, atol=1e-11)


@given(logits_pairs())
def test_half_jsd_is_symmetric_over_the_full_vocabulary(pair):
    student, teacher, _ = pair
    torch.testing.assert_close(
        generalized_jsd(student, teacher, beta=0.5, reduction="none"),
        generalized_jsd(teacher, student, beta=0.5, reduction="none"),
        **TIGHT,
    )


@given(logits_pairs())
def test_forward_kl_is_reverse_kl_with_inputs_swapped(pair):
    student, teacher, _ = pair
    torch.testing.assert_close(
        kl_divergence(student, teacher, direction="forward", reduction="none"),
        kl_divergence(teacher, student, direction="reverse", reduction="none"),
        **TIGHT,
    )


@given(logits_pairs(), temperatures, st.data())
def test_beta_endpoints_are_exactly_the_kls(pair, temperature, data):
    student, teacher, mask = pair
    common = dict(top_k=draw_top_k(data, student.shape[-1]), temperature=temperature, mask=mask, reduction="none")
    forward = kl_divergence(student, teacher, direction="forward", **common)
    reverse = kl_divergence(student, teacher, direction="reverse", **common)
    assert torch.equal(generalized_jsd(student, teacher, beta=0.0, **common), forward)
    assert torch.equal(generalized_jsd(student, teacher, beta=1, **common), reverse)


# ------------------------------------------------------------ top-K support
@given(logits_pairs(), betas, clips, clip_modes)
def test_top_k_of_the_whole_vocabulary_is_the_full_divergence(pair, beta, clip, clip_mode):
    student, teacher, _ = pair
    options = dict(beta=beta, clip=clip, clip_mode=clip_mode, reduction="none")
    full = generalized_jsd(student, teacher, **options)
    assert torch.equal(generalized_jsd(student, teacher, top_k=student.shape[-1], **options), full)


@given(logits_pairs(distinct_teacher=True), betas, st.data())
def test_permuting_the_vocabulary_changes_nothing(pair, beta, data):
    student, teacher, _ = pair
    top_k = draw_top_k(data, student.shape[-1])
    order = torch.tensor(data.draw(st.permutations(range(student.shape[-1])), label="order"))
    base = generalized_jsd(student, teacher, beta=beta, top_k=top_k, reduction="none")
    permuted = generalized_jsd(student[..., order], teacher[..., order], beta=beta, top_k=top_k, reduction="none")
    torch.testing.assert_close(permuted, base, **TIGHT)


@given(logits_pairs(distinct_teacher=True), betas, clips, clip_modes, st.data())
def test_top_k_is_the_divergence_of_the_renormalised_support(pair, beta, clip, clip_mode, data):
    student, teacher, _ = pair
    top_k = draw_top_k(data, student.shape[-1], allow_none=False)
    support = teacher.argsort(dim=-1, descending=True)[..., :top_k]  # (..., K)
    options = dict(beta=beta, clip=clip, clip_mode=clip_mode, reduction="none")
    leaf = student.clone().requires_grad_(True)
    ours = generalized_jsd(leaf, teacher, top_k=top_k, **options)
    explicit_leaf = student.gather(-1, support).requires_grad_(True)
    explicit = generalized_jsd(explicit_leaf, teacher.gather(-1, support), **options)
    torch.testing.assert_close(ours, explicit, **TIGHT)
    ours.sum().backward()
    explicit.sum().backward()
    expected_grad = torch.zeros_like(student).scatter(-1, support, explicit_leaf.grad)
    torch.testing.assert_close(leaf.grad, expected_grad, **TIGHT)


# ------------------------------------------------------------ clipping
@given(logits_pairs(), betas, st.floats(1e-4, 1.0), st.data())
def test_clip_bounds(pair, beta, clip, data):
    student, teacher, _ = pair
    top_k = draw_top_k(data, student.shape[-1], allow_none=False)
    common = dict(beta=beta, top_k=top_k, reduction="none")
    unclipped = generalized_jsd(student, teacher, **common)
    entry = generalized_jsd(student, teacher, clip=clip, clip_mode="entry", **common)
    token = generalized_jsd(student, teacher, clip=clip, clip_mode="token", **common)
    assert (entry <= top_k * clip + 1e-12).all() and (entry <= unclipped + 1e-12).all()
    assert (token <= clip).all() and torch.equal(token, unclipped.clamp(max=clip))
    loose = generalized_jsd(student, teacher, clip=1e6, clip_mode="entry", **common)
    assert torch.equal(loose, unclipped)


@given(logits_pairs(), interior_betas)
def test_rows_over_the_token_clip_pass_no_gradient(pair, beta):
    student, teacher, _ = pair
    clip = 1e-3
    leaf = student.clone().requires_grad_(True)
    rows = generalized_jsd(leaf, teacher, beta=beta, clip=clip, clip_mode="token", reduction="none")
    rows.sum().backward()
    capped = generalized_jsd(student, teacher, beta=beta, reduction="none") > clip
    assert torch.count_nonzero(leaf.grad[capped]) == 0


# ------------------------------------------------------------ invariances and scaling
@given(logits_pairs(distinct_teacher=True), betas, clips, clip_modes, st.data())
def test_invariant_to_adding_a_constant_to_a_row(pair, beta, clip, clip_mode, data):
    student, teacher, mask = pair
    shifts = hnp.arrays(np.float64, student.shape[:-1] + (1,), elements=st.floats(-100, 100))
    shift_student = torch.from_numpy(data.draw(shifts, label="shift_student"))
    shift_teacher = torch.from_numpy(data.draw(shifts, label="shift_teacher"))
    options = dict(beta=beta, top_k=draw_top_k(data, student.shape[-1]), clip=clip, clip_mode=clip_mode, mask=mask)
    base = generalized_jsd(student, teacher, reduction="none", **options)
    moved = generalized_jsd(student + shift_student, teacher + shift_teacher, reduction="none", **options)
    torch.testing.assert_close(moved, base, rtol=1e-8, atol=1e-10)


@given(logits_pairs(distinct_teacher=True), betas, clips, clip_modes, temperatures, st.data())
def test_temperature_scales_by_its_square(pair, beta, clip, clip_mode, temperature, data):
    student, teacher, _ = pair
    options = dict(beta=beta, top_k=draw_top_k(data, student.shape[-1]), clip=clip, clip_mode=clip_mode, reduction="none")
    hot = generalized_jsd(student, teacher, temperature=temperature, **options)
    plain = generalized_jsd(student / temperature, teacher / temperature, **options)
    torch.testing.assert_close(hot, temperature**2 * plain, rtol=1e-8, atol=1e-12)


# ------------------------------------------------------------ masks and reductions
@given(logits_pairs(), betas, st.sampled_from([None, 1, 2]), st.data())
def test_masked_rows_contribute_nothing_and_get_no_gradient(pair, beta, chunk_size, data):
    student, teacher, mask = pair
    top_k = draw_top_k(data, student.shape[-1])
    options = dict(beta=beta, top_k=top_k, mask=mask, chunk_size=chunk_size)
    clean = generalized_jsd(student, teacher, reduction="none", **options)
    garbage = data.draw(st.sampled_from([math.nan, math.inf, -math.inf, 1e300]), label="garbage")
    leaf = student.clone()
    leaf[~mask] = garbage
    leaf.requires_grad_(True)
    dirty_teacher = teacher.clone()
    dirty_teacher[~mask] = -garbage
    rows = generalized_jsd(leaf, dirty_teacher, reduction="none", **options)
    assert torch.equal(rows, clean) and (rows[~mask] == 0).all()
    generalized_jsd(leaf, dirty_teacher, reduction="mean", **options).backward()
    assert torch.isfinite(leaf.grad).all() and torch.count_nonzero(leaf.grad[~mask]) == 0


@given(logits_pairs(min_valid=0), betas, st.sampled_from([None, 2]))
def test_reductions(pair, beta, chunk_size):
    student, teacher, mask = pair
    options = dict(beta=beta, mask=mask, chunk_size=chunk_size)
    rows = generalized_jsd(student, teacher, reduction="none", **options)
    assert rows.shape == mask.shape and (rows[~mask] == 0).all()
    torch.testing.assert_close(generalized_jsd(student, teacher, reduction="sum", **options), rows.sum(), **TIGHT)
    mean = generalized_jsd(student, teacher, reduction="mean", **options)
    expected = rows.sum() / mask.sum() if mask.any() else torch.zeros((), dtype=torch.float64)
    torch.testing.assert_close(mean, expected, **TIGHT)


# ------------------------------------------------------------ chunked path and gradients
def clip_within_reach(student, teacher, fraction, **options):
    """A clip that caps some rows (or entries) but not all: ``fraction`` of the largest
    unclipped row, or None when there is nothing to cap."""
    if fraction is None:
        return None
    largest = float(generalized_jsd(student, teacher, reduction="none", **options).max())
    return fraction * largest if largest > 0 else None


@given(
    logits_pairs(max_rows=8, min_valid=0),
    betas,
    st.none() | st.floats(0.02, 1.0),
    clip_modes,
    temperatures,
    st.integers(1, 5),
    st.sampled_from(["none", "sum", "mean"]),
    st.data(),
)
def test_chunked_equals_unchunked(pair, beta, clip_fraction, clip_mode, temperature, chunk_size, reduction, data):
    student, teacher, mask = pair
    top_k = draw_top_k(data, student.shape[-1])
    options = dict(
        beta=beta,
        top_k=top_k,
        clip=clip_within_reach(student, teacher, clip_fraction, beta=beta, top_k=top_k),
        clip_mode=clip_mode,
        temperature=temperature,
        mask=mask,
        reduction=reduction,
    )
    # Unequal upstream gradients per row, so that a row's gradient landing on another row shows.
    weights = torch.linspace(0.5, 1.5, mask.numel(), dtype=torch.float64).reshape(mask.shape)
    if reduction != "none":
        weights = weights.sum()
    results = []
    for size in (None, chunk_size):
        leaf = student.clone().requires_grad_(True)
        loss = generalized_jsd(leaf, teacher, chunk_size=size, **options)
        (loss * weights).sum().backward()
        results.append((loss.detach(), leaf.grad))
    (plain, plain_grad), (chunked, chunked_grad) = results
    torch.testing.assert_close(chunked, plain, **TIGHT)
    torch.testing.assert_close(chunked_grad, plain_grad, rtol=1e-8, atol=1e-12)


@given(logits_pairs(max_rows=8, min_valid=0), directions, temperatures, st.integers(1, 5), st.data())
def test_chunked_kl_equals_unchunked(pair, direction, temperature, chunk_size, data):
    student, teacher, mask = pair
    options = dict(direction=direction, top_k=draw_top_k(data, student.shape[-1]), temperature=temperature, mask=mask)
    grads = []
    for size in (None, chunk_size):
        leaf = student.clone().requires_grad_(True)
        kl_divergence(leaf, teacher, chunk_size=size, reduction="sum", **options).backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-8, atol=1e-12)


@given(
    logits_pairs(max_rows=4, max_vocab=6, bound=6.0),
    betas,
    st.none() | st.floats(0.1, 0.9),
    clip_modes,
    st.sampled_from([1.0, 0.7]),
    st.sampled_from([None, 1]),
    st.data(),
)
def test_gradient_passes_gradcheck(pair, beta, clip_fraction, clip_mode, temperature, chunk_size, data):
    student, teacher, mask = pair
    teacher = separate_ranks(teacher)
    top_k = draw_top_k(data, student.shape[-1])
    clip = clip_within_reach(student, teacher, clip_fraction, beta=beta, top_k=top_k, temperature=temperature)
    if clip is not None:
        # Finite differences straddling the cap's kink would disagree with any gradient.
        rows = reference_terms(student, teacher, beta=beta, top_k=top_k, temperature=temperature)
        values = [term for terms in rows for term in terms] if clip_mode == "entry" else [math.fsum(r) for r in rows]
        assume(all(abs(value - clip) > 1e-4 for value in values))
    options = dict(
        beta=beta,
        top_k=top_k,
        clip=clip,
        clip_mode=clip_mode,
        temperature=temperature,
        mask=mask,
        chunk_size=chunk_size,
        reduction="none",
    )
    leaf = student.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: generalized_jsd(s, teacher, **options), (leaf,))


@given(logits_pairs(max_rows=4), betas, st.sampled_from([None, 1]), st.data())
def test_teacher_gets_no_gradient(pair, beta, chunk_size, data):
    student, teacher, mask = pair
    top_k = draw_top_k(data, student.shape[-1])
    leaf, teacher = student.clone().requires_grad_(True), teacher.clone().requires_grad_(True)
    loss = generalized_jsd(leaf, teacher, beta=beta, top_k=top_k, mask=mask, chunk_size=chunk_size)
    loss = loss + kl_divergence(leaf, teacher, direction="reverse", top_k=top_k, mask=mask, chunk_size=chunk_size)
    loss.backward()
    assert teacher.grad is None and leaf.grad is not None


# ------------------------------------------------------------ low precision
@given(logits_pairs(dtype=torch.bfloat16, bound=20.0), betas, st.sampled_from([None, 1]))
def test_bf16_inputs_compute_in_float32(pair, beta, chunk_size):
    student, teacher, mask = pair
    options = dict(beta=beta, mask=mask, chunk_size=chunk_size, reduction="none")
    leaf = student.clone().requires_grad_(True)
    rows = generalized_jsd(leaf, teacher, **options)
    assert rows.dtype == torch.float32
    torch.testing.assert_close(rows, generalized_jsd(student.float(), teacher.float(), **options), rtol=1e-6, atol=1e-7)
    rows.sum().backward()
    assert leaf.grad.dtype == torch.bfloat16 and torch.isfinite(leaf.grad).all()

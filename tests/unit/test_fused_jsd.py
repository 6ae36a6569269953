"""The fused top-K JSD from hidden states: equality with ``generalized_jsd`` on full logits
(values and gradients), argument errors, the memory bound of the torch path, the ``jsd``
divergence's ``per_token_hidden`` and the trainer's fused path on the tiny backend."""

from pathlib import Path

import pydantic
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from opsd_core.components import build_components, check_components
from opsd_core.config import load_config
from opsd_core.divergences import (
    JsdDivergence,
    JsdParams,
    fused_topk_jsd,
    generalized_jsd,
    kl_divergence,
)
from opsd_core.errors import ConfigError
from opsd_core.interfaces import Backend, Capabilities
from opsd_core.sampling import BatchedSampler
from opsd_core.trainer.trainer import Trainer
from opsd_core.rundir import MetricsLog

TIGHT = {"rtol": 1e-10, "atol": 1e-12}
QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "quickstart.toml"


def _inputs(batch=(3, 5), hidden=6, vocab=40, dtype=torch.float64, seed=0, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    student = (scale * torch.randn(*batch, hidden, generator=generator, dtype=dtype)).requires_grad_()
    teacher = scale * torch.randn(*batch, hidden, generator=generator, dtype=dtype)
    weight = torch.randn(vocab, hidden, generator=generator, dtype=dtype).requires_grad_()
    mask = torch.rand(*batch, generator=generator) > 0.3
    mask[0] = False  # a sample with no valid row
    return student, teacher, weight, mask


def _both(student, teacher, weight, teacher_weight=None, chunk_size=None, **kwargs):
    """(fused value, its grads) and (unfused value, its grads) w.r.t. student hidden and weight."""
    fused = fused_topk_jsd(student, teacher, weight, teacher_weight=teacher_weight, chunk_size=chunk_size, **kwargs)
    fused_grads = torch.autograd.grad(fused.sum(), (student, weight), allow_unused=True)
    teacher_head = (weight if teacher_weight is None else teacher_weight).detach()
    plain = generalized_jsd(student @ weight.T, teacher @ teacher_head.T, **kwargs)
    plain_grads = torch.autograd.grad(plain.sum(), (student, weight), allow_unused=True)
    return (fused, fused_grads), (plain, plain_grads)


def _assert_same(fused, plain, **tolerance):
    (value, grads), (expected, expected_grads) = fused, plain
    tolerance = tolerance or TIGHT
    torch.testing.assert_close(value, expected, **tolerance)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, **tolerance)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize(
    ("beta", "clip", "clip_mode"),
    [
        (0.5, None, "entry"),
        (0.5, 0.01, "entry"),
        (0.3, 0.05, "token"),
        (0.0, None, "entry"),
        (0.0, 0.2, "token"),
        (1.0, None, "entry"),
        (1.0, 0.2, "token"),
        (0.9, 0.02, "entry"),
    ],
)
def test_equals_generalized_jsd_on_full_logits(beta, clip, clip_mode, reduction):
    student, teacher, weight, mask = _inputs(scale=2.0)
    for chunk_size in (None, 4):  # 4 divides neither 15 rows nor the valid ones
        fused, plain = _both(
            student, teacher, weight, chunk_size=chunk_size, beta=beta, top_k=7, clip=clip,
            clip_mode=clip_mode, temperature=0.7, mask=mask, reduction=reduction,
        )
        _assert_same(fused, plain)
        if reduction == "none":
            assert fused[0].shape == mask.shape and bool((fused[0][~mask] == 0).all())


def test_separate_teacher_weight_gets_no_gradient():
    student, teacher, weight, mask = _inputs(seed=1)
    teacher_weight = torch.randn(weight.shape, dtype=weight.dtype).requires_grad_()
    fused, plain = _both(student, teacher, weight, teacher_weight, beta=0.5, top_k=5, temperature=2.0, mask=mask)
    _assert_same(fused, plain)
    teacher.requires_grad_()
    loss = fused_topk_jsd(student, teacher, weight, teacher_weight=teacher_weight, beta=0.5, top_k=5, mask=mask)
    loss.backward()
    assert teacher.grad is None and teacher_weight.grad is None
    assert student.grad is not None and weight.grad is not None


def test_weight_gradient_only_on_supported_rows():
    student, teacher, weight, _ = _inputs(batch=(1, 2), vocab=60, seed=2)
    fused_topk_jsd(student, teacher, weight, beta=0.5, top_k=3, reduction="sum").backward()
    touched = (weight.grad != 0).any(dim=-1)
    assert 3 <= int(touched.sum()) <= 6  # at most K rows for each of the 2 tokens


def test_top_k_equal_to_vocabulary_is_the_whole_vocabulary():
    student, teacher, weight, mask = _inputs(vocab=12, seed=3)
    value = fused_topk_jsd(student, teacher, weight, beta=0.4, top_k=12, mask=mask)
    grads = torch.autograd.grad(value, (student, weight))
    whole = generalized_jsd(student @ weight.T, teacher @ weight.detach().T, beta=0.4, top_k=None, mask=mask)
    _assert_same((value, grads), (whole, torch.autograd.grad(whole, (student, weight))))


def test_float32_and_bf16_inputs_match_the_unfused_path():
    student, teacher, weight, mask = _inputs(dtype=torch.float32, seed=4, scale=2.0)
    fused, plain = _both(student, teacher, weight, beta=0.5, top_k=8, clip=0.05, mask=mask)
    assert fused[0].dtype == torch.float32
    _assert_same(fused, plain, rtol=1e-5, atol=1e-6)
    student, teacher, weight = (t.detach().bfloat16().requires_grad_() for t in (student, teacher, weight))
    teacher.requires_grad_(False)
    fused, plain = _both(student, teacher, weight, beta=0.5, top_k=8, mask=mask)
    assert fused[0].dtype == torch.float32 and fused[1][1].dtype == torch.bfloat16
    _assert_same(fused, plain, rtol=2e-2, atol=2e-3)


def test_garbage_in_masked_rows_reaches_nothing():
    student, teacher, weight, mask = _inputs(seed=5)
    with torch.no_grad():
        student[~mask] = float("nan")
        teacher[~mask] = float("inf")
    loss = fused_topk_jsd(student, teacher, weight, beta=0.5, top_k=4, mask=mask)
    loss.backward()
    assert torch.isfinite(loss) and bool(torch.isfinite(weight.grad).all())
    assert bool((student.grad[~mask] == 0).all()) and bool(torch.isfinite(student.grad).all())


def test_no_valid_row_gives_zero_and_zero_gradients():
    student, teacher, weight, mask = _inputs(seed=6)
    nothing = torch.zeros_like(mask)
    for reduction in ("mean", "sum"):
        loss = fused_topk_jsd(student, teacher, weight, beta=0.5, top_k=4, mask=nothing, reduction=reduction)
        assert float(loss.detach()) == 0.0
    grads = torch.autograd.grad(loss, (student, weight))
    assert all(bool((grad == 0).all()) for grad in grads)


def test_gradcheck_float64():
    student, teacher, weight, mask = _inputs(batch=(2, 3), hidden=4, vocab=9, seed=7)
    # A separate teacher head: with the default, perturbing ``weight`` would move the teacher
    # too, which finite differences see and the (teacher-detached) gradient rightly does not.
    teacher_weight = weight.detach().clone()

    def loss(student, weight):
        return fused_topk_jsd(
            student, teacher, weight, teacher_weight=teacher_weight, beta=0.3, top_k=4, temperature=1.5,
            mask=mask, chunk_size=2,
        )

    assert torch.autograd.gradcheck(loss, (student, weight))


def test_triton_path_is_not_used_on_cpu(monkeypatch):
    from opsd_core.divergences import fused

    monkeypatch.setattr(fused, "_gathered_logits_torch", lambda *args: (_ for _ in ()).throw(RuntimeError("torch")))
    student, teacher, weight, _ = _inputs()
    with pytest.raises(RuntimeError, match="torch"):  # "auto" on CPU goes to the torch path
        fused_topk_jsd(student, teacher, weight, beta=0.5, top_k=3, impl="auto")


_S, _T, _W, _M = _inputs()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"student_hidden": [1.0]}, "student_hidden must be a torch.Tensor"),
        ({"teacher_hidden": _T.long()}, "teacher_hidden must have a floating point dtype"),
        ({"teacher_hidden": _T[:, :2]}, "teacher_hidden must have the same shape"),
        ({"weight": _W[:, :3]}, r"weight must have shape \(V, D\)"),
        ({"teacher_weight": _W[:5]}, "teacher_weight must have the same shape"),
        ({"mask": _M.float()}, "mask must be a bool tensor"),
        ({"mask": _M[:, :2]}, "mask must have shape"),
        ({"top_k": None}, r"top_k must be an integer in \[1, V\]"),
        ({"top_k": 0}, r"top_k must be an integer in \[1, V\] = \[1, 40\]"),
        ({"top_k": 41}, "top_k must be an integer"),
        ({"top_k": True}, "top_k must be an integer"),
        ({"beta": 1.5}, r"beta must be a number in \[0, 1\]"),
        ({"clip": 0.0}, "clip must be a number > 0"),
        ({"clip_mode": "row"}, "clip_mode must be one of entry, token"),
        ({"temperature": 0}, "temperature must be a finite number > 0"),
        ({"reduction": "avg"}, "reduction must be one of none, sum, mean"),
        ({"chunk_size": 0}, "chunk_size must be an integer >= 1"),
        ({"impl": "cuda"}, "impl must be one of auto, torch, triton"),
        ({"impl": "triton"}, "impl='triton' needs CUDA tensors"),
    ],
)
def test_bad_arguments_name_themselves(change, message):
    arguments = {"student_hidden": _S, "teacher_hidden": _T, "weight": _W, "beta": 0.5, "top_k": 4, "mask": _M} | change
    with pytest.raises(ValueError, match=message):
        fused_topk_jsd(**arguments)


class _LargestFloatTensor(TorchDispatchMode):
    """Records the shape of every floating point tensor an operator returns."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                self.shapes.append(tuple(tensor.shape))
        return out

    def largest(self) -> int:
        return max(torch.Size(shape).numel() for shape in self.shapes)


def test_torch_path_never_builds_rows_times_vocabulary():
    rows, hidden, vocab, chunk = 64, 8, 4096, 8
    student, teacher, weight, mask = _inputs(batch=(rows,), hidden=hidden, vocab=vocab, dtype=torch.float32)
    with _LargestFloatTensor() as fused_run:
        fused_topk_jsd(student, teacher, weight, beta=0.5, top_k=16, mask=mask, chunk_size=chunk).backward()
    # The teacher's (chunk, V) block and the (V, D) weight gradient are the largest tensors.
    assert fused_run.largest() <= max(chunk * vocab, vocab * hidden) < rows * vocab
    assert (rows, vocab) not in fused_run.shapes and (int(mask.sum()), vocab) not in fused_run.shapes
    with _LargestFloatTensor() as plain_run:  # the recorder does see (N, V) when it exists
        generalized_jsd(student @ weight.T, teacher @ weight.detach().T, top_k=16, mask=mask).backward()
    assert (rows, vocab) in plain_run.shapes


# ------------------------------------------------------------ the jsd divergence's fused side
def test_jsd_params_fused_needs_a_top_k():
    assert JsdParams(fused=True).fused
    with pytest.raises(pydantic.ValidationError, match="needs top_k"):
        JsdParams(fused=True, top_k=None)


def test_per_token_hidden_equals_per_token_and_reports_top_k_kl():
    student, teacher, weight, mask = _inputs(dtype=torch.float64, seed=8)
    divergence = JsdDivergence(JsdParams(top_k=6, clip=0.05, fused=True))
    assert divergence.uses_hidden_states
    losses, kl = divergence.per_token_hidden(student, teacher, weight, mask, with_kl=True)
    student_logits, teacher_logits = student @ weight.T, teacher @ weight.detach().T
    torch.testing.assert_close(losses, divergence.per_token(student_logits, teacher_logits, mask), **TIGHT)
    expected_kl = kl_divergence(student_logits, teacher_logits, top_k=6, mask=mask, reduction="none")
    torch.testing.assert_close(kl, expected_kl, **TIGHT)
    assert not kl.requires_grad and losses.requires_grad
    wide = JsdDivergence(JsdParams(top_k=256, fused=True))  # K >= V: the whole vocabulary
    torch.testing.assert_close(
        wide.per_token_hidden(student, teacher, weight, mask),
        wide.per_token(student_logits, teacher_logits, mask),
        **TIGHT,
    )


# ------------------------------------------------------------ the trainer on the tiny backend
SMALL = [
    "train.samples_per_step=2",
    "train.grad_accum=1",
    "schedule.total_steps=3",
    "schedule.warmup_steps=1",
    "sampling.max_completion_tokens=10",
    "divergence.top_k=8",
]


def _trainer(tmp_path, name, *overrides):
    config = load_config(QUICKSTART, [*SMALL, *overrides])
    components = build_components(config)
    components.sampler = BatchedSampler(components.backend, 0.0, config.sampling.max_completion_tokens)  # greedy
    torch.manual_seed(0)
    trainer = Trainer(components, components.backend.build_model(), tmp_path / name, MetricsLog(tmp_path / f"{name}.jsonl"))
    return trainer


def test_trainer_fused_step_equals_the_logits_step(tmp_path):
    plain = _trainer(tmp_path, "plain")
    fused = _trainer(tmp_path, "fused", "divergence.fused=true")
    assert fused.hidden_states and not plain.hidden_states
    for step in range(2):
        plain_metrics, fused_metrics = plain.train_step(), fused.train_step()
        assert fused_metrics["loss"] == pytest.approx(plain_metrics["loss"], rel=1e-5, abs=1e-7)
        assert fused_metrics["grad_norm"] == pytest.approx(plain_metrics["grad_norm"], rel=1e-4)
        assert fused_metrics["kl"] > 0
        if step == 0:  # after a step the weights differ by Adam's sign-like noise; compare once
            for (name, a), (_, b) in zip(plain.student.named_parameters(), fused.student.named_parameters()):
                torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_fused_run_is_refused_by_a_backend_without_hidden_states():
    config = load_config(QUICKSTART, [*SMALL, "divergence.fused=true"])
    components = build_components(config)

    class LogitsOnly(type(components.backend)):
        capabilities = Capabilities()
        completion_hidden = Backend.completion_hidden

    components.backend = LogitsOnly.__new__(LogitsOnly)
    components.backend.__dict__.update(build_components(config).backend.__dict__)
    with pytest.raises(ConfigError, match="divergence.fused"):
        check_components(components)
    components.divergence = build_components(load_config(QUICKSTART, SMALL)).divergence
    check_components(components)  # unfused: accepted

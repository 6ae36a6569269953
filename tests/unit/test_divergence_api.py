"""The divergences' public surface: argument checking, dtypes and shapes, edge cases, path
selection, params models, the registered classes and the contract they pass."""

import math
import subprocess
import sys

import pydantic
import pytest
import torch

from opsd_core.divergences import (
    ForwardKlDivergence,
    JsdDivergence,
    JsdParams,
    KlParams,
    ReverseKlDivergence,
    _chunked,
    functional,
    generalized_jsd,
    kl_divergence,
)
from opsd_core.testing.divergence_contract import DivergenceContract

STUDENT = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(0))
TEACHER = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(1))


def _uses_chunked_path(loss: torch.Tensor) -> bool:
    pending, seen = [loss.grad_fn], set()
    while pending:
        node = pending.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if "ChunkedRowLosses" in type(node).__name__:
            return True
        pending.extend(next_node for next_node, _ in node.next_functions)
    return False


# ------------------------------------------------------------ invalid arguments
SHARED_INVALID = [
    ({"top_k": 0}, "top_k"),
    ({"top_k": 8}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"top_k": True}, "top_k"),
    ({"temperature": 0.0}, "temperature"),
    ({"temperature": -2.0}, "temperature"),
    ({"temperature": math.inf}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"reduction": "max"}, "reduction"),
    ({"mask": torch.ones(2, 4, dtype=torch.bool)}, "mask"),
    ({"mask": torch.ones(2, 3)}, "mask"),
    ({"mask": [[True] * 3] * 2}, "mask"),
    ({"chunk_size": 0}, "chunk_size"),
    ({"chunk_size": 1.5}, "chunk_size"),
]


@pytest.mark.parametrize(
    "kwargs, argument",
    SHARED_INVALID
    + [
        ({"beta": -0.1}, "beta"),
        ({"beta": 1.5}, "beta"),
        ({"beta": math.nan}, "beta"),
        ({"beta": "0.5"}, "beta"),
        ({"clip": 0.0}, "clip"),
        ({"clip": -1.0}, "clip"),
        ({"clip": math.nan}, "clip"),
        ({"clip_mode": "row"}, "clip_mode"),
    ],
)
def test_invalid_jsd_arguments_raise_value_error_naming_them(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        generalized_jsd(STUDENT, TEACHER, **kwargs)


@pytest.mark.parametrize("kwargs, argument", SHARED_INVALID + [({"direction": "sideways"}, "direction")])
def test_invalid_kl_arguments_raise_value_error_naming_them(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        kl_divergence(STUDENT, TEACHER, **kwargs)


@pytest.mark.parametrize("function", [generalized_jsd, kl_divergence])
@pytest.mark.parametrize(
    "student, teacher, argument",
    [
        (STUDENT.tolist(), TEACHER, "student_logits"),
        (STUDENT, TEACHER.numpy(), "teacher_logits"),
        (STUDENT.long(), TEACHER, "student_logits"),
        (STUDENT, TEACHER.int(), "teacher_logits"),
        (STUDENT, TEACHER[..., :5], "teacher_logits"),
        (STUDENT, TEACHER[0], "teacher_logits"),
        (torch.tensor(1.0), torch.tensor(1.0), "student_logits"),
        (torch.zeros(3, 0), torch.zeros(3, 0), "student_logits"),
    ],
)
def test_invalid_logits_raise_value_error_naming_them(function, student, teacher, argument):
    with pytest.raises(ValueError, match=argument):
        function(student, teacher)


# ------------------------------------------------------------ dtypes, shapes, edge cases
@pytest.mark.parametrize(
    "student_dtype, teacher_dtype, result_dtype",
    [
        (torch.float32, torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16, torch.float32),
        (torch.float16, torch.float16, torch.float32),
        (torch.bfloat16, torch.float32, torch.float32),
        (torch.float64, torch.float64, torch.float64),
        (torch.bfloat16, torch.float64, torch.float64),
    ],
)
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_result_dtype_and_gradient_dtype(student_dtype, teacher_dtype, result_dtype, chunk_size):
    student = STUDENT.to(student_dtype, copy=True).requires_grad_(True)
    loss = generalized_jsd(student, TEACHER.to(teacher_dtype), top_k=4, clip=0.05, chunk_size=chunk_size)
    assert loss.dtype == result_dtype
    loss.backward()
    assert student.grad.dtype == student_dtype and torch.isfinite(student.grad).all()


def test_shapes_of_each_reduction():
    assert generalized_jsd(STUDENT, TEACHER, reduction="none").shape == (2, 3)
    assert generalized_jsd(STUDENT, TEACHER, reduction="sum").shape == ()
    assert generalized_jsd(STUDENT, TEACHER).shape == ()
    assert generalized_jsd(STUDENT[0, 0], TEACHER[0, 0], reduction="none").shape == ()
    assert kl_divergence(STUDENT[:, :, None], TEACHER[:, :, None], reduction="none").shape == (2, 3, 1)


@pytest.mark.parametrize("chunk_size", [None, 1])
def test_no_rows_give_zero_and_a_zero_gradient(chunk_size):
    student = torch.zeros(0, 5, requires_grad=True)
    assert generalized_jsd(student, torch.zeros(0, 5), reduction="none", chunk_size=chunk_size).shape == (0,)
    loss = generalized_jsd(student, torch.zeros(0, 5), top_k=2, chunk_size=chunk_size)
    loss.backward()
    assert float(loss.detach()) == 0.0 and student.grad.shape == (0, 5)


@pytest.mark.parametrize("chunk_size", [None, 1])
def test_mean_over_no_valid_rows_is_zero_with_zero_gradient(chunk_size):
    student = STUDENT.clone().requires_grad_(True)
    loss = generalized_jsd(student, TEACHER, mask=torch.zeros(2, 3, dtype=torch.bool), chunk_size=chunk_size)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.count_nonzero(student.grad) == 0


def test_a_single_entry_vocabulary_gives_zero():
    assert torch.equal(generalized_jsd(STUDENT[..., :1], TEACHER[..., :1], reduction="none"), torch.zeros(2, 3))


@pytest.mark.parametrize("chunk_size", [None, 1])
def test_minus_infinity_entries_in_both_inputs_act_as_absent(chunk_size):
    """Vocabulary padding masked to -inf in both models is simply not there."""
    student = STUDENT.clone()
    teacher = TEACHER.clone()
    student[..., 5:] = -math.inf
    teacher[..., 5:] = -math.inf
    leaf = student.requires_grad_(True)
    for beta in (0.0, 0.3, 1.0):
        rows = generalized_jsd(leaf, teacher, beta=beta, clip=0.05, reduction="none", chunk_size=chunk_size)
        expected = generalized_jsd(STUDENT[..., :5], TEACHER[..., :5], beta=beta, clip=0.05, reduction="none")
        torch.testing.assert_close(rows, expected)
        leaf.grad = None
        rows.sum().backward()
        assert torch.isfinite(leaf.grad).all() and torch.count_nonzero(leaf.grad[..., 5:]) == 0


def test_capped_terms_pass_no_gradient():
    student = torch.tensor([[8.0, -8.0, 0.0]], dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor([[-8.0, 8.0, 0.0]], dtype=torch.float64)
    for chunk_size in (None, 1):
        for clip_mode, clip in (("token", 1e-6), ("entry", 1e-9)):
            student.grad = None
            generalized_jsd(student, teacher, clip=clip, clip_mode=clip_mode, chunk_size=chunk_size).backward()
            assert torch.count_nonzero(student.grad) == 0, (chunk_size, clip_mode)


def test_teacher_is_detached_even_when_it_requires_grad():
    student = STUDENT.clone().requires_grad_(True)
    teacher = TEACHER.clone().requires_grad_(True)
    (generalized_jsd(student, teacher, chunk_size=1) + kl_divergence(student, teacher)).backward()
    assert teacher.grad is None and student.grad is not None


# ------------------------------------------------------------ plain and chunked paths
def test_small_inputs_take_the_plain_path_and_large_ones_the_chunked_path(monkeypatch):
    student = STUDENT.clone().requires_grad_(True)
    plain = generalized_jsd(student, TEACHER, top_k=3, clip=0.05)
    assert not _uses_chunked_path(plain)
    assert _uses_chunked_path(generalized_jsd(student, TEACHER, top_k=3, clip=0.05, chunk_size=4))
    monkeypatch.setattr(functional, "_BLOCK_ELEMENTS", 10)
    automatic = generalized_jsd(student, TEACHER, top_k=3, clip=0.05)
    assert _uses_chunked_path(automatic)
    torch.testing.assert_close(automatic, plain)


def test_recomputed_top_k_supports_equal_stored_ones(monkeypatch):
    student = STUDENT.double().requires_grad_(True)
    grads = []
    for budget in (_chunked._STORED_SUPPORT_ELEMENTS, 0):
        monkeypatch.setattr(_chunked, "_STORED_SUPPORT_ELEMENTS", budget)
        student.grad = None
        generalized_jsd(student, TEACHER.double(), top_k=3, chunk_size=2).backward()
        grads.append(student.grad)
    assert torch.equal(grads[0], grads[1])


def test_chunked_path_saves_only_its_inputs_for_backward():
    """No (N, V) float32 intermediate survives from forward to backward."""
    saved = []
    student = torch.randn(64, 50, dtype=torch.bfloat16, requires_grad=True)
    teacher = torch.randn(64, 50, dtype=torch.bfloat16)
    with torch.autograd.graph.saved_tensors_hooks(lambda tensor: saved.append(tensor) or tensor, lambda tensor: tensor):
        generalized_jsd(student, teacher, chunk_size=8).backward()
    big = [tensor for tensor in saved if tensor.numel() >= student.numel()]
    assert all(tensor.dtype == torch.bfloat16 for tensor in big) and len(big) == 2


# ------------------------------------------------------------ params models
def test_jsd_params_default_to_the_papers_values():
    params = JsdParams()
    assert (params.beta, params.top_k, params.clip, params.clip_mode, params.temperature, params.chunk_size) == (
        0.5,
        256,
        0.05,
        "entry",
        1.0,
        None,
    )
    assert (KlParams().top_k, KlParams().temperature) == (None, 1.0)


@pytest.mark.parametrize(
    "model, fields, name",
    [
        (JsdParams, {"beta": 1.5}, "beta"),
        (JsdParams, {"beta": -0.1}, "beta"),
        (JsdParams, {"top_k": 0}, "top_k"),
        (JsdParams, {"clip": 0.0}, "clip"),
        (JsdParams, {"clip_mode": "row"}, "clip_mode"),
        (JsdParams, {"temperature": 0.0}, "temperature"),
        (JsdParams, {"chunk_size": 0}, "chunk_size"),
        (JsdParams, {"bta": 0.5}, "bta"),
        (JsdParams, {"beta": 0.0}, "clip_mode"),
        (JsdParams, {"beta": 1.0, "top_k": None}, "clip_mode"),
        (KlParams, {"beta": 0.5}, "beta"),
        (KlParams, {"clip": 0.05}, "clip"),
        (KlParams, {"top_k": 0}, "top_k"),
    ],
)
def test_params_reject_bad_values_naming_the_field(model, fields, name):
    with pytest.raises(pydantic.ValidationError, match=name):
        model(**fields)


@pytest.mark.parametrize("model", [JsdParams, KlParams])
def test_every_params_field_is_described(model):
    assert all(field.description for field in model.model_fields.values())


def test_params_module_does_not_import_torch():
    code = "import sys, opsd_core.divergences.params; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# ------------------------------------------------------------ registered classes
def test_classes_bind_their_params_to_the_functions():
    mask = torch.tensor([[True, False, True], [True, True, True]])
    params = JsdParams(beta=0.3, top_k=4, clip=0.02, clip_mode="token", temperature=2.0, chunk_size=1)
    expected = generalized_jsd(
        STUDENT, TEACHER, beta=0.3, top_k=4, clip=0.02, clip_mode="token", temperature=2.0, mask=mask, reduction="none"
    )
    torch.testing.assert_close(JsdDivergence(params).per_token(STUDENT, TEACHER, mask), expected)
    kl = KlParams(top_k=3, temperature=0.5)
    for cls, direction in ((ForwardKlDivergence, "forward"), (ReverseKlDivergence, "reverse")):
        expected = kl_divergence(STUDENT, TEACHER, direction=direction, top_k=3, temperature=0.5, mask=mask, reduction="none")
        torch.testing.assert_close(cls(kl).per_token(STUDENT, TEACHER, mask), expected)


def test_a_top_k_above_the_vocabulary_means_the_whole_vocabulary():
    rows = JsdDivergence(JsdParams(top_k=256, clip=None)).per_token(STUDENT, TEACHER)
    torch.testing.assert_close(rows, generalized_jsd(STUDENT, TEACHER, reduction="none"))


def test_registered_names_resolve_to_these_classes():
    from opsd_core.plugins import build_plugin_manager, fill_registries

    registry = fill_registries(build_plugin_manager({"OPSD_LOAD_PLUGINS": ""})).divergence
    for name, cls, params in (
        ("jsd", JsdDivergence, JsdParams),
        ("kl", ForwardKlDivergence, KlParams),
        ("reverse-kl", ReverseKlDivergence, KlParams),
    ):
        entry = registry.get(name)
        assert entry.resolve() is cls and entry.params is params


class TestBuiltinDivergencesHonourTheContract(DivergenceContract):
    @pytest.fixture(
        params=[
            JsdDivergence(),
            JsdDivergence(JsdParams(top_k=3)),
            JsdDivergence(JsdParams(top_k=4, clip=0.01, clip_mode="token", temperature=2.0, chunk_size=1)),
            JsdDivergence(JsdParams(beta=0.0, clip=None)),
            JsdDivergence(JsdParams(beta=1.0, top_k=5, clip=None, chunk_size=2)),
            ForwardKlDivergence(),
            ReverseKlDivergence(KlParams(top_k=4, chunk_size=2)),
        ],
        ids=["jsd-paper", "jsd-top3", "jsd-token-chunked", "jsd-beta0", "jsd-beta1-chunked", "kl", "reverse-kl-top4"],
    )
    def divergence(self, request):
        return request.param

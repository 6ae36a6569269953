"""The fused top-K JSD on a model FSDP shards over 2 CPU processes (gloo) equals it unsharded.

The fused loss multiplies the final hidden states by the whole ``lm_head`` weight outside the
model's forward methods, where FSDP holds only each rank's rows of it. Here the debug flavour
in float64 computes one micro-batch's fused loss (student and a perturbed teacher, the teacher's
top-K support, the paper's entry clip) and its backward: each of the 2 processes takes one of
the 2 samples, the single process both. The loss summed over ranks and every gradient of the
student (the ``lm_head``'s included, gathered whole) must equal the single-process ones: to
float64 rounding on CPU (gloo), and on CUDA (``pytest -m gpu``: 2 GPUs through NCCL, or both
processes on one GPU through gloo) with bf16 mixed
precision and fp32 master weights within the bf16 tolerance of ``tests/gpu/test_fused_jsd_gpu.py``
(the single process runs the same fp32 weights under bf16 autocast, as a one-GPU run does).
Then whole training runs with the fused loss (3 OPSD steps of the comparison harness, FSDP with
activation checkpointing, and HSDP: replicate 2 x shard 1) must give the single-process run's
metrics and weights on CPU.

The 2-process run executes this file as a torchrun script (``test_fused_fsdp.py OUT DEVICE``):
workers cannot import a test module collected by pytest.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from opsd_core.api import CompletionBatch, Problem
from opsd_core.testing import fsdp
from opsd_core.testing.trainer import Ranks, process_group
from opsd_thinkmorph.backend import ThinkMorphBackend
from opsd_thinkmorph.config import ThinkMorphParams

SAMPLES = 2
COMPLETIONS = [[11, 12, 13, 14, 15], [21, 22, 23]]
# device -> (master weights' dtype, run.precision, mixed precision of FSDP)
SETTINGS = {"cpu": (torch.float64, "fp32"), "cuda": (torch.float32, "bf16")}


def debug_backend() -> ThinkMorphBackend:
    return ThinkMorphBackend(
        ThinkMorphParams(flavour="debug", generation=False, vit_max_size=56, vit_min_size=28, vae_max_size=64, vae_min_size=32)
    )


def models(backend: ThinkMorphBackend, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The student (in ``device``'s master dtype) and a teacher a seeded perturbation away from it."""
    student = backend.build_model().to(device, SETTINGS[device.type][0]).requires_grad_(True)
    teacher = copy.deepcopy(student).requires_grad_(False)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in teacher.parameters():
            parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return student, teacher


def samples(backend: ThinkMorphBackend, indices: range) -> tuple[list, list, CompletionBatch]:
    """Student and teacher contexts and completions of the samples ``indices``."""
    generator = torch.Generator().manual_seed(0)
    problems = [
        Problem(
            id=f"p{i}",
            image=torch.rand(3, 28, 42, generator=generator),
            question=f"which way to the goal {i}?",
            visual_thought=torch.rand(3, 42, 42, generator=generator),
        )
        for i in range(SAMPLES)
    ]
    builder = backend.context_builder()
    pairs = [builder.build(problems[i]) for i in indices]
    rows = [COMPLETIONS[i] for i in indices]
    width = max(len(row) for row in rows)
    tokens = torch.full((len(rows), width), backend.vocabulary.pad_id, dtype=torch.long)
    for row, completion in enumerate(rows):
        tokens[row, : len(completion)] = torch.tensor(completion)
    lengths = torch.tensor([len(row) for row in rows])
    sampled = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)
    batch = CompletionBatch(tokens, lengths, sampled, torch.ones(len(rows), dtype=torch.bool))
    return [p.student for p in pairs], [p.teacher for p in pairs], batch


def fused_step(backend, student, teacher, indices: range, samples_per_rank: int, device: torch.device) -> torch.Tensor:
    """This rank's share of the step loss, backpropagated into ``student`` (in the precision of
    a training step on ``device``)."""
    students, teachers, batch = samples(backend, indices)
    return fsdp.fused_loss_step(backend, student, teacher, (students, teachers), batch, samples_per_rank, SETTINGS[device.type][1])


@contextlib.contextmanager
def two_processes_on_one_gpu():
    """Both processes on the one CUDA device, joined through gloo (NCCL refuses two ranks on one
    GPU): the sharding, the bf16 products and the gathered ``lm_head`` are the GPU's; only the
    collectives go through host memory."""
    from torch.distributed.device_mesh import init_device_mesh

    torch.distributed.init_process_group("gloo")
    torch.cuda.set_device(0)
    try:
        mesh = init_device_mesh("cuda", (2,), mesh_dim_names=("shard",))
        yield Ranks(torch.distributed.get_rank(), 2, mesh, torch.device("cuda", 0))
    finally:
        torch.distributed.destroy_process_group()


def worker(out: Path, device: torch.device) -> None:
    """What each of the 2 torchrun processes runs: its own sample on the sharded models."""
    torch.set_num_threads(1)
    config = fsdp.comparison_config()
    one_gpu = device.type == "cuda" and torch.cuda.device_count() == 1
    with two_processes_on_one_gpu() if one_gpu else process_group(config, device) as ranks:
        backend = debug_backend()
        student, teacher = models(backend, ranks.device)
        precision = SETTINGS[device.type][1]
        settings = SimpleNamespace(run=SimpleNamespace(precision=precision), train=SimpleNamespace(activation_checkpointing=False))
        for model in (student, teacher):
            backend.parallelize(model, ranks.mesh, settings)
        assert type(student.language_model.lm_head.weight).__name__ == "DTensor"
        loss = fused_step(backend, student, teacher, range(ranks.rank, ranks.rank + 1), 1, ranks.device)
        torch.distributed.all_reduce(loss)
        gradients = fsdp.whole_gradients(student)
        if ranks.is_main:
            torch.save({"loss": (loss / ranks.world_size).cpu(), "gradients": gradients}, out / "sharded.pt")
        if device.type == "cpu":
            training = fsdp.comparison_config(activation_checkpointing=True)
            fsdp.train_straight(debug_backend, out / "fused-fsdp", ranks, training, divergence=fsdp.fused_jsd())
            hsdp = fsdp.comparison_config(replicate=2)
            with process_group(hsdp, device) as hsdp_ranks:
                assert hsdp_ranks.mesh.ndim == 2
                fsdp.train_straight(debug_backend, out / "fused-hsdp", hsdp_ranks, hsdp, divergence=fsdp.fused_jsd())


def single_and_sharded(out: Path, device: torch.device) -> tuple[dict, dict]:
    """(the single process's loss and gradients, the 2 processes')."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        backend = debug_backend()
        student, teacher = models(backend, device)
        loss = fused_step(backend, student, teacher, range(SAMPLES), SAMPLES, device)
        single = {"loss": loss.cpu(), "gradients": fsdp.whole_gradients(student)}
        if device.type == "cpu":
            fsdp.train_straight(debug_backend, out / "fused-single", Ranks(), fsdp.comparison_config(), divergence=fsdp.fused_jsd())
    finally:
        torch.set_num_threads(threads)
    fsdp.run_torchrun(__file__, out, device.type)
    sharded = torch.load(out / "sharded.pt", weights_only=True)
    assert sharded["gradients"].keys() == single["gradients"].keys()
    assert "language_model.lm_head.weight" in single["gradients"]
    return single, sharded


@pytest.fixture(scope="module")
def on_cpu(tmp_path_factory) -> tuple[Path, dict, dict]:
    out = tmp_path_factory.mktemp("fused")
    return (out, *single_and_sharded(out, torch.device("cpu")))


@pytest.mark.multiprocess
def test_fused_loss_and_gradients_on_a_sharded_lm_head_equal_the_unsharded_ones(on_cpu):
    _, single, sharded = on_cpu
    torch.testing.assert_close(sharded["loss"], single["loss"], rtol=1e-12, atol=0)
    for name, gradient in single["gradients"].items():
        torch.testing.assert_close(sharded["gradients"][name], gradient, rtol=1e-9, atol=1e-13, msg=name)


@pytest.mark.multiprocess
@pytest.mark.parametrize("variant", ["fused-fsdp", "fused-hsdp"])
def test_training_with_the_fused_loss_in_two_processes_equals_one(on_cpu, variant):
    out, _, _ = on_cpu
    fsdp.assert_same_run(out / "fused-single", out / variant, build_backend=debug_backend)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_loss_on_two_gpus_in_bf16_stays_within_the_bf16_tolerance(tmp_path):
    """On 2 or more GPUs the processes use NCCL, one GPU each; on one GPU both share it through
    gloo (:func:`two_processes_on_one_gpu`)."""
    single, sharded = single_and_sharded(tmp_path, torch.device("cuda"))
    torch.testing.assert_close(sharded["loss"], single["loss"], rtol=2e-2, atol=1e-3)
    for name, gradient in single["gradients"].items():
        # bf16 products summed in another order: each gradient within 2e-2 of its own norm.
        error = (sharded["gradients"][name].double() - gradient.double()).norm()
        assert error <= 2e-2 * gradient.double().norm() + 1e-6, (name, float(error), float(gradient.norm()))


if __name__ == "__main__":
    worker(Path(sys.argv[1]), torch.device(sys.argv[2]))

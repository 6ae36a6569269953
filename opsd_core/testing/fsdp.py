"""A harness for backend authors: OPSD trained in several processes (torchrun, FSDP2) must equal
the same steps trained in one.

Owns: an endless seeded task with stored visual thoughts (no data files, no drawing), the run
config of such comparisons, a trainer sampling at temperature 1 (each problem's draws are keyed
by its place in the problem stream, so completions do not depend on how a step's problems are
split over ranks), straight training and training resumed from a
straight run's checkpoint,
launching a worker script under torchrun, the comparisons of per-step metrics and final
student and teacher weights, and one fused-loss step with the whole gradients it leaves (for
comparing a sharded ``lm_head`` with an unsharded one).
Does not know: any backend; the caller passes a function that builds one.

Use from a plugin's test module, which doubles as the torchrun script (workers cannot import a
module collected by pytest)::

    from opsd_core.testing import fsdp

    @pytest.fixture(scope="module")
    def runs(tmp_path_factory):
        return fsdp.single_and_sharded_runs(__file__, my_backend, tmp_path_factory.mktemp("fsdp"))

    def test_two_processes_equal_one(runs):
        fsdp.assert_same_run(runs / "single", runs / "fsdp")

    def test_resumed_run_equals_the_uninterrupted_one(runs):
        fsdp.assert_identical_runs(runs / "fsdp", runs / "fsdp-resumed")

    if __name__ == "__main__":
        fsdp.fsdp_worker(my_backend, Path(sys.argv[1]))
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from opsd_core.config import RunConfig
from opsd_core.interfaces import Backend, Divergence, Task
from opsd_core.rundir import METRICS, MetricsLog
from opsd_core.types import Problem, Score

STEPS = 3
LR = 1e-3
ADAM_EPS = 1e-6
"""Adam divides by sqrt(v) + eps, so a gradient that is float noise in both runs (summed in
another order over ranks) still moves a weight by up to lr * noise / eps; eps = 1e-6 (not the
paper's 1e-15) keeps that far below a real fault, which moves weights by about lr."""
WEIGHT_RTOL, WEIGHT_ATOL = 1e-5, LR / 500
"""Final weights: a lost or double-counted sample, or an EMA of the wrong weights, moves
weights by about lr = 1e-3, 500 times the absolute tolerance."""
METRIC_RTOL, METRIC_ATOL = 1e-4, 1e-7
"""Per-step metrics: step 1 agrees to about 1e-6, later steps carry the reduction-order noise;
a wrong loss scale or sample split is off by tens of percent. abs covers the 8 decimals
metrics.jsonl keeps and float32 rounding of near-zero KLs: a KL of 2e-4 between two nearly
equal distributions over the vocabulary comes out of float32 log-softmaxes to about 1e-7."""


class SeededProblems(Task):
    """Endless seeded problems, each with a stored visual thought, in no data files.

    Args:
        image_sides: (height, width) of the problem images, cycled over the stream.
        visual_thought_side: side of the square stored visual thoughts.
    """

    def __init__(self, image_sides: Sequence[tuple[int, int]] = ((28, 42), (42, 42), (56, 42)), visual_thought_side: int = 42):
        self.image_sides, self.visual_thought_side = list(image_sides), visual_thought_side

    def train_problems(self, seed: int, start: int = 0):
        index = start
        while True:
            generator = torch.Generator().manual_seed(seed * 100_003 + index)
            height, width = self.image_sides[index % len(self.image_sides)]
            side = self.visual_thought_side
            yield Problem(
                id=f"p{index}",
                image=torch.rand(3, height, width, generator=generator),
                question=f"which way to the goal {index}?",
                visual_thought=torch.rand(3, side, side, generator=generator),
            )
            index += 1

    def eval_problems(self, limit: int | None = None):
        return []

    def score(self, problem: Problem, response: str) -> Score:
        return Score(correct=False, value=0.0)


def comparison_config(steps: int = STEPS, max_completion_tokens: int = 6, **train: Any) -> RunConfig:
    """2 problems a step, no accumulation, a checkpoint every 2 steps (the last 2 kept), every
    step logged; ``train``
    overrides fields of the train section (e.g. ``activation_checkpointing=True``, ``replicate=2``)."""
    return RunConfig.model_validate(
        {
            "train": {"samples_per_step": 2, "grad_accum": 1, "checkpoint_every": 2, "keep_checkpoints": 2, "log_every": 1, **train},
            "schedule": {"total_steps": steps, "warmup_steps": 1},
            "optim": {"lr": LR, "eps": ADAM_EPS},
            "sampling": {"max_completion_tokens": max_completion_tokens},
        }
    )


def make_trainer(
    build_backend: Callable[[], Backend],
    directory: Path,
    ranks: Any,
    config: RunConfig,
    task: Task | None = None,
    divergence: Divergence | None = None,
):
    """A Trainer of the backend's freshly built model, writing to ``directory``; the loss is
    ``divergence`` (default: ``jsd`` with the paper's settings, on logits)."""
    from opsd_core.components import Components
    from opsd_core.divergences.jsd import JsdDivergence
    from opsd_core.sampling import BatchedSampler
    from opsd_core.teachers.ema import EmaTeacher
    from opsd_core.trainer.trainer import Trainer

    backend = build_backend()
    student = backend.build_model().requires_grad_(True)
    directory.mkdir(parents=True, exist_ok=True)
    sampler = BatchedSampler(backend, config.sampling.temperature, config.sampling.max_completion_tokens)
    components = Components(
        config, backend, task or SeededProblems(), divergence or JsdDivergence(), EmaTeacher(), sampler, backend.context_builder()
    )
    trainer = Trainer(components, student, directory, MetricsLog(directory / METRICS), ranks=ranks)
    return trainer


def train_straight(
    build_backend: Callable[[], Backend],
    directory: Path,
    ranks: Any,
    config: RunConfig,
    task: Task | None = None,
    divergence: Divergence | None = None,
) -> None:
    """All ``schedule.total_steps`` steps in one go."""
    make_trainer(build_backend, directory, ranks, config, task, divergence).fit(progress=False)


def train_resumed(
    build_backend: Callable[[], Backend],
    straight: Path,
    directory: Path,
    ranks: Any,
    config: RunConfig,
    from_step: int = 2,
    task: Task | None = None,
) -> None:
    """Resume the run in ``straight`` from its step-``from_step`` checkpoint in ``directory``, as
    after a crash past that step: its metrics lines and that checkpoint are copied over (by the
    main rank), then a fresh trainer runs to the end. Every rank must call it."""
    import shutil

    if ranks.is_main:
        name = f"step-{from_step:07d}"
        shutil.copytree(Path(straight) / "checkpoints" / name, Path(directory) / "checkpoints" / name)
        shutil.copy2(Path(straight) / METRICS, Path(directory) / METRICS)
    ranks.barrier()
    trainer = make_trainer(build_backend, directory, ranks, config, task)
    assert trainer.resume() and trainer.step == from_step, f"no step-{from_step} checkpoint in {straight}"
    trainer.fit(progress=False)


@contextlib.contextmanager
def one_process_group() -> Iterator[Any]:
    """A gloo process group of this process alone (on a free local port) and its one-rank CPU
    mesh, for sharding a model inside a test; destroyed on exit."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def run_torchrun(script: str | Path, *arguments: str | Path, nproc: int = 2, timeout: float = 300) -> None:
    """Run ``script arguments`` in ``nproc`` processes with torchrun (one torch thread each);
    fail with the end of its output when any process fails."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        str(script), *map(str, arguments),
    ]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout, env=environment)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


def fsdp_worker(build_backend: Callable[[], Backend], out: Path) -> None:
    """The standard worker: in the process group torchrun started, a straight FSDP run with
    activation checkpointing (``out/fsdp``) and the same run resumed from its step-2
    checkpoint (``out/fsdp-resumed``)."""
    from opsd_core import runtime

    torch.set_num_threads(1)
    config = comparison_config(activation_checkpointing=True)
    with runtime.process_group(config, torch.device("cpu")) as ranks:
        assert ranks.world_size > 1, "run under torchrun with several processes"
        train_straight(build_backend, out / "fsdp", ranks, config)
        train_resumed(build_backend, out / "fsdp", out / "fsdp-resumed", ranks, config, from_step=2)


def single_and_sharded_runs(script: str | Path, build_backend: Callable[[], Backend], out: Path, nproc: int = 2) -> Path:
    """The single-process run in ``out/single`` (one torch thread, as each worker has), then
    ``script out`` under torchrun (a script whose workers call e.g. :func:`fsdp_worker`);
    returns ``out``."""
    from opsd_core import runtime

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_straight(build_backend, Path(out) / "single", runtime.Ranks(), comparison_config())
    finally:
        torch.set_num_threads(threads)
    run_torchrun(script, out, nproc=nproc)
    return Path(out)


# ---------------------------------------------------------------------------------------- one fused-loss step
def fused_jsd(top_k: int = 16) -> Divergence:
    """``jsd`` with the paper's beta and clip over the teacher's top ``top_k``, computed from
    final hidden states and the lm_head weight (``fused = true``)."""
    from opsd_core.divergences.jsd import JsdDivergence
    from opsd_core.divergences.params import JsdParams

    return JsdDivergence(JsdParams(top_k=top_k, fused=True))


def fused_loss_step(
    backend: Backend,
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    contexts: tuple[Sequence[Any], Sequence[Any]],
    completions: Any,
    samples_per_rank: int,
    precision: str = "fp32",
    top_k: int = 16,
) -> torch.Tensor:
    """This rank's share of one micro-batch's fused top-K JSD (the paper's beta and clip), as
    the trainer computes it, backpropagated into ``student``; returns the detached loss.

    Args:
        contexts: (student contexts, teacher contexts) of this rank's samples.
        completions: their ``CompletionBatch``.
        samples_per_rank: the samples of the step on this rank (the loss's divisor).
        precision: ``run.precision`` of the forwards ("fp32" or "bf16").
    """
    from opsd_core.runtime import autocast
    from opsd_core.trainer.loss import micro_batch_loss

    device = next(student.parameters()).device
    divergence = fused_jsd(top_k)
    students, teachers = contexts
    with torch.no_grad(), autocast(device, precision):
        teacher_rows = backend.completion_hidden(teacher, teachers, completions)
    with autocast(device, precision):
        student_rows = backend.completion_hidden(student, students, completions)
        per_row = divergence.per_token_hidden(
            student_rows.hidden, teacher_rows.hidden, student_rows.weight, student_rows.mask, teacher_weight=teacher_rows.weight
        )
    loss = micro_batch_loss(per_row, student_rows.mask, samples_per_rank)
    loss.backward()
    return loss.detach()


def whole_gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's gradient by name, whole (gathered where FSDP shards it), on the CPU."""
    from torch.distributed.tensor import DTensor

    return {
        name: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).detach().cpu().clone()
        for name, p in model.named_parameters()
        if p.grad is not None
    }


# ---------------------------------------------------------------------------------------- reading runs
def step_metrics(directory: Path, steps: int = STEPS) -> list[dict[str, float]]:
    """Every step's numeric metrics from ``metrics.jsonl`` (timings and peak memory left out); checks that steps
    1..``steps`` were each logged once, all in the OPSD phase."""
    lines = MetricsLog(Path(directory) / METRICS).read()
    assert [line["step"] for line in lines] == list(range(1, steps + 1)), [line["step"] for line in lines]
    assert all(line["phase"] == "opsd" for line in lines)
    return [
        {
            key: value
            for key, value in line.items()
            if not key.endswith("_s") and key != "peak_memory_gb" and not isinstance(value, str)
        }
        for line in lines
    ]


def final_weights(
    directory: Path,
    name: str,
    steps: int = STEPS,
    weights: str = "model.safetensors",
    build_backend: Callable[[], Backend] | None = None,
) -> dict[str, torch.Tensor]:
    """The ``name`` (student or teacher) weights saved at the last step's checkpoint.

    A multi-process checkpoint's part of ``sharded/`` is keyed by the model's own parameter
    names. A single-process checkpoint is loaded through ``build_backend``'s model
    (:func:`~opsd_core.trainer.checkpoint.load_model`: whole, or trainable tensors over the
    start), giving the same names; without it, it is read as saved: the trainable tensors only
    when the student had frozen parameters (``trainable.safetensors``), else the backend's
    ``weights`` file.
    """
    from opsd_core.state_dicts import read_safetensors
    from opsd_core.trainer.checkpoint import TRAINABLE_WEIGHTS, is_sharded, load_model, read_sharded_weights

    step_dir = Path(directory) / "checkpoints" / f"step-{steps:07d}"
    if is_sharded(step_dir):
        return read_sharded_weights(step_dir, name)
    if build_backend is None:
        trainable = step_dir / name / TRAINABLE_WEIGHTS
        return read_safetensors([trainable if trainable.is_file() else step_dir / name / weights])
    backend = build_backend()
    model = backend.build_model()
    load_model(backend, model, step_dir, name)
    return {key: value.detach().cpu() for key, value in model.state_dict().items()}


def assert_same_run(
    expected: Path,
    actual: Path,
    steps: int = STEPS,
    metric_rtol: float = METRIC_RTOL,
    metric_atol: float = METRIC_ATOL,
    weight_rtol: float = WEIGHT_RTOL,
    weight_atol: float = WEIGHT_ATOL,
    weights: str = "model.safetensors",
    build_backend: Callable[[], Backend] | None = None,
) -> None:
    """Per-step metrics and final student and teacher weights of two runs agree within tolerance.
    Pass ``build_backend`` when one run has a single-process and the other a multi-process
    checkpoint (see :func:`final_weights`)."""
    import pytest

    for step, (want, got) in enumerate(zip(step_metrics(expected, steps), step_metrics(actual, steps)), start=1):
        assert got.keys() == want.keys(), step
        assert got == pytest.approx(want, rel=metric_rtol, abs=metric_atol), f"step {step}"
    for name in ("student", "teacher"):
        want = final_weights(expected, name, steps, weights, build_backend)
        got = final_weights(actual, name, steps, weights, build_backend)
        assert want.keys() == got.keys(), name
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=weight_rtol, atol=weight_atol, msg=f"{name} {key}")


def assert_identical_runs(
    expected: Path,
    actual: Path,
    steps: int = STEPS,
    weights: str = "model.safetensors",
    build_backend: Callable[[], Backend] | None = None,
) -> None:
    """Per-step metrics and final weights of two runs are equal bit for bit (``build_backend``
    as for :func:`assert_same_run`)."""
    assert step_metrics(actual, steps) == step_metrics(expected, steps)
    for name in ("student", "teacher"):
        want = final_weights(expected, name, steps, weights, build_backend)
        got = final_weights(actual, name, steps, weights, build_backend)
        assert want.keys() == got.keys(), name
        for key in want:
            assert torch.equal(got[key], want[key]), f"{name} {key}"

"""FSDP2 training of the debug flavour in 2 CPU processes (gloo) equals the single-process run.

The comparison harness of :mod:`opsd_core.testing.fsdp`: same config, sampling at temperature
1 (completions do not depend on how a step's problems are split over ranks), 3 OPSD steps of 2
problems each: per-step metrics (loss, gradient norm, KL, ...)
and the final student and EMA teacher weights must match the single-process run, for FSDP
(with activation checkpointing) and for HSDP (replicate 2 x shard 1). Checkpoints change the
number of processes both ways: the 2-process run's sharded step-2 checkpoint resumed in one
process, and the single-process run's step-2 checkpoint resumed in two, each equal to the
uninterrupted single-process run within the same tolerance; the 2-process run resumed in 2
processes equals the uninterrupted one bit for bit; a sharded checkpoint of other models, and
a step that the processes cannot split, are refused before anything is loaded. Two quick tests
check the parallelize module's pieces in one process.

The 2-process runs execute this file as a torchrun script (``test_fsdp.py OUT``): workers
cannot import a test module collected by pytest. The tolerances are explained in the harness.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

from opsd_core.api import CheckpointError, ConfigError
from opsd_core.testing import fsdp
from opsd_core.testing.trainer import Ranks, process_group
from opsd_thinkmorph.backend import ThinkMorphBackend
from opsd_thinkmorph.config import ThinkMorphParams
from opsd_thinkmorph.parallelize import checkpoint_forward, mixed_precision_policy

STEPS = fsdp.STEPS


def debug_backend() -> ThinkMorphBackend:
    return ThinkMorphBackend(
        ThinkMorphParams(flavour="debug", generation=False, vit_max_size=56, vit_min_size=28, vae_max_size=64, vae_min_size=32)
    )


def worker(out: Path) -> None:
    """What each of the 2 torchrun processes runs."""
    torch.set_num_threads(1)
    config = fsdp.comparison_config(activation_checkpointing=True)
    with process_group(config, torch.device("cpu")) as ranks:
        fsdp.train_straight(debug_backend, out / "fsdp", ranks, config)
        fsdp.train_resumed(debug_backend, out / "fsdp", out / "fsdp-resumed", ranks, config, from_step=2)
        fsdp.train_resumed(debug_backend, out / "single", out / "one-to-two", ranks, config, from_step=2)
        try:  # 3 problems a step cannot be split over 2 processes: refused before the checkpoint is read
            fsdp.make_trainer(debug_backend, out / "fsdp", ranks, fsdp.comparison_config(samples_per_step=3)).resume()
        except ConfigError as error:
            if ranks.is_main:
                (out / "odd-split.txt").write_text(str(error))
        hsdp = fsdp.comparison_config(replicate=2)
        with process_group(hsdp, torch.device("cpu")) as hsdp_ranks:
            assert hsdp_ranks.mesh.ndim == 2
            fsdp.train_straight(debug_backend, out / "hsdp", hsdp_ranks, hsdp)


# ---------------------------------------------------------------------------------------------- the tests
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread, as each worker has: several threads on tiny matmuls crawl on busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    fsdp.train_straight(debug_backend, out / "single", Ranks(), fsdp.comparison_config())
    fsdp.run_torchrun(__file__, out)
    return out


@pytest.mark.multiprocess
@pytest.mark.parametrize("variant", ["fsdp", "hsdp"])
def test_two_processes_equal_one(runs, variant):
    fsdp.assert_same_run(runs / "single", runs / variant, build_backend=debug_backend)


@pytest.mark.multiprocess
def test_resumed_two_process_run_equals_the_uninterrupted_one(runs):
    fsdp.assert_identical_runs(runs / "fsdp", runs / "fsdp-resumed")


@pytest.mark.multiprocess
def test_a_one_process_checkpoint_resumed_in_two_equals_the_uninterrupted_run(runs):
    fsdp.assert_same_run(runs / "single", runs / "one-to-two", build_backend=debug_backend)


@pytest.mark.multiprocess
def test_a_two_process_checkpoint_resumed_in_one_equals_the_uninterrupted_run(runs, tmp_path):
    fsdp.train_resumed(debug_backend, runs / "fsdp", tmp_path / "two-to-one", Ranks(), fsdp.comparison_config())
    fsdp.assert_same_run(runs / "single", tmp_path / "two-to-one", build_backend=debug_backend)


@pytest.mark.multiprocess
def test_a_sharded_checkpoint_of_other_models_is_refused(runs, tmp_path):
    shutil.copytree(runs / "fsdp" / "checkpoints", tmp_path / "checkpoints")
    before = sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))

    def wider_backend() -> ThinkMorphBackend:
        return ThinkMorphBackend(ThinkMorphParams(flavour="debug", generation=True))

    trainer = fsdp.make_trainer(wider_backend, tmp_path, Ranks(), fsdp.comparison_config())
    with pytest.raises(CheckpointError) as info:
        trainer.resume()
    message = str(info.value)
    assert "\n" not in message and "holds other models than this run builds" in message, message
    assert sorted((p.relative_to(tmp_path), p.stat().st_mtime_ns) for p in tmp_path.rglob("*")) == before


@pytest.mark.multiprocess
def test_a_resume_on_processes_that_cannot_split_the_step_is_refused_in_one_line(runs):
    message = (runs / "odd-split.txt").read_text()
    assert message == (
        "train.samples_per_step: 3 cannot be split evenly over 2 processes (got 3); use a multiple of 2"
    )


@pytest.mark.multiprocess
def test_a_two_process_checkpoint_resumes_in_one_process(runs, tmp_path):
    shutil.copytree(runs / "fsdp" / "checkpoints", tmp_path / "checkpoints")
    trainer = fsdp.make_trainer(debug_backend, tmp_path, Ranks(), fsdp.comparison_config())
    assert trainer.resume() and trainer.step == STEPS
    saved = fsdp.final_weights(runs / "fsdp", "student")  # sharded: whole models, frozen tensors too
    frozen = {name for name, parameter in trainer.student.named_parameters() if not parameter.requires_grad}
    assert frozen and saved.keys() == trainer.student.state_dict().keys()
    for key, value in trainer.student.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert trainer.optimizer.state and trainer.scheduler.last_epoch == STEPS
    assert trainer.train_step()["loss"] > 0


def test_bf16_mixed_precision_is_refused_on_cpu():
    with pytest.raises(ConfigError, match="run.precision: 'bf16' in a multi-process run needs CUDA devices.*use 'fp32' on CPU"):
        mixed_precision_policy("bf16", "cpu")
    assert mixed_precision_policy("fp32", "cpu").param_dtype is None


def test_activation_checkpointing_keeps_names_outputs_and_gradients():
    backend = ThinkMorphBackend(ThinkMorphParams(flavour="debug", generation=False))
    plain, recomputed = backend.build_model(), backend.build_model()
    for layer in recomputed.language_model.model.layers:
        checkpoint_forward(layer)
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in recomputed.named_parameters()]
    tokens = torch.arange(10).view(2, 5)
    positions = torch.arange(5).expand(2, 5)
    mask = torch.ones(2, 5, 5, dtype=torch.bool).tril()
    for model in (plain, recomputed):
        model.llm_forward(model.input_embeddings(tokens), positions, mask).square().sum().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), recomputed.named_parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, msg=name)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))

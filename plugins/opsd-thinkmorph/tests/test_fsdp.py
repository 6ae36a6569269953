"""FSDP2 training of the debug flavour in 2 CPU processes (gloo) equals the single-process run.

The comparison harness of :mod:`opsd_core.testing.fsdp`: same config, sampling at temperature
1 (completions do not depend on how a step's problems are split over ranks), 3 OPSD steps of 2
problems each: per-step metrics (loss, gradient norm, KL, ...)
and the final student and EMA teacher weights must match the single-process run, for FSDP
(with activation checkpointing) and for HSDP (replicate 2 x shard 1); the 2-process run
resumed from its step-2 checkpoint must equal the uninterrupted one bit for bit; and a
2-process checkpoint must resume in a single process. Two quick tests check the parallelize
module's pieces in one process.

The 2-process runs execute this file as a torchrun script (``test_fsdp.py OUT``): workers
cannot import a test module collected by pytest. The tolerances are explained in the harness.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

from opsd_core.api import ConfigError
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
    fsdp.assert_same_run(runs / "single", runs / variant)


@pytest.mark.multiprocess
def test_resumed_two_process_run_equals_the_uninterrupted_one(runs):
    fsdp.assert_identical_runs(runs / "fsdp", runs / "fsdp-resumed")


@pytest.mark.multiprocess
def test_a_two_process_checkpoint_resumes_in_one_process(runs, tmp_path):
    shutil.copytree(runs / "fsdp" / "checkpoints", tmp_path / "checkpoints")
    trainer = fsdp.make_trainer(debug_backend, tmp_path, Ranks(), fsdp.comparison_config())
    assert trainer.resume() and trainer.step == STEPS
    saved = fsdp.final_weights(runs / "fsdp", "student")  # trainable tensors: the generation twins are frozen
    frozen = {name for name, parameter in trainer.student.named_parameters() if not parameter.requires_grad}
    assert frozen and saved.keys() == trainer.student.state_dict().keys() - frozen
    for key, value in trainer.student.state_dict().items():
        assert torch.equal(value, saved[key]) if key in saved else key in frozen, key
    assert trainer.optimizer.state and trainer.scheduler.last_epoch == STEPS
    assert trainer.train_step()["loss"] > 0


def test_bf16_mixed_precision_is_refused_on_cpu():
    with pytest.raises(ConfigError, match="train.mixed_precision: 'bf16' needs CUDA devices.*use 'none' on CPU"):
        mixed_precision_policy("bf16", "cpu")
    assert mixed_precision_policy("none", "cpu").param_dtype is None


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

"""The trainable set, activation checkpointing and optimizer-state offload in one-process runs,
on the embedded tiny UMM: each saves memory without changing a single update."""

import json
from pathlib import Path

import pytest
import torch

from opsd_core.components import build_components, check_components
from opsd_core.config import load_config
from opsd_core.errors import CheckpointError, ConfigError
from opsd_core.rundir import MetricsLog
from opsd_core.state_dicts import read_safetensors
from opsd_core.trainer import offload, trainable
from opsd_core.trainer.checkpoint import START_RECORD, TRAINABLE_WEIGHTS, check_start, load_model, path_sha256
from opsd_core.trainer.trainer import Trainer

QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "quickstart.toml"
SMALL = [
    "train.samples_per_step=2",
    "train.grad_accum=1",
    "schedule.total_steps=3",
    "schedule.warmup_steps=1",
    "train.checkpoint_every=2",
    "train.log_every=1",
    "sampling.max_completion_tokens=8",
]
FROZEN = ["token_embedding.weight", "blocks.0.attention.weight"]


def _setup(tmp_path, *overrides, name="run", frozen=None, chunk_bytes=None):
    config = load_config(QUICKSTART, [*SMALL, *overrides])
    components = build_components(config)
    if frozen is not None:
        components.backend.frozen_parameters = lambda model: list(frozen)
    torch.manual_seed(0)
    student = components.backend.build_model()
    trainer = Trainer(components, student, tmp_path / name, MetricsLog(tmp_path / f"{name}-metrics.jsonl"))
    if chunk_bytes is not None:
        trainer.state_offload.chunk_bytes = chunk_bytes
    return trainer


def _frozen_names(trainer):
    names = [name for name, _ in trainer.student.named_parameters()]
    return [name for name in names if name.startswith(("token_embedding.", "blocks.0."))]


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    expected = b.state_dict()
    for key, value in a.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_frozen_parameters_get_no_update_no_optimizer_state_and_are_shared(tmp_path):
    probe = _setup(tmp_path, name="probe")
    frozen = _frozen_names(probe)
    trainer = _setup(tmp_path, frozen=frozen)
    before = {name: p.detach().clone() for name, p in trainer.student.named_parameters()}
    trainer.train_step()
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    teacher = dict(trainer.teacher.named_parameters())
    for name, parameter in trainer.student.named_parameters():
        is_frozen = name in frozen
        assert parameter.requires_grad != is_frozen and (id(parameter) in optimized) != is_frozen
        assert (teacher[name] is parameter) == is_frozen
        if is_frozen:
            assert torch.equal(parameter, before[name])
    counts = trainer.parameter_counts
    assert counts.frozen == sum(p.numel() for n, p in trainer.student.named_parameters() if n in frozen) > 0
    assert counts.trainable + counts.frozen == sum(p.numel() for p in trainer.student.parameters())
    assert "trainable" in counts.describe() and "frozen" in counts.describe()


def test_the_student_shares_the_start_models_frozen_tensors(tmp_path):
    trainer = _setup(tmp_path)
    backend = trainer.backend
    start = backend.build_model().requires_grad_(False)
    frozen = _frozen_names(trainer)
    backend.frozen_parameters = lambda model: frozen
    student = trainable.student_from_start(backend, start)
    start_parameters = dict(start.named_parameters())
    for name, parameter in student.named_parameters():
        assert (parameter is start_parameters[name]) == (name in frozen)
        assert parameter.requires_grad == (name not in frozen)
    assert not any(p.requires_grad for p in start.parameters())


def test_a_frozen_name_the_model_lacks_is_refused(tmp_path):
    with pytest.raises(ValueError, match="frozen_parameters names parameters the model does not have"):
        _setup(tmp_path, frozen=["no.such.weight"])


def test_activation_checkpointing_in_one_process_changes_no_update(tmp_path):
    plain = _setup(tmp_path, name="plain")
    recomputed = _setup(tmp_path, "train.activation_checkpointing=true", name="recomputed")
    assert all(hasattr(block.forward, "__wrapped__") for block in recomputed.student.blocks)
    assert all(not hasattr(block.forward, "__wrapped__") for block in recomputed.teacher.blocks)
    for _ in range(2):
        assert plain.train_step()["loss"] == recomputed.train_step()["loss"]
    _assert_same_weights(recomputed.student, plain.student)


def test_activation_checkpointing_needs_layers_named_by_the_backend(tmp_path):
    config = load_config(QUICKSTART, [*SMALL, "train.activation_checkpointing=true"])
    components = build_components(config)
    components.backend.recomputed_layers = lambda model: []
    with pytest.raises(ConfigError, match="train.activation_checkpointing: backend .* names no layers"):
        Trainer(components, components.backend.build_model(), tmp_path, MetricsLog(tmp_path / "m.jsonl"))


def test_optimizer_offload_gives_the_same_updates_in_chunks_and_resumes(tmp_path):
    plain = _setup(tmp_path, name="plain")
    offloaded = _setup(tmp_path, "train.optimizer_offload=true", name="offloaded", chunk_bytes=4096)
    assert len(offloaded.state_offload._chunks(list(offloaded.student.parameters()))) > 3
    for _ in range(2):
        plain.train_step()
        offloaded.train_step()
    _assert_same_weights(offloaded.student, plain.student)
    _assert_same_weights(offloaded.teacher, plain.teacher)
    states = [value for state in offloaded.optimizer.state.values() for value in state.values()]
    assert states and all(value.device.type == "cpu" for value in states)
    assert all(p.grad is not None for p in offloaded.student.parameters())  # hidden only during the step

    # Round trip: a checkpoint of the offloaded run resumes into a fresh one, states back on the host.
    offloaded.save()
    resumed = _setup(tmp_path, "train.optimizer_offload=true", name="offloaded", chunk_bytes=4096)
    assert resumed.resume() and resumed.step == 2
    saved, loaded = offloaded.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    for index, state in saved.items():
        for key, value in state.items():
            assert torch.equal(loaded[index][key], value) and loaded[index][key].device.type == "cpu"
    plain.train_step()
    resumed.train_step()
    _assert_same_weights(resumed.student, plain.student)


def test_offload_without_enough_host_memory_is_refused_in_one_line():
    parameters = [torch.zeros(1024, 1024)]
    assert offload.check_host_memory(parameters, available=1 << 30) == 2 * 4 * 1024 * 1024
    with pytest.raises(ConfigError) as error:
        offload.check_host_memory(parameters, available=1 << 20)
    message = str(error.value)
    assert message.startswith("train.optimizer_offload: the AdamW states need 8.0 MiB of host memory, 1.0 MiB is available")
    assert "\n" not in message


def test_offload_is_refused_in_multi_process_runs():
    config = load_config(QUICKSTART, [*SMALL, "train.optimizer_offload=true"])
    components = build_components(config)
    with pytest.raises(ConfigError, match="train.optimizer_offload = true .* 2 processes"):
        check_components(components, world_size=2)


def test_a_checkpoint_of_a_partly_frozen_student_keeps_trainable_tensors_and_names_its_start(tmp_path):
    probe = _setup(tmp_path, name="probe")
    frozen = _frozen_names(probe)
    trainer = _setup(tmp_path, frozen=frozen)
    trainer.train_step()
    directory = trainer.save()
    saved = read_safetensors([directory / "student" / TRAINABLE_WEIGHTS])
    assert saved.keys() == trainer.student.state_dict().keys() - set(frozen)
    assert sorted(path.name for path in (directory / "teacher").iterdir()) == [TRAINABLE_WEIGHTS]
    record = json.loads((directory / START_RECORD).read_text())
    start = trainer.backend.start_checkpoint()
    assert record["frozen"] == sorted(frozen) and record["path"] == str(start.resolve())
    assert record["sha256"] == path_sha256(start) and record["backend"]["name"] == "tiny-umm"

    # What `opsd eval --checkpoint` loads: the start model with the trainable tensors over it.
    model = trainer.backend.build_model()
    load_model(trainer.backend, model, directory)
    _assert_same_weights(model, trainer.student)

    resumed = _setup(tmp_path, frozen=frozen)
    assert resumed.resume() and resumed.step == 1
    _assert_same_weights(resumed.student, trainer.student)
    _assert_same_weights(resumed.teacher, trainer.teacher)
    assert trainer.train_step()["loss"] == resumed.train_step()["loss"]
    _assert_same_weights(resumed.student, trainer.student)


def test_a_partial_checkpoint_refuses_another_start(tmp_path):
    probe = _setup(tmp_path, name="probe")
    trainer = _setup(tmp_path, frozen=_frozen_names(probe))
    trainer.train_step()
    directory = trainer.save()
    record = json.loads((directory / START_RECORD).read_text())
    with pytest.raises(CheckpointError, match="keeps only trainable tensors; its frozen ones are those of the start"):
        check_start(directory, directory / "student")
    assert check_start(directory, trainer.backend.start_checkpoint()) == record


def test_opsd_run_refuses_offload_without_host_memory_in_one_line_and_writes_nothing(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from opsd_core.cli import cli

    monkeypatch.setattr(offload, "available_host_bytes", lambda: 1024)
    arguments = ["--set", f"run.output_dir='{tmp_path}'", "--set", "train.optimizer_offload=true"]
    result = CliRunner().invoke(cli, ["run", str(QUICKSTART), "--no-progress", *arguments])
    assert result.exit_code != 0
    errors = [line for line in result.output.splitlines() if "train.optimizer_offload" in line]
    assert len(errors) == 1 and "of host memory, 1.0 KiB is available" in errors[0], result.output
    assert not (tmp_path / "quickstart").exists()

"""LoRA through ``[backend.lora]`` on the embedded tiny UMM: only adapters train, the frozen base
is shared, a LoRA student samples and scores as the same model with its adapters merged, the
merged state dict is the plain model's layout, and bad targets stop a run before it writes."""

import copy
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from opsd_core import lora
from opsd_core.cli import cli
from opsd_core.components import build_components
from opsd_core.config import load_config
from opsd_core.errors import ConfigError
from opsd_core.rundir import MetricsLog
from opsd_core.testing.lora import (
    adapted_layers,
    check_lora_matches_merged,
    randomise_adapters,
)
from opsd_core.trainer.trainer import Trainer

pytest.importorskip("peft")

QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "quickstart.toml"
SMALL = [
    "train.samples_per_step=4",
    "train.grad_accum=1",
    "schedule.total_steps=2",
    "schedule.warmup_steps=1",
    "sampling.max_completion_tokens=12",
]
LORA = ['backend.lora.target_modules=["qkv", "out", "mlp.2"]', "backend.lora.rank=4", "backend.lora.alpha=8"]


def _trainer(tmp_path, *overrides):
    config = load_config(QUICKSTART, [*SMALL, *LORA, *overrides])
    components = build_components(config)
    start = components.backend.build_model().requires_grad_(False)
    student = lora.base_sharing_copy(start)
    return Trainer(components, student, tmp_path / "run", MetricsLog(tmp_path / "metrics.jsonl")), start


def test_only_adapters_train_and_the_base_is_shared_with_start_and_teacher(tmp_path):
    trainer, start = _trainer(tmp_path, "optim.lr=1e-2")
    trainable = [name for name, p in trainer.student.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in name for name in trainable)
    assert len(trainable) == 2 * 3 * start.config.n_layers  # A and B of qkv, out, mlp.2 per block
    start_before = {name: p.clone() for name, p in start.named_parameters()}
    teacher_before = lora.adapter_state_dict(trainer.teacher)
    teacher_before = {name: t.clone() for name, t in teacher_before.items()}
    trainer.train_step()
    for name, parameter in start.named_parameters():
        assert torch.equal(parameter, start_before[name]), name
    student, teacher = dict(trainer.student.named_parameters()), dict(trainer.teacher.named_parameters())
    base = "blocks.0.qkv.base_layer.weight"
    assert student[base] is teacher[base] is dict(start.named_parameters())["blocks.0.qkv.weight"]
    decay = trainer.teacher_update.decay
    for name, old in teacher_before.items():  # the EMA follows the adapters, in fp32
        expected = decay * old + (1 - decay) * student[name].detach()
        torch.testing.assert_close(teacher[name], expected, rtol=0, atol=1e-7)
    assert any(not torch.equal(teacher[name], old) for name, old in teacher_before.items())


def test_a_lora_student_samples_and_scores_as_its_merged_model():
    components = build_components(load_config(QUICKSTART, SMALL))
    stream = components.task.train_problems(0)
    problems = [next(stream) for _ in range(4)]
    targets = ["qkv", "out", "mlp.0", "mlp.2", "lm_head", "token_embedding", "patch_projection"]
    check_lora_matches_merged(components.backend, {"target_modules": targets, "rank": 4}, problems, max_tokens=12)


def test_the_merged_state_dict_is_the_plain_models_layout(tmp_path):
    trainer, start = _trainer(tmp_path)
    randomise_adapters(trainer.student)
    merged = lora.merged_state_dict(trainer.student)
    assert merged.keys() == start.state_dict().keys()
    in_place = lora.merge_adapters(copy.deepcopy(trainer.student)).state_dict()
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, in_place[name], rtol=0, atol=1e-6)
    assert not torch.equal(merged["blocks.0.qkv.weight"], start.blocks[0].qkv.weight)
    assert torch.equal(merged["lm_head.weight"], start.lm_head.weight)
    fresh = trainer.backend.build_model()
    fresh.load_state_dict(merged)  # what export writes loads into the backend's own model
    lora.save_adapters(trainer.student, tmp_path / "adapters")
    reloaded = lora.load_merged(trainer.backend.build_model(), trainer.lora, tmp_path / "adapters")
    for name, tensor in reloaded.state_dict().items():
        torch.testing.assert_close(tensor, merged[name], rtol=0, atol=1e-6)


def test_a_target_that_matches_nothing_is_one_error_naming_it_and_real_layers(tmp_path):
    with pytest.raises(ConfigError) as raised:
        _trainer(tmp_path, 'backend.lora.target_modules=["q_proj"]')
    message = str(raised.value)
    assert "'q_proj'" in message and "backend.lora.target_modules" in message and "'qkv'" in message
    assert "\n" not in message


def test_lora_on_the_fused_losss_lm_head_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"'lm_head'.*divergence.fused = true"):
        _trainer(tmp_path, 'backend.lora.target_modules=["lm_head"]', "divergence.fused=true")
    _trainer(tmp_path, 'backend.lora.target_modules=["lm_head"]')  # logits through the module: adapter-aware
    _trainer(tmp_path, "divergence.fused=true")  # the fused loss with adapters elsewhere


def test_lora_is_refused_in_multi_process_runs():
    config = load_config(QUICKSTART, LORA)
    with pytest.raises(ConfigError, match="backend.lora trains adapters in one process"):
        build_components(config, world_size=2)


def test_opsd_run_with_a_bad_target_writes_nothing(tmp_path):
    result = CliRunner().invoke(
        cli,
        [
            "run", str(QUICKSTART), "--no-progress",
            "--set", f"run.output_dir='{tmp_path}'",
            "--set", 'backend.lora.target_modules=["attention"]',
        ],
    )  # fmt: skip
    assert result.exit_code != 0
    assert "'attention' matches no Linear, Embedding or Conv layer" in result.output
    assert not any(tmp_path.iterdir())


def test_opsd_run_with_lora_then_eval_of_its_checkpoint(tmp_path):
    short = [
        "--set", f"run.output_dir='{tmp_path}'",
        "--set", "schedule.total_steps=2",
        "--set", "schedule.warmup_steps=1",
        "--set", "train.samples_per_step=4",
        "--set", "train.checkpoint_every=1",
        "--set", "eval.limit=8",
        "--set", "diagnostics.kl_samples=4",
        "--set", "experiment.noise_control=false",
        "--set", "optim.lr=1e-2",
        *[argument for override in LORA for argument in ("--set", override)],
    ]  # fmt: skip
    result = CliRunner().invoke(cli, ["run", str(QUICKSTART), "--no-progress", *short])
    assert result.exit_code == 0, result.output
    directory = tmp_path / "quickstart"
    checkpoint = directory / "opsd" / "checkpoints" / "step-0000002"
    assert sorted(path.name for path in (checkpoint / "teacher").iterdir()) == ["adapters.safetensors"]
    evaluated = CliRunner().invoke(
        cli, ["eval", str(directory / "config.toml"), "--checkpoint", str(checkpoint), "--contexts", "student"]
    )
    assert evaluated.exit_code == 0, evaluated.output
    summary = json.loads(evaluated.output)[0]
    results = json.loads((directory / "results.json").read_text())
    assert summary["accuracy"] == results["opsd"]["eval"]["student"]["accuracy"]


def test_targets_by_last_parts_and_by_pattern(tmp_path):
    model = build_components(load_config(QUICKSTART, SMALL)).backend.build_model()
    assert adapted_layers(model, {"target_modules": ["blocks.0.*"]}) == [
        "blocks.0.mlp.0", "blocks.0.mlp.2", "blocks.0.out", "blocks.0.qkv"
    ]  # fmt: skip
    assert adapted_layers(model, {"target_modules": ["mlp.2", "lm_head"]}) == [
        *(f"blocks.{i}.mlp.2" for i in range(model.config.n_layers)), "lm_head"
    ]  # fmt: skip


def test_a_lora_checkpoint_names_its_start_and_refuses_another(tmp_path, monkeypatch):
    from opsd_core.config import lora_settings
    from opsd_core.errors import CheckpointError
    from opsd_core.trainer.checkpoint import START_RECORD, load_model, path_sha256

    trainer, start_model = _trainer(tmp_path, "optim.lr=1e-2")
    trainer.train_step()
    directory = trainer.save()
    record = json.loads((directory / START_RECORD).read_text())
    start = trainer.backend.start_checkpoint()
    assert record["path"] == str(start.resolve()) and record["sha256"] == path_sha256(start)
    assert record["frozen"] == sorted(n for n, p in trainer.student.named_parameters() if not p.requires_grad)
    assert len(record["frozen"]) == len(list(start_model.parameters()))  # the whole base, under adapters

    # What `opsd eval --checkpoint` and `opsd export` load: the start model, adapters merged.
    adapters = lora_settings(trainer.config)
    model = trainer.backend.build_model()
    load_model(trainer.backend, model, directory, adapters=adapters)
    merged = lora.merged_state_dict(trainer.student)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, merged[name], rtol=0, atol=1e-6)

    # Without the run's LoRA settings the adapters cannot be placed: said, not a key mismatch.
    with pytest.raises(CheckpointError, match="holds LoRA adapters"):
        load_model(trainer.backend, trainer.backend.build_model(), directory)

    # Another start model: refused in one line, on loading and on resuming.
    other = trainer.backend.build_model()
    monkeypatch.setattr(type(trainer.backend), "start_checkpoint", lambda self: directory / "student")
    with pytest.raises(CheckpointError, match="keeps only trainable tensors; its frozen ones are those of the start"):
        load_model(trainer.backend, other, directory, adapters=adapters)
    resumed, _ = _trainer(tmp_path, "optim.lr=1e-2")
    with pytest.raises(CheckpointError, match="keeps only trainable tensors; its frozen ones are those of the start"):
        resumed.resume()

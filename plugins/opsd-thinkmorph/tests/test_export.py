"""`opsd export` of a debug-flavour run into the released ThinkMorph layout.

A run of 2 OPSD steps of the debug flavour with its generation modules (the comparison
harness's seeded problems with stored visual thoughts)
writes its step-2 checkpoint under ``RUN/opsd/checkpoints/`` next to the run's ``config.toml``;
the export of its student (bf16, then fp32, then in shards) is read back by our loader of the
released layout and must equal the trained weights (bf16-rounded for bf16), with the tensor
names of the official-layout fixture. Bad requests (a corrupt or incomplete checkpoint, a
non-empty output folder, an unknown model) fail with one line and write nothing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from opsd_core.api import state_dicts
from opsd_core.testing import fsdp
from opsd_core.testing.cli import cli
from opsd_core.testing.trainer import Ranks
from opsd_thinkmorph import state_dict
from opsd_thinkmorph.architecture import BagelConfig
from opsd_thinkmorph.backend import ThinkMorphBackend
from opsd_thinkmorph.config import ThinkMorphParams

FIXTURE = Path(__file__).parent / "fixtures" / "thinkmorph-tiny"
SIZES = {"vit_max_size": 56, "vit_min_size": 28, "vae_max_size": 64, "vae_min_size": 32}
STEP = "step-0000002"


def debug_backend() -> ThinkMorphBackend:
    return ThinkMorphBackend(ThinkMorphParams(flavour="debug", **SIZES))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run directory: config.toml and the opsd phase's step-2 checkpoint."""
    run = tmp_path_factory.mktemp("export") / "run"
    run.mkdir()
    backend = "\n".join(f"{key} = {value}" for key, value in SIZES.items())
    (run / "config.toml").write_text(f'[backend]\nname = "thinkmorph"\nflavour = "debug"\n{backend}\n')
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fsdp.train_straight(debug_backend, run / "opsd", Ranks(), fsdp.comparison_config(steps=2))
    finally:
        torch.set_num_threads(threads)
    return run


def export(*arguments: str):
    return CliRunner().invoke(cli, ["export", *arguments])


def trained(run: Path, model: str = "student") -> dict[str, torch.Tensor]:
    """The checkpoint's whole ``model``: its trainable tensors over the run's start model."""
    from opsd_core.testing.runs import FinishedRun

    return FinishedRun(run, "").checkpoint_model(debug_backend(), name=model).state_dict()


def loaded_back(directory: Path) -> dict[str, torch.Tensor]:
    """The export read by our loader of the released layout into a fresh fp32 debug model."""
    model = debug_backend().build_model()
    state_dict.load_into(model, directory, "ema")
    return model.state_dict()


@pytest.mark.parametrize(("dtype", "torch_dtype"), [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_the_export_loads_back_as_the_trained_weights(run, tmp_path, dtype, torch_dtype):
    out = tmp_path / "exported"
    result = export(str(run / "opsd" / "checkpoints" / STEP), "--out", str(out), "--dtype", dtype)
    assert result.exit_code == 0, result.output
    names = {path.name for path in out.iterdir()}
    assert {"ema.safetensors", "llm_config.json", "vit_config.json", "ae.safetensors"} <= names
    assert "model.safetensors" not in names
    assert BagelConfig.from_directory(out) == debug_backend().config
    with safe_open(str(out / "ema.safetensors"), "pt") as handle:
        assert {handle.get_slice(key).get_dtype() for key in handle.keys()} == {"BF16" if dtype == "bf16" else "F32"}  # noqa: SIM118
    expected = trained(run)
    assert any(not torch.equal(expected[key], value) for key, value in trained(run, "teacher").items())
    for key, value in loaded_back(out).items():
        assert torch.equal(value, expected[key].to(torch_dtype).float()), key


def test_the_exported_tensor_names_are_the_released_ones(run, tmp_path):
    out = tmp_path / "exported"
    assert export(str(run / "opsd" / "checkpoints" / STEP), "--out", str(out)).exit_code == 0
    with safe_open(str(out / "ema.safetensors"), "pt") as exported, safe_open(str(FIXTURE / "ema.safetensors"), "pt") as released:
        assert set(exported.keys()) == set(released.keys())


def test_the_teacher_exports_too(run, tmp_path):
    out = tmp_path / "teacher"
    assert export(str(run / "opsd" / "checkpoints" / STEP), "--out", str(out), "--model", "teacher", "--dtype", "fp32").exit_code == 0
    expected = trained(run, "teacher")
    for key, value in loaded_back(out).items():
        assert torch.equal(value, expected[key]), key


def test_shards_with_an_index_round_trip(run, tmp_path):
    out = tmp_path / "sharded"
    result = export(str(run / "opsd" / "checkpoints" / STEP), "--out", str(out), "--dtype", "fp32", "--max-shard-size", "200KB")
    assert result.exit_code == 0, result.output
    index = json.loads((out / "ema.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (out / "ema.safetensors").exists()
    assert index["metadata"]["total_size"] == sum(value.numel() * 4 for value in trained(run).values())
    for shard in shards:
        tensors = state_dicts.read_safetensors([out / shard])
        assert sum(value.numel() * 4 for value in tensors.values()) <= 200_000 or len(tensors) == 1
    expected = trained(run)
    for key, value in loaded_back(out).items():
        assert torch.equal(value, expected[key]), key


def test_a_corrupt_or_incomplete_checkpoint_is_refused_and_nothing_written(run, tmp_path):
    broken = tmp_path / "run"
    shutil.copytree(run, broken)
    checkpoint = broken / "opsd" / "checkpoints" / STEP
    weights = next((checkpoint / "student").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8] + b"\x00" * 8)
    result = export(str(checkpoint), "--out", str(tmp_path / "out"))
    assert result.exit_code != 0 and "is corrupt (checksum mismatch)" in result.output
    assert len(result.output.strip().splitlines()) == 1
    (checkpoint / "manifest.json").unlink()
    result = export(str(checkpoint), "--out", str(tmp_path / "out"))
    assert result.exit_code != 0 and "has no manifest.json" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_non_empty_output_folder_an_unknown_model_and_a_bad_size_are_refused(run, tmp_path):
    checkpoint = str(run / "opsd" / "checkpoints" / STEP)
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    result = export(checkpoint, "--out", str(full))
    assert result.exit_code != 0 and "is not empty" in result.output
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    result = export(checkpoint, "--out", str(tmp_path / "out"), "--model", "ema")
    assert result.exit_code != 0 and "'ema' is not one of 'student', 'teacher'" in result.output
    result = export(checkpoint, "--out", str(tmp_path / "out"), "--max-shard-size", "lots")
    assert result.exit_code != 0 and "is not a size" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]


def test_a_checkpoint_outside_its_run_needs_the_config(run, tmp_path):
    moved = tmp_path / STEP
    shutil.copytree(run / "opsd" / "checkpoints" / STEP, moved)
    result = export(str(moved), "--out", str(tmp_path / "out"))
    assert result.exit_code != 0 and "pass the run's config with --config" in result.output
    result = export(str(moved), "--out", str(tmp_path / "out"), "--config", str(run / "config.toml"), "--set", "backend.vit_attention='sdpa'")
    assert result.exit_code == 0, result.output


def test_a_sharded_checkpoint_exports_the_same(run, tmp_path):
    """The checkpoint in the form a multi-process run writes (``sharded/``: the student and the
    teacher by ``torch.distributed.checkpoint``) instead of ``student/`` and ``teacher/``."""
    import hashlib

    import torch.distributed.checkpoint as dcp

    converted = tmp_path / "run"
    shutil.copytree(run, converted)
    checkpoint = converted / "opsd" / "checkpoints" / STEP
    state = {f"{role}.{key}": value for role in ("student", "teacher") for key, value in trained(run, role).items()}
    for role in ("student", "teacher"):
        shutil.rmtree(checkpoint / role)
    (checkpoint / "start.json").unlink()  # the shards hold whole models
    dcp.save(state, checkpoint_id=str(checkpoint / "sharded"), no_dist=True)
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["files"] = {
        str(path.relative_to(checkpoint)): {"bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        for path in sorted(checkpoint.rglob("*"))
        if path.is_file() and path.name != "manifest.json"
    }
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "exported"
    result = export(str(checkpoint), "--out", str(out), "--dtype", "fp32")
    assert result.exit_code == 0, result.output
    expected = trained(run)
    for key, value in loaded_back(out).items():
        assert torch.equal(value, expected[key]), key


def test_a_lora_run_exports_its_adapters_merged(tmp_path):
    """A LoRA checkpoint holds adapters only; the export is the start model with them merged."""
    pytest.importorskip("peft", reason="the opsd-core[lora] extra (the dev install has it)")
    from opsd_core.api import RunConfig

    settings = {"target_modules": ["q_proj", "v_proj", "connector.fc1"], "rank": 4}
    config = RunConfig.model_validate(
        {**fsdp.comparison_config(steps=2).model_dump(), "backend": {"name": "thinkmorph", "lora": settings}}
    )
    run = tmp_path / "run"
    backend = "\n".join(f"{key} = {value}" for key, value in SIZES.items())
    run.mkdir()
    (run / "config.toml").write_text(
        f'[backend]\nname = "thinkmorph"\nflavour = "debug"\ndecode_kernels = false\n{backend}\n'
        '[backend.lora]\ntarget_modules = ["q_proj", "v_proj", "connector.fc1"]\nrank = 4\n'
    )

    def build() -> ThinkMorphBackend:
        return ThinkMorphBackend(ThinkMorphParams(flavour="debug", decode_kernels=False, **SIZES))

    fsdp.train_straight(build, run / "opsd", Ranks(), config)
    checkpoint = run / "opsd" / "checkpoints" / STEP
    assert (checkpoint / "student" / "adapters.safetensors").is_file()
    out = tmp_path / "exported"
    result = export(str(checkpoint), "--out", str(out), "--dtype", "fp32")
    assert result.exit_code == 0, result.output
    trainer = fsdp.make_trainer(build, tmp_path / "resumed", Ranks(), config)
    shutil.copytree(run / "opsd" / "checkpoints", tmp_path / "resumed" / "checkpoints")
    assert trainer.resume()
    from opsd_core.testing.lora import merged_state_dict

    expected = merged_state_dict(trainer.student)
    exported = loaded_back(out)
    assert any(not torch.equal(exported[key], build().build_model().state_dict()[key]) for key in exported)
    for key, value in exported.items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6, msg=key)

"""``opsd plan`` on the embedded default, its bad input, and ``opsd run`` refusing a run the
planner says cannot fit the GPU (the GPU's free memory is stood in for on a CPU)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from opsd_core import memory_census
from opsd_core.cli import cli

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
QUICKSTART = str(EXAMPLES / "quickstart.toml")


def test_plan_prints_every_term_and_the_verdict():
    result = CliRunner().invoke(cli, ["plan", QUICKSTART, "--gpu-memory", "80", "--host-memory", "64"])
    assert result.exit_code == 0, result.output
    for term in (
        "parameters: 855,040 (855,040 trainable, 0 frozen), 4 bytes each",
        "weights", "gradients", "optimizer state", "teacher", "start model", "activations without / with checkpointing",
        "sampler KV cache", "per host (1 GPU)", "of 80.00 GiB", "fits: yes",
    ):  # fmt: skip
        assert term in result.output, term


def _gib(output: str, term: str) -> float:
    return float(re.search(rf"^\s+{re.escape(term)}\s+([\d.]+) GiB", output, re.MULTILINE).group(1))


def test_plan_counts_the_full_thinkmorph_on_its_skeleton_and_shards_it_over_several_gpus():
    pytest.importorskip("opsd_thinkmorph", reason="the thinkmorph plugin")

    def planned(gpus: int) -> str:
        arguments = ["plan", str(EXAMPLES / "thinkmorph-debug.toml"), "--set", "backend.flavour='7b-random'",
                     "--set", "train.samples_per_step=8", "--gpus", str(gpus), "--gpu-memory", "80",
                     "--host-memory", "1024"]  # fmt: skip
        result = CliRunner().invoke(cli, arguments)
        assert result.exit_code == 0, result.output
        return result.output

    one, eight = planned(1), planned(8)
    # The generation expert, time embedder and latent connectors get no gradient in OPSD: frozen.
    assert "parameters: 14,575,018,464 (8,035,157,408 trainable, 6,539,861,056 frozen), 4 bytes each" in one
    assert re.search(r"language_model \(generation expert\)\s+6,525,628,928", one)
    assert "per GPU (8 processes, sharded over 8)" in eight
    for term in ("weights", "gradients", "optimizer state"):
        assert abs(_gib(one, term) / 8 - _gib(eight, term)) < 0.01, term
    # One process shares the frozen weights of start, student and teacher; sharded runs do not.
    assert _gib(one, "teacher") == _gib(one, "start model") == _gib(one, "gradients")
    assert _gib(eight, "start model") == 0 and _gib(eight, "start model (parked)") == _gib(one, "weights")
    assert "No combination of the memory savers fits (tried: train.activation_checkpointing = true, train.optimizer_offload = true, run.precision = 'bf16'); it fits on 4 GPUs" in one
    assert "fits: yes" in eight  # frozen generation expert: 8 GPUs fit without a switch


def test_plan_says_when_a_run_does_not_fit():
    result = CliRunner().invoke(cli, ["plan", QUICKSTART, "--gpu-memory", "0.001"])
    assert result.exit_code == 0, result.output
    assert "fits: no (needs" in result.output
    assert "it needs a GPU with more memory or a smaller model" in result.output  # tiny-umm cannot shard


def test_plan_refuses_several_gpus_for_a_backend_that_cannot_shard():
    result = CliRunner().invoke(cli, ["plan", QUICKSTART, "--gpus", "2"])
    assert result.exit_code == 2
    assert "trains on one device only" in result.output


@pytest.mark.parametrize(
    ("arguments", "option"),
    [
        (["--gpus", "0"], "--gpus"),
        (["--gpus", "-2"], "--gpus"),
        (["--gpus", "two"], "--gpus"),
        (["--gpu-memory", "0"], "--gpu-memory"),
        (["--gpu-memory", "-80"], "--gpu-memory"),
        (["--gpu-memory", "nan"], "--gpu-memory"),
        (["--gpu-memory", "lots"], "--gpu-memory"),
        (["--host-memory", "inf"], "--host-memory"),
        (["--host-memory", "0"], "--host-memory"),
    ],
)
def test_bad_gpu_counts_and_memory_sizes_are_one_line_each_and_write_nothing(tmp_path, monkeypatch, arguments, option):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["plan", QUICKSTART, *arguments])
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and option in errors[0], result.output
    assert list(tmp_path.iterdir()) == []


def test_run_refuses_a_run_that_cannot_fit_before_building_the_model(tmp_path, monkeypatch):
    monkeypatch.setattr(memory_census, "gpu_memory", lambda device: 1024)
    built = []
    from opsd_core.trainer import sharding

    monkeypatch.setattr(sharding, "build_start", lambda *args: built.append(args))
    result = CliRunner().invoke(cli, ["run", QUICKSTART, "--set", f"run.output_dir='{tmp_path}'"])
    assert result.exit_code == 1
    error = result.output.strip().splitlines()[-1]
    assert "this run needs about" in error and "Options: a GPU with more memory, more GPUs or a smaller model" in error
    assert "--skip-memory-check" in error and "opsd plan" in error
    assert not built
    assert list(tmp_path.iterdir()) == []


def test_skip_memory_check_runs_anyway(tmp_path, monkeypatch):
    monkeypatch.setattr(memory_census, "gpu_memory", lambda device: 1024)
    from opsd_core.errors import OpsdError
    from opsd_core.trainer import sharding

    def build_start(*args):
        raise OpsdError("the model would be built now")

    monkeypatch.setattr(sharding, "build_start", build_start)
    result = CliRunner().invoke(
        cli, ["run", QUICKSTART, "--skip-memory-check", "--set", f"run.output_dir='{tmp_path}'"]
    )
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == "Error: the model would be built now"


def test_the_workers_of_a_multi_process_run_get_the_flag():
    from opsd_core.cli.run import _run_arguments

    assert _run_arguments("c.toml", (), None, False, False, True) == ["run", "c.toml", "--skip-memory-check"]
    assert "--skip-memory-check" not in _run_arguments("c.toml", (), None, False, False, False)

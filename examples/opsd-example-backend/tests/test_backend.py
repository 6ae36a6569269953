"""The example backend honours opsd's Backend contract, is found through its entry point, and
runs the whole pipeline with ``opsd run``."""

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from opsd_example_backend import vocab
from opsd_example_backend.backend import ByteBackend
from opsd_example_backend.config import ByteUMMParams

from opsd_core.api import CheckpointError, ConfigError, Problem, RunConfig, load_config
from opsd_core.testing.trainer import build_components
from opsd_core.testing.backend_contract import check_backend_contract

RUN_CONFIG = Path(__file__).resolve().parents[1] / "byte-umm.toml"
SHORT_RUN = [
    "--set", "schedule.total_steps=2",
    "--set", "schedule.warmup_steps=1",
    "--set", "train.samples_per_step=2",
    "--set", "train.checkpoint_every=0",
    "--set", "sampling.max_completion_tokens=6",
    "--set", "eval.limit=2",
    "--set", "diagnostics.kl_samples=2",
    "--set", "experiment.noise_control=false",
]


def problems(count=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        Problem(
            id=f"p{index}",
            image=torch.rand(3, 20, 20, generator=generator),
            question="Which way? " * (index + 1),
            visual_thought=torch.rand(3, 24, 24, generator=generator),
        )
        for index in range(count)
    ]


def small_params(**changes):
    return ByteUMMParams(**{"d_model": 32, "n_layers": 2, "n_heads": 2, "max_positions": 512, **changes})


def test_the_backend_contract(tmp_path):
    check_backend_contract(ByteBackend(small_params()), problems(), tmp_path)


def test_the_contract_holds_for_another_image_grid(tmp_path):
    check_backend_contract(ByteBackend(small_params(image_size=8, patch_size=2)), problems(2, seed=1), tmp_path)


def test_text_round_trips_through_bytes():
    backend = ByteBackend(small_params())
    text = "R c7 D c12 — déjà vu"
    assert backend.decode(backend.encode(text)) == text
    assert backend.decode([*backend.encode("ab"), vocab.EOS, vocab.PAD, vocab.ANSWER]) == "ab"
    assert backend.vocabulary.valid_size == vocab.EOS + 1 and backend.vocabulary.size == vocab.VOCAB_SIZE


def test_same_seed_same_weights_other_seed_other_weights():
    first, again = (ByteBackend(small_params(seed=3)).build_model() for _ in range(2))
    other = ByteBackend(small_params(seed=4)).build_model()
    torch.manual_seed(123)  # the global RNG plays no part
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    assert not torch.equal(first.lm_head.weight, other.lm_head.weight)


def test_a_checkpoint_directory_fixes_the_architecture(tmp_path):
    trained = ByteBackend(small_params(seed=5))
    model = trained.build_model()
    trained.save_pretrained(model, tmp_path / "saved")
    loaded = ByteBackend(ByteUMMParams(checkpoint=str(tmp_path / "saved"), d_model=128, n_heads=4)).build_model()
    assert loaded.config == model.config
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_a_missing_checkpoint_says_what_belongs_there(tmp_path):
    with pytest.raises(CheckpointError, match="config.json, model.safetensors missing"):
        ByteBackend(ByteUMMParams(checkpoint=str(tmp_path)))


def test_images_are_resized_and_centred():
    backend = ByteBackend(small_params(image_size=8, patch_size=4))
    pixels = backend.preprocess_image(torch.ones(3, 32, 24))
    assert pixels.shape == (3, 8, 8) and torch.allclose(pixels, torch.ones(3, 8, 8))
    with pytest.raises(ValueError, match="RGB images"):
        backend.preprocess_image(torch.ones(1, 8, 8))


def test_params_name_the_bad_field():
    with pytest.raises(ValueError, match="divisible by n_heads"):
        ByteUMMParams(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="divisible by patch_size"):
        ByteUMMParams(image_size=10, patch_size=4)


def test_check_run_refuses_what_the_model_cannot_serve():
    backend = ByteBackend(small_params())
    base = {"backend": {"name": "byte-umm"}, "task": {"name": "frozen-lake"}}
    with pytest.raises(ConfigError, match="sampling.max_forward_tokens"):
        backend.check_run(RunConfig.model_validate({**base, "sampling": {"max_forward_tokens": 513}}))
    backend.check_run(RunConfig.model_validate({**base, "sampling": {"max_forward_tokens": 512}}))


def test_runs_that_need_drawing_are_refused_because_no_drawing_is_declared():
    assert not ByteBackend.capabilities.visual_thoughts
    overrides = ["backend.name='byte-umm'", "sampling.max_forward_tokens=512", "sampling.visual_thoughts='generate'"]
    with pytest.raises(ConfigError, match="sampling.visual_thoughts"):
        build_components(load_config(None, overrides))


def test_registered_through_the_entry_point():
    from opsd_core.testing.cli import build_plugin_manager, fill_registries

    registries = fill_registries(build_plugin_manager({"OPSD_LOAD_PLUGINS": "example-backend"}))
    entry = registries.backend.get("byte-umm")
    assert entry.plugin == "example-backend"
    assert entry.resolve() is ByteBackend and entry.params is ByteUMMParams


def test_a_short_opsd_run(tmp_path):
    from opsd_core.testing.cli import cli

    result = CliRunner().invoke(
        cli, ["run", str(RUN_CONFIG), "--no-progress", "--set", f"run.output_dir='{tmp_path}'", *SHORT_RUN]
    )
    assert result.exit_code == 0, result.output
    directory = tmp_path / "byte-umm"
    steps = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    assert {line["phase"] for line in steps} == {"opsd"} and max(line["step"] for line in steps) == 2
    results = json.loads((directory / "results.json").read_text())
    assert {"start", "opsd"} <= set(results) and results["start"]["kl"] > 0
    assert (directory / "report.md").is_file()

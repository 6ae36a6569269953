"""LoRA on the thinkmorph debug flavour: adapters are exact on every decode path that calls the
layers (fixed-shape steps, one-row kernels away from the adapted layers), refused on the
layers the one-row kernels and the fused loss read directly, and a LoRA run resumes bit-exactly."""

from __future__ import annotations

import pytest
import torch
from opsd_thinkmorph.backend import ThinkMorphBackend
from opsd_thinkmorph.config import ThinkMorphParams

from opsd_core.api import FUSED_HEAD, ConfigError, Problem, RunConfig
from opsd_core.testing.fsdp import (
    assert_identical_runs,
    comparison_config,
    train_resumed,
    train_straight,
)
from opsd_core.testing.lora import adapted_layers, check_lora_matches_merged
from opsd_core.testing.trainer import Ranks

pytest.importorskip("peft")


def debug_backend(device: str = "cpu", **overrides) -> ThinkMorphBackend:
    return ThinkMorphBackend(
        ThinkMorphParams(flavour="debug", vit_max_size=56, vit_min_size=28, vae_max_size=64, vae_min_size=32, **overrides)
    ).place(device)


def problems(count: int) -> list[Problem]:
    generator = torch.Generator().manual_seed(0)
    sides = [(28, 42), (42, 28)]
    return [
        Problem(
            id=f"p{i}",
            image=torch.rand(3, *sides[i % 2], generator=generator),
            question=f"which way to the goal {i}?",
            visual_thought=torch.rand(3, 42, 42, generator=generator),
        )
        for i in range(count)
    ]

# The understanding expert's projections and the lm_head (not the ViT's q/k/v, not the generation expert's MLP).
LANGUAGE_MODEL = ["language_model.*.self_attn.[qkvo]_proj", "language_model.*.mlp.*_proj", "lm_head"]


def test_patterns_pick_the_understanding_experts_layers():
    names = adapted_layers(debug_backend().build_model(), {"target_modules": LANGUAGE_MODEL})
    layers = debug_backend().config.llm.num_layers
    assert len(names) == 7 * layers + 1
    assert not [name for name in names if "moe_gen" in name or name.startswith("vit_model")]


def test_adapters_on_the_language_model_decode_and_score_as_merged_weights():
    # Fixed-shape steps through the layers themselves, as written (no one-row kernels).
    backend = debug_backend(decode_kernels=False)
    check_lora_matches_merged(backend, {"target_modules": LANGUAGE_MODEL, "rank": 4}, problems(2), max_tokens=6)


def test_adapters_away_from_the_kernels_keep_one_row_kernel_decoding_exact():
    # One row: the one-row kernels decode; the adapters sit on the ViT, its connector and the
    # generation expert, which those kernels do not read.
    targets = ["connector.fc1", "mlp.fc2", "q_proj_moe_gen"]
    check_lora_matches_merged(debug_backend(), {"target_modules": targets, "rank": 4}, problems(1), max_tokens=6)


@pytest.mark.parametrize("target", ["q_proj", "down_proj", "lm_head"])
def test_adapters_on_what_the_decode_kernels_read_are_refused(target):
    with pytest.raises(ConfigError, match=rf"'{target}'.*backend.decode_kernels = true.*target_modules"):
        check_lora_matches_merged(debug_backend(), {"target_modules": [target]}, problems(1))


def test_the_fused_losss_head_is_declared():
    assert ("language_model.lm_head", FUSED_HEAD) in debug_backend(decode_kernels=False).weights_read_directly()


def test_a_lora_run_resumes_bit_exactly(tmp_path):
    settings = {"target_modules": ["q_proj", "v_proj", "down_proj", "connector.fc1"], "rank": 4, "dropout": 0.1}
    config = RunConfig.model_validate(
        {**comparison_config().model_dump(), "backend": {"name": "thinkmorph", "lora": settings}}
    )

    def build():
        return debug_backend(decode_kernels=False)

    train_straight(build, tmp_path / "straight", Ranks(), config)
    train_resumed(build, tmp_path / "straight", tmp_path / "resumed", Ranks(), config, from_step=2)
    assert_identical_runs(tmp_path / "straight", tmp_path / "resumed", weights="adapters.safetensors")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "kernels, targets, count",
    [(False, LANGUAGE_MODEL, 2), (True, ["connector.fc1", "mlp.fc2", "q_proj_moe_gen"], 1)],
    ids=["layers", "one-row-kernels"],
)
def test_on_cuda_the_captured_compiled_decode_step_runs_the_adapters(kernels, targets, count):
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:  # fixed-shape steps captured in a CUDA graph, each layer through torch.compile
        backend = debug_backend(device="cuda", decode_kernels=kernels)
        settings = {"target_modules": targets, "rank": 4}
        check_lora_matches_merged(backend, settings, problems(count), max_tokens=6, rtol=1e-4, atol=1e-5)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous

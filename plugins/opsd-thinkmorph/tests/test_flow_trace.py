"""The drawing loop step by step against BAGEL's own inference loop on the thinkmorph-tiny checkpoint.

``fixtures/make_vt_trace.py`` ran the official ``InterleaveInferencer.gen_image`` once per case
(CPU, float32) and stored its inputs, its initial noise and, per step, the timestep, whether
text guidance was on and the guided velocity, then the final latent tokens. Here the same three
contexts are prefilled through our packer and cache, and our loop runs from the same noise.
Times and guidance decisions must be identical; velocities and latents agree within 1e-4, the
tolerance of ``test_parity.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from opsd_thinkmorph.flow import GuidanceConfig, combine_guidance, sample_visual_thought_latents
from opsd_thinkmorph.packing import LatentItem, TextItem, ViTItem
from opsd_thinkmorph.vae import latents_to_tokens
from opsd_thinkmorph.visual_thought import FrozenContext
from safetensors import safe_open
from safetensors.torch import load_file

# The parity tests' checkpoint loader, imported by name (the suite runs in importlib mode).
sys.path.insert(0, str(Path(__file__).parent))
from test_parity import FIXTURE, SPECIAL, build_model

TRACE = FIXTURE / "vt_trace.safetensors"
CASES: dict[str, dict] = json.loads(safe_open(str(TRACE), "pt").metadata()["cases"])
ATOL = RTOL = 1e-4


@pytest.fixture(scope="module")
def model():
    return build_model(generation=True)


@pytest.fixture(scope="module")
def trace() -> dict[str, torch.Tensor]:
    return load_file(str(TRACE))


def _contexts(
    model, case: dict[str, torch.Tensor], with_reasoning: bool
) -> tuple[dict[str, FrozenContext], tuple[int, int]]:
    """The official inferencer's three contexts for [system, image, question(, reasoning)]."""
    latent = case["input.vae_latent"]  # (1, 16, 2h, 2w)
    grid = (latent.shape[2] // 2, latent.shape[3] // 2)
    system, question = (TextItem(case["input.system"].tolist()), TextItem(case["input.question"].tolist()))
    clean = LatentItem(latents_to_tokens(latent)[0], grid, 0.0)
    vit = ViTItem(case["input.vit_pixels"])
    thought = [TextItem(case["input.reasoning"].tolist())] if with_reasoning else []
    rows = {
        "cond": [system, clean, vit, question, *thought],
        "text_uncond": [system, clean, vit],
        "image_uncond": [system, question],
    }
    return {branch: FrozenContext(model, [items], SPECIAL.endoftext) for branch, items in rows.items()}, grid


def _settings(settings: dict) -> GuidanceConfig:
    return GuidanceConfig(
        text_scale=settings["text_scale"],
        image_scale=settings["image_scale"],
        interval=tuple(settings["interval"]),
        renorm=settings["renorm"],
        renorm_min=settings["renorm_min"],
        num_timesteps=settings["num_timesteps"],
        shift=settings["shift"],
    )


def test_the_trace_holds_a_step_on_the_guidance_bound(trace):
    """The boundary case is really in the fixture: BAGEL leaves the step at t = float32(0.4) unguided."""
    times = trace["boundary_global.expected.timesteps"]
    guided = trace["boundary_global.expected.guided"]
    assert times[18].item() == 0.4000000059604645 and not guided[18] and guided[17]


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_drawing_loop_retraces_the_official_one(name, model, trace):
    settings = CASES[name]
    case = {key.split(".", 1)[1]: value for key, value in trace.items() if key.startswith(f"{name}.")}
    contexts, grid = _contexts(model, case, settings["reasoning"])
    config = _settings(settings)
    times, guided, velocities = [], [], []

    def velocity_fn(x, t, branches):
        out = {branch: contexts[branch].velocity(model, x, t, grid) for branch in branches}
        times.append(t)
        guided.append(branches != ("cond",))
        combined = (
            out["cond"]
            if branches == ("cond",)
            else combine_guidance(out["cond"], out["text_uncond"], out.get("image_uncond"), config)
        )
        velocities.append(combined[0])
        return out

    with torch.no_grad():
        latent = sample_visual_thought_latents(velocity_fn, case["input.noise"].unsqueeze(0), config)
    assert torch.equal(torch.tensor(times, dtype=torch.float32), case["expected.timesteps"])
    assert guided == case["expected.guided"].tolist()
    torch.testing.assert_close(torch.stack(velocities), case["expected.velocities"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(latent[0], case["expected.latent"], atol=ATOL, rtol=RTOL)

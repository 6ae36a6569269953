"""Parity with the official BAGEL code on the thinkmorph-tiny fixture.

Each case is rebuilt from its raw parts (text ids per turn, images' pixels, latent tokens)
through our packer; the packer must reproduce the official layout (RoPE ids, attention mask,
ViT patches, logit rows, labels) exactly, and the model loaded through our loader must
reproduce every expected tensor within 1e-4.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opsd_thinkmorph.architecture import BagelConfig, SpecialTokens
from opsd_thinkmorph.model import Bagel
from opsd_thinkmorph.packing import FULL, LATENT, NOISE, VIT, LatentItem, TextItem, ViTItem, pack
from opsd_thinkmorph.runtime import forward_rows
from opsd_thinkmorph.state_dict import load_into

FIXTURE = Path(__file__).parent / "fixtures" / "thinkmorph-tiny"
SPECIAL = SpecialTokens(endoftext=496, im_start=497, im_end=498, vision_start=505, vision_end=506)
CASES = ("und_single", "und_two_images", "gen_simple", "gen_interleaved")
ATOL = RTOL = 1e-4


@pytest.fixture(scope="module")
def cases() -> dict[str, dict[str, torch.Tensor]]:
    tensors = load_file(str(FIXTURE / "cases.safetensors"))
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        case, rest = key.split(".", 1)
        grouped.setdefault(case, {})[rest] = value
    return grouped


def build_model(generation: bool) -> Bagel:
    config = replace(BagelConfig.from_directory(FIXTURE, visual_gen=generation), special=SPECIAL)
    model = Bagel(config)
    load_into(model, FIXTURE)
    return model.eval()


@pytest.fixture(scope="module")
def models() -> dict[bool, Bagel]:
    return {False: build_model(False), True: build_model(True)}


def items_of(case: dict[str, torch.Tensor]) -> list:
    """The case as packer items, read from its splits, token types and raw inputs."""
    text_at = dict(zip(case["input.packed_text_indexes"].tolist(), case["input.packed_text_ids"].tolist()))
    loss_rows = set(case["input.ce_loss_indexes"].tolist()) if "input.ce_loss_indexes" in case else set()
    kinds = case["derived.token_type"]
    items, start, image, block, latent_row = [], 0, 0, 0, 0
    for length, mode in zip(case["derived.split_lens"].tolist(), case["derived.split_attn_modes"].tolist()):
        span = range(start, start + length)
        if mode == FULL and bool((kinds[start : start + length] == VIT).any()):
            items.append(ViTItem(case[f"input.vit_image_pixels.{image}"]))
            image += 1
        elif mode in (FULL, NOISE):
            h, w = case["input.patchified_vae_latent_shapes"][block].tolist()
            rows = slice(latent_row, latent_row + h * w)
            assert bool((kinds[start + 1 : start + 1 + h * w] == LATENT).all())
            t = float(case["derived.timesteps_t"][latent_row])
            items.append(LatentItem(case["derived.packed_latent_xt"][rows], (h, w), t, noisy=mode == NOISE))
            block, latent_row = block + 1, latent_row + h * w
        else:
            ids = [text_at[p] for p in span]
            assert ids[0] == SPECIAL.im_start and ids[-1] == SPECIAL.im_end
            items.append(TextItem(ids[1:-1], loss=start in loss_rows))
        start += length
    return items


@pytest.mark.parametrize("name", CASES)
def test_packer_reproduces_the_official_layout(name, cases, models):
    case = cases[name]
    model = models[name.startswith("gen")]
    rows = pack([items_of(case)], model.config)
    length = int(case["input.sequence_length"])
    assert rows.token_ids.shape == (1, length)
    assert rows.positions[0].tolist() == case["input.packed_position_ids"].tolist()
    official_mask = case["input.nested_attention_masks.0"] == 0
    assert torch.equal(rows.mask[0], official_mask)
    text_slots = case["input.packed_text_indexes"]
    assert rows.token_ids[0, text_slots].tolist() == case["input.packed_text_ids"].tolist()
    assert torch.equal(rows.images.patches, case["input.packed_vit_tokens"])
    assert rows.images.position_ids.tolist() == case["input.packed_vit_position_ids"].tolist()
    assert rows.images.seqlens == case["input.vit_token_seqlens"].tolist()
    assert torch.nonzero(rows.image_slots[0]).flatten().tolist() == case["input.packed_vit_token_indexes"].tolist()
    assert rows.logit_rows[0] == case.get("input.ce_loss_indexes", torch.empty(0)).tolist()
    assert rows.label_ids[0] == case.get("input.packed_label_ids", torch.empty(0)).tolist()
    if name.startswith("gen"):
        assert torch.nonzero(rows.latent_slots[0]).flatten().tolist() == case["input.packed_vae_token_indexes"].tolist()
        assert rows.latents.position_ids.tolist() == case["input.packed_latent_position_ids"].tolist()
        assert rows.noisy_latent_rows[0] == case["input.mse_loss_indexes"].tolist()


@pytest.mark.parametrize("name", CASES)
def test_outputs_match_the_official_code(name, cases, models):
    case = cases[name]
    model = models[name.startswith("gen")]
    rows = pack([items_of(case)], model.config)
    with torch.no_grad():
        hidden = forward_rows(model, rows)[0]  # (L, D)
        torch.testing.assert_close(hidden, case["expected.last_hidden_state"], atol=ATOL, rtol=RTOL)
        text_logits = model.lm_logits(hidden[case["input.packed_text_indexes"]])
        torch.testing.assert_close(text_logits, case["expected.text_logits"], atol=ATOL, rtol=RTOL)
        if "expected.logits" in case:
            logits = model.lm_logits(hidden[rows.logit_rows[0]])
            torch.testing.assert_close(logits, case["expected.logits"], atol=ATOL, rtol=RTOL)
            ce = torch.nn.functional.cross_entropy(logits, torch.tensor(rows.label_ids[0]), reduction="none")
            torch.testing.assert_close(ce, case["expected.ce"], atol=ATOL, rtol=RTOL)
        if "expected.velocity" in case:
            velocity = model.velocity(hidden[rows.noisy_latent_rows[0]])
            torch.testing.assert_close(velocity, case["expected.velocity"], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", CASES)
def test_intermediates_match(name, cases, models):
    """The ViT, connector and input embeddings match too (locates a mismatch when outputs differ)."""
    case = cases[name]
    model = models[name.startswith("gen")]
    rows = pack([items_of(case)], model.config)
    with torch.no_grad():
        vision = model.vit_model.vision_model(rows.images.patches, rows.images.position_ids, rows.images.seqlens)
        torch.testing.assert_close(vision, case["debug.vit_output"], atol=ATOL, rtol=RTOL)
        embeddings = model.input_embeddings(
            rows.token_ids, rows.images, rows.image_slots, rows.latents, rows.latent_slots
        )
        torch.testing.assert_close(embeddings[0], case["debug.llm_input_sequence"], atol=ATOL, rtol=RTOL)

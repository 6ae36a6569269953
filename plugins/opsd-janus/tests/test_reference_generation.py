"""Visual thoughts drawn as transformers' own Janus image generation draws them.

The reference is ``JanusForConditionalGeneration.generate(..., generation_mode="image")`` on the
same debug model: its prompts left-padded in one batch, its unconditional rows masked by
``generate`` itself, its guidance processor, and its temperature and top-k warpers. Both draw
from the same random stream: ``generate`` samples with ``torch.multinomial`` on the global
generator, ours with a ``torch.Generator`` passed in; seeded alike, they give the same numbers,
so whole token sequences are compared, for greedy and sampled drawing, one prompt and a batch of
prompts of different lengths. ``generate`` in image mode reads no pixels, so these prompts are
text only; the problem image's part is the unconditional rule, checked on its own below.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opsd_janus import context as chat
from opsd_janus import visual_thought
from opsd_janus.backend import JanusBackend, Rendered
from opsd_janus.config import JanusParams
from transformers import GenerationConfig
from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil

from opsd_core.api import Problem

PROMPTS = ("a red circle", "two squares, one inside the other, drawn in blue")


def drawing_backend(**settings) -> JanusBackend:
    return JanusBackend(JanusParams(flavour="debug", image_size=32, **settings))


@pytest.fixture(scope="module")
def model():
    return drawing_backend().build_model().eval()


def text_prompts(backend: JanusBackend, texts) -> list[Rendered]:
    ids = backend.ids
    return [Rendered(tokens=[ids["bos"], *backend.encode(chat.USER_OPEN + text + chat.ASSISTANT_OPEN), ids["image_start"]]) for text in texts]


def reference_codes(backend: JanusBackend, model, prompts: list[Rendered], seed: int) -> torch.Tensor:
    """int64 (B, N) codes from transformers' image generation, prompts left-padded."""
    ids, params = backend.ids, backend.params
    width = max(len(p.tokens) for p in prompts)
    input_ids = torch.tensor([[ids["pad"]] * (width - len(p.tokens)) + p.tokens for p in prompts])
    attention = torch.tensor([[0] * (width - len(p.tokens)) + [1] * len(p.tokens) for p in prompts])
    sampled = params.vt_temperature > 0
    settings = GenerationConfig(
        do_sample=sampled,
        temperature=params.vt_temperature if sampled else None,
        top_k=params.vt_top_k,
        top_p=None,
        guidance_scale=params.vt_guidance_scale,
        bos_token_id=ids["bos"],
        pad_token_id=ids["pad"],
        eos_token_id=ids["eos"],
        generation_kwargs={"boi_token_id": ids["image_start"]},
    )
    torch.manual_seed(seed)
    return model.generate(input_ids, attention_mask=attention, generation_mode="image", generation_config=settings)


def our_codes(backend: JanusBackend, model, prompts: list[Rendered], seed: int) -> torch.Tensor:
    rows = [*prompts, *(visual_thought.unconditional_prompt(backend, p) for p in prompts)]
    return visual_thought.draw_codes(backend, model, rows, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("settings", "count"),
    [
        ({"vt_temperature": 0.0}, 1),
        ({"vt_temperature": 0.0, "vt_guidance_scale": 2.5}, 2),
        ({"vt_temperature": 1.0}, 1),
        ({"vt_temperature": 1.0, "vt_guidance_scale": 3.0}, 2),
        ({"vt_temperature": 0.7, "vt_top_k": 8}, 2),
    ],
    ids=["greedy", "greedy-batch", "sampled", "sampled-batch", "temperature-top-k-batch"],
)
def test_drawn_codes_equal_transformers_image_generation(model, settings, count):
    backend = drawing_backend(**settings)
    prompts = text_prompts(backend, PROMPTS[:count])
    for seed in (0, 7):
        ours = our_codes(backend, model, prompts, seed)
        assert torch.equal(ours, reference_codes(backend, model, prompts, seed)), f"seed {seed}: codes differ"


def test_the_unconditional_prompt_masks_as_generate_does():
    """``generate`` pads every unconditional token that is neither BOS nor ``<begin_of_image>``,
    the problem image's own ``<begin_of_image>`` included."""
    backend = drawing_backend()
    problem = Problem(id="p", image=torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)), question="where?")
    conditional, unconditional = visual_thought.generation_prompts(backend, [problem])
    ids = torch.tensor(conditional.tokens)
    kept = (ids == backend.ids["bos"]) | (ids == backend.ids["image_start"])
    assert int(kept.sum()) == 3, "BOS, the problem image's <begin_of_image> and the final one"
    assert unconditional.tokens == ids.masked_fill(~kept, backend.ids["pad"]).tolist()
    assert unconditional.images == [] and unconditional.image_slots == []


def test_decoded_images_equal_transformers_decoding_of_the_same_codes(model):
    """Codes drawn by ``generate`` -> ``decode_image_tokens`` -> the image processor's ``postprocess``,
    fed channels first: the NumPy image processor (``JanusImageProcessorPil``, what transformers
    picks without torchvision) normalises only that layout, and refuses (H, W, 3) images."""
    backend = drawing_backend(vt_temperature=1.0)
    codes = reference_codes(backend, model, text_prompts(backend, PROMPTS), seed=3)
    ours = visual_thought.decode_codes(backend, model, codes)
    with torch.no_grad():
        decoded = model.decode_image_tokens(codes).permute(0, 3, 1, 2)  # (B, 3, H, W)
    processor = JanusImageProcessorPil(image_mean=[0.5] * 3, image_std=[0.5] * 3)
    theirs = processor.postprocess(list(decoded.float()), return_tensors="PIL.Image.Image")["pixel_values"]
    assert len(ours) == len(theirs) == len(PROMPTS)
    for mine, reference in zip(ours, theirs):
        assert mine.size == (backend.visual_thought_side,) * 2
        assert np.array_equal(np.asarray(mine), np.asarray(reference))

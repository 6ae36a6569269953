"""Visual thoughts drawn as transformers' own Emu3 image generation draws them.

The reference is ``Emu3ForConditionalGeneration.generate`` on the same debug model, set up as
transformers documents Emu3 image generation: the prompts left-padded in one batch, the
negative prompt through ``negative_prompt_ids`` and ``guidance_scale`` (the unbatched guidance
processor, on log-probabilities), a ``prefix_allowed_tokens_fn`` allowing only visual tokens and
an end-of-line token after every row (written here from the position of the image header's
``<|image token|>``, as in transformers' Emu3 documentation), then temperature and top-k.
Both draw from the same random stream: ``generate`` samples with ``torch.multinomial`` on the
global generator, ours with a ``torch.Generator`` passed in; seeded alike, they give the same
numbers, so whole token sequences are compared (greedy and sampled, one prompt and a batch of
prompts of different lengths).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opsd_emu3 import visual_thought
from opsd_emu3.backend import Emu3Backend
from opsd_emu3.config import Emu3Params
from transformers import GenerationConfig
from transformers.models.emu3.image_processing_emu3 import Emu3ImageProcessor

PROMPTS = ("a red circle", "two squares, one inside the other")
GRID = (3, 4)


def drawing_backend(**settings) -> Emu3Backend:
    settings = {"vt_grid": GRID, "vt_negative_prompt": "blurry", "image_min_pixels": 256, "image_max_pixels": 1024, **settings}
    return Emu3Backend(Emu3Params(flavour="debug", **settings))


@pytest.fixture(scope="module")
def model():
    return drawing_backend().build_model().eval()


def text_prompts(backend: Emu3Backend, texts) -> list[list[int]]:
    return [[backend.ids["bos"], *backend.encode(text), *backend.image_header(*GRID)] for text in texts]


def reference_tokens(backend: Emu3Backend, model, prompts: list[list[int]], seed: int) -> torch.Tensor:
    """int64 (B, rows * (columns + 1)) generated tokens, end-of-line tokens included."""
    ids, params = backend.ids, backend.params
    width = max(map(len, prompts))
    input_ids = torch.tensor([[ids["pad"]] * (width - len(p)) + p for p in prompts])
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    rows, columns = GRID
    visual = backend.code_to_token.tolist()

    def allowed(batch_id: int, sequence: torch.Tensor) -> list[int]:
        header_end = int(torch.nonzero(sequence == ids["image_wrapper"])[-1])
        offset = sequence.shape[0] - header_end
        return [ids["end_of_line"]] if offset % (columns + 1) == 0 else visual

    sampled = params.vt_temperature > 0
    count = rows * (columns + 1)
    settings = GenerationConfig(
        do_sample=sampled,
        temperature=params.vt_temperature if sampled else None,
        top_k=params.vt_top_k,
        top_p=None,
        max_new_tokens=count,
        min_new_tokens=count,
        guidance_scale=params.vt_guidance_scale,
        bos_token_id=ids["bos"],
        pad_token_id=ids["pad"],
        eos_token_id=ids["eos"],
    )
    negative = visual_thought.negative_prompt(backend)
    guidance = {}
    if params.vt_guidance_scale > 1:
        guidance = {
            "negative_prompt_ids": torch.tensor([negative] * len(prompts)),
            "negative_prompt_attention_mask": torch.ones(len(prompts), len(negative), dtype=torch.long),
        }
    torch.manual_seed(seed)
    output = model.generate(input_ids, attention_mask=attention, generation_config=settings, prefix_allowed_tokens_fn=allowed, **guidance)
    return output[:, width:]


def as_codes(backend: Emu3Backend, tokens: torch.Tensor) -> torch.Tensor:
    """int64 (B, rows, columns) VQ codes of generated tokens, each row's end-of-line checked and dropped."""
    grid = tokens.view(tokens.shape[0], GRID[0], GRID[1] + 1)
    assert bool((grid[:, :, -1] == backend.ids["end_of_line"]).all()), "a row did not end with end-of-line"
    lookup = torch.full((backend.vocabulary.size,), -1, dtype=torch.long)
    lookup[backend.code_to_token] = torch.arange(backend.code_to_token.numel())
    return lookup[grid[:, :, :-1]]


@pytest.mark.parametrize(
    ("settings", "count"),
    [
        ({"vt_temperature": 0.0}, 1),
        ({"vt_temperature": 0.0, "vt_guidance_scale": 2.0}, 2),
        ({"vt_temperature": 1.0, "vt_top_k": 0}, 1),
        ({"vt_temperature": 1.0, "vt_top_k": 0}, 2),
        ({"vt_temperature": 0.7, "vt_top_k": 8}, 2),
        ({"vt_temperature": 1.0, "vt_top_k": 16, "vt_guidance_scale": 1.0}, 2),
    ],
    ids=["greedy", "greedy-batch", "sampled", "sampled-batch", "temperature-top-k-batch", "unguided-batch"],
)
def test_drawn_codes_equal_transformers_generation(model, settings, count):
    backend = drawing_backend(**settings)
    prompts = text_prompts(backend, PROMPTS[:count])
    negative = visual_thought.negative_prompt(backend)
    for seed in (0, 7):
        ours = visual_thought.draw_codes(backend, model, prompts, negative, torch.Generator().manual_seed(seed))
        theirs = as_codes(backend, reference_tokens(backend, model, prompts, seed))
        assert torch.equal(ours, theirs), f"seed {seed}: codes differ"


def test_decoded_images_equal_transformers_decoding_of_the_same_tokens(model):
    """Tokens drawn by ``generate``, closed as a generated image is (end of frame, image end,
    EOS), through ``decode_image_tokens`` and ``Emu3ImageProcessor.postprocess``."""
    backend = drawing_backend(vt_temperature=1.0, vt_top_k=0)
    tokens = reference_tokens(backend, model, text_prompts(backend, PROMPTS), seed=3)
    ours = visual_thought.decode_codes(backend, model, as_codes(backend, tokens))
    ids = backend.ids
    closing = torch.tensor([[ids["end_of_frame"], ids["image_end"], ids["eos"]]] * tokens.shape[0])
    with torch.no_grad():
        decoded = model.decode_image_tokens(image_tokens=torch.cat([tokens, closing], dim=1), height=GRID[0], width=GRID[1])
    processor = Emu3ImageProcessor(image_mean=list(backend.transform.mean), image_std=list(backend.transform.std))
    theirs = processor.postprocess(list(decoded.float()), return_tensors="PIL.Image.Image")["pixel_values"]
    assert len(ours) == len(theirs) == len(PROMPTS)
    for mine, reference in zip(ours, theirs):
        assert mine.size == (GRID[1] * backend.spatial_factor, GRID[0] * backend.spatial_factor)
        assert np.array_equal(np.asarray(mine), np.asarray(reference))

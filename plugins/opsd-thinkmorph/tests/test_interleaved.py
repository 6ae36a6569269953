"""ThinkMorph's interleaved inference on the debug flavour: several visual thoughts per answer, each
round and image appended to the context, the cap on images, the token budget and the count of
images drawn. The text rounds are scripted (a random model never asks for an image); the images
are really drawn."""

from __future__ import annotations

import pytest
import torch
from opsd_thinkmorph import visual_thought
from opsd_thinkmorph.backend import ThinkMorphBackend
from opsd_thinkmorph.config import ThinkMorphParams

from opsd_core.api import CompletionBatch, Context, Problem
from opsd_core.api.backend import BatchedSampler

ASK = "<think>look closer</think><image_start>"
ANSWER = "<answer>A</answer>"


@pytest.fixture(scope="module")
def backend():
    return ThinkMorphBackend(
        ThinkMorphParams(flavour="debug", vit_max_size=56, vit_min_size=28, vae_max_size=64, vae_min_size=32, vt_timesteps=2)
    )


@pytest.fixture(scope="module")
def model(backend):
    return backend.build_model().eval()


def _problems(count: int) -> list[Problem]:
    generator = torch.Generator().manual_seed(0)
    return [Problem(f"p{i}", torch.rand(3, 28, 42, generator=generator), f"which way to goal {i}?") for i in range(count)]


def _batch(rows: list[list[int]], pad: int) -> CompletionBatch:
    width = max(len(row) for row in rows)
    tokens = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row)
    lengths = torch.tensor([len(row) for row in rows])
    sampled = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)
    return CompletionBatch(tokens, lengths, sampled, torch.ones(len(rows), dtype=torch.bool))


def _thoughts_in(context: Context) -> int:
    return sum(name.startswith("visual_thought") for name in context.names())


def script(monkeypatch, backend, plan: dict[int, list[str]]):
    """Make every sampling round answer from ``plan``: problem number -> the text of each round
    (the last entry repeats). Returns the contexts of every call and the reasoning each drawing saw."""
    calls, drawings = [], []

    def sample(self, model, contexts, generator=None):
        calls.append(list(contexts))
        rows = []
        for context in contexts:
            number = next(i for i in plan if f"goal {i}?" in context.get("question").text)
            texts = plan[number]
            rows.append(backend.encode(texts[min(_thoughts_in(context), len(texts) - 1)]))
        return _batch(rows, backend.vocabulary.pad_id)

    drawing = visual_thought.draw_visual_thoughts

    def spy(*args, reasoning=None, **kwargs):
        drawings.append(list(reasoning))
        return drawing(*args, reasoning=reasoning, **kwargs)

    monkeypatch.setattr(BatchedSampler, "sample", sample)
    monkeypatch.setattr(visual_thought, "draw_visual_thoughts", spy)
    return calls, drawings


def _answer(backend, model, count, max_tokens=200, **kwargs):
    batch = _problems(count)
    contexts = [backend.context_builder().student_context(problem) for problem in batch]
    return backend.answer_with_visual_thoughts(model, contexts, batch, max_tokens, torch.Generator().manual_seed(0), **kwargs)


def test_two_image_requests_draw_two_images_each_appended_to_the_context(monkeypatch, backend, model):
    calls, drawings = script(monkeypatch, backend, {0: [ASK, ASK, ANSWER], 1: [ASK, ANSWER], 2: [ANSWER]})
    answers = _answer(backend, model, 3)
    assert [drawn for _, drawn in answers] == [2, 1, 0]
    ask, answer, turn = backend.encode(ASK), backend.encode(ANSWER), [backend.special.im_end, backend.special.im_start]
    assert answers[0][0] == ask + turn + ask + turn + answer
    assert answers[1][0] == ask + turn + answer
    assert answers[2][0] == answer
    # Round 3 of problem 0 sees both rounds and both images, in order, after the question.
    (last,) = calls[2]
    assert last.names()[-4:] == ("reasoning", "visual_thought", "reasoning_2", "visual_thought_2")
    assert last.get("reasoning").text == last.get("reasoning_2").text == backend.decode(ask)
    first_image, second_image = last.get("visual_thought").image, last.get("visual_thought_2").image
    assert first_image.size == second_image.size and first_image.tobytes() != second_image.tobytes()
    # Each drawing is conditioned on all the reasoning so far.
    assert drawings == [[ASK, ASK], [ASK + "\n" + ASK]]


@pytest.mark.parametrize("cap", [0, 1])
def test_the_cap_on_visual_thoughts_is_respected(monkeypatch, backend, model, cap):
    calls, drawings = script(monkeypatch, backend, {0: [ASK]})  # asks for an image in every round
    ((tokens, drawn),) = _answer(backend, model, 1, max_visual_thoughts=cap)
    assert drawn == cap and len(drawings) == cap
    assert len(calls) == cap + 1  # one round per image, plus the first
    assert tokens.count(backend.special.im_start) == cap


@pytest.mark.slow
def test_the_default_cap_is_the_papers_three(monkeypatch, backend, model):
    _, drawings = script(monkeypatch, backend, {0: [ASK]})
    ((_, drawn),) = _answer(backend, model, 1)
    assert drawn == 3 and len(drawings) == 3


def test_the_token_budget_covers_every_round(monkeypatch, backend, model):
    script(monkeypatch, backend, {0: [ASK]})
    ask = len(backend.encode(ASK))
    # Room for the first round, the turn markers and two tokens: one image, a cut second round, no third.
    ((tokens, drawn),) = _answer(backend, model, 1, max_tokens=ask + 4)
    assert drawn == 1 and len(tokens) == ask + 4
    ((tokens, drawn),) = _answer(backend, model, 1, max_tokens=ask + 3)  # no room after the markers
    assert drawn == 0 and len(tokens) == ask


def test_a_negative_cap_is_refused(backend, model):
    with pytest.raises(ValueError, match="max_visual_thoughts must be >= 0"):
        _answer(backend, model, 1, max_visual_thoughts=-1)

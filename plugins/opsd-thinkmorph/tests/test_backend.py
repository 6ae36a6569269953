"""The thinkmorph backend on its debug flavour: the backend contract, cached decoding, checkpoints."""

from __future__ import annotations

import pytest
import torch

from opsd_core.api import Problem
from opsd_core.testing.backend_contract import check_backend_contract
from opsd_thinkmorph.backend import ThinkMorphBackend
from opsd_thinkmorph.config import ThinkMorphParams

SMALL_IMAGES = dict(vit_max_size=56, vit_min_size=28, vae_max_size=64, vae_min_size=32)


def debug_backend(device: str = "cpu", dtype: str = "float32", **overrides) -> ThinkMorphBackend:
    backend = ThinkMorphBackend(ThinkMorphParams(flavour="debug", **{**SMALL_IMAGES, **overrides}))
    return backend.place(device, getattr(torch, dtype))


def problems(count: int = 3) -> list[Problem]:
    generator = torch.Generator().manual_seed(0)
    sides = [(28, 42), (42, 28), (56, 56)]
    return [
        Problem(
            id=f"p{i}",
            image=torch.rand(3, *sides[i % 3], generator=generator),
            question=f"which way to the goal {i}?",
            visual_thought=torch.rand(3, 42, 42, generator=generator),
        )
        for i in range(count)
    ]


def test_backend_contract(tmp_path):
    check_backend_contract(debug_backend(), problems(), tmp_path, max_tokens=8)


def test_random_flavour_is_seeded():
    first, second = debug_backend().build_model(), debug_backend().build_model()
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    other = debug_backend(seed=1).build_model()
    assert not torch.equal(first.connector.fc1.weight, other.connector.fc1.weight)


def test_saved_checkpoint_loads_alone(tmp_path):
    backend = debug_backend()
    model = backend.build_model()
    backend.save_pretrained(model, tmp_path / "ckpt")
    names = {path.name for path in (tmp_path / "ckpt").iterdir()}
    assert {"model.safetensors", "llm_config.json", "vit_config.json", "ae.safetensors"} <= names
    reloaded_backend = ThinkMorphBackend(ThinkMorphParams(checkpoint=str(tmp_path / "ckpt"), **SMALL_IMAGES))
    reloaded = reloaded_backend.build_model()
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert reloaded_backend.vocabulary == backend.vocabulary
    assert reloaded_backend.encode("move left") == backend.encode("move left")


def test_image_skip_keeps_the_injected_turn_markers():
    backend = debug_backend()
    asks = backend.encode("<think>go</think><image_start>")
    assert backend.image_skip_tokens(asks) == [backend.special.im_end, backend.special.im_start]
    assert backend.image_skip_tokens(backend.encode("<answer>A</answer>")) is None


def test_visual_thoughts_are_drawn_per_problem(tmp_path):
    backend = debug_backend(vt_timesteps=4)
    model = backend.build_model().eval()
    batch = problems(3)
    images = backend.generate_visual_thought(model, batch, torch.Generator().manual_seed(0))
    assert len(images) == 3
    for problem, image in zip(batch, images):
        expected = backend.vae_transform.target_size(problem.image.shape[2], problem.image.shape[1])
        assert image.size == expected
    again = backend.generate_visual_thought(model, batch, torch.Generator().manual_seed(0))
    assert all(list(a.getdata()) == list(b.getdata()) for a, b in zip(images, again))


def test_fixed_shape_decoding_equals_growing_steps():
    fixed, growing = debug_backend(), debug_backend(fixed_shape_decoding=False)
    model = fixed.build_model().eval()
    contexts = [fixed.context_builder().build(p).teacher for p in problems(3)]
    feeds = torch.randint(0, 256, (6, 3), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = fixed.start_decoding(model, contexts, 6), growing.start_decoding(model, contexts, 6)
        assert a.fixed is not None and b.fixed is None
        for feed in feeds:
            torch.testing.assert_close(fixed.decode_step(a, feed), growing.decode_step(b, feed), atol=1e-5, rtol=1e-5)
        with pytest.raises(RuntimeError, match="KV cache full"):
            fixed.decode_step(a, feeds[0])


@pytest.mark.parametrize("compile_layers", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_one_row_layer_decodes_like_the_layer(compile_layers):
    """Batch-1 fixed-shape steps through one_row_layer (the torch path of the kernels here)
    equal the layer as written, step after step."""
    from opsd_thinkmorph.model import call_layer, one_row_layer
    from opsd_thinkmorph.runtime import FixedShapeDecoder

    backend, plain = debug_backend(), debug_backend(decode_kernels=False)
    model = backend.build_model().eval()
    context = [backend.context_builder().build(problems(1)[0]).teacher]
    feeds = torch.randint(0, 256, (5, 1), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = backend.start_decoding(model, context, 5), plain.start_decoding(model, context, 5)
        assert a.fixed.run_layer is one_row_layer and b.fixed.run_layer is call_layer
        if compile_layers:
            a.fixed = FixedShapeDecoder(model, a.cache, 1, capture=False, compile=True, kernels=True)
        for feed in feeds:
            torch.testing.assert_close(backend.decode_step(a, feed), plain.decode_step(b, feed), atol=1e-5, rtol=1e-5)


def test_one_row_layer_leaves_other_steps_to_the_layer():
    """Several rows, several positions or generation-expert positions take the layer as written."""
    from opsd_thinkmorph.model import Routing, one_row_layer, rope_tables

    model = debug_backend().build_model().eval()
    layer, config = model.language_model.model.layers[0], model.config.llm
    for rows, length, gen in ((2, 1, False), (1, 3, False), (1, 3, True)):
        h = torch.randn(rows, length, config.hidden_size)
        positions = torch.arange(length).expand(rows, length)
        rope = rope_tables(positions, config.head_dim, config.rope_theta, h.dtype)
        mask = torch.ones(rows, length, length, dtype=torch.bool).tril()
        routing = Routing(torch.tensor([[False, True, True]])) if gen else None
        with torch.no_grad():
            torch.testing.assert_close(one_row_layer(layer, h, routing, rope, mask, None), layer(h, routing, rope, mask))


def test_sharded_models_decode_one_row_with_the_kernels_while_gathered():
    """one_row_layer reads the layers' weights without calling the layers (whose FSDP hooks
    gather them), so it runs only while a sharded model's weights are whole, as they are in
    the trainer's sampling (inside ``gathered``); there it gives the unsharded logits."""
    from types import SimpleNamespace

    from opsd_core.testing.fsdp import one_process_group
    from opsd_core.testing.trainer import gathered

    with one_process_group() as mesh:
        backend = debug_backend()
        reference, sharded = backend.build_model().eval(), backend.build_model().eval()
        config = SimpleNamespace(run=SimpleNamespace(precision="fp32"), train=SimpleNamespace(activation_checkpointing=False))
        backend.parallelize(sharded, mesh, config)
        context = [backend.context_builder().build(problems(1)[0]).student]
        feeds = torch.randint(0, 256, (3, 1), generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            assert not backend.start_decoding(sharded, context, 3).fixed.one_row
            with gathered(sharded):
                a, b = backend.start_decoding(reference, context, 3), backend.start_decoding(sharded, context, 3)
                assert a.fixed.one_row and b.fixed.one_row
                for feed in feeds:
                    torch.testing.assert_close(backend.decode_step(b, feed), backend.decode_step(a, feed), atol=1e-5, rtol=1e-5)


def _batch(rows, pad):
    from opsd_core.api import CompletionBatch

    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row)
    lengths = torch.tensor([len(r) for r in rows])
    sampled = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)
    return CompletionBatch(tokens, lengths, sampled, torch.ones(len(rows), dtype=torch.bool))


def test_interleaved_answer_draws_a_visual_thought_after_an_image_request(monkeypatch):
    from opsd_core.api.backend import BatchedSampler

    backend = debug_backend(vt_timesteps=2)
    model = backend.build_model().eval()
    batch = problems(2)
    contexts = [backend.context_builder().student_context(p) for p in batch]
    asks, answers_now = backend.encode("<think>look</think><image_start>"), backend.encode("<answer>A</answer>")
    original, calls = BatchedSampler.sample, []

    def scripted(self, model, rows, generator=None):
        calls.append(rows)
        if len(calls) == 1:  # first round: row 0 asks for an image, row 1 answers at once
            return _batch([asks, answers_now], backend.vocabulary.pad_id)
        return original(self, model, rows, generator)

    monkeypatch.setattr(BatchedSampler, "sample", scripted)
    from opsd_thinkmorph import visual_thought

    drawing, conditioned_on = visual_thought.draw_visual_thoughts, []

    def spy(*args, reasoning=None, **kwargs):
        conditioned_on.append(reasoning)
        return drawing(*args, reasoning=reasoning, **kwargs)

    monkeypatch.setattr(visual_thought, "draw_visual_thoughts", spy)
    answers = backend.answer_with_visual_thoughts(model, contexts, batch, 60, torch.Generator().manual_seed(0))
    assert answers[1] == (answers_now, 0)
    tokens, drawn = answers[0]
    special = backend.special
    assert drawn == 1 and tokens[: len(asks)] == asks
    assert tokens[len(asks) : len(asks) + 2] == [special.im_end, special.im_start]
    assert len(tokens) <= 60
    (follow,) = calls[1]
    assert follow.names()[-2:] == ("reasoning", "visual_thought")
    assert follow.get("reasoning").text == backend.decode(asks)
    assert conditioned_on == [[backend.decode(asks)]], "the drawing must see the reasoning so far"


@pytest.mark.slow
def test_compiled_decode_layers_equal_eager_ones():
    from opsd_thinkmorph.runtime import FixedShapeDecoder

    backend = debug_backend()
    model = backend.build_model().eval()
    contexts = [backend.context_builder().build(p).teacher for p in problems(2)]
    feeds = torch.randint(0, 256, (4, 2), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = backend.start_decoding(model, contexts, 4), backend.start_decoding(model, contexts, 4)
        a.fixed = FixedShapeDecoder(model, a.cache, 2, capture=False, compile=True)
        for feed in feeds:
            torch.testing.assert_close(backend.decode_step(a, feed), backend.decode_step(b, feed), atol=1e-5, rtol=1e-5)

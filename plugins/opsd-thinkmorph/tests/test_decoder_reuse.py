"""Fixed-shape decoders kept between calls: reused decoders answer exactly as new ones would,
one is built per batch size and cache bucket, and weights that move invalidate them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from opsd_core.api import Context, TextSegment
from opsd_core.api.backend import BatchedSampler
from opsd_core.testing.backend_contract import decode_logits
from opsd_thinkmorph.model import KVCache
from opsd_thinkmorph.runtime import SMALLEST_BUCKET, FixedShapeDecoder, cache_bucket

sys.path.insert(0, str(Path(__file__).parent))
from test_backend import debug_backend  # noqa: E402


def questions(count: int, offset: int = 0) -> list[Context]:
    """Text contexts of different lengths (all within one cache bucket at 8 new tokens)."""
    return [Context((TextSegment("question", "Which way? " * (1 + (offset + i) % 4)),)) for i in range(count)]


def answers(backend, model, batches, temperature: float) -> list[list[int]]:
    sampler = BatchedSampler(backend, temperature, 8, max_image_skips=0)
    completions = []
    for number, contexts in enumerate(batches):
        seeds = [1000 * number + row for row in range(len(contexts))]
        completions += sampler.sample(model, contexts, seeds=seeds).token_lists()
    return completions


def test_buckets_cover_what_is_needed_with_little_to_spare():
    assert cache_bucket(1) == cache_bucket(SMALLEST_BUCKET) == SMALLEST_BUCKET
    previous = SMALLEST_BUCKET
    for positions in range(SMALLEST_BUCKET + 1, 20_000, 7):
        bucket = cache_bucket(positions)
        assert positions <= bucket <= 1.25 * positions
        assert bucket >= previous
        previous = bucket
    assert len({cache_bucket(p) for p in range(1025, 2049)}) == 4


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_kept_decoders_answer_exactly_as_new_ones(temperature):
    kept, new = debug_backend(), debug_backend(kept_decoders=0)
    model = kept.build_model().eval()
    batches = [questions(1, i) for i in range(3)] + [questions(3, i) for i in range(2)] + [questions(1, 9)]
    with torch.no_grad():
        reused = answers(kept, model, batches, temperature)
        fresh = answers(new, model, batches, temperature)
    assert reused == fresh
    assert kept.decoders.builds == 2, "one decoder for batch 1 and one for batch 3"
    assert new.decoders.builds == len(batches) and len(new.decoders) == 0


def test_kept_decoders_give_bit_equal_logits():
    kept, new = debug_backend(), debug_backend(kept_decoders=0)
    model = kept.build_model().eval()
    completions = BatchedSampler(new, 1.0, 6, max_image_skips=0).sample(model, questions(2), seeds=[1, 2])
    with torch.no_grad():
        for offset in range(3):
            contexts = questions(2, offset)
            assert torch.equal(decode_logits(kept, model, contexts, completions), decode_logits(new, model, contexts, completions))
    assert kept.decoders.builds == 1


def test_padding_to_the_bucket_leaves_the_logits_unchanged():
    """Masked slots add nothing; the logits may differ in the last bit only because the CPU
    attention kernel splits the keys into blocks whose size depends on how many there are."""
    backend = debug_backend()
    model = backend.build_model().eval()
    contexts = questions(2, 1)
    rows = backend._rows(contexts, None)
    needed = rows.token_ids.shape[1] + 5
    assert cache_bucket(needed) > needed
    feeds = torch.randint(0, 256, (5, 2), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        exact = FixedShapeDecoder(model, KVCache(backend.config.llm, 2, needed, "cpu", torch.float32), 2, capture=False)
        padded = FixedShapeDecoder(model, KVCache(backend.config.llm, 2, cache_bucket(needed), "cpu", torch.float32), 2, capture=False)
        assert torch.equal(exact.prefill(rows, needed), padded.prefill(rows, needed))
        positions = rows.next_positions
        for feed in feeds:
            logits = exact.step(feed, positions)
            torch.testing.assert_close(padded.step(feed, positions), logits, atol=1e-6, rtol=1e-6)
            positions = positions + 1
        with pytest.raises(RuntimeError, match="KV cache full"):
            padded.step(feeds[0], positions)


def test_optimizer_steps_are_seen_and_moved_weights_rebuild():
    kept, new = debug_backend(), debug_backend(kept_decoders=0)
    model = kept.build_model().eval()
    contexts = questions(2)
    completions = BatchedSampler(new, 1.0, 6, max_image_skips=0).sample(model, contexts, seeds=[1, 2])
    with torch.no_grad():
        before = decode_logits(kept, model, contexts, completions)
    optimizer = torch.optim.SGD(model.parameters(), lr=10.0)
    hidden = model.llm_forward(model.language_model.model.embed_tokens(torch.tensor([[1, 2, 3]])),
                               torch.arange(3).view(1, 3), torch.ones(1, 3, 3, dtype=torch.bool).tril())
    model.lm_logits(hidden).square().mean().backward()
    optimizer.step()  # in place: the kept decoder reads the new values
    with torch.no_grad():
        stepped = decode_logits(kept, model, contexts, completions)
        assert not torch.equal(stepped, before)
        assert torch.equal(stepped, decode_logits(new, model, contexts, completions))
        assert kept.decoders.builds == 1
        mlp = model.language_model.model.layers[0].mlp
        mlp.down_proj.weight.data = mlp.down_proj.weight.data * 2  # a new tensor: the decoder is rebuilt
        moved = decode_logits(kept, model, contexts, completions)
        assert not torch.equal(moved, stepped)
        assert torch.equal(moved, decode_logits(new, model, contexts, completions))
    assert kept.decoders.builds == 2 and len(kept.decoders) == 1


def test_a_living_state_keeps_its_decoder():
    backend = debug_backend()
    model = backend.build_model().eval()
    with torch.no_grad():
        first = backend.start_decoding(model, questions(1, 0), 4)
        second = backend.start_decoding(model, questions(1, 2), 4)
        assert first.fixed is not second.fixed and backend.decoders.builds == 2
        alone = debug_backend(kept_decoders=0)
        reference = alone.start_decoding(model, questions(1, 0), 4)
        feed = torch.tensor([7])
        backend.decode_step(second, feed)
        assert torch.equal(backend.decode_step(first, feed), alone.decode_step(reference, feed))
        del first, second
        backend.start_decoding(model, questions(1, 1), 4)
    assert backend.decoders.builds == 2, "the kept decoder is handed out again once its state is gone"


def test_the_cache_keeps_at_most_its_size():
    backend = debug_backend(kept_decoders=2)
    model = backend.build_model().eval()
    with torch.no_grad():
        for batch in (1, 2, 3, 1):
            backend.start_decoding(model, questions(batch), 4)
    assert len(backend.decoders) == 2 and backend.decoders.builds == 4


def test_a_kept_decoder_does_not_keep_its_model_alive():
    import gc
    import weakref

    backend = debug_backend()
    model = backend.build_model().eval()
    with torch.no_grad():
        backend.start_decoding(model, questions(1), 4)
    assert len(backend.decoders) == 1
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None
    other = backend.build_model().eval()
    with torch.no_grad():
        backend.start_decoding(other, questions(1), 4)
    assert len(backend.decoders) == 1 and backend.decoders.builds == 2


def test_a_training_step_keeps_no_decoder_past_its_sampling(tmp_path):
    """Evaluation keeps decoders between answers; a training step drops them (and its own)
    around its sampling, so the teacher and student forwards share the GPU with no cache."""
    from opsd_core.testing import fsdp
    from opsd_core.testing.trainer import Ranks

    config = fsdp.comparison_config(steps=1, checkpoint_every=0)
    trainer = fsdp.make_trainer(debug_backend, tmp_path, Ranks(), config)
    with torch.no_grad():
        answers(trainer.backend, trainer.student.eval(), [questions(2)], 0.0)
    assert len(trainer.backend.decoders) == 1
    builds = trainer.backend.decoders.builds
    trainer.train_step()
    assert trainer.backend.decoders.builds > builds, "the step sampled through a fixed-shape decoder"
    assert len(trainer.backend.decoders) == 0

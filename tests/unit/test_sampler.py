"""The batched sampler's policy: caps, finished rows, the image-skip rule, greedy choice, and
seeded draws that do not depend on the batch."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from opsd_core.interfaces.backend import Backend, Capabilities, DecodeState
from opsd_core.sampling import BatchedSampler, choose_tokens
from opsd_core.sampling.sampler import seeded_choice, uniform_noise, unit_interval
from opsd_core.types import Context, TextSegment, Vocabulary

EOS, PAD, IMAGE_START, IM_END, IM_START = 0, 1, 5, 6, 7
V = 10


class _State(DecodeState):
    def __init__(self, scripts):
        self.scripts = scripts
        self.fed = [[] for _ in scripts]
        self.logits = self._logits()

    def _logits(self):
        logits = torch.full((len(self.scripts), V), -10.0)
        for row, script in enumerate(self.scripts):
            position = len(self.fed[row])
            logits[row, script[position] if position < len(script) else EOS] = 10.0
        return logits


class ScriptedBackend(Backend):
    """Greedily emits a fixed script per context (the context's text is the script)."""

    vocabulary = Vocabulary(size=V, eos_id=EOS, pad_id=PAD, valid_size=9)
    capabilities = Capabilities(image_skips=True)

    def build_model(self):
        return torch.nn.Linear(1, 1)

    def encode(self, text):
        return [int(t) for t in text.split()]

    def decode(self, token_ids):
        return " ".join(map(str, token_ids))

    def preprocess_image(self, image):
        return torch.zeros(3, 2, 2)

    def context_length(self, context):
        return 1

    def completion_logits(self, model, contexts, completions):
        raise NotImplementedError

    def start_decoding(self, model, contexts, max_new_tokens):
        return _State([self.encode(c.segments[0].text) for c in contexts])

    def decode_step(self, state, tokens):
        for row, token in enumerate(tokens.tolist()):
            state.fed[row].append(token)
        # After an injected im_end/im_start pair the script goes on after the EOS it replaced.
        for row, fed in enumerate(state.fed):
            if fed[-2:] == [IM_END, IM_START]:
                script = state.scripts[row]
                state.scripts[row] = script[: len(fed) - 2] + [IM_END, IM_START] + script[len(fed) - 1 :]
        state.logits = state._logits()
        return state.logits

    def image_skip_tokens(self, completion):
        return [IM_END, IM_START] if IMAGE_START in completion else None

    def image_skip_injection(self):
        return [IM_END, IM_START]

    def save_pretrained(self, model, directory):
        raise NotImplementedError

    def load_weights(self, model, directory):
        raise NotImplementedError


def _contexts(*scripts):
    return [Context((TextSegment("question", " ".join(map(str, s))),)) for s in scripts]


def test_rows_stop_at_eos_or_cap_independently():
    sampler = BatchedSampler(ScriptedBackend(), temperature=0.0, max_completion_tokens=4)
    batch = sampler.sample(None, _contexts([2, 3], [4, 4, 4, 4, 4, 4], []))
    assert batch.token_lists() == [[2, 3], [4, 4, 4, 4], []]
    assert batch.finished.tolist() == [True, False, True]
    assert batch.tokens.shape == (3, 4) and batch.tokens[0, 2:].tolist() == [PAD, PAD]
    assert batch.sampled.tolist()[0] == [True, True, False, False]


def test_image_skip_injects_tokens_that_carry_no_loss():
    sampler = BatchedSampler(ScriptedBackend(), temperature=0.0, max_completion_tokens=10, max_image_skips=1)
    # Round 1 asks for an image then ends; EOS becomes im_end + im_start; round 2 says 8 3.
    batch = sampler.sample(None, _contexts([2, IMAGE_START, EOS, 8, 3], [2, 3]))
    assert batch.token_lists()[0] == [2, IMAGE_START, IM_END, IM_START, 8, 3]
    assert batch.sampled[0, :6].tolist() == [True, True, False, False, True, True]
    assert batch.finished.tolist() == [True, True]
    rows = batch.row_mask()
    assert rows[0].tolist()[:7] == [True, True, False, False, True, True, True]


def test_image_skip_budget_and_room_are_respected():
    no_skips = BatchedSampler(ScriptedBackend(), temperature=0.0, max_completion_tokens=10, max_image_skips=0)
    assert no_skips.sample(None, _contexts([IMAGE_START, EOS, 8])).token_lists() == [[IMAGE_START]]
    no_room = BatchedSampler(ScriptedBackend(), temperature=0.0, max_completion_tokens=3, max_image_skips=1)
    assert no_room.sample(None, _contexts([2, IMAGE_START, EOS, 8])).token_lists() == [[2, IMAGE_START]]


def test_choose_tokens_never_picks_padded_vocabulary_ids():
    logits = torch.zeros(4, V)
    logits[:, 9] = 50.0
    assert (choose_tokens(logits, 0.0, None, valid_size=9) != 9).all()
    generator = torch.Generator().manual_seed(0)
    assert (choose_tokens(logits, 1.0, generator, valid_size=9) != 9).all()


def test_sampling_is_reproducible_with_a_seeded_generator():
    logits = torch.randn(16, V)
    first = choose_tokens(logits, 1.0, torch.Generator().manual_seed(3))
    second = choose_tokens(logits, 1.0, torch.Generator().manual_seed(3))
    assert torch.equal(first, second)


def test_truncation_keeps_rows_aligned_and_unfinishes_cut_rows():
    sampler = BatchedSampler(ScriptedBackend(), temperature=0.0, max_completion_tokens=6)
    batch = sampler.sample(None, _contexts([2, 3, 4], [2]))
    cut = batch.truncated(torch.tensor([2, 5]), PAD)
    assert cut.token_lists() == [[2, 3], [2]]
    assert cut.finished.tolist() == [False, True]
    assert cut.tokens.shape == (2, 2) and cut.sampled.shape == (2, 2)


# ---------------------------------------------------------------------------------------------- seeded draws
def test_an_eos_without_an_image_request_ends_the_row_whatever_the_sync_interval():
    # The EOS of row 0 is injected over at once and cut back at the host's next look.
    scripts = [[2, 3, EOS, 4, 4, 4], [2, IMAGE_START, EOS, 8, 3], [4, 4, 4, 4, 4, 4, 4, 4]]
    results = []
    for sync_every in (1, 3, 4, 16):
        sampler = BatchedSampler(ScriptedBackend(), 0.0, 8, max_image_skips=1, sync_every=sync_every)
        results.append(sampler.sample(None, _contexts(*scripts)))
    for batch in results:
        assert batch.token_lists() == [[2, 3], [2, IMAGE_START, IM_END, IM_START, 8, 3], [4] * 8]
        assert batch.finished.tolist() == [True, True, False]
        assert batch.sampled.tolist() == results[0].sampled.tolist()
        assert batch.tokens[0, 2:].tolist() == [PAD] * 6


def test_a_second_skip_is_checked_and_cut_back_on_its_own():
    # Round 1 asks for an image (kept); round 2 ends plainly: the image request is still in the
    # completion, so the rule applies again, as it does for the paper's sampler.
    sampler = BatchedSampler(ScriptedBackend(), 0.0, 12, max_image_skips=2, sync_every=5)
    batch = sampler.sample(None, _contexts([IMAGE_START, EOS, 8, EOS, 3]))
    assert batch.token_lists() == [[IMAGE_START, IM_END, IM_START, 8, IM_END, IM_START, 3]]
    no_request = BatchedSampler(ScriptedBackend(), 0.0, 12, max_image_skips=2, sync_every=5)
    assert no_request.sample(None, _contexts([2, EOS, 8, EOS, 3])).token_lists() == [[2]]


def test_a_backend_that_declares_image_skips_but_no_injection_is_refused():
    class Undeclared(ScriptedBackend):
        def image_skip_injection(self):
            return None

    with pytest.raises(ValueError, match="image_skip_injection"):
        BatchedSampler(Undeclared(), 0.0, 8, max_image_skips=1)
    BatchedSampler(Undeclared(), 0.0, 8, max_image_skips=0)  # no skips: nothing to declare


def test_a_rule_that_injects_other_tokens_than_declared_is_an_error():
    class Inconsistent(ScriptedBackend):
        def image_skip_tokens(self, completion):
            return [IM_START, IM_END] if IMAGE_START in completion else None

    sampler = BatchedSampler(Inconsistent(), 0.0, 8, max_image_skips=1)
    with pytest.raises(RuntimeError, match="declared"):
        sampler.sample(None, _contexts([IMAGE_START, EOS, 8]))


class _FixedLogits(ScriptedBackend):
    """Every step returns the same per-context logits (context text: the row index)."""

    def __init__(self, table):
        self.table = table  # (rows, V)

    def start_decoding(self, model, contexts, max_new_tokens):
        state = _State([[] for _ in contexts])
        state.rows = [int(c.segments[0].text) for c in contexts]
        state.logits = self.table[state.rows]
        return state

    def decode_step(self, state, tokens):
        return self.table[state.rows]


def test_batched_sampling_with_fixed_seeds_equals_each_row_alone():
    table = torch.randn(5, V, generator=torch.Generator().manual_seed(0)) * 2
    table[:, EOS] = -4.0
    backend = _FixedLogits(table)
    contexts = [Context((TextSegment("question", str(row)),)) for row in range(5)]
    seeds = [11, 12, 13, 14, 2**62 - 1]
    sampler = BatchedSampler(backend, 1.0, 30, max_image_skips=0, sync_every=7)
    together = sampler.sample(None, contexts, seeds=seeds)
    for row in range(5):
        alone = BatchedSampler(backend, 1.0, 30, max_image_skips=0).sample(None, contexts[row : row + 1], seeds=seeds[row : row + 1])
        assert alone.token_lists()[0] == together.token_lists()[row]
        assert alone.finished.tolist()[0] == together.finished.tolist()[row]
    reordered = sampler.sample(None, contexts[::-1], seeds=seeds[::-1])
    assert reordered.token_lists()[::-1] == together.token_lists()
    other = sampler.sample(None, contexts, seeds=[s + 1 for s in seeds[:4]] + [0])
    assert other.token_lists() != together.token_lists()


def test_seeds_are_drawn_from_the_generator_when_not_given():
    table = torch.randn(3, V, generator=torch.Generator().manual_seed(1))
    backend = _FixedLogits(table)
    contexts = [Context((TextSegment("question", str(row)),)) for row in range(3)]
    sampler = BatchedSampler(backend, 1.0, 20, max_image_skips=0)
    first = sampler.sample(None, contexts, torch.Generator().manual_seed(5))
    second = sampler.sample(None, contexts, torch.Generator().manual_seed(5))
    assert first.token_lists() == second.token_lists()
    with pytest.raises(ValueError, match="seeds"):
        sampler.sample(None, contexts, seeds=[1, 2])
    with pytest.raises(ValueError, match="seeds"):
        sampler.sample(None, contexts, seeds=[1, 2, -3])


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**62 - 1), st.integers(0, 10**6), st.integers(1, 6), st.integers(0, 5))
def test_a_rows_draw_depends_only_on_its_seed_counter_and_logits(seed, counter, batch, where):
    where = min(where, batch - 1)
    logits = torch.randn(batch, 50, generator=torch.Generator().manual_seed(seed % 1000))
    seeds = torch.randint(0, 2**62, (batch,), generator=torch.Generator().manual_seed(counter))
    counters = torch.randint(0, 10**6, (batch,), generator=torch.Generator().manual_seed(seed % 997))
    seeds[where], counters[where] = seed, counter
    together = seeded_choice(logits, 0.7, seeds, counters)
    alone = seeded_choice(logits[where : where + 1], 0.7, seeds[where : where + 1], counters[where : where + 1])
    assert int(together[where]) == int(alone[0])
    noise = uniform_noise(seeds, counters, 50)
    assert bool(((noise > 0) & (noise < 1)).all())


@pytest.mark.parametrize("vary", ["seed", "counter"])
def test_seeded_draws_follow_the_softmax(vary):
    # 20,000 draws from one 6-way distribution: every frequency within 4.5 standard errors.
    probabilities = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.07, 0.03])
    draws = 20_000
    logits = (probabilities.log() * 2.0).expand(draws, -1)  # temperature 2 undoes the doubling
    index = torch.arange(draws)
    seeds = index if vary == "seed" else torch.full((draws,), 12345)
    counters = torch.full((draws,), 7) if vary == "seed" else index
    chosen = seeded_choice(logits, 2.0, seeds, counters)
    frequencies = torch.bincount(chosen, minlength=6).double() / draws
    standard_error = (probabilities.double() * (1 - probabilities.double()) / draws).sqrt()
    assert bool(((frequencies - probabilities.double()).abs() <= 4.5 * standard_error).all()), frequencies.tolist()
    # Neighbouring counters of one seed are not correlated: the next draw's distribution does not
    # depend on the previous draw.
    if vary == "counter":
        previous, following = chosen[:-1], chosen[1:]
        after_top = following[previous == 0]
        share = float((after_top == 0).double().mean())
        assert abs(share - 0.4) <= 4.5 * (0.4 * 0.6 / after_top.numel()) ** 0.5


def test_noise_stays_strictly_inside_the_unit_interval_at_the_extreme_bits():
    bits = torch.tensor([0, 1, 2**9 - 1, 2**31, 2**32 - 2**9, 2**32 - 1], dtype=torch.int64)
    u = unit_interval(bits)
    assert u.dtype == torch.float32 and bool(((u > 0) & (u < 1)).all()), u.tolist()
    gumbel = -torch.log(-torch.log(u))
    assert bool(torch.isfinite(gumbel).all()) and float(gumbel.max()) < 17

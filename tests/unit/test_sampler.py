"""The batched sampler's policy: caps, finished rows, the image-skip rule, greedy choice."""

import torch

from opsd_core.interfaces.backend import Backend, DecodeState
from opsd_core.sampling import BatchedSampler, choose_tokens
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

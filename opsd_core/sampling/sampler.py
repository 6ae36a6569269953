"""Batched on-policy sampler: one completion per context from the current student.

Owns: the decoding loop over a batch (temperature or greedy choice, the completion cap,
finished rows, and the paper's image-skip rule as tokens injected into one row while the
other rows keep sampling).
Does not know: the model's architecture or cache; it drives the backend through
``start_decoding`` / ``decode_step`` and asks ``image_skip_tokens`` what to inject.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from opsd_core.interfaces.backend import Backend
from opsd_core.interfaces.sampler import OnPolicySampler
from opsd_core.types import CompletionBatch, Context


def choose_tokens(
    logits: torch.Tensor, temperature: float, generator: torch.Generator | None, valid_size: int | None = None
) -> torch.Tensor:
    """int64 (B,) next tokens from float (B, V) logits: argmax when ``temperature`` is 0,
    else a sample of softmax(logits / temperature). Ids >= ``valid_size`` are never chosen."""
    logits = logits.float()
    if valid_size is not None and valid_size < logits.shape[-1]:
        logits = logits.clone()
        logits[:, valid_size:] = float("-inf")
    if temperature == 0:
        return logits.argmax(dim=-1)
    probabilities = torch.softmax(logits / temperature, dim=-1)
    if generator is not None and generator.device != probabilities.device:
        # A generator draws only on its own device; sample there so seeded runs stay reproducible.
        return torch.multinomial(probabilities.to(generator.device), 1, generator=generator).squeeze(1).to(logits.device)
    return torch.multinomial(probabilities, 1, generator=generator).squeeze(1)


class BatchedSampler(OnPolicySampler):
    """Samples a batch of completions together with the backend's KV cache.

    Args:
        backend: the model family to drive.
        temperature: sampling temperature; 0 means greedy.
        max_completion_tokens: cap on completion tokens, injected ones included.
        max_image_skips: rounds per completion that may continue after asking for an image.
    """

    def __init__(
        self, backend: Backend, temperature: float = 1.0, max_completion_tokens: int = 1024, max_image_skips: int = 1
    ):
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if max_completion_tokens < 1:
            raise ValueError(f"max_completion_tokens must be >= 1, got {max_completion_tokens}")
        self.backend = backend
        self.temperature = temperature
        self.max_completion_tokens = max_completion_tokens
        self.max_image_skips = max_image_skips

    @torch.no_grad()
    def sample(
        self, model: torch.nn.Module, contexts: Sequence[Context], generator: torch.Generator | None = None
    ) -> CompletionBatch:
        vocabulary = self.backend.vocabulary
        batch, cap = len(contexts), self.max_completion_tokens
        state = self.backend.start_decoding(model, contexts, cap)
        device = state.logits.device
        tokens = torch.full((batch, cap), vocabulary.pad_id, dtype=torch.long)
        sampled = torch.zeros(batch, cap, dtype=torch.bool)
        lengths = [0] * batch
        finished = [False] * batch
        active = [True] * batch
        pending: list[list[int]] = [[] for _ in range(batch)]
        skips_left = [self.max_image_skips] * batch
        logits = state.logits
        while True:
            chosen = choose_tokens(logits, self.temperature, generator, vocabulary.valid_size).tolist()
            feed = [vocabulary.pad_id] * batch
            for row in range(batch):
                if not active[row]:
                    continue
                token, was_sampled = chosen[row], True
                if pending[row]:
                    token, was_sampled = pending[row].pop(0), False
                elif token == vocabulary.eos_id:
                    injected = self._image_skip(row, tokens, lengths, skips_left)
                    if injected is None:
                        active[row], finished[row] = False, True
                        continue
                    token, was_sampled, pending[row] = injected[0], False, injected[1:]
                tokens[row, lengths[row]] = token
                sampled[row, lengths[row]] = was_sampled
                lengths[row] += 1
                feed[row] = token
                if lengths[row] == cap:
                    active[row] = False
            if not any(active):
                break
            logits = self.backend.decode_step(state, torch.tensor(feed, dtype=torch.long, device=device))
        width = max(lengths, default=0)
        return CompletionBatch(
            tokens=tokens[:, :width].to(device),
            lengths=torch.tensor(lengths, dtype=torch.long, device=device),
            sampled=sampled[:, :width].to(device),
            finished=torch.tensor(finished, dtype=torch.bool, device=device),
        )

    def _image_skip(
        self, row: int, tokens: torch.Tensor, lengths: list[int], skips_left: list[int]
    ) -> list[int] | None:
        """Tokens to inject instead of an EOS that asks for an image, if the rule applies."""
        if skips_left[row] == 0:
            return None
        injected = self.backend.image_skip_tokens(tokens[row, : lengths[row]].tolist())
        # Injected tokens need room, and one more position for the round to say anything.
        if not injected or lengths[row] + len(injected) >= self.max_completion_tokens:
            return None
        skips_left[row] -= 1
        return list(injected)

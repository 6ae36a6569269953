"""Batched on-policy sampler: one completion per context from the current student.

Owns: the decoding loop over a batch (temperature or greedy choice, the completion cap,
finished rows, and the paper's image-skip rule as tokens injected into one row while the
other rows keep sampling), kept on the model's device: the host looks at the batch only once
every ``sync_every`` tokens.
Does not know: the model's architecture or cache; it drives the backend through
``start_decoding`` / ``decode_step`` and asks ``image_skip_tokens`` whether a round that ended
may go on.

Sampling noise is a function of (row seed, completion position, token id) only
(:func:`seeded_choice`), so a row's completion does not depend on which other rows share its
batch, on the batch's order, or on how often the host looks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from opsd_core.interfaces.backend import Backend
from opsd_core.interfaces.sampler import OnPolicySampler
from opsd_core.sampling.params import BatchedSamplerParams
from opsd_core.types import CompletionBatch, Context

_MASK32 = 0xFFFFFFFF
_MULTIPLIER = 0x45D9F3B  # < 2**27: products of 32-bit values stay below 2**59 (no int64 overflow)
_SEED_LIMIT = 2**62


def choose_tokens(
    logits: torch.Tensor, temperature: float, generator: torch.Generator | None, valid_size: int | None = None
) -> torch.Tensor:
    """int64 (B,) next tokens from float (B, V) logits: argmax when ``temperature`` is 0,
    else a sample of softmax(logits / temperature) from ``generator``'s stream. Ids >=
    ``valid_size`` are never chosen."""
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


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash of int64 values in [0, 2**32) (two multiply-xorshift rounds)."""
    x = ((x >> 16) ^ x) * _MULTIPLIER & _MASK32
    x = ((x >> 16) ^ x) * _MULTIPLIER & _MASK32
    return (x >> 16) ^ x


def uniform_noise(seeds: torch.Tensor, counters: torch.Tensor, size: int) -> torch.Tensor:
    """float32 (B, size) values in (0, 1), a pure function of each row's int64 ``seeds`` (in
    [0, 2**62)) and ``counters`` (>= 0) and of the column: the same (seed, counter, column)
    gives the same value on every device and in every batch. 23 random bits per value."""
    key = _mix(_mix(_mix(seeds & _MASK32) ^ (seeds >> 32)) ^ (counters & _MASK32))  # (B,)
    second = _mix(key ^ 0x5BD1E995)  # (B,)
    columns = _mix(torch.arange(size, device=seeds.device, dtype=torch.int64) + 0x68E31DA4)  # (size,)
    bits = _mix((_mix(key.unsqueeze(1) ^ columns) + second.unsqueeze(1)) & _MASK32)  # (B, size)
    return unit_interval(bits)


def unit_interval(bits: torch.Tensor) -> torch.Tensor:
    """float32 values strictly inside (0, 1) from int64 32-bit ``bits``: their top 23 bits,
    centred in their bins. 24 bits would round the top bin to exactly 1.0 in float32, where
    -log(-log u) is infinite and would force that token whatever its probability."""
    return ((bits >> 9).float() + 0.5) * 2.0**-23


def seeded_choice(
    logits: torch.Tensor,
    temperature: float,
    seeds: torch.Tensor,
    counters: torch.Tensor,
    valid_size: int | None = None,
) -> torch.Tensor:
    """int64 (B,) next tokens from float (B, V) logits, one draw per row keyed by (seed, counter).

    argmax when ``temperature`` is 0; otherwise the Gumbel-max draw argmax(logits / T + G) with
    G = -log(-log U) and U = :func:`uniform_noise`, which picks token v with probability
    softmax(logits / T)[v]. Ids >= ``valid_size`` are never chosen.
    """
    logits = logits[:, :valid_size].float()  # the same argmax as masking the rest with -inf
    if temperature == 0:
        return logits.argmax(dim=-1)
    noise = uniform_noise(seeds.to(logits.device), counters.to(logits.device), logits.shape[-1])
    return (logits / temperature - torch.log(-torch.log(noise))).argmax(dim=-1)


def top_k_draw(scores: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator | None) -> torch.Tensor:
    """int64 (B,) ids from float (B, V) ``scores`` the way transformers' ``generate`` samples: the
    argmax when ``temperature`` is 0; else the scores divided by ``temperature``, all but the
    ``top_k`` best set to -inf (0 keeps all), softmax, and one multinomial draw per row from
    ``generator``'s stream, on the generator's device so a seeded draw is the same wherever the
    model runs. (The on-policy sampler draws differently, per row seed: :func:`seeded_choice`.)"""
    if temperature == 0:
        return scores.argmax(dim=-1)
    scores = scores / temperature
    if 0 < top_k < scores.shape[-1]:
        threshold = scores.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        scores = scores.masked_fill(scores < threshold, float("-inf"))
    probabilities = scores.softmax(dim=-1)
    device = generator.device if generator is not None else probabilities.device
    return torch.multinomial(probabilities.to(device), 1, generator=generator).squeeze(1).to(scores.device)


def row_seeds(count: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """int64 (count,) CPU seeds in [0, 2**62) drawn from ``generator`` (default: torch's global one)."""
    device = generator.device if generator is not None else "cpu"
    return torch.randint(0, _SEED_LIMIT, (count,), generator=generator, device=device).cpu()


def sample_seed(base: int, index: int) -> int:
    """A row seed in [0, 2**62) for the ``index``-th sample of the stream keyed by ``base``
    (SplitMix64's finaliser over the pair; a pure function, the same on every process)."""
    mask = 2**64 - 1
    x = (base * 0x9E3779B97F4A7C15 + index * 0xD1B54A32D192ED03 + 1) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return (x ^ (x >> 31)) >> 2


class _Rows:
    """The batch's decoding bookkeeping as device tensors (B rows, cap completion positions).

    ``tokens``, ``sampled`` and ``skipped_at`` have one spare column, so every step can write
    each row at its next free index unconditionally: a row that writes nothing writes padding
    past its length (or, for ``skipped_at``, -1 into an unused column), which is never read.
    """

    def __init__(self, batch: int, cap: int, pad_id: int, skips: int, device: torch.device):
        self.tokens = torch.full((batch, cap + 1), pad_id, dtype=torch.long, device=device)
        self.sampled = torch.zeros(batch, cap + 1, dtype=torch.bool, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.active = torch.ones(batch, dtype=torch.bool, device=device)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.skips = skips
        # Where each row's image skips replaced an EOS, in order (-1: not taken); the host checks them.
        self.skipped_at = torch.full((batch, skips + 1), -1, dtype=torch.long, device=device)
        self.checked = torch.zeros(batch, skips, dtype=torch.bool)  # host side: skips already checked
        self.forced_at = torch.zeros(batch, dtype=torch.long, device=device)  # next injected token, 0 = none


class BatchedSampler(OnPolicySampler):
    """Samples a batch of completions together with the backend's KV cache.

    Args:
        backend: the model family to drive.
        temperature: sampling temperature; 0 means greedy.
        max_completion_tokens: cap on completion tokens, injected ones included.
        max_image_skips: rounds per completion that may continue after asking for an image.
        sync_every: decode steps between looks of the host at the batch (stop when every row
            is done, check image skips); None: 16 on GPUs, 1 elsewhere. The completions do not
            depend on it; after the last row ends, up to ``sync_every - 1`` steps are wasted.

    The image-skip rule runs on the device without waiting for the host: a row that samples
    EOS while it may still skip (skips left, room for the injected tokens and one more) gets
    the backend's :meth:`~opsd_core.interfaces.backend.Backend.image_skip_injection` at once,
    and the host asks :meth:`~opsd_core.interfaces.backend.Backend.image_skip_tokens` at its
    next look; where the round had not asked for an image, the row is cut back to that EOS and
    ends there, exactly as if it had never gone on.
    """

    def __init__(
        self,
        backend: Backend,
        temperature: float = 1.0,
        max_completion_tokens: int = 1024,
        max_image_skips: int = 1,
        sync_every: int | None = None,
    ):
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if max_completion_tokens < 1:
            raise ValueError(f"max_completion_tokens must be >= 1, got {max_completion_tokens}")
        if max_image_skips < 0:
            raise ValueError(f"max_image_skips must be >= 0, got {max_image_skips}")
        if sync_every is not None and sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {sync_every}")
        self.backend = backend
        self.temperature = temperature
        self.max_completion_tokens = max_completion_tokens
        self.max_image_skips = max_image_skips
        self.sync_every = sync_every
        self._injection = self._declared_injection() if max_image_skips and backend.capabilities.image_skips else None

    def _declared_injection(self) -> list[int]:
        injection = self.backend.image_skip_injection()
        if not injection:
            raise ValueError(
                f"{type(self.backend).__name__} declares the image_skips capability but image_skip_injection() "
                f"returned {injection!r}: it must return the tokens a skip injects (needed before the rule is "
                "checked); declare image_skips only with both methods, or set sampling.max_image_skips = 0"
            )
        return [int(t) for t in injection]

    @torch.no_grad()
    def sample(
        self,
        model: torch.nn.Module,
        contexts: Sequence[Context],
        generator: torch.Generator | None = None,
        seeds: torch.Tensor | Sequence[int] | None = None,
    ) -> CompletionBatch:
        """One completion per context. Row b's draws are keyed by ``seeds[b]`` (int64 in
        [0, 2**62)); without ``seeds`` they are drawn from ``generator``."""
        batch, cap = len(contexts), self.max_completion_tokens
        seeds = row_seeds(batch, generator) if seeds is None else torch.as_tensor(seeds, dtype=torch.long)
        if seeds.shape != (batch,) or bool(((seeds < 0) | (seeds >= _SEED_LIMIT)).any()):
            raise ValueError(f"seeds must be {batch} int64 values in [0, 2**62), got {seeds.tolist()}")
        vocabulary = self.backend.vocabulary
        state = self.backend.start_decoding(model, contexts, cap)
        device = state.logits.device
        seeds = seeds.to(device)
        sync_every = self.sync_every or (16 if device.type == "cuda" else 1)
        injection = torch.tensor(self._injection or [vocabulary.pad_id], dtype=torch.long, device=device)
        rows = _Rows(batch, cap, vocabulary.pad_id, self.max_image_skips if self._injection else 0, device)
        logits, step = state.logits, 0
        while True:
            feed = self._advance(rows, logits, seeds, injection, cap)
            step += 1
            look = step % sync_every == 0 or step == cap
            if look:
                self._check_skips(rows)
                if step == cap or not bool(rows.active.any()):
                    break
            logits = self.backend.decode_step(state, feed)
        return self._completions(rows)

    def _advance(self, rows: _Rows, logits: torch.Tensor, seeds, injection: torch.Tensor, cap: int) -> torch.Tensor:
        """Choose and record each active row's next token (all on the device); return the (B,)
        tokens to feed (pad for rows that wrote nothing)."""
        vocabulary = self.backend.vocabulary
        chosen = seeded_choice(logits, self.temperature, seeds, rows.lengths, vocabulary.valid_size)
        forced = rows.forced_at > 0
        token = torch.where(forced, injection[rows.forced_at.clamp(max=injection.numel() - 1)], chosen)
        eos = rows.active & ~forced & (chosen == vocabulary.eos_id)
        taken = (rows.skipped_at >= 0).sum(dim=1)  # (B,)
        skip = eos & (taken < rows.skips) & (rows.lengths + injection.numel() < cap)
        rows.skipped_at.scatter_(1, taken.unsqueeze(1), torch.where(skip, rows.lengths, -1).unsqueeze(1))
        token = torch.where(skip, injection[0], token)
        write = rows.active & ~(eos & ~skip)
        rows.finished |= eos & ~skip
        step_forced = forced & rows.active
        rows.forced_at = torch.where(
            skip, 1 if injection.numel() > 1 else 0,
            torch.where(step_forced, (rows.forced_at + 1) % injection.numel(), rows.forced_at),
        )
        pad = torch.full_like(token, vocabulary.pad_id)
        at = rows.lengths.unsqueeze(1)
        rows.tokens.scatter_(1, at, torch.where(write, token, pad).unsqueeze(1))
        rows.sampled.scatter_(1, at, (write & ~forced & ~skip).unsqueeze(1))
        rows.lengths += write.long()
        rows.active = write & (rows.lengths < cap)
        return torch.where(write, token, pad)

    def _check_skips(self, rows: _Rows) -> None:
        """Ask the backend about image skips taken since the last look; cut back the rows whose
        round had not asked for an image (they end at that EOS)."""
        if not self._injection:
            return
        skipped_at = rows.skipped_at[:, : rows.skips].cpu()
        new = (skipped_at >= 0) & ~rows.checked
        if not bool(new.any()):
            return
        tokens = rows.tokens.cpu()
        for row in new.any(dim=1).nonzero().flatten().tolist():
            for column in new[row].nonzero().flatten().tolist():
                rows.checked[row, column] = True
                at = int(skipped_at[row, column])
                injected = self.backend.image_skip_tokens(tokens[row, :at].tolist())
                if injected is None:
                    rows.checked[row] = True  # later skips of this row never happened
                    rows.lengths[row], rows.active[row], rows.finished[row] = at, False, True
                    break
                if [int(t) for t in injected] != self._injection:
                    raise RuntimeError(
                        f"{type(self.backend).__name__}.image_skip_tokens returned {list(injected)}, "
                        f"image_skip_injection declared {self._injection}"
                    )

    def _completions(self, rows: _Rows) -> CompletionBatch:
        pad = self.backend.vocabulary.pad_id
        positions = torch.arange(rows.tokens.shape[1], device=rows.tokens.device)
        past = positions.unsqueeze(0) >= rows.lengths.unsqueeze(1)  # (B, cap + 1)
        width = int(rows.lengths.max()) if rows.lengths.numel() else 0
        return CompletionBatch(
            tokens=rows.tokens.masked_fill(past, pad)[:, :width],
            lengths=rows.lengths.clone(),
            sampled=(rows.sampled & ~past)[:, :width],
            finished=rows.finished.clone(),
        )


def batched_sampler(params: BatchedSamplerParams, backend: Backend, sampling: Any) -> BatchedSampler:
    """The ``[sampler]`` named ``batched``, following the run's ``[sampling]`` policy."""
    return BatchedSampler(
        backend,
        sampling.temperature,
        sampling.max_completion_tokens,
        sampling.max_image_skips,
        sync_every=params.sync_every,
    )

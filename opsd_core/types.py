"""Frozen dataclasses that cross role boundaries.

Owns: the shapes of what tasks, context builders, samplers, backends and divergences hand to
each other. Every tensor field states its shape and dtype with one letter set: B batch,
T tokens (completion rows), N completion tokens, V vocabulary, K top-K, C/H/W image.
Does not know: how any of it is produced or consumed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:
    import torch

# Segment names, as in the paper (student: system, problem image, question; teacher adds the rest).
SYSTEM = "system"
PROBLEM_IMAGE = "problem_image"
QUESTION = "question"
REF_INTRO = "ref_intro"
VISUAL_THOUGHT = "visual_thought"
TRANSITION = "transition"

# An image as tasks hand it over: a PIL image, or a float32 tensor (3, H, W) with values in [0, 1].
Image = Any


@dataclass(frozen=True)
class TextSegment:
    """A text turn of a context.

    Attributes:
        name: its role in the context (``system``, ``question``, ``ref_intro``, ...).
        text: the text, rendered by the backend with its own turn markers.
    """

    name: str
    text: str


@dataclass(frozen=True)
class ImageSegment:
    """An image block of a context.

    Attributes:
        name: its role (``problem_image`` or ``visual_thought``).
        image: the image as the task produced it (PIL, or float32 (3, H, W) in [0, 1]).
        pixels: when set, the already-preprocessed pixels the backend must use as is, float32
            (3, H, W) in the backend's normalised pixel space; the noise control sets this to
            N(0, 1) noise of the preprocessed shape.
    """

    name: str
    image: Image
    pixels: torch.Tensor | None = None


Segment = Union[TextSegment, ImageSegment]


@dataclass(frozen=True)
class Context:
    """An ordered list of segments: what a model sees before the completion."""

    segments: tuple[Segment, ...]

    def names(self) -> tuple[str, ...]:
        return tuple(segment.name for segment in self.segments)

    def get(self, name: str) -> Segment:
        """The segment called ``name``; KeyError if absent."""
        for segment in self.segments:
            if segment.name == name:
                return segment
        raise KeyError(f"context has no segment {name!r}; it has {self.names()}")

    def with_segment(self, new: Segment) -> Context:
        """A copy with the segment of the same name replaced by ``new``."""
        if new.name not in self.names():
            raise KeyError(f"context has no segment {new.name!r}; it has {self.names()}")
        return Context(tuple(new if s.name == new.name else s for s in self.segments))


@dataclass(frozen=True)
class Problem:
    """One problem of a task.

    Attributes:
        id: stable identifier (used for resumable evaluation and logging).
        image: the problem image.
        question: the question text.
        reference_answer: gold answer text, if the task has one (scoring).
        visual_thought: a stored VT image, if the task ships one; otherwise the backend
            generates it.
        metadata: task-specific data the scorer needs (e.g. the map of a maze).
        reference_trace: a text-only reasoning trace that ends in the answer, written as the
            model should write its completion, if the task has one: what the SFT control trains
            on (cross-entropy in the student context).
    """

    id: str
    image: Image
    question: str
    reference_answer: str | None = None
    visual_thought: Image | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    reference_trace: str | None = None


@dataclass(frozen=True)
class ContextPair:
    """The student and privileged teacher contexts of one problem."""

    student: Context
    teacher: Context


@dataclass(frozen=True)
class Vocabulary:
    """What the framework needs to know of a backend's tokens.

    Attributes:
        size: number of logit rows V (may exceed the tokenizer's size when padded).
        eos_id: the token that ends a completion.
        pad_id: the id used to pad completion batches (never trained on).
        valid_size: ids >= valid_size have no token string and are never sampled.
        special: other named special tokens, e.g. ``{"image_start": 151652}``.
    """

    size: int
    eos_id: int
    pad_id: int
    valid_size: int | None = None
    special: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class MemoryShape:
    """The sizes of a backend's decoder that the memory planner's activation and KV-cache
    estimates read (``Backend.memory_shape``).

    Attributes:
        hidden_size: D, the width of the residual stream.
        num_layers: decoder layers.
        num_heads: query heads H.
        num_kv_heads: key/value heads (H for plain multi-head attention, fewer with GQA).
        head_dim: width of one head.
        intermediate_size: width of the MLP's hidden layer (the gate and up projections).
        vocab_size: V, logit rows.
        max_positions: the longest sequence the model takes (None: no limit of its own).
        visual_thought_tokens: positions of one sequence while drawing a visual thought
            (context, its image latents and the image being drawn); 0 if the backend cannot draw.
        visual_thought_passes: sequences decoded per image drawn (e.g. 3 with text and image
            guidance).
    """

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_positions: int | None = None
    visual_thought_tokens: int = 0
    visual_thought_passes: int = 1


@dataclass(frozen=True)
class CompletionBatch:
    """Sampled completions of B contexts, padded to the longest.

    Attributes:
        tokens: int64 (B, N) completion tokens, padded with ``pad_id`` after ``lengths``; never
            contains the closing EOS.
        lengths: int64 (B,) number of completion tokens per row.
        sampled: bool (B, N) True where the token was sampled by the policy, False where the
            sampler injected it (image-skip rule) or it is padding.
        finished: bool (B,) True where the completion ended by sampling EOS, False where it hit
            a cap.
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    sampled: torch.Tensor
    finished: torch.Tensor

    @property
    def batch_size(self) -> int:
        return int(self.tokens.shape[0])

    def row_mask(self) -> torch.Tensor:
        """bool (B, N + 1): the loss rows.

        Row i < length predicts completion token i and carries loss only if that token was
        sampled; row ``length`` predicts EOS and always carries loss; rows past it are padding.
        """
        import torch

        batch, width = self.tokens.shape
        positions = torch.arange(width + 1, device=self.tokens.device)
        lengths = self.lengths.unsqueeze(1)  # (B, 1)
        token_rows = torch.cat(
            [self.sampled, torch.zeros(batch, 1, dtype=torch.bool, device=self.tokens.device)], dim=1
        )  # (B, N+1)
        return (positions.unsqueeze(0) < lengths) & token_rows | (positions.unsqueeze(0) == lengths)

    def select(self, rows: Sequence[int]) -> CompletionBatch:
        """The completions of ``rows`` (in that order), padded only to their own longest row."""
        import torch

        index = torch.as_tensor(list(rows), dtype=torch.long, device=self.tokens.device)
        lengths = self.lengths.index_select(0, index)
        width = int(lengths.max()) if len(index) else 0
        return CompletionBatch(
            tokens=self.tokens.index_select(0, index)[:, :width],
            lengths=lengths,
            sampled=self.sampled.index_select(0, index)[:, :width],
            finished=self.finished.index_select(0, index),
        )

    def token_lists(self) -> list[list[int]]:
        """Unpadded completion tokens as Python lists."""
        return [row[:length].tolist() for row, length in zip(self.tokens, self.lengths.tolist())]

    def truncated(self, max_lengths: torch.Tensor, pad_id: int) -> CompletionBatch:
        """A copy with row b cut to at most ``max_lengths[b]`` tokens (int64 (B,)).

        A cut row no longer counts as finished: its EOS was never sampled.
        """
        import torch

        lengths = torch.minimum(self.lengths, max_lengths.to(self.lengths))
        width = int(lengths.max()) if lengths.numel() else 0
        keep = torch.arange(width, device=self.tokens.device).unsqueeze(0) < lengths.unsqueeze(1)  # (B, N')
        tokens = torch.where(keep, self.tokens[:, :width], torch.full_like(self.tokens[:, :width], pad_id))
        return replace(
            self,
            tokens=tokens,
            lengths=lengths,
            sampled=self.sampled[:, :width] & keep,
            finished=self.finished & (lengths == self.lengths),
        )


@dataclass(frozen=True)
class CompletionLogits:
    """Logits a model gives at the completion rows of a context.

    Attributes:
        logits: float (B, N + 1, V), row i predicts completion token i, row N predicts EOS;
            any float dtype (divergences compute in float32).
        mask: bool (B, N + 1), the loss rows (``CompletionBatch.row_mask()``).
    """

    logits: torch.Tensor
    mask: torch.Tensor


@dataclass(frozen=True)
class CompletionHidden:
    """Final hidden states a model gives at the completion rows of a context, and its lm_head.

    The rows are those of :class:`CompletionLogits`: ``weight`` applied to ``hidden`` gives
    its ``logits`` (``hidden @ weight.T``), without ever forming them.

    Attributes:
        hidden: float (B, N + 1, D), the final-norm output that the lm_head multiplies; row i
            predicts completion token i, row N predicts EOS.
        mask: bool (B, N + 1), the loss rows (``CompletionBatch.row_mask()``).
        weight: float (V, D), the lm_head weight (the model's own parameter, so gradients
            reach it); the lm_head has no bias.
    """

    hidden: torch.Tensor
    mask: torch.Tensor
    weight: torch.Tensor


@dataclass(frozen=True)
class Score:
    """A task's verdict on one response.

    Attributes:
        correct: whether the response counts as correct.
        value: the score in [0, 1] (equal to ``float(correct)`` for exact-match tasks).
        extracted: the answer the scorer extracted, for logs and tables.
    """

    correct: bool
    value: float
    extracted: str | None = None

"""The tiny UMM's word-level vocabulary and tokenizer.

Owns: the token list (specials, prompt words, the four moves, one token per grid cell), its
order (ids are positions in the list, saved as ``vocab.json`` beside the weights), and
encoding/decoding of space-separated words.
Does not know: models, images or contexts; which specials open which segment is the backend's
rendering.
"""

from __future__ import annotations

from collections.abc import Sequence

PAD, BOS, EOS, SYSTEM_OPEN = "<pad>", "<bos>", "<eos>", "<sys>"
IMAGE_OPEN, IMAGE_CLOSE, IMAGE_PATCH, ANSWER = "<img>", "</img>", "<imgp>", "<ans>"
SPECIALS = (PAD, BOS, EOS, SYSTEM_OPEN, IMAGE_OPEN, IMAGE_CLOSE, IMAGE_PATCH, ANSWER)
# Every word of the prompt texts in ``opsd_tiny.context``; a test checks they all encode.
PROMPT_WORDS = tuple("navigate the frozen lake find path S to G ? reference sketch : now answer".split())
# Completion moves in the canonical tie-break order (the task's shortest path prefers them so).
MOVES = ("R", "D", "L", "U")


def cell_token(index: int) -> str:
    """The word naming grid cell ``index`` (row-major), e.g. ``c7``."""
    return f"c{index}"


class Vocab:
    """A fixed list of word tokens; a token's id is its position in the list."""

    def __init__(self, tokens: Sequence[str]):
        self.tokens = list(tokens)
        self.ids = {token: index for index, token in enumerate(self.tokens)}
        if len(self.ids) != len(self.tokens):
            duplicates = sorted({token for token in self.tokens if self.tokens.count(token) > 1})
            raise ValueError(f"vocabulary has duplicate tokens: {duplicates}")
        missing = [token for token in SPECIALS if token not in self.ids]
        if missing:
            raise ValueError(f"vocabulary lacks the special tokens {missing}")

    @classmethod
    def for_grid(cls, size: int) -> Vocab:
        """Specials, prompt words, moves, then cells ``c0`` .. ``c{size*size-1}``: 52 tokens for 5x5."""
        return cls([*SPECIALS, *PROMPT_WORDS, *MOVES, *(cell_token(i) for i in range(size * size))])

    def __len__(self) -> int:
        return len(self.tokens)

    def id(self, token: str) -> int:
        return self.ids[token]

    def encode(self, text: str, skip_unknown: bool = False) -> list[int]:
        """Ids of the whitespace-separated words of ``text``; a word outside the vocabulary is
        a ValueError naming it (the tiny model cannot read free text), or dropped with
        ``skip_unknown``."""
        words = text.split()
        if skip_unknown:
            return [self.ids[word] for word in words if word in self.ids]
        unknown = [word for word in words if word not in self.ids]
        if unknown:
            raise ValueError(f"words not in the tiny vocabulary: {unknown}; it knows {' '.join(self.tokens)}")
        return [self.ids[word] for word in words]

    def decode(self, ids: Sequence[int]) -> str:
        """Space-joined words of ``ids``; ids outside the vocabulary are skipped."""
        return " ".join(self.tokens[i] for i in ids if 0 <= i < len(self.tokens))

"""The tiny UMM's word-level vocabulary.

Owns: the token list (specials, prompt words, moves, cells), encoding and decoding.
Does not know: models or images.
"""

from __future__ import annotations

from collections.abc import Sequence

PAD, BOS, EOS, IMAGE_OPEN, IMAGE_CLOSE, IMAGE_PATCH, ANSWER = "<pad>", "<bos>", "<eos>", "<img>", "</img>", "<imgp>", "<ans>"
SPECIALS = [PAD, BOS, EOS, IMAGE_OPEN, IMAGE_CLOSE, IMAGE_PATCH, ANSWER]
WORDS = "navigate the frozen lake find path S to G ? reference sketch : now answer".split()
MOVES = ["R", "D", "L", "U"]


def cell_token(index: int) -> str:
    return f"c{index}"


class Vocab:
    """Word-level tokens: specials, prompt words, the four moves, and one token per cell."""

    def __init__(self, tokens: Sequence[str]):
        self.tokens = list(tokens)
        self.ids = {token: index for index, token in enumerate(self.tokens)}
        if len(self.ids) != len(self.tokens):
            raise ValueError("vocabulary has duplicate tokens")

    @classmethod
    def for_grid(cls, size: int) -> Vocab:
        return cls(SPECIALS + WORDS + MOVES + [cell_token(i) for i in range(size * size)])

    def __len__(self) -> int:
        return len(self.tokens)

    def id(self, token: str) -> int:
        return self.ids[token]

    def encode(self, text: str) -> list[int]:
        """Ids of the space-separated words of ``text``; unknown words are an error."""
        unknown = [word for word in text.split() if word not in self.ids]
        if unknown:
            raise ValueError(f"words not in the tiny vocabulary: {unknown}")
        return [self.ids[word] for word in text.split()]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.tokens[i] for i in ids if 0 <= i < len(self.tokens))

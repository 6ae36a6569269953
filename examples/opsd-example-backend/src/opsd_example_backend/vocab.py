"""The byte-level vocabulary of ``byte-umm``.

Owns: the token ids: the 256 byte values of UTF-8 text, then EOS (the only other id the
sampler may draw), then special tokens that are never sampled.
Does not know: models, images or contexts.
"""

BYTE_TOKENS = 256
EOS = 256
"""Ends a completion; the last id with a token string (``valid_size`` = EOS + 1)."""
PAD = 257
BOS = 258
IMAGE_OPEN = 259
IMAGE_PATCH = 260
"""Placeholder id at each image-patch position; the patch's pixels are added to its embedding."""
IMAGE_CLOSE = 261
ANSWER = 262
"""Opens the completion: the last position of every rendered context."""
VOCAB_SIZE = 263


def encode(text: str) -> list[int]:
    """The UTF-8 bytes of ``text`` as token ids."""
    return list(text.encode("utf-8"))


def decode(token_ids) -> str:
    """Text of the byte ids in ``token_ids``; EOS and special ids are skipped, broken UTF-8 is
    replaced by U+FFFD."""
    return bytes(int(token) for token in token_ids if 0 <= int(token) < BYTE_TOKENS).decode("utf-8", errors="replace")

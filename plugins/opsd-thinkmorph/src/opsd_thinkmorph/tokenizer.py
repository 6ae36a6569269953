"""Tokenizers: the Qwen2 tokenizer from a checkpoint directory, or the debug flavour's bytes.

Owns: text <-> ids with no special tokens added (Qwen adds none), the number of ids that have
a token string, and the special ids a checkpoint's tokenizer assigns.
Does not know: models, contexts or turn markers' placement.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from opsd_thinkmorph.architecture import CheckpointContentError, CheckpointFileError, SpecialTokens

MARKER_FILE = "opsd_tokenizer.json"
SPECIAL_STRINGS = {
    "endoftext": "<|endoftext|>",
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
    "vision_start": "<|vision_start|>",
    "vision_end": "<|vision_end|>",
}


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then the special tokens: the debug flavour's vocabulary."""

    def __init__(self, special: SpecialTokens):
        self.special = special
        self._special_ids = {getattr(special, name): text for name, text in SPECIAL_STRINGS.items()}
        self.size = max(self._special_ids) + 1

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        pieces, pending = [], bytearray()
        for token in ids:
            if token < 256:
                pending.append(token)
                continue
            pieces.append(pending.decode("utf-8", errors="replace"))
            pending = bytearray()
            pieces.append(self._special_ids.get(token, ""))
        pieces.append(pending.decode("utf-8", errors="replace"))
        return "".join(pieces)

    def __len__(self) -> int:
        return self.size

    def save(self, directory: Path) -> None:
        (Path(directory) / MARKER_FILE).write_text(json.dumps({"kind": "bytes"}) + "\n")


class QwenTokenizer:
    """The checkpoint's own Qwen2 tokenizer files, read with transformers from a local directory."""

    def __init__(self, directory: Path):
        from transformers import AutoTokenizer

        directory = Path(directory)
        if not any((directory / name).is_file() for name in ("tokenizer.json", "vocab.json")):
            raise CheckpointFileError(
                f"no tokenizer in {directory}: expected the Qwen2 tokenizer files (tokenizer.json, or vocab.json "
                "+ merges.txt, with tokenizer_config.json) next to the weights"
            )
        self.directory = directory
        self.inner = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        ids = {name: self.inner.convert_tokens_to_ids(text) for name, text in SPECIAL_STRINGS.items()}
        unknown = [SPECIAL_STRINGS[name] for name, value in ids.items() if value is None or value < 0]
        if unknown:
            raise CheckpointContentError(f"tokenizer in {directory} lacks the special tokens {unknown}")
        self.special = SpecialTokens(**ids)

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        valid = [token for token in ids if token < len(self.inner)]
        return self.inner.decode(valid, skip_special_tokens=False)

    def __len__(self) -> int:
        return len(self.inner)

    def save(self, directory: Path) -> None:
        self.inner.save_pretrained(str(directory))


def load_tokenizer(directory: Path | None, special: SpecialTokens) -> ByteTokenizer | QwenTokenizer:
    """The tokenizer of a checkpoint directory; the byte tokenizer for debug checkpoints or none."""
    if directory is None:
        return ByteTokenizer(special)
    marker = Path(directory) / MARKER_FILE
    if marker.is_file() and json.loads(marker.read_text()).get("kind") == "bytes":
        return ByteTokenizer(special)
    return QwenTokenizer(directory)

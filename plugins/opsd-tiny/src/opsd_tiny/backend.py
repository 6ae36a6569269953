"""The ``tiny-umm`` backend: the Backend interface over the tiny UMM.

Owns: rendering contexts into token and patch sequences (``<bos>``, text words, image blocks
``<img> 25 patches </img>``, then ``<ans>`` opens the completion), batching with left-padded
prompts so every row's completion starts in the same column, completion-row logits, KV-cached
decoding, and the self-contained checkpoint directory (model.safetensors, config.json,
vocab.json).
Does not know: losses, teachers or sampling policy.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from opsd_core.errors import CapabilityError, CheckpointError
from opsd_core.interfaces import Backend, DecodeState
from opsd_core.types import CompletionBatch, CompletionLogits, Context, ImageSegment, TextSegment, Vocabulary
from opsd_tiny import context as prompts
from opsd_tiny.config import SHIPPED_CHECKPOINT, TinyBackendParams
from opsd_tiny.model import KVCache, ModelInputs, TinyConfig, TinyUMM
from opsd_tiny.vocab import ANSWER, BOS, EOS, IMAGE_CLOSE, IMAGE_OPEN, IMAGE_PATCH, PAD, Vocab

WEIGHTS, CONFIG, VOCAB = "model.safetensors", "config.json", "vocab.json"
GRID, CELL_PIXELS = 5, 8


@dataclass
class _Rendered:
    """One context as model input rows: token ids, patch cell and image block number per
    position, and each image's patch pixels with the position of its first patch."""

    tokens: list[int]
    cells: list[int]
    blocks: list[int]
    images: list[tuple[int, torch.Tensor]]


class TinyDecodeState(DecodeState):
    def __init__(self, cache: KVCache, next_positions: torch.Tensor, logits: torch.Tensor, model: TinyUMM):
        self.cache, self.next_positions, self.logits, self.model = cache, next_positions, logits, model


class TinyBackend(Backend):
    """The embedded default's model family."""

    def __init__(self, params: TinyBackendParams | None = None):
        self.params = params or TinyBackendParams()
        self.directory: Path | None = None
        if self.params.checkpoint == "random":
            self.vocab = Vocab.for_grid(GRID)
            self.config = TinyConfig(vocab_size=len(self.vocab))
        else:
            self.directory = Path(self.params.checkpoint) if self.params.checkpoint else SHIPPED_CHECKPOINT
            self.vocab, self.config = read_checkpoint_metadata(self.directory)
        self._vocabulary = Vocabulary(
            size=len(self.vocab),
            eos_id=self.vocab.id(EOS),
            pad_id=self.vocab.id(PAD),
            valid_size=len(self.vocab),
            special={name: self.vocab.id(token) for name, token in
                     (("bos", BOS), ("image_open", IMAGE_OPEN), ("image_close", IMAGE_CLOSE), ("answer", ANSWER))},
        )

    # ------------------------------------------------------------------ identity
    @property
    def vocabulary(self) -> Vocabulary:
        return self._vocabulary

    def build_model(self) -> TinyUMM:
        model = TinyUMM(self.config)
        if self.directory is not None:
            self.load_weights(model, self.directory)
        return model

    def context_builder(self):
        return prompts.context_builder()

    def encode(self, text: str) -> list[int]:
        return self.vocab.encode(text)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.vocab.decode(token_ids)

    def preprocess_image(self, image) -> torch.Tensor:
        """float32 (3, 40, 40) in [-1, 1], the normalised pixel space the model reads (as in
        BAGEL's ViT), so that an N(0, 1) noise image has the scale of a real one."""
        if isinstance(image, torch.Tensor):
            pixels = image.detach().float().cpu()
        else:
            pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255.0)
        side = GRID * CELL_PIXELS
        if tuple(pixels.shape) != (3, side, side):
            raise ValueError(f"tiny-umm images must be (3, {side}, {side}), got {tuple(pixels.shape)}")
        return pixels * 2.0 - 1.0

    # ------------------------------------------------------------------ rendering
    def _render(self, context: Context) -> _Rendered:
        rendered = _Rendered([self.vocab.id(BOS)], [0], [0], [])
        block = 0
        for segment in context.segments:
            if isinstance(segment, TextSegment):
                ids = self.encode(segment.text)
                rendered.tokens += ids
                rendered.cells += [0] * len(ids)
                rendered.blocks += [0] * len(ids)
                continue
            if not isinstance(segment, ImageSegment):
                raise TypeError(f"unknown segment type {type(segment).__name__}")
            block += 1
            pixels = segment.pixels if segment.pixels is not None else self.preprocess_image(segment.image)
            patches = pixels.reshape(3, GRID, CELL_PIXELS, GRID, CELL_PIXELS).permute(1, 3, 0, 2, 4)
            patches = patches.reshape(GRID * GRID, -1)  # (25, P)
            rendered.images.append((len(rendered.tokens) + 1, patches))
            rendered.tokens += [self.vocab.id(IMAGE_OPEN)] + [self.vocab.id(IMAGE_PATCH)] * len(patches) + [self.vocab.id(IMAGE_CLOSE)]
            rendered.cells += [0] + list(range(len(patches))) + [0]
            rendered.blocks += [block] * (len(patches) + 2)
        rendered.tokens.append(self.vocab.id(ANSWER))
        rendered.cells.append(0)
        rendered.blocks.append(0)
        return rendered

    def context_length(self, context: Context) -> int:
        return len(self._render(context).tokens)

    def _inputs(
        self, contexts: Sequence[Context], completions: CompletionBatch | None, device: torch.device
    ) -> tuple[ModelInputs, int]:
        """Left-padded prompts followed by right-padded completions; returns the inputs and the
        prompt width (the column after each row's ``<ans>``)."""
        rendered = [self._render(context) for context in contexts]
        width = max(len(r.tokens) for r in rendered)
        extra = 0 if completions is None else completions.tokens.shape[1]
        batch, total = len(rendered), width + extra
        tokens = torch.full((batch, total), self.vocabulary.pad_id, dtype=torch.long)
        patches = torch.zeros(batch, total, self.config.patch_dim)
        cells = torch.zeros(batch, total, dtype=torch.long)
        blocks = torch.zeros(batch, total, dtype=torch.long)
        valid = torch.zeros(batch, total, dtype=torch.bool)
        for row, item in enumerate(rendered):
            offset = width - len(item.tokens)
            tokens[row, offset:width] = torch.tensor(item.tokens)
            cells[row, offset:width] = torch.tensor(item.cells)
            blocks[row, offset:width] = torch.tensor(item.blocks)
            valid[row, offset:width] = True
            for first, pixels in item.images:
                patches[row, offset + first : offset + first + len(pixels)] = pixels
        if completions is not None:
            tokens[:, width:] = completions.tokens.cpu()
            valid[:, width:] = torch.arange(extra).unsqueeze(0) < completions.lengths.cpu().unsqueeze(1)
        positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
        if int(positions.max()) >= self.config.max_positions:
            raise CapabilityError(
                f"tiny-umm handles at most {self.config.max_positions} positions; this batch needs "
                f"{int(positions.max()) + 1} (lower sampling.max_completion_tokens)"
            )
        inputs = ModelInputs(tokens, positions, patches, cells, blocks, valid)
        return ModelInputs(*(getattr(inputs, name).to(device) for name in inputs.__dataclass_fields__)), width

    # ------------------------------------------------------------------ model calls
    def completion_logits(self, model: TinyUMM, contexts: Sequence[Context], completions: CompletionBatch) -> CompletionLogits:
        device = next(model.parameters()).device
        inputs, width = self._inputs(contexts, completions, device)
        logits = model(inputs)  # (B, T, V)
        rows = logits[:, width - 1 : width + completions.tokens.shape[1]]  # (B, N+1, V)
        return CompletionLogits(rows, completions.row_mask().to(device))

    def start_decoding(self, model: TinyUMM, contexts: Sequence[Context], max_new_tokens: int) -> TinyDecodeState:
        device = next(model.parameters()).device
        inputs, width = self._inputs(contexts, None, device)
        longest = int(inputs.positions[:, -1].max()) + 1 + max_new_tokens
        if longest > self.config.max_positions:
            raise CapabilityError(
                f"tiny-umm handles at most {self.config.max_positions} positions; a {width}-position prompt "
                f"plus {max_new_tokens} new tokens does not fit (lower the completion cap)"
            )
        cache = KVCache(len(contexts), self.config, width + max_new_tokens, device, next(model.parameters()).dtype)
        logits = model(inputs, cache)[:, -1]  # (B, V)
        return TinyDecodeState(cache, inputs.positions[:, -1] + 1, logits, model)

    def decode_step(self, state: TinyDecodeState, tokens: torch.Tensor) -> torch.Tensor:
        batch = tokens.shape[0]
        device = state.next_positions.device
        zeros = torch.zeros(batch, 1, dtype=torch.long, device=device)
        inputs = ModelInputs(
            tokens=tokens.view(batch, 1).to(device),
            positions=state.next_positions.view(batch, 1),
            patches=torch.zeros(batch, 1, self.config.patch_dim, device=device),
            patch_cells=zeros,
            image_blocks=zeros,
            valid=torch.ones(batch, 1, dtype=torch.bool, device=device),
        )
        state.logits = state.model(inputs, state.cache)[:, -1]
        state.next_positions = state.next_positions + 1
        return state.logits

    # ------------------------------------------------------------------ weights on disk
    def save_pretrained(self, model: TinyUMM, directory: Path, metadata: dict | None = None) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: tensor.detach().float().contiguous().cpu() for name, tensor in model.state_dict().items()}
        save_file(tensors, directory / WEIGHTS)
        config = {"architecture": model.config.to_dict(), **(metadata or {})}
        (directory / CONFIG).write_text(json.dumps(config, indent=2))
        (directory / VOCAB).write_text(json.dumps(self.vocab.tokens))

    def load_weights(self, model: TinyUMM, directory: Path) -> None:
        directory = Path(directory)
        path = directory / WEIGHTS
        if not path.is_file():
            raise CheckpointError(
                f"{str(directory)!r} is not a tiny-umm checkpoint: expected {WEIGHTS}, {CONFIG} and {VOCAB} there"
            )
        try:
            tensors = load_file(path)
        except Exception as error:
            raise CheckpointError(f"{path}: unreadable safetensors file ({error})") from None
        expected = model.state_dict()
        missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
        if missing or unexpected:
            raise CheckpointError(f"{path}: missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]}")
        for name, tensor in tensors.items():
            if tensor.shape != expected[name].shape:
                raise CheckpointError(
                    f"{path}: {name} has shape {tuple(tensor.shape)}, the model expects {tuple(expected[name].shape)}"
                )
        with torch.no_grad():
            for name, target in expected.items():
                target.copy_(tensors[name])


def read_checkpoint_metadata(directory: Path) -> tuple[Vocab, TinyConfig]:
    """The vocabulary and architecture of a checkpoint directory, with a clear error when
    files are missing."""
    missing = [name for name in (WEIGHTS, CONFIG, VOCAB) if not (directory / name).is_file()]
    if missing:
        raise CheckpointError(
            f"{str(directory)!r} is not a tiny-umm checkpoint: missing {', '.join(missing)} (expected "
            f"{WEIGHTS}, {CONFIG}, {VOCAB}; make one with `python -m opsd_tiny.pretrain --out DIR`)"
        )
    vocab = Vocab(json.loads((directory / VOCAB).read_text()))
    architecture = json.loads((directory / CONFIG).read_text())["architecture"]
    config = TinyConfig(**architecture)
    if config.vocab_size != len(vocab):
        raise CheckpointError(f"{directory}: config vocab_size {config.vocab_size} != {len(vocab)} tokens in {VOCAB}")
    return vocab, config

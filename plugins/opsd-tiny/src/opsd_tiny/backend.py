"""The ``tiny-umm`` backend: the Backend interface over the tiny UMM.

Owns: rendering contexts into token and patch rows (``<bos>``; the system text after
``<sys>``; other texts as plain words; each image as ``<img>``, one ``<imgp>`` patch per grid
cell, ``</img>``; then ``<ans>`` opens the completion), the pixel normalisation, batching
(prompts left-padded so every row's completion starts in the same column, completions
right-padded, positions counted per row so a batched row equals the row alone), completion-row
logits and final hidden states, KV-cached decoding, and saving/loading through :mod:`opsd_tiny.state_dict`.
Does not know: losses, teachers or sampling policy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from opsd_core.api import (
    FUSED_HEAD,
    SYSTEM,
    Backend,
    Capabilities,
    CapabilityError,
    CompletionBatch,
    CompletionHidden,
    CompletionLogits,
    Context,
    DecodeState,
    ImageSegment,
    MemoryShape,
    PrivilegedContextBuilder,
    TextSegment,
    Vocabulary,
)
from opsd_tiny import context as prompts
from opsd_tiny import state_dict
from opsd_tiny.config import RANDOM_WEIGHTS, SHIPPED_CHECKPOINT, TinyBackendParams
from opsd_tiny.model import KVCache, ModelInputs, TinyConfig, TinyUMM
from opsd_tiny.vocab import ANSWER, BOS, EOS, IMAGE_CLOSE, IMAGE_OPEN, IMAGE_PATCH, PAD, SYSTEM_OPEN, Vocab

DEFAULT_GRID = 5


@dataclass
class RenderedContext:
    """One context as model input: per position its token id, patch cell (-1: no patch) and
    image block (0: none); ``images`` holds each image's float32 (cells, P) patch pixels with
    the position of its first patch."""

    tokens: list[int] = field(default_factory=list)
    patch_cells: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    images: list[tuple[int, torch.Tensor]] = field(default_factory=list)

    def extend(self, tokens: Sequence[int], patch_cells: Sequence[int] | None = None, block: int = 0) -> None:
        self.tokens += tokens
        self.patch_cells += patch_cells if patch_cells is not None else [-1] * len(tokens)
        self.blocks += [block] * len(tokens)


class TinyDecodeState(DecodeState):
    """KV cache of a batch being decoded.

    Attributes:
        logits: float (B, V), the next-token logits after the last step.
        next_positions: int64 (B,), the position id of each row's next token.
    """

    def __init__(self, model: TinyUMM, cache: KVCache, next_positions: torch.Tensor, logits: torch.Tensor):
        self.model, self.cache, self.next_positions, self.logits = model, cache, next_positions, logits


class TinyBackend(Backend):
    """The embedded default's model family: :class:`TinyUMM` with its word vocabulary."""

    capabilities = Capabilities(hidden_states=True, meta_skeleton=True)

    def __init__(self, params: TinyBackendParams | None = None):
        self.params = params or TinyBackendParams()
        if self.params.checkpoint == RANDOM_WEIGHTS:
            self.directory: Path | None = None
            self.vocab = Vocab.for_grid(DEFAULT_GRID)
            self.config = TinyConfig(vocab_size=len(self.vocab), grid_size=DEFAULT_GRID)
        else:
            self.directory = Path(self.params.checkpoint) if self.params.checkpoint else SHIPPED_CHECKPOINT
            self.config, self.vocab, _ = state_dict.read_metadata(self.directory)
        ids = self.vocab.ids
        self._vocabulary = Vocabulary(
            size=len(self.vocab),
            eos_id=ids[EOS],
            pad_id=ids[PAD],
            valid_size=len(self.vocab),
            special={
                "bos": ids[BOS],
                "system": ids[SYSTEM_OPEN],
                "image_start": ids[IMAGE_OPEN],
                "image_end": ids[IMAGE_CLOSE],
                "image_patch": ids[IMAGE_PATCH],
                "answer": ids[ANSWER],
            },
        )

    # ------------------------------------------------------------------ vocabulary and images
    @property
    def vocabulary(self) -> Vocabulary:
        return self._vocabulary

    def build_model(self) -> TinyUMM:
        """A :class:`TinyUMM` on :attr:`device` in :attr:`dtype`, with the checkpoint's weights (or random ones)."""
        model = TinyUMM(self.config)
        if self.directory is not None:
            state_dict.load_state(model, self.directory)
        return model.to(self.device, self.dtype)

    def model_skeleton(self) -> TinyUMM:
        """:meth:`build_model`'s model on the meta device (for ``opsd plan`` and the memory check)."""
        with torch.device("meta"):
            return TinyUMM(self.config)

    def memory_shape(self) -> MemoryShape:
        """The tiny decoder's sizes (plain multi-head attention, a 4 D MLP)."""
        c = self.config
        return MemoryShape(
            hidden_size=c.d_model,
            num_layers=c.n_layers,
            num_heads=c.n_heads,
            num_kv_heads=c.n_heads,
            head_dim=c.d_model // c.n_heads,
            intermediate_size=c.mlp_ratio * c.d_model,
            vocab_size=c.vocab_size,
            max_positions=c.max_positions,
        )

    def start_checkpoint(self) -> Path | None:
        """The checkpoint directory (the shipped one by default; None for random weights)."""
        return self.directory

    def recomputed_layers(self, model: TinyUMM) -> list[torch.nn.Module]:
        """The transformer blocks (activation checkpointing)."""
        return list(model.blocks)

    def context_builder(self) -> PrivilegedContextBuilder:
        return prompts.context_builder()

    def encode(self, text: str) -> list[int]:
        return self.vocab.encode(text, skip_unknown=self.params.free_text == "skip")

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.vocab.decode(token_ids)

    def preprocess_image(self, image: Any) -> torch.Tensor:
        """float32 (3, side, side) in [-1, 1]: ``2 * pixels - 1`` of the [0, 1] image.

        Centring matters: with raw [0, 1] pixels the common ice colour dominates every patch and
        the model learns to read the image far later; it also puts the noise control's N(0, 1)
        pixels on the scale of real ones, as BAGEL's ViT normalisation does. A PIL image of
        another size is box-resized to side x side (undoing nearest-neighbour enlargement).
        """
        side = self.config.image_side
        if hasattr(image, "convert"):
            from PIL import Image

            picture = image.convert("RGB")
            if picture.size != (side, side):
                picture = picture.resize((side, side), Image.BOX)
            pixels = torch.from_numpy(np.asarray(picture, dtype=np.float32).transpose(2, 0, 1) / 255.0)
        else:
            pixels = torch.as_tensor(image).detach().to("cpu", torch.float32)
        if tuple(pixels.shape) != (3, side, side):
            raise ValueError(f"tiny-umm reads images of shape (3, {side}, {side}), got {tuple(pixels.shape)}")
        return pixels * 2.0 - 1.0

    # ------------------------------------------------------------------ rendering
    def render(self, context: Context) -> RenderedContext:
        """The token, patch and block rows of ``context``, ending with ``<ans>``."""
        ids, config = self.vocab.ids, self.config
        rendered = RenderedContext()
        rendered.extend([ids[BOS]])
        images = 0
        for segment in context.segments:
            if isinstance(segment, TextSegment):
                opener = [ids[SYSTEM_OPEN]] if segment.name == SYSTEM else []
                rendered.extend(opener + self.encode(segment.text))
            elif isinstance(segment, ImageSegment):
                images += 1
                pixels = segment.pixels if segment.pixels is not None else self.preprocess_image(segment.image)
                rendered.images.append((len(rendered.tokens) + 1, self._patches(pixels)))
                cells = config.patches_per_image
                rendered.extend(
                    [ids[IMAGE_OPEN]] + [ids[IMAGE_PATCH]] * cells + [ids[IMAGE_CLOSE]],
                    [-1, *range(cells), -1],
                    block=images,
                )
            else:
                raise TypeError(f"tiny-umm cannot render a segment of type {type(segment).__name__}")
        rendered.extend([ids[ANSWER]])
        return rendered

    def _patches(self, pixels: torch.Tensor) -> torch.Tensor:
        """float32 (cells, P) row-major grid-cell patches of float (3, side, side) ``pixels``."""
        grid, size = self.config.grid_size, self.config.cell_pixels
        if tuple(pixels.shape) != (3, grid * size, grid * size):
            raise ValueError(
                f"image pixels must have shape (3, {grid * size}, {grid * size}), got {tuple(pixels.shape)}"
            )
        patches = pixels.detach().to("cpu", torch.float32).reshape(3, grid, size, grid, size)
        return patches.permute(1, 3, 0, 2, 4).reshape(grid * grid, -1)  # (cells, 3 * size * size)

    def context_length(self, context: Context) -> int:
        return len(self.render(context).tokens)

    def model_inputs(
        self, contexts: Sequence[Context], completions: CompletionBatch | None, device: torch.device, dtype: torch.dtype
    ) -> tuple[ModelInputs, int]:
        """Left-padded prompts followed by right-padded completion tokens.

        Returns the inputs (B, W + N) and W, the prompt width: column W - 1 holds every row's
        ``<ans>``, so the completion rows of all contexts are columns W - 1 .. W - 1 + N.
        """
        rendered = [self.render(context) for context in contexts]
        width = max(len(item.tokens) for item in rendered)
        extra = 0 if completions is None else int(completions.tokens.shape[1])
        batch, total = len(rendered), width + extra
        tokens = torch.full((batch, total), self.vocabulary.pad_id, dtype=torch.long)
        patches = torch.zeros(batch, total, self.config.patch_dim)
        patch_cells = torch.full((batch, total), -1, dtype=torch.long)
        blocks = torch.zeros(batch, total, dtype=torch.long)
        valid = torch.zeros(batch, total, dtype=torch.bool)
        for row, item in enumerate(rendered):
            offset = width - len(item.tokens)
            tokens[row, offset:width] = torch.tensor(item.tokens)
            patch_cells[row, offset:width] = torch.tensor(item.patch_cells)
            blocks[row, offset:width] = torch.tensor(item.blocks)
            valid[row, offset:width] = True
            for first, pixels in item.images:
                patches[row, offset + first : offset + first + len(pixels)] = pixels
        if completions is not None:
            tokens[:, width:] = completions.tokens.cpu()
            valid[:, width:] = torch.arange(extra).unsqueeze(0) < completions.lengths.cpu().unsqueeze(1)
        positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, W + N), per-row count
        needed = int(positions.max()) + 1
        if needed > self.config.max_positions:
            raise CapabilityError(
                f"tiny-umm handles {self.config.max_positions} positions; this batch needs {needed} "
                "(lower sampling.max_completion_tokens)"
            )
        inputs = ModelInputs(tokens, positions, patches.to(dtype), patch_cells, blocks, valid)
        return inputs.to(device), width

    # ------------------------------------------------------------------ running the model
    def completion_logits(
        self, model: TinyUMM, contexts: Sequence[Context], completions: CompletionBatch
    ) -> CompletionLogits:
        """float (B, N + 1, V) logits at each context's completion rows, and the row mask."""
        parameter = next(model.parameters())
        inputs, width = self.model_inputs(contexts, completions, parameter.device, parameter.dtype)
        logits = model(inputs)  # (B, W + N, V)
        rows = logits[:, width - 1 : width + completions.tokens.shape[1]]  # (B, N + 1, V)
        return CompletionLogits(rows, completions.row_mask().to(parameter.device))

    def completion_hidden(
        self, model: TinyUMM, contexts: Sequence[Context], completions: CompletionBatch
    ) -> CompletionHidden:
        """float (B, N + 1, D) final hidden states at the rows of :meth:`completion_logits`,
        the row mask and the (V, D) lm_head weight."""
        parameter = next(model.parameters())
        inputs, width = self.model_inputs(contexts, completions, parameter.device, parameter.dtype)
        hidden = model.final_hidden(inputs)  # (B, W + N, D)
        rows = hidden[:, width - 1 : width + completions.tokens.shape[1]]  # (B, N + 1, D)
        return CompletionHidden(rows, completions.row_mask().to(parameter.device), model.lm_head.weight)

    def weights_read_directly(self) -> list[tuple[str, str]]:
        """The fused loss multiplies by ``lm_head.weight`` (see :meth:`completion_hidden`)."""
        return [("lm_head", FUSED_HEAD)]

    def start_decoding(self, model: TinyUMM, contexts: Sequence[Context], max_new_tokens: int) -> TinyDecodeState:
        parameter = next(model.parameters())
        inputs, width = self.model_inputs(contexts, None, parameter.device, parameter.dtype)
        longest = int(inputs.positions[:, -1].max()) + 1
        if longest + max_new_tokens > self.config.max_positions:
            raise CapabilityError(
                f"tiny-umm handles {self.config.max_positions} positions; a {longest}-position prompt plus "
                f"{max_new_tokens} new tokens does not fit (lower the completion cap)"
            )
        cache = KVCache(len(contexts), self.config, width + max_new_tokens, parameter.device, parameter.dtype)
        logits = model(inputs, cache)[:, -1]  # (B, V)
        return TinyDecodeState(model, cache, inputs.positions[:, -1] + 1, logits)

    def decode_step(self, state: TinyDecodeState, tokens: torch.Tensor) -> torch.Tensor:
        """Feed int64 (B,) ``tokens``; return float (B, V) next-token logits."""
        batch = tokens.shape[0]
        device = state.next_positions.device
        inputs = ModelInputs(
            tokens=tokens.view(batch, 1).to(device),
            positions=state.next_positions.view(batch, 1),
            patches=torch.zeros(batch, 1, self.config.patch_dim, device=device, dtype=state.cache.keys[0].dtype),
            patch_cells=torch.full((batch, 1), -1, dtype=torch.long, device=device),
            image_blocks=torch.zeros(batch, 1, dtype=torch.long, device=device),
            valid=torch.ones(batch, 1, dtype=torch.bool, device=device),
        )
        state.logits = state.model(inputs, state.cache)[:, -1]
        state.next_positions = state.next_positions + 1
        return state.logits

    # ------------------------------------------------------------------ weights on disk
    def save_pretrained(self, model: TinyUMM, directory: Path, metadata: dict[str, Any] | None = None) -> None:
        """Write ``model.safetensors`` (fp32), ``config.json`` (architecture plus ``metadata``)
        and ``vocab.json`` to ``directory``."""
        state_dict.write_checkpoint(model, model.config, self.vocab, Path(directory), metadata)

    def load_weights(self, model: TinyUMM, directory: Path) -> None:
        state_dict.load_state(model, Path(directory))

"""The ``byte-umm`` backend: opsd's Backend role over :class:`ByteUMM`.

Owns: rendering contexts into rows (``<bos>``; each text segment as its UTF-8 bytes and a
newline; each image as ``<img>``, one ``<patch>`` per image patch, ``</img>``; then ``<ans>``
opens the completion), the pixel normalisation, batching (prompts left-padded so that every
row's completion starts in the same column, completions right-padded, positions counted along
each row so that a batched row equals the row alone), completion-row logits, KV-cached
decoding, and the checkpoint layout (``config.json`` + ``model.safetensors``).
Does not know: losses, teachers, optimizers or sampling policy.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from opsd_core.api import (
    Backend,
    CapabilityError,
    CheckpointError,
    CompletionBatch,
    CompletionLogits,
    ConfigError,
    Context,
    DecodeState,
    ImageSegment,
    PrivilegedContextBuilder,
    TextSegment,
    Vocabulary,
)
from opsd_example_backend import context as prompts
from opsd_example_backend import vocab
from opsd_example_backend.config import ByteUMMParams
from opsd_example_backend.model import ByteUMM, ByteUMMConfig, KVCache, ModelInputs

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
NEWLINE = vocab.encode("\n")


class ByteDecodeState(DecodeState):
    """The KV cache of a batch being decoded.

    Attributes:
        logits: float (B, V), the next-token logits after the last step.
        next_positions: int64 (B,), the position id of each row's next token.
    """

    def __init__(self, model: ByteUMM, cache: KVCache, next_positions: torch.Tensor, logits: torch.Tensor):
        self.model, self.cache, self.next_positions, self.logits = model, cache, next_positions, logits


class ByteBackend(Backend):
    """A byte-level UMM: reads any UTF-8 text and images of any size; draws no images."""

    def __init__(self, params: ByteUMMParams | None = None):
        self.params = params if params is not None else ByteUMMParams()
        self.directory = Path(self.params.checkpoint) if self.params.checkpoint else None
        if self.directory is None:
            sizes = ("d_model", "n_layers", "n_heads", "max_positions", "image_size", "patch_size")
            self.config = ByteUMMConfig(**self.params.model_dump(include=set(sizes)))
        else:
            self.config = read_config(self.directory)
        self._vocabulary = Vocabulary(
            size=vocab.VOCAB_SIZE,
            eos_id=vocab.EOS,
            pad_id=vocab.PAD,
            valid_size=vocab.EOS + 1,
            special={
                "bos": vocab.BOS,
                "image_start": vocab.IMAGE_OPEN,
                "image_end": vocab.IMAGE_CLOSE,
                "answer": vocab.ANSWER,
            },
        )

    # ------------------------------------------------------------------ tokens, images, model
    @property
    def vocabulary(self) -> Vocabulary:
        return self._vocabulary

    def build_model(self) -> ByteUMM:
        """A :class:`ByteUMM` with seeded random weights, or the checkpoint's, on the run's device
        in the run's weight dtype (``self.device``, ``self.dtype``: set by the core)."""
        model = ByteUMM(self.config, seed=self.params.seed)
        if self.directory is not None:
            self.load_weights(model, self.directory)
        return model.to(self.device, self.dtype)

    def context_builder(self) -> PrivilegedContextBuilder:
        return prompts.context_builder()

    def encode(self, text: str) -> list[int]:
        return vocab.encode(text)

    def decode(self, token_ids: Sequence[int]) -> str:
        return vocab.decode(token_ids)

    def preprocess_image(self, image: Any) -> torch.Tensor:
        """float32 (3, S, S) in [-1, 1], S = ``image_size``: the image area-resized, then
        ``2 * pixels - 1``.

        Args:
            image: a PIL image, or float (3, H, W) with values in [0, 1].
        """
        if hasattr(image, "convert"):
            array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
            pixels = torch.from_numpy(array).permute(2, 0, 1)  # (3, H, W)
        else:
            pixels = torch.as_tensor(image).detach().to("cpu", torch.float32)
        if pixels.dim() != 3 or pixels.shape[0] != 3:
            raise ValueError(f"byte-umm reads RGB images (3, H, W), got shape {tuple(pixels.shape)}")
        side = self.config.image_size
        resized = F.interpolate(pixels.unsqueeze(0), size=(side, side), mode="area")[0]  # (3, S, S)
        return resized * 2.0 - 1.0

    def patches(self, pixels: torch.Tensor) -> torch.Tensor:
        """float32 (n, P) row-major patches of preprocessed float (3, S, S) ``pixels``."""
        side, size = self.config.image_size, self.config.patch_size
        if tuple(pixels.shape) != (3, side, side):
            raise ValueError(f"image pixels must have shape (3, {side}, {side}), got {tuple(pixels.shape)}")
        grid = side // size
        blocks = pixels.detach().to("cpu", torch.float32).reshape(3, grid, size, grid, size)
        return blocks.permute(1, 3, 0, 2, 4).reshape(grid * grid, -1)  # (n, 3 * size * size)

    # ------------------------------------------------------------------ contexts to rows
    def render(self, context: Context) -> tuple[list[int], torch.Tensor]:
        """The token ids of ``context`` (ending with ``<ans>``) and float32 (T, P) pixels of
        the patch at each position (zero elsewhere)."""
        tokens, images = [vocab.BOS], []
        for segment in context.segments:
            if isinstance(segment, TextSegment):
                tokens += vocab.encode(segment.text) + NEWLINE
            elif isinstance(segment, ImageSegment):
                pixels = segment.pixels if segment.pixels is not None else self.preprocess_image(segment.image)
                grid = self.patches(pixels)
                images.append((len(tokens) + 1, grid))
                tokens += [vocab.IMAGE_OPEN] + [vocab.IMAGE_PATCH] * len(grid) + [vocab.IMAGE_CLOSE]
            else:
                raise TypeError(f"byte-umm cannot render a segment of type {type(segment).__name__}")
        tokens.append(vocab.ANSWER)
        patches = torch.zeros(len(tokens), self.config.patch_dim)
        for first, grid in images:
            patches[first : first + len(grid)] = grid
        return tokens, patches

    def context_length(self, context: Context) -> int:
        return len(self.render(context)[0])

    def model_inputs(
        self, contexts: Sequence[Context], completions: CompletionBatch | None, device: torch.device, dtype: torch.dtype
    ) -> tuple[ModelInputs, int]:
        """Left-padded prompts followed by right-padded completion tokens.

        Returns the inputs, (B, W + N), and W, the prompt width: column W - 1 holds every row's
        ``<ans>``, so the N + 1 completion rows are columns W - 1 .. W - 1 + N.
        """
        rendered = [self.render(context) for context in contexts]
        width = max(len(tokens) for tokens, _ in rendered)
        extra = 0 if completions is None else int(completions.tokens.shape[1])
        batch, total = len(rendered), width + extra
        tokens = torch.full((batch, total), vocab.PAD, dtype=torch.long)
        patches = torch.zeros(batch, total, self.config.patch_dim)
        valid = torch.zeros(batch, total, dtype=torch.bool)
        for row, (row_tokens, row_patches) in enumerate(rendered):
            start = width - len(row_tokens)
            tokens[row, start:width] = torch.tensor(row_tokens)
            patches[row, start:width] = row_patches
            valid[row, start:width] = True
        if completions is not None:
            tokens[:, width:] = completions.tokens.cpu()
            valid[:, width:] = torch.arange(extra).unsqueeze(0) < completions.lengths.cpu().unsqueeze(1)
        positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, W + N)
        needed = int(positions.max()) + 1
        if needed > self.config.max_positions:
            raise CapabilityError(
                f"byte-umm holds {self.config.max_positions} positions; this batch needs {needed} "
                "(lower sampling.max_completion_tokens or raise backend.max_positions)"
            )
        inputs = ModelInputs(tokens.to(device), positions.to(device), patches.to(device, dtype), valid.to(device))
        return inputs, width

    # ------------------------------------------------------------------ running the model
    def completion_logits(
        self, model: ByteUMM, contexts: Sequence[Context], completions: CompletionBatch
    ) -> CompletionLogits:
        """float (B, N + 1, V) logits at each context's completion rows, and the row mask."""
        parameter = next(model.parameters())
        inputs, width = self.model_inputs(contexts, completions, parameter.device, parameter.dtype)
        logits = model(inputs)  # (B, W + N, V)
        rows = logits[:, width - 1 : width + completions.tokens.shape[1]]  # (B, N + 1, V)
        return CompletionLogits(rows, completions.row_mask().to(parameter.device))

    def start_decoding(self, model: ByteUMM, contexts: Sequence[Context], max_new_tokens: int) -> ByteDecodeState:
        parameter = next(model.parameters())
        inputs, width = self.model_inputs(contexts, None, parameter.device, parameter.dtype)
        next_positions = inputs.positions[:, -1] + 1  # (B,)
        if int(next_positions.max()) + max_new_tokens > self.config.max_positions:
            raise CapabilityError(
                f"byte-umm holds {self.config.max_positions} positions; a {int(next_positions.max())}-position "
                f"prompt plus {max_new_tokens} new tokens does not fit (lower the completion cap)"
            )
        cache = KVCache(len(contexts), self.config, width + max_new_tokens, parameter.device, parameter.dtype)
        logits = model(inputs, cache)[:, -1]  # (B, V)
        return ByteDecodeState(model, cache, next_positions, logits)

    def decode_step(self, state: ByteDecodeState, tokens: torch.Tensor) -> torch.Tensor:
        """Feed int64 (B,) ``tokens``; return float (B, V) next-token logits."""
        batch, device = tokens.shape[0], state.next_positions.device
        inputs = ModelInputs(
            tokens=tokens.view(batch, 1).to(device),
            positions=state.next_positions.view(batch, 1),
            patches=torch.zeros(batch, 1, self.config.patch_dim, device=device, dtype=state.cache.keys[0].dtype),
            valid=torch.ones(batch, 1, dtype=torch.bool, device=device),
        )
        state.logits = state.model(inputs, state.cache)[:, -1]
        state.next_positions = state.next_positions + 1
        return state.logits

    def check_run(self, config: Any) -> None:
        """Refuse runs whose teacher forwards could outgrow the position table. (Runs that would
        need this model to draw visual thoughts are refused by the core: it declares no
        ``visual_thoughts`` capability.)"""
        if config.sampling.max_forward_tokens > self.config.max_positions:
            raise ConfigError(
                f"sampling.max_forward_tokens: byte-umm holds {self.config.max_positions} positions, got "
                f"{config.sampling.max_forward_tokens}; set it to at most {self.config.max_positions} "
                "or raise backend.max_positions"
            )

    # ------------------------------------------------------------------ weights on disk
    def save_pretrained(self, model: ByteUMM, directory: Path) -> None:
        """Write ``config.json`` (the architecture) and ``model.safetensors`` (fp32) to ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
        weights = {
            name: tensor.detach().to("cpu", torch.float32).contiguous() for name, tensor in model.state_dict().items()
        }
        save_file(weights, str(directory / WEIGHTS_FILE))

    def load_weights(self, model: ByteUMM, directory: Path) -> None:
        """Load weights written by :meth:`save_pretrained`; the architectures must match."""
        directory = Path(directory)
        if read_config(directory) != model.config:
            raise CheckpointError(
                f"{directory / CONFIG_FILE} describes another architecture than the model's {model.config}"
            )
        model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)), strict=True)


def read_config(directory: Path) -> ByteUMMConfig:
    """The architecture stored in checkpoint ``directory``; an error saying what belongs there
    if it is not a byte-umm checkpoint."""
    files = [directory / CONFIG_FILE, directory / WEIGHTS_FILE]
    missing = [path.name for path in files if not path.is_file()]
    if missing:
        raise CheckpointError(
            f"{directory} is not a byte-umm checkpoint: {', '.join(missing)} missing; it must hold {CONFIG_FILE} "
            f"and {WEIGHTS_FILE} as written by ByteBackend.save_pretrained"
        )
    return ByteUMMConfig(**json.loads(files[0].read_text()))

"""The ``emu3`` backend: the Backend interface over transformers' Emu3ForConditionalGeneration.

Owns: rendering contexts as Emu3-Chat turns with each image VQ-encoded by the model's own
VQ-VAE into its token block (``<|image start|>{h}*{w}<|image token|>`` codes with an end-of-line
token after every row, ``<|extra_201|><|image end|>``), completion-row logits, batched KV-cached
decoding over left-padded rows, visual-thought generation (:mod:`opsd_emu3.visual_thought`),
by the model given or by a frozen second checkpoint (``drawing_checkpoint``: Emu3-Gen drawing
for Emu3-Chat), and checkpoints in the Hugging Face layout.
Does not know: losses, teachers, optimizers or sampling policy.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hashlib

import torch
from transformers import AutoTokenizer, Emu3Config, Emu3ForConditionalGeneration
from transformers.cache_utils import DynamicCache

from opsd_core.api import (
    Backend,
    Capabilities,
    CapabilityError,
    CompletionBatch,
    CompletionLogits,
    ConfigError,
    Context,
    DecodeState,
    ImageSegment,
    PrivilegedContextBuilder,
    Problem,
    Vocabulary,
    check_length_budget,
    context_floor,
)
from opsd_core.api.backend import PaddedRows, completion_columns, pad_left
from opsd_emu3 import context as emu3_context
from opsd_emu3 import flavours, state_dict
from opsd_emu3.config import CHECKPOINT, DEBUG, Emu3Params
from opsd_emu3.images import CLIP_MEAN, CLIP_STD, ImageTransform


CODE_CACHE_SIZE = 4096  # images whose VQ codes are kept (a few per problem in flight)


class Emu3DecodeState(DecodeState):
    """A batch being decoded.

    Attributes:
        logits: float (B, V) next-token logits.
        cache: the transformers KV cache of the prefilled rows and decoded tokens.
        attention_mask: int64 (B, S), 0 at each row's left padding, S = positions cached so far.
        next_positions: int64 (B,) RoPE position of each row's next token.
        capacity: the most positions a row may reach (the model's maximum).
    """

    def __init__(self, model, cache, attention_mask, next_positions, logits, capacity):
        self.model, self.cache, self.attention_mask = model, cache, attention_mask
        self.next_positions, self.logits, self.capacity = next_positions, logits, capacity


class Emu3Backend(Backend):
    """Emu3-Chat-hf / Emu3-Gen-hf from a local directory, or the tiny ``debug`` flavour."""

    capabilities = Capabilities(visual_thoughts=True, sharding=True, export=True)

    def __init__(self, params: Emu3Params | None = None):
        self.params = p = params or Emu3Params(flavour=DEBUG)
        self.directory = Path(p.checkpoint) if p.flavour == CHECKPOINT else None
        if self.directory is not None:
            state_dict.check_directory(self.directory)
            self.tokenizer = AutoTokenizer.from_pretrained(self.directory, local_files_only=True)
            config = Emu3Config.from_pretrained(self.directory, local_files_only=True)
            settings = state_dict.read_image_settings(self.directory)
        else:
            self.tokenizer = flavours.debug_tokenizer()
            config = flavours.debug_config(self.tokenizer)
            settings = {}
        # The student is scored in train mode: Emu3's default attention dropout (0.1) would make
        # its loss rows noisy and cached decoding differ from the full forward.
        config.text_config.attention_dropout = 0.0
        self.config = config
        self.ids = _special_ids(config.vocabulary_map)
        codes = {int(name[-8:-2]): index for name, index in config.vocabulary_map.items() if name.startswith("<|visual token")}
        self.code_to_token = torch.tensor([codes[c] for c in range(len(codes))], dtype=torch.long)  # (codebook,)
        self.spatial_factor = 2 ** (len(config.vq_config.channel_multiplier) - 1)
        self.transform = ImageTransform(
            self.spatial_factor,
            p.image_min_pixels,
            p.image_max_pixels,
            tuple(settings.get("image_mean", CLIP_MEAN)),
            tuple(settings.get("image_std", CLIP_STD)),
        )
        self.max_positions = config.text_config.max_position_embeddings
        if len(self.tokenizer) > config.text_config.vocab_size:
            raise ConfigError(f"tokenizer has {len(self.tokenizer)} tokens but the model only {config.text_config.vocab_size} rows")
        self._vocabulary = Vocabulary(
            size=config.text_config.vocab_size,
            eos_id=self.ids["eos"],
            pad_id=self.ids["pad"],
            valid_size=len(self.tokenizer),
            special={name: index for name, index in self.ids.items() if name not in ("eos", "pad")},
        )
        self._codes: dict[tuple, torch.Tensor] = {}
        self.drawing_directory = Path(p.drawing_checkpoint) if p.drawing_checkpoint is not None else None
        self.drawing_config = self._read_drawing_config() if self.drawing_directory is not None else None
        self._drawing_model: Emu3ForConditionalGeneration | None = None
        self._check_lengths()

    # ------------------------------------------------------------------ vocabulary and model
    @property
    def vocabulary(self) -> Vocabulary:
        return self._vocabulary

    def build_model(self) -> Emu3ForConditionalGeneration:
        """The model on :attr:`device` in :attr:`dtype`: the checkpoint's weights or seeded random ones."""
        if self.directory is not None:
            model = Emu3ForConditionalGeneration.from_pretrained(
                self.directory, config=self.config, dtype=self.dtype, local_files_only=True
            )
            return model.to(self.device).eval()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.params.seed)
            model = Emu3ForConditionalGeneration(self.config)
        return model.to(device=self.device, dtype=self.dtype).eval()

    def drawing_model(self) -> Emu3ForConditionalGeneration:
        """The frozen model of ``drawing_checkpoint`` on :attr:`device` in :attr:`dtype`, loaded at the first call."""
        if self._drawing_model is None:
            model = Emu3ForConditionalGeneration.from_pretrained(
                self.drawing_directory, config=self.drawing_config, dtype=self.dtype, local_files_only=True
            )
            self._drawing_model = model.to(self.device).eval().requires_grad_(False)
        return self._drawing_model

    def context_builder(self) -> PrivilegedContextBuilder:
        return emu3_context.context_builder()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, token_ids: Sequence[int]) -> str:
        known = len(self.tokenizer)
        return self.tokenizer.decode([int(t) for t in token_ids if int(t) < known])

    def preprocess_image(self, image: Any) -> torch.Tensor:
        """float32 (3, H, W) normalised with the processor's mean and std; sides multiples of the VQ's factor."""
        return self.transform(image)

    # ------------------------------------------------------------------ rendering
    def image_tokens(self, model: Emu3ForConditionalGeneration | None, pixels: torch.Tensor) -> list[int]:
        """The token block of float (3, H, W) ``pixels``; with ``model`` None, placeholders of the same length."""
        _, height, width = pixels.shape
        rows, columns = height // self.spatial_factor, width // self.spatial_factor
        if model is None:
            grid = torch.full((rows, columns), self.ids["image_placeholder"], dtype=torch.long)
        else:
            grid = self.code_to_token[self.vq_codes(model, pixels.unsqueeze(0))[0].cpu()]  # (h, w)
        end_of_line = torch.full((rows, 1), self.ids["end_of_line"], dtype=torch.long)
        body = torch.cat([grid, end_of_line], dim=1).flatten().tolist()  # h * (w + 1)
        return [*self.image_header(rows, columns), *body, self.ids["end_of_frame"], self.ids["image_end"]]

    def image_header(self, rows: int, columns: int) -> list[int]:
        """``<|image start|>{rows}*{columns}<|image token|>``: what precedes an image's codes."""
        return [self.ids["image_start"], *self.encode(f"{rows}*{columns}"), self.ids["image_wrapper"]]

    @torch.no_grad()
    def vq_codes(self, model: Emu3ForConditionalGeneration, pixels: torch.Tensor) -> torch.Tensor:
        """int64 (B, h, w) VQ codes of float (B, 3, H, W) ``pixels`` (one size), by ``model``'s VQ-VAE.

        Emu3's VQ-VAE is a frozen tokenizer and the same image is rendered several times a step
        (sampling, student and teacher scoring), so codes are cached per VQ module, pixels and
        parameter versions: any in-place change of the VQ's weights (loading, the EMA update)
        invalidates them.
        """
        vq = model.model.vqmodel
        key = (id(vq), tuple(p._version for p in vq.parameters()), hashlib.sha1(pixels.detach().float().cpu().numpy().tobytes()).hexdigest())
        if key not in self._codes:
            if len(self._codes) >= CODE_CACHE_SIZE:
                self._codes.clear()
            self._codes[key] = self._encode(vq, pixels).cpu()
        return self._codes[key]

    @staticmethod
    def _encode(vq, pixels: torch.Tensor) -> torch.Tensor:
        """Codes as at inference, whatever mode the model is in: the encoder's BatchNorm layers
        would otherwise use each image's own statistics and move their running ones at every
        call, so the student (train mode) and the teacher would tokenise an image differently."""
        sizes = torch.tensor([list(pixels.shape[2:])] * pixels.shape[0])
        parameter = next(vq.parameters())
        was_training = vq.training
        vq.eval()
        try:
            encoded = vq.encode(pixels.to(parameter.device, parameter.dtype), sizes, return_dict=True)
        finally:
            vq.train(was_training)
        return torch.stack(list(encoded.image_tokens)).long()

    def render(self, model: Emu3ForConditionalGeneration | None, context: Context) -> list[int]:
        """Token ids of ``context`` from BOS through the completion-opening ``ASSISTANT:``."""
        tokens = [self.ids["bos"]]
        for piece in emu3_context.layout(context):
            if isinstance(piece, ImageSegment):
                pixels = piece.pixels if piece.pixels is not None else self.preprocess_image(piece.image)
                tokens.extend(self.image_tokens(model, pixels.float()))
            else:
                tokens.extend(self.encode(piece))
        return tokens

    def context_length(self, context: Context) -> int:
        return len(self.render(None, context))

    def _fit(self, sequences: Sequence[Sequence[int]], extra: int = 0) -> None:
        longest = max(len(s) for s in sequences) + extra
        if longest > self.max_positions:
            raise ConfigError(
                f"an Emu3 sequence needs {longest} positions but the model has {self.max_positions}; lower "
                "sampling.max_completion_tokens, backend.image_max_pixels or backend.vt_grid"
            )

    # ------------------------------------------------------------------ running the model
    def completion_logits(self, model, contexts: Sequence[Context], completions: CompletionBatch) -> CompletionLogits:
        """float (B, N + 1, V) at each completion's rows (the context's last token, then each completion token)."""
        lengths = completions.lengths.cpu()
        sequences = [self.render(model, c) + t for c, t in zip(contexts, completions.token_lists())]
        self._fit(sequences)
        device = next(model.parameters()).device
        rows = pad_left(sequences, self.ids["pad"]).to(device)
        width = int(completions.tokens.shape[1])
        kept = min(width + 1, rows.token_ids.shape[1])
        logits = self._forward(model, rows, logits_to_keep=kept).logits  # (B, kept, V)
        index = completion_columns(lengths.to(device), width, kept)  # (B, N + 1)
        gathered = logits.gather(1, index.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))  # (B, N + 1, V)
        return CompletionLogits(gathered, completions.row_mask().to(device))

    @staticmethod
    def _forward(model, rows: PaddedRows, cache=None, logits_to_keep: int = 1):
        return model(
            input_ids=rows.token_ids,
            attention_mask=rows.attention_mask,
            position_ids=rows.positions,
            cache=cache,
            use_cache=cache is not None,
            logits_to_keep=logits_to_keep,
        )

    @torch.no_grad()
    def prefill(self, model, sequences: Sequence[Sequence[int]], room: int) -> Emu3DecodeState:
        """Prefill token-id ``sequences`` into a fresh cache with ``room`` more positions per row."""
        self._fit(sequences, room)
        device = next(model.parameters()).device
        rows = pad_left(sequences, self.ids["pad"]).to(device)
        cache = DynamicCache(config=self.config.text_config)
        output = self._forward(model, rows, cache)
        longest = int(rows.lengths.max())
        return Emu3DecodeState(model, output.cache, rows.attention_mask, rows.lengths.clone(), output.logits[:, -1], longest + room)

    def start_decoding(self, model, contexts: Sequence[Context], max_new_tokens: int) -> Emu3DecodeState:
        return self.prefill(model, [self.render(model, c) for c in contexts], max_new_tokens)

    @torch.no_grad()
    def decode_step(self, state: Emu3DecodeState, tokens: torch.Tensor) -> torch.Tensor:
        """Feed int64 (B,) ``tokens``; return float (B, V) next-token logits."""
        if state.attention_mask.shape[1] >= state.capacity:
            raise RuntimeError(f"decoding state full: it was started with room for {state.capacity} positions")
        batch = tokens.shape[0]
        device = state.attention_mask.device
        state.attention_mask = torch.cat([state.attention_mask, state.attention_mask.new_ones(batch, 1)], dim=1)  # (B, S + 1)
        step = PaddedRows(tokens.view(batch, 1).to(device), state.attention_mask, state.next_positions.view(batch, 1), state.next_positions)
        output = self._forward(state.model, step, state.cache)
        state.cache, state.next_positions = output.cache, state.next_positions + 1
        state.logits = output.logits[:, -1]
        return state.logits

    def check_run(self, config: Any) -> None:
        """Refuse, at the start of a run, a forward cap beyond the model's positions, completion
        and forward caps that cannot fit beside the shortest contexts with images at
        ``image_max_pixels`` (see :func:`opsd_core.api.check_length_budget`), and drawing with the Chat
        checkpoint (it was not trained to generate images)."""
        super().check_run(config)
        if config.sampling.max_forward_tokens > self.max_positions:
            raise ConfigError(
                f"sampling.max_forward_tokens = {config.sampling.max_forward_tokens} exceeds this Emu3's "
                f"{self.max_positions} positions (max_position_embeddings); set it to at most {self.max_positions}"
            )
        largest = self._largest_image()
        images = f"images at backend.image_max_pixels = {self.params.image_max_pixels}"
        floor = context_floor(self, largest, largest)
        check_length_budget(self, config, floor, self.max_positions, "max_position_embeddings", images)
        if not self.params.can_draw and config.sampling.visual_thoughts == "generate":
            raise ConfigError(
                "sampling.visual_thoughts = 'generate' needs an Emu3 that draws, but backend.checkpoint_kind = 'chat'; "
                "use 'stored' (or 'auto' with a task that stores visual thoughts) or the Emu3-Gen-hf checkpoint"
            )

    # ------------------------------------------------------------------ visual thoughts
    def generate_visual_thought(self, model, problems: Sequence[Problem], generator: torch.Generator | None = None) -> list:
        """One PIL image of ``vt_grid`` tokens per problem, sampled with guidance and VQ-decoded: by
        ``model``, or by the drawing checkpoint's model when ``drawing_checkpoint`` is set (``model``
        is then not used)."""
        if not self.params.can_draw:
            raise CapabilityError(
                "backend.checkpoint_kind = 'chat': Emu3-Chat was not trained to generate images. Use stored visual "
                "thoughts (sampling.visual_thoughts = 'stored') or the Emu3-Gen-hf checkpoint (checkpoint_kind = 'gen')"
            )
        from opsd_emu3.visual_thought import draw_visual_thoughts

        drawer = self.drawing_model() if self.drawing_directory is not None else model
        return draw_visual_thoughts(self, drawer, problems, generator)

    # ------------------------------------------------------------------ parallelism and weights on disk
    def recomputed_layers(self, model) -> list:
        """The transformer layers activation checkpointing recomputes (those ``parallelize`` shards)."""
        from opsd_emu3.parallelize import transformer_layers

        return transformer_layers(model)

    def parallelize(self, model, mesh: Any, config: Any):
        """FSDP2 per decoder layer, the VQ-VAE and the root; see :mod:`opsd_emu3.parallelize`."""
        from opsd_emu3.parallelize import parallelize_emu3

        return parallelize_emu3(model, mesh, config)

    def start_checkpoint(self) -> Path | None:
        """The checkpoint directory of flavour 'checkpoint' (None for the random flavours)."""
        return self.directory

    def save_pretrained(self, model, directory: Path) -> None:
        """config.json, model.safetensors, tokenizer files and preprocessor_config.json: loads alone."""
        state_dict.save_checkpoint(model, self.tokenizer, self._image_settings(), Path(directory))

    def export_model(self, model, directory: Path, dtype: torch.dtype, max_shard_bytes: int | None) -> None:
        """transformers' layout, which ``Emu3ForConditionalGeneration.from_pretrained`` loads: the
        files of :meth:`save_pretrained` with the weights cast to ``dtype`` (``model`` is cast in
        place) and split into shards with an index above ``max_shard_bytes``."""
        model.to(dtype)
        state_dict.save_checkpoint(model, self.tokenizer, self._image_settings(), Path(directory), max_shard_bytes)

    def _image_settings(self) -> dict:
        t = self.transform
        return {"image_mean": list(t.mean), "image_std": list(t.std), "min_pixels": t.min_pixels, "max_pixels": t.max_pixels, "spatial_factor": t.factor}

    def load_weights(self, model, directory: Path) -> None:
        state_dict.load_into(model, Path(directory))

    # ------------------------------------------------------------------ construction-time checks
    def _largest_image(self) -> torch.Tensor:
        """A blank square image as large as ``image_max_pixels`` allows: the lengths budgeted for."""
        side = max(self.spatial_factor, int(self.params.image_max_pixels**0.5) // self.spatial_factor * self.spatial_factor)
        return torch.zeros(3, side, side)

    def _read_drawing_config(self) -> Emu3Config:
        """The drawing checkpoint's config, refused unless it shares this model's vocabulary (the
        drawn tokens and the prompts are read with one tokenizer) and its positions hold a drawing."""
        state_dict.check_directory(self.drawing_directory, "backend.drawing_checkpoint")
        config = Emu3Config.from_pretrained(self.drawing_directory, local_files_only=True)
        if config.vocabulary_map != self.config.vocabulary_map or config.text_config.vocab_size != self.config.text_config.vocab_size:
            raise ConfigError(
                f"backend.drawing_checkpoint: {self.drawing_directory} has another vocabulary than backend.checkpoint "
                f"(its vocabulary_map or vocab_size differs); use Emu3-Gen-hf beside Emu3-Chat-hf, whose vocabularies match"
            )
        config.text_config.attention_dropout = 0.0
        return config

    def _check_lengths(self) -> None:
        """Refuse settings whose longest context cannot fit the model's positions."""
        image = self._largest_image()
        rows, columns = self.params.vt_grid
        problem = Problem(id="length-check", image=image, question="")
        pair = self.context_builder().build(problem, torch.zeros(3, rows * self.spatial_factor, columns * self.spatial_factor))
        teacher = self.context_length(pair.teacher)
        drawing = self.context_length(pair.student) + len(self.image_header(rows, columns)) + rows * (columns + 1)
        drawer = self.drawing_config or self.config
        checks = (
            ("the teacher context at backend.image_max_pixels", teacher, self.max_positions),
            ("drawing a visual thought of backend.vt_grid", drawing, drawer.text_config.max_position_embeddings),
        )
        for what, needed, positions in checks:
            if needed > positions:
                raise ConfigError(
                    f"{what} needs {needed} positions but this Emu3 has {positions} "
                    f"(image_max_pixels = {self.params.image_max_pixels}, vt_grid = {self.params.vt_grid}); lower them"
                )


def _special_ids(vocabulary_map: dict[str, int]) -> dict[str, int]:
    names = {
        "pad": flavours.PAD,
        "bos": flavours.BOS,
        "eos": flavours.EOS,
        "image_start": flavours.IMAGE_START,
        "image_end": flavours.IMAGE_END,
        "image_wrapper": flavours.IMAGE_WRAPPER,
        "end_of_line": flavours.END_OF_LINE,
        "end_of_frame": flavours.END_OF_FRAME,
        "image_placeholder": flavours.PLACEHOLDER,
    }
    missing = [token for token in names.values() if token not in vocabulary_map]
    if missing:
        raise ConfigError(f"the Emu3 config's vocabulary_map lacks {missing}; is this an Emu3 checkpoint?")
    return {name: vocabulary_map[token] for name, token in names.items()}

"""The ``janus-pro`` backend: the Backend interface over transformers' Janus.

Owns: rendering contexts as Janus-Pro conversations (text pieces tokenized one by one, each
image a ``<begin_of_image>`` + placeholders + ``<end_of_image>`` block whose placeholder slots
receive the SigLIP encoder's aligned features, as ``JanusModel`` does), the image transform of
``JanusImageProcessor`` (pad to square with the mean colour, resize, normalise),
completion-row logits, batched KV-cached decoding (right padding, per-row positions; the state
and the step are :mod:`opsd_janus.decoding`'s), visual-thought generation (delegated to
:mod:`opsd_janus.visual_thought`), and checkpoints in the Hugging Face layout
(:mod:`opsd_janus.state_dict`).
Does not know: losses, teachers, optimizers or sampling policy.

Image slots are tracked from the rendering, not found by searching for the placeholder id, so
a completion that happens to sample ``<image_placeholder>`` is scored as the text token it is.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from opsd_core.api import (
    Backend,
    Capabilities,
    CompletionBatch,
    CompletionLogits,
    ConfigError,
    Context,
    ImageSegment,
    PrivilegedContextBuilder,
    Problem,
    TextSegment,
    Vocabulary,
    check_length_budget,
    context_floor,
)
from opsd_core.api.backend import completion_rows, pad_right
from opsd_janus import context as chat
from opsd_janus import state_dict
from opsd_janus.config import CHECKPOINT, DEBUG, JanusParams
from opsd_janus.decoding import JanusDecodeState, Rendered, step


class JanusBackend(Backend):
    """Janus-Pro from a local Hugging Face directory, or the tiny ``debug`` flavour."""

    capabilities = Capabilities(visual_thoughts=True, sharding=True, export=True)

    def __init__(self, params: JanusParams | None = None):
        self.params = p = params or JanusParams(flavour=DEBUG, image_size=32)
        self.directory = Path(p.checkpoint) if p.flavour == CHECKPOINT else None
        mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
        if self.directory is not None:
            from transformers import AutoTokenizer, JanusConfig

            state_dict.require_checkpoint(self.directory)
            self.config = JanusConfig.from_pretrained(str(self.directory))
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.directory))
            processor_file = self.directory / "preprocessor_config.json"
            if processor_file.is_file():
                processor = json.loads(processor_file.read_text())
                mean, std = tuple(processor.get("image_mean", mean)), tuple(processor.get("image_std", std))
        else:
            from opsd_janus.debug import debug_config, debug_tokenizer

            self.config = debug_config(p.image_size, p.image_tokens or 16)
            self.tokenizer = debug_tokenizer()
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self._check_config()
        text = self.config.text_config
        ids = self._special_ids()
        self.ids = ids
        self._vocabulary = Vocabulary(
            size=text.vocab_size,
            eos_id=ids["eos"],
            pad_id=ids["pad"],
            valid_size=min(len(self.tokenizer), text.vocab_size),
            special={key: ids[key] for key in ("bos", "image_start", "image_end", "image_token")},
        )

    # ------------------------------------------------------------------ construction checks
    def _check_config(self) -> None:
        """Refuse, before any step runs, what this backend cannot do with this config."""
        p, vision, vq = self.params, self.config.vision_config, self.config.vq_config
        where = f"checkpoint {self.directory}" if self.directory else "the debug flavour"
        if vision.image_size != p.image_size:
            raise ValueError(
                f"backend.image_size = {p.image_size}, but {where} reads {vision.image_size}-pixel images "
                f"(vision_config.image_size); set image_size = {vision.image_size}"
            )
        self.image_tokens = vision.num_image_tokens
        if p.image_tokens is not None and p.image_tokens != self.image_tokens:
            raise ValueError(
                f"backend.image_tokens = {p.image_tokens}, but {where} has {self.image_tokens} tokens per image "
                f"(vision_config.num_image_tokens); leave image_tokens unset"
            )
        side = vq.num_patches * 2 ** (len(vq.channel_multiplier) - 1)
        if vq.num_patches**2 != self.image_tokens:
            raise ValueError(
                f"{where}: vision_config.num_image_tokens = {self.image_tokens} is not vq_config.num_patches^2 = "
                f"{vq.num_patches**2}; the VQ decoder could not draw the generated tokens"
            )
        self.visual_thought_side = side
        positions = self.config.text_config.max_position_embeddings
        self.max_context_tokens = p.max_context_tokens or positions
        if self.max_context_tokens > positions:
            raise ValueError(
                f"backend.max_context_tokens = {p.max_context_tokens} exceeds the model's "
                f"max_position_embeddings = {positions}; use at most {positions}"
            )
        if 2 * self.image_tokens + 16 > self.max_context_tokens:
            raise ValueError(
                f"a visual-thought prompt (problem image, question) plus {self.image_tokens} generated tokens does "
                f"not fit in {self.max_context_tokens} positions; raise backend.max_context_tokens"
            )

    def _special_ids(self) -> dict[str, int]:
        tokenizer = self.tokenizer
        strings = {"image_start": chat.IMAGE_START, "image_end": chat.IMAGE_END}
        ids = {
            "bos": tokenizer.bos_token_id,
            "eos": tokenizer.eos_token_id,
            "pad": tokenizer.pad_token_id,
            "image_token": self.config.image_token_id,
        }
        for key, token in strings.items():
            index = tokenizer.convert_tokens_to_ids(token)
            ids[key] = index if index != tokenizer.unk_token_id else None
        missing = sorted(key for key, value in ids.items() if value is None)
        if missing:
            raise ValueError(
                f"the tokenizer lacks Janus-Pro's special tokens {missing} (bos/eos/pad, {chat.IMAGE_START}, "
                f"{chat.IMAGE_END}); use the tokenizer files of a Janus-Pro checkpoint"
            )
        return ids

    # ------------------------------------------------------------------ vocabulary and model
    @property
    def vocabulary(self) -> Vocabulary:
        return self._vocabulary

    def build_model(self) -> torch.nn.Module:
        """``JanusForConditionalGeneration`` on :attr:`device` in :attr:`dtype`: the
        checkpoint's weights, or the debug flavour's seeded random ones."""
        from transformers import JanusForConditionalGeneration

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.params.seed)
            with torch.device(self.device):
                model = JanusForConditionalGeneration(self.config)
        model = model.to(dtype=self.dtype)
        if self.directory is not None:
            state_dict.load_into(model, self.directory)
        return model

    def context_builder(self) -> PrivilegedContextBuilder:
        return chat.context_builder()

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, token_ids: Sequence[int]) -> str:
        valid = self._vocabulary.valid_size
        return self.tokenizer.decode([int(t) for t in token_ids if 0 <= int(t) < valid])

    def preprocess_image(self, image: Any) -> torch.Tensor:
        """float32 (3, S, S), S = ``image_size``: padded to a square with the mean colour,
        resized (bicubic, antialiased) and normalised with the processor's mean and std."""
        if hasattr(image, "convert"):
            array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
            pixels = torch.from_numpy(array).permute(2, 0, 1)
        else:
            pixels = torch.as_tensor(image).detach().to("cpu", torch.float32)
        if pixels.ndim != 3 or pixels.shape[0] != 3:
            raise ValueError(f"janus-pro reads RGB images (3, H, W) in [0, 1], got shape {tuple(pixels.shape)}")
        height, width = pixels.shape[1:]
        side = max(height, width)
        square = self.mean.expand(3, side, side).clone()  # background: the mean colour, as the processor pads
        top, left = (side - height) // 2, (side - width) // 2
        square[:, top : top + height, left : left + width] = pixels
        size = self.params.image_size
        if side != size:
            square = torch.nn.functional.interpolate(
                square.unsqueeze(0), size=(size, size), mode="bicubic", antialias=True, align_corners=False
            )[0].clamp(0.0, 1.0)  # (3, S, S)
        return (square - self.mean) / self.std

    # ------------------------------------------------------------------ rendering
    def render(self, context: Context, opener: str = chat.ASSISTANT_OPEN) -> Rendered:
        """``context`` as one Janus-Pro user turn, ending with the completion opener."""
        rendered = Rendered(tokens=[self.ids["bos"]])
        segments = list(context.segments)
        if segments and isinstance(segments[0], TextSegment) and segments[0].name == "system":
            rendered.tokens += self.encode(segments.pop(0).text + chat.TURN_SEPARATOR)
        rendered.tokens += self.encode(chat.USER_OPEN)
        for index, segment in enumerate(segments):
            if index:
                rendered.tokens += self.encode("\n")
            if isinstance(segment, TextSegment):
                rendered.tokens += self.encode(segment.text)
            elif isinstance(segment, ImageSegment):
                pixels = segment.pixels if segment.pixels is not None else self.preprocess_image(segment.image)
                self.add_image(rendered, pixels)
            else:
                raise TypeError(f"janus-pro cannot render a segment of type {type(segment).__name__}")
        rendered.tokens += self.encode(opener)
        return rendered

    def add_image(self, rendered: Rendered, pixels: torch.Tensor) -> None:
        """Append one image block: ``<begin_of_image>``, the placeholder slots, ``<end_of_image>``."""
        size = self.params.image_size
        if tuple(pixels.shape) != (3, size, size):
            raise ValueError(f"janus-pro image pixels must have shape (3, {size}, {size}), got {tuple(pixels.shape)}")
        rendered.tokens.append(self.ids["image_start"])
        start = len(rendered.tokens)
        rendered.image_slots += range(start, start + self.image_tokens)
        rendered.tokens += [self.ids["image_token"]] * self.image_tokens
        rendered.tokens.append(self.ids["image_end"])
        rendered.images.append(pixels.float())

    def context_length(self, context: Context) -> int:
        return len(self.render(context).tokens)

    def require_fits(self, length: int, what: str) -> None:
        if length > self.max_context_tokens:
            raise ValueError(
                f"janus-pro: {what} needs {length} positions but the backend allows {self.max_context_tokens} "
                f"(backend.max_context_tokens, at most the model's max_position_embeddings); lower "
                f"sampling.max_forward_tokens / max_completion_tokens or shorten the prompts"
            )

    # ------------------------------------------------------------------ running the model
    def hidden_states(self, model, rendered: Sequence[Rendered], cache=None):
        """Run the LLM over right-padded rows.

        Returns:
            hidden: float (B, T, D) final-norm hidden states.
            attention: int64 (B, T) real-token mask.
            lengths: int64 (B,) tokens per row.
        """
        device = next(model.parameters()).device
        padded = pad_right([r.tokens for r in rendered], self.ids["pad"]).to(device)
        ids, attention, positions, lengths = padded.token_ids, padded.attention_mask, padded.positions, padded.lengths
        embeds = model.get_input_embeddings()(ids)  # (B, T, D)
        images = [image for r in rendered for image in r.images]
        if images:
            pixels = torch.stack(images).to(device=device, dtype=embeds.dtype)  # (I, 3, S, S)
            features = model.model.get_image_features(pixels).pooler_output  # (I, image_tokens, D)
            slots = torch.zeros_like(ids, dtype=torch.bool)
            for row, r in enumerate(rendered):
                slots[row, r.image_slots] = True
            embeds = embeds.masked_scatter(slots.unsqueeze(-1), features.to(embeds.dtype))
        output = model.model.language_model(
            inputs_embeds=embeds,
            attention_mask=attention,
            position_ids=positions,
            cache=cache,
            use_cache=cache is not None,
        )
        return output.last_hidden_state, attention, lengths

    def completion_logits(self, model, contexts: Sequence[Context], completions: CompletionBatch) -> CompletionLogits:
        """float (B, N + 1, V) from the row before each completion token and after the last one."""
        rendered = [self.render(context) for context in contexts]
        context_lengths = torch.tensor([len(r.tokens) for r in rendered], dtype=torch.long)
        for r, completion in zip(rendered, completions.token_lists()):
            r.tokens = r.tokens + completion
            self.require_fits(len(r.tokens), "a context and its completion")
        hidden, _, _ = self.hidden_states(model, rendered)
        width = int(completions.tokens.shape[1]) + 1
        rows = completion_rows(hidden, context_lengths, width)  # (B, N + 1, D)
        return CompletionLogits(model.lm_head(rows), completions.row_mask().to(hidden.device))

    @torch.no_grad()
    def start_decoding(self, model, contexts: Sequence[Context], max_new_tokens: int) -> JanusDecodeState:
        from transformers import DynamicCache

        rendered = [self.render(context) for context in contexts]
        for r in rendered:
            self.require_fits(len(r.tokens) + max_new_tokens, "a context plus the completion cap")
        cache = DynamicCache(config=model.config.text_config)
        hidden, attention, lengths = self.hidden_states(model, rendered, cache)
        last = hidden[torch.arange(len(rendered), device=hidden.device), lengths - 1]  # (B, D)
        capacity = attention.shape[1] + max_new_tokens
        return JanusDecodeState(model, cache, attention, lengths.clone(), model.lm_head(last), capacity)

    @torch.no_grad()
    def decode_step(self, state: JanusDecodeState, tokens: torch.Tensor) -> torch.Tensor:
        """Feed int64 (B,) ``tokens``; return float (B, V) next-token logits."""
        model = state.model
        embeds = model.get_input_embeddings()(tokens.view(-1, 1).to(state.attention.device))  # (B, 1, D)
        state.logits = model.lm_head(step(model, state, embeds)[:, -1])
        return state.logits

    # ------------------------------------------------------------------ visual thoughts
    @torch.no_grad()
    def check_run(self, config: Any) -> None:
        """Refuse, at the start of a run, caps that cannot fit the positions this backend allows.

        The forward cap must be within ``max_context_tokens``; the completion caps and the
        forward cap must fit beside the shortest student and teacher contexts (see
        :func:`opsd_core.api.check_length_budget`); and when visual thoughts may be drawn, the drawing
        prompt (problem image, empty question, ``vt_prompt``) plus its image tokens must fit.
        """
        super().check_run(config)
        if config.sampling.max_forward_tokens > self.max_context_tokens:
            raise ConfigError(
                f"sampling.max_forward_tokens = {config.sampling.max_forward_tokens} exceeds the "
                f"{self.max_context_tokens} positions janus-pro allows (backend.max_context_tokens, at most the "
                f"model's max_position_embeddings); set it to at most {self.max_context_tokens}"
            )
        size = self.params.image_size
        blank = torch.zeros(3, size, size)
        limit = "backend.max_context_tokens, at most the model's max_position_embeddings"
        images = f"images of {self.image_tokens} tokens"
        check_length_budget(self, config, context_floor(self, blank, blank), self.max_context_tokens, limit, images)
        if config.sampling.visual_thoughts != "stored":
            from opsd_janus.visual_thought import generation_prompts

            prompt = generation_prompts(self, [Problem(id="length-budget", image=blank, question="")])[0]
            needed = len(prompt.tokens) + self.image_tokens
            if needed > self.max_context_tokens:
                raise ConfigError(
                    f"sampling.visual_thoughts = {config.sampling.visual_thoughts!r}: drawing a visual thought takes "
                    f"{needed} positions before any question text (prompt, backend.vt_prompt, {self.image_tokens} image "
                    f"tokens) but janus-pro allows {self.max_context_tokens} ({limit}); use 'stored' visual thoughts "
                    f"or shorten backend.vt_prompt"
                )

    def generate_visual_thought(self, model, problems: Sequence[Problem], generator: torch.Generator | None = None) -> list:
        """One PIL image (``image_size`` square) per problem, from CFG-sampled VQ tokens."""
        from opsd_janus.visual_thought import draw_visual_thoughts

        return draw_visual_thoughts(self, model, problems, generator)

    # ------------------------------------------------------------------ parallelism and weights on disk
    def recomputed_layers(self, model) -> list:
        """The transformer layers activation checkpointing recomputes (those ``parallelize`` shards)."""
        from opsd_janus.parallelize import transformer_layers

        return transformer_layers(model)

    def parallelize(self, model, mesh: Any, config: Any):
        """FSDP2 over ``mesh``; see :mod:`opsd_janus.parallelize`."""
        from opsd_janus.parallelize import parallelize_janus

        return parallelize_janus(model, mesh, config)

    def start_checkpoint(self) -> Path | None:
        """The checkpoint directory of flavour 'checkpoint' (None for the random flavours)."""
        return self.directory

    def save_pretrained(self, model, directory: Path) -> None:
        """config.json, model.safetensors, tokenizer and processor files: a directory that loads alone."""
        directory = Path(directory)
        state_dict.save_checkpoint(model, directory)
        self.tokenizer.save_pretrained(str(directory))
        self.image_processor().save_pretrained(str(directory))

    def load_weights(self, model, directory: Path) -> None:
        state_dict.load_into(model, Path(directory))

    def export_model(self, model, directory: Path, dtype: torch.dtype, max_shard_bytes: int | None) -> None:
        """transformers' layout, which ``JanusForConditionalGeneration.from_pretrained`` loads:
        ``save_pretrained``'s config and weights in ``dtype`` (``model`` is cast in place; shards
        with an index above ``max_shard_bytes``), the tokenizer and processor files."""
        directory = Path(directory)
        model.to(dtype)
        state_dict.export_checkpoint(model, directory, max_shard_bytes)
        self.tokenizer.save_pretrained(str(directory))
        self.image_processor().save_pretrained(str(directory))

    def image_processor(self):
        """``JanusImageProcessorPil`` with this backend's size, mean and std (saved with checkpoints,
        and the post-processing of drawn images)."""
        from transformers.models.janus.image_processing_pil_janus import (
            JanusImageProcessorPil,
        )

        size = self.params.image_size
        return JanusImageProcessorPil(
            size={"height": size, "width": size},
            image_mean=self.mean.flatten().tolist(),
            image_std=self.std.flatten().tolist(),
        )


"""The ``thinkmorph`` backend: the Backend interface over the BAGEL re-implementation.

Owns: rendering contexts as BAGEL turns (each text segment a ``<|im_start|>…<|im_end|>`` turn,
each image a ViT block, the completion a turn opened by ``<|im_start|>``), completion-row
logits, batched KV-cached decoding, the image-skip rule, visual-thought generation (VAE
context blocks, three-context guidance, rectified flow), and checkpoints on disk.
Does not know: losses, teachers, optimizers or sampling policy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from opsd_core.api import (
    FUSED_HEAD,
    Backend,
    Capabilities,
    CompletionBatch,
    CompletionHidden,
    CompletionLogits,
    ConfigError,
    Context,
    DecodeState,
    ImageSegment,
    MemoryShape,
    PrivilegedContextBuilder,
    Problem,
    TextSegment,
    Vocabulary,
)
from opsd_core.api.backend import gather_rows, whole_parameter
from opsd_thinkmorph import architecture, prompts, state_dict
from opsd_thinkmorph.config import CHECKPOINT, DEBUG, ThinkMorphParams
from opsd_thinkmorph.images import ImageTransform
from opsd_thinkmorph.model import Bagel, KVCache, SiglipAttention
from opsd_thinkmorph.packing import TextItem, ViTItem, lay_out, pack_rows
from opsd_thinkmorph.runtime import (
    DecoderCache,
    FixedShapeDecoder,
    cache_bucket,
    forward_rows,
    is_shard,
    is_sharded,
)
from opsd_thinkmorph.tokenizer import load_tokenizer

# The projections one-row decode steps with kernels multiply by directly (one_row_layer).
ONE_ROW_PROJECTIONS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)

# ThinkMorph asks for a visual thought with this plain-text tag, then closes its turn.
IMAGE_REQUEST = "<image_start>"
# Room for the system, question and framing turns of a visual-thought drawing context.
VISUAL_THOUGHT_TEXT_TOKENS = 512


class ThinkMorphDecodeState(DecodeState):
    """A batch being decoded.

    Attributes:
        logits: float (B, V) next-token logits.
        cache: the KV cache of the prefilled contexts and decoded tokens.
        next_positions: int64 (B,) RoPE id of each row's next token.
    """

    def __init__(self, model: Bagel, cache: KVCache, next_positions: torch.Tensor, logits: torch.Tensor):
        self.model, self.cache, self.next_positions, self.logits = model, cache, next_positions, logits
        self.fixed: FixedShapeDecoder | None = None


class ThinkMorphBackend(Backend):
    """ThinkMorph-7B from a local directory, or the ``debug`` / ``7b-random`` flavours."""

    capabilities = Capabilities(
        hidden_states=True,
        sharded_hidden_states=True,
        meta_skeleton=True,
        visual_thoughts=True,
        interleaved_answers=True,
        image_skips=True,
        sharding=True,
        export=True,
    )

    def __init__(self, params: ThinkMorphParams | None = None):
        self.params = params or ThinkMorphParams(flavour=DEBUG)
        p = self.params
        self.directory = Path(p.checkpoint) if p.flavour == CHECKPOINT else None
        if self.directory is not None:
            config = architecture.BagelConfig.from_directory(self.directory, visual_gen=p.generation)
        elif p.flavour == DEBUG:
            config = architecture.debug().with_visual_gen(p.generation)
        else:
            config = architecture.seven_b(p.random_layers).with_visual_gen(p.generation)
        self.tokenizer = load_tokenizer(self.directory, config.special)
        if self.directory is not None and hasattr(self.tokenizer, "special"):
            config = replace(config, special=self.tokenizer.special)
        self.config = config
        self.special = config.special
        self.vit_transform = ImageTransform(p.vit_max_size, p.vit_min_size, config.vit.patch_size, p.vit_max_pixels)
        self.vae_transform = ImageTransform(p.vae_max_size, p.vae_min_size, config.latent_downsample)
        self._vae = None
        self.decoders = DecoderCache(p.kept_decoders)
        if len(self.tokenizer) > config.llm.vocab_size:
            raise ValueError(
                f"tokenizer has {len(self.tokenizer)} tokens but the model only {config.llm.vocab_size} rows"
            )
        self._vocabulary = Vocabulary(
            size=config.llm.vocab_size,
            eos_id=self.special.im_end,
            pad_id=self.special.endoftext,
            valid_size=len(self.tokenizer),
            special={
                "im_start": self.special.im_start,
                "im_end": self.special.im_end,
                "image_start": self.special.vision_start,
                "image_end": self.special.vision_end,
            },
        )

    # ------------------------------------------------------------------ vocabulary and model
    def place(self, device: torch.device | str, dtype: torch.dtype | None = None) -> ThinkMorphBackend:
        super().place(device, dtype)
        if self.params.vit_attention == "flash-attn":
            _check_flash_attn(self.device)
        return self

    @property
    def vocabulary(self) -> Vocabulary:
        return self._vocabulary

    def build_model(self) -> Bagel:
        """The model on :attr:`device` in :attr:`dtype`, with the checkpoint's weights or seeded random ones."""
        with torch.device("meta"):
            model = self._bagel()
        if self.directory is not None:
            model = model.to_empty(device="cpu")
            _recompute_tables(model)
            state_dict.load_into(model, self.directory, self.params.weights_file)
            return model.to(device=self.device, dtype=self.dtype)
        # Random flavours are drawn where they will run, in their final dtype: the 7B model
        # never passes through host memory in float32.
        model = model.to(self.dtype).to_empty(device=self.device)
        _recompute_tables(model)
        generator = torch.Generator(self.device).manual_seed(self.params.seed)
        _init_weights(model, generator)
        return model

    def model_skeleton(self) -> Bagel:
        """:meth:`build_model`'s model on the meta device (for sharded start-up)."""
        with torch.device("meta"):
            model = self._bagel()
        model = model.to(self.dtype)
        _recompute_tables(model)
        return model

    def _bagel(self) -> Bagel:
        model = Bagel(self.config)
        for module in model.vit_model.modules():
            if isinstance(module, SiglipAttention):
                module.flash = self.params.vit_attention == "flash-attn"
        return model

    def memory_shape(self) -> MemoryShape:
        """The Qwen2 decoder's sizes; a visual thought is drawn against three guidance contexts
        whose longest holds the problem image as ViT and VAE blocks and the latent block being
        drawn, each at the largest size the transforms allow, plus the text turns."""
        llm, p = self.config.llm, self.params
        vit_patch = self.config.vit.patch_size
        vit_tokens = min((p.vit_max_size // vit_patch) ** 2, p.vit_max_pixels // vit_patch**2)
        latent_tokens = (p.vae_max_size // self.config.latent_downsample) ** 2
        return MemoryShape(
            hidden_size=llm.hidden_size,
            num_layers=llm.num_layers,
            num_heads=llm.num_heads,
            num_kv_heads=llm.num_kv_heads,
            head_dim=llm.head_dim,
            intermediate_size=llm.intermediate_size,
            vocab_size=llm.vocab_size,
            visual_thought_tokens=vit_tokens + 2 * latent_tokens + VISUAL_THOUGHT_TEXT_TOKENS if p.generation else 0,
            visual_thought_passes=3,
        )

    def parameter_group(self, name: str) -> str:
        """Top-level modules, with the LLM's generation expert (the ``*_moe_gen`` weights) apart."""
        group = name.split(".", 1)[0]
        return f"{group} (generation expert)" if "moe_gen" in name else group

    def frozen_parameters(self, model: Bagel) -> list[str]:
        """The generation expert (every ``*_moe_gen`` weight), the time embedder and the latent
        connectors ``vae2llm`` / ``llm2vae``, unless ``train_generation``: the student and teacher
        contexts hold text and ViT images only, so these never receive a gradient."""
        if self.params.train_generation:
            return []
        return [name for name, _ in model.named_parameters() if _generation_parameter(name)]

    def context_builder(self) -> PrivilegedContextBuilder:
        return prompts.context_builder()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(t) for t in token_ids])

    def preprocess_image(self, image: Any) -> torch.Tensor:
        """float32 (3, H, W) in [-1, 1], sides multiples of 14 (the ViT transform)."""
        return self.vit_transform(image)

    # ------------------------------------------------------------------ rendering
    def items(self, context: Context) -> list:
        """BAGEL items of ``context``: text turns and ViT blocks, in order."""
        result = []
        for segment in context.segments:
            if isinstance(segment, TextSegment):
                result.append(TextItem(self.encode(segment.text)))
            elif isinstance(segment, ImageSegment):
                pixels = segment.pixels if segment.pixels is not None else self.preprocess_image(segment.image)
                result.append(ViTItem(pixels.float()))
            else:
                raise TypeError(f"thinkmorph cannot render a segment of type {type(segment).__name__}")
        return result

    def context_length(self, context: Context) -> int:
        return len(lay_out([*self.items(context), TextItem([], open=True)], self.config))

    def _rows(self, contexts: Sequence[Context], completions: Sequence[Sequence[int]] | None):
        sequences = []
        for row, context in enumerate(contexts):
            tail = TextItem([], open=True) if completions is None else TextItem(completions[row], loss=True)
            sequences.append(lay_out([*self.items(context), tail], self.config))
        return pack_rows(sequences, self.special.endoftext)

    # ------------------------------------------------------------------ running the model
    def _completion_hidden_rows(
        self, model: Bagel, contexts: Sequence[Context], completions: CompletionBatch
    ) -> torch.Tensor:
        """float (B, N + 1, D) final hidden states at each completion's ``<|im_start|>`` and token slots."""
        rows = self._rows(contexts, completions.token_lists())
        hidden = forward_rows(model, rows)  # (B, T, D)
        width = int(completions.tokens.shape[1]) + 1
        index = torch.zeros(len(contexts), width, dtype=torch.long)
        for row, positions in enumerate(rows.logit_rows):
            index[row, : len(positions)] = torch.tensor(positions)
        return gather_rows(hidden, index)  # (B, N + 1, D)

    def completion_logits(
        self, model: Bagel, contexts: Sequence[Context], completions: CompletionBatch
    ) -> CompletionLogits:
        """float (B, N + 1, V) at each completion's ``<|im_start|>`` and token slots, and the row mask."""
        hidden = self._completion_hidden_rows(model, contexts, completions)
        return CompletionLogits(model.lm_logits(hidden), completions.row_mask().to(hidden.device))

    def completion_hidden(
        self, model: Bagel, contexts: Sequence[Context], completions: CompletionBatch
    ) -> CompletionHidden:
        """float (B, N + 1, D) final-norm hidden states at the rows of :meth:`completion_logits`
        (what ``lm_logits`` multiplies), the row mask and the (V, D) ``lm_head`` weight, whole
        even where FSDP shards it (its gradient then reaches the shard as FSDP would reduce it)."""
        weight = whole_parameter(model.language_model.lm_head.weight)
        hidden = self._completion_hidden_rows(model, contexts, completions)
        return CompletionHidden(hidden, completions.row_mask().to(hidden.device), weight)

    def weights_read_directly(self) -> list[tuple[str, str]]:
        """The fused loss multiplies by the lm_head weight; one-row decode steps with kernels
        (:func:`~opsd_thinkmorph.model.one_row_layer`) read the understanding expert's projections
        and the lm_head weight."""
        reads = [("language_model.lm_head", FUSED_HEAD)]
        if self.params.fixed_shape_decoding and self.params.decode_kernels:
            kernels = "backend.decode_kernels = true"
            reads += [(f"language_model.model.layers.*.{name}", kernels) for name in ONE_ROW_PROJECTIONS]
            reads.append(("language_model.lm_head", kernels))
        return reads

    @torch.no_grad()
    def release_decoding_memory(self) -> None:
        """Drop the kept fixed-shape decoders and their KV caches (``backend.kept_decoders``)."""
        self.decoders.clear()

    def start_decoding(self, model: Bagel, contexts: Sequence[Context], max_new_tokens: int) -> ThinkMorphDecodeState:
        """Prefill ``contexts``; with ``fixed_shape_decoding``, into a kept decoder of their batch
        size whose cache holds at least their width plus ``max_new_tokens`` (:func:`cache_bucket`)."""
        rows = self._rows(contexts, None)
        parameter = next(model.parameters())
        positions = rows.token_ids.shape[1] + max_new_tokens
        fixed = None
        if self.params.fixed_shape_decoding:
            fixed = self._fixed_decoder(model, len(contexts), positions)
            cache = fixed.cache
            hidden = fixed.prefill(rows, positions)  # (B, T, D)
        else:
            cache = KVCache(self.config.llm, len(contexts), positions, parameter.device, parameter.dtype)
            hidden = forward_rows(model, rows, cache)  # (B, T, D)
        last = (rows.lengths - 1).to(hidden.device)
        logits = model.lm_logits(hidden[torch.arange(len(contexts), device=hidden.device), last])  # (B, V)
        state = ThinkMorphDecodeState(model, cache, rows.next_positions.to(parameter.device), logits)
        if fixed is not None:
            fixed.claim(state)
            state.fixed = fixed
        return state

    def _fixed_decoder(self, model: Bagel, batch: int, positions: int) -> FixedShapeDecoder:
        """A fixed-shape decoder for ``batch`` rows and ``positions`` positions: kept ones are
        reused; a sharded model's gathered weights move at every gathering, so it gets a new one."""
        parameter = next(model.parameters())
        sharded = is_sharded(model)
        capacity = cache_bucket(positions)

        def build() -> FixedShapeDecoder:
            cache = KVCache(self.config.llm, batch, capacity, parameter.device, parameter.dtype)
            compile = self.params.compile_decoding and parameter.is_cuda and not sharded
            # one_row_layer reads the layers' weights without calling the layers, so it needs them
            # whole: unsharded, or gathered, as the trainer gathers a sharded model for sampling.
            layer = model.language_model.model.layers[0]
            kernels = self.params.decode_kernels and not is_shard(layer.mlp.down_proj.weight)
            return FixedShapeDecoder(model, cache, batch, capture=parameter.is_cuda, compile=compile, kernels=kernels)

        return build() if sharded else self.decoders.decoder(model, batch, capacity, build)

    @torch.no_grad()
    def decode_step(self, state: ThinkMorphDecodeState, tokens: torch.Tensor) -> torch.Tensor:
        """Feed int64 (B,) ``tokens``; return float (B, V) next-token logits."""
        if state.fixed is not None:
            state.logits = state.fixed.step(tokens.to(state.next_positions.device), state.next_positions)
            state.next_positions = state.next_positions + 1
            return state.logits
        cache, model = state.cache, state.model
        batch, start = tokens.shape[0], cache.length
        if start >= cache.capacity:
            raise RuntimeError(f"KV cache full: the decoding state was started with room for {cache.capacity} positions")
        device = state.next_positions.device
        cache.valid[:, start] = True
        mask = cache.valid[:, : start + 1].unsqueeze(1)  # (B, 1, S)
        h = model.language_model.model.embed_tokens(tokens.view(batch, 1).to(device))
        hidden = model.llm_forward(h, state.next_positions.view(batch, 1), mask, None, cache)
        state.next_positions = state.next_positions + 1
        state.logits = model.lm_logits(hidden[:, -1])
        return state.logits

    def image_skip_tokens(self, completion: Sequence[int]) -> list[int] | None:
        """``<|im_end|> <|im_start|>`` after a round that asked for an image (ThinkMorph's tag).

        Unlike the paper's sampler, the two injected tokens stay in the completion, so the
        tokens sampled after them are scored in the context they were sampled in.
        """
        if IMAGE_REQUEST in self.decode(completion):
            return self.image_skip_injection()
        return None

    def image_skip_injection(self) -> list[int]:
        return [self.special.im_end, self.special.im_start]

    # ------------------------------------------------------------------ visual thoughts
    def vae(self):
        """The FLUX autoencoder: ``ae.safetensors`` of the checkpoint, or seeded random for other flavours."""
        if self._vae is None:
            from opsd_thinkmorph import vae as vae_module

            flavour = "debug" if self.params.flavour == DEBUG else "7b"
            if self.directory is not None:
                self._vae = vae_module.load_vae(self.directory / "ae.safetensors", flavour, self.device, self.dtype)
            else:
                from diffusers import AutoencoderKL

                generator_state = torch.random.get_rng_state()
                torch.manual_seed(self.params.seed + 1)
                self._vae = AutoencoderKL(**vae_module.flux_vae_config(flavour)).to(self.device, self.dtype).eval()
                torch.random.set_rng_state(generator_state)
        return self._vae

    @torch.no_grad()
    def generate_visual_thought(
        self, model: Bagel, problems: Sequence[Problem], generator: torch.Generator | None = None
    ) -> list:
        """One PIL image per problem, drawn by the model's rectified flow with three-context guidance."""
        from opsd_thinkmorph.visual_thought import draw_visual_thoughts

        return draw_visual_thoughts(self, model, problems, generator)

    @torch.no_grad()
    def answer_with_visual_thoughts(
        self,
        model: Bagel,
        contexts: Sequence[Context],
        problems: Sequence[Problem],
        max_tokens: int,
        generator=None,
        max_visual_thoughts: int = 3,
    ) -> list[tuple[list[int], int]]:
        """ThinkMorph's interleaved inference, greedy, drawing up to ``max_visual_thoughts`` images.

        Rounds of text: a round that asks for an image (``<image_start>``) while fewer than
        ``max_visual_thoughts`` have been drawn and budget remains gets a visual thought
        conditioned on the reasoning so far; that round's text and the image join the context
        (as ThinkMorph appends each round and each image) and the next round continues. A round
        that does not ask, or asks once the cap is reached, ends the answer. The default, 3, is
        the paper's harness's ``max_rounds``; unlike that loop, the last image drawn is always
        followed by a round that reads it.

        Returns, per context, the rounds joined by ``<|im_end|> <|im_start|>`` (within
        ``max_tokens`` in all) and the number of images drawn.
        """
        if max_visual_thoughts < 0:
            raise ValueError(f"max_visual_thoughts must be >= 0, got {max_visual_thoughts}")
        from opsd_core.api.backend import BatchedSampler

        rounds = BatchedSampler(self, 0.0, max_tokens, max_image_skips=0).sample(model, contexts).token_lists()
        tokens, drawn = [list(first) for first in rounds], [0] * len(contexts)
        texts = [[self.decode(first)] for first in rounds]
        current, active = list(contexts), range(len(contexts))
        for _ in range(max_visual_thoughts):
            active = [i for i in active if IMAGE_REQUEST in texts[i][-1] and len(tokens[i]) + 3 < max_tokens]
            if not active:
                break
            reasoning = ["\n".join(texts[i]) for i in active]
            thoughts = self.generate_visual_thought_after(model, [problems[i] for i in active], reasoning, generator)
            for i, thought in zip(active, thoughts):
                current[i] = self._with_round(current[i], texts[i][-1], thought, drawn[i])
                drawn[i] += 1
            budget = {i: max_tokens - len(tokens[i]) - 2 for i in active}
            sampler = BatchedSampler(self, 0.0, max(budget.values()), max_image_skips=0)
            for i, round_tokens in zip(active, sampler.sample(model, [current[i] for i in active]).token_lists()):
                round_tokens = round_tokens[: budget[i]]
                tokens[i] += [self.special.im_end, self.special.im_start, *round_tokens]
                texts[i].append(self.decode(round_tokens))
        return [(row, count) for row, count in zip(tokens, drawn)]

    @staticmethod
    def _with_round(context: Context, reasoning: str, thought: Any, earlier: int) -> Context:
        """``context`` followed by a round's text and the visual thought drawn after it; the first
        pair is named ``reasoning`` / ``visual_thought``, later ones ``reasoning_2`` / ``visual_thought_2``, ..."""
        from opsd_core.api import VISUAL_THOUGHT

        suffix = "" if earlier == 0 else f"_{earlier + 1}"
        added = (TextSegment(f"reasoning{suffix}", reasoning), ImageSegment(f"{VISUAL_THOUGHT}{suffix}", thought))
        return Context(context.segments + added)

    def generate_visual_thought_after(self, model: Bagel, problems: Sequence[Problem], reasoning: Sequence[str], generator=None):
        """Visual thoughts whose conditional context also holds the model's reasoning so far."""
        from opsd_thinkmorph.visual_thought import draw_visual_thoughts

        return draw_visual_thoughts(self, model, problems, generator, reasoning=reasoning)

    # ------------------------------------------------------------------ parallelism and weights on disk
    def recomputed_layers(self, model) -> list:
        """The transformer layers activation checkpointing recomputes (those ``parallelize`` shards)."""
        from opsd_thinkmorph.parallelize import transformer_layers

        return transformer_layers(model)

    def parallelize(self, model: Bagel, mesh: Any, config: Any) -> Bagel:
        """FSDP2 over ``mesh`` (HSDP when it has a replicate dimension); see :mod:`opsd_thinkmorph.parallelize`."""
        from opsd_thinkmorph.parallelize import parallelize_bagel

        return parallelize_bagel(model, mesh, config)

    # ------------------------------------------------------------------ weights on disk
    def start_checkpoint(self) -> Path | None:
        """The checkpoint directory of flavour 'checkpoint' (None for the random flavours)."""
        return self.directory

    def save_pretrained(self, model: Bagel, directory: Path) -> None:
        """Weights, configs, tokenizer and the VAE: a directory that loads alone."""
        self._write(model, Path(directory), "model", None, None)

    def export_model(self, model: Bagel, directory: Path, dtype: torch.dtype, max_shard_bytes: int | None) -> None:
        """The released layout that BAGEL's inference code loads: ``ema.safetensors`` in ``dtype``
        (or its shards and index), ``llm_config.json``, ``vit_config.json``, the tokenizer files
        and ``ae.safetensors``."""
        self._write(model, Path(directory), "ema", dtype, max_shard_bytes)

    def _write(self, model: Bagel, directory: Path, stem: str, dtype: torch.dtype | None, max_shard_bytes: int | None) -> None:
        state_dict.save_checkpoint(model, self.config, directory, self.directory, stem, dtype, max_shard_bytes)
        self.tokenizer.save(directory)
        if not (directory / "ae.safetensors").exists() and self.config.visual_gen and self.directory is None:
            from opsd_thinkmorph import vae as vae_module

            vae_module.save_vae(self.vae(), directory / "ae.safetensors")

    def load_weights(self, model: Bagel, directory: Path) -> None:
        state_dict.load_into(model, Path(directory))


GENERATION_MODULES = ("time_embedder.", "vae2llm.", "llm2vae.")


def _generation_parameter(name: str) -> bool:
    """Whether parameter ``name`` of a Bagel model serves image generation only."""
    return "_moe_gen" in name or name.startswith(GENERATION_MODULES)


def _check_flash_attn(device: torch.device) -> None:
    """Refuse ``vit_attention = 'flash-attn'`` where it cannot run."""
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None:
        raise ConfigError(
            "backend.vit_attention = 'flash-attn' needs the flash-attn package (pip install flash-attn); "
            "it is not installed. Set backend.vit_attention = 'sdpa'"
        )
    if device.type != "cuda":
        raise ConfigError(f"backend.vit_attention = 'flash-attn' runs on CUDA devices only, got run.device = '{device}'")


def _recompute_tables(model: Bagel) -> None:
    """Recompute the sin-cos buffers (they are not in the state dict) after a meta-device build."""
    from opsd_thinkmorph.model import sincos_2d

    config, device = model.config, model.connector.fc1.weight.device
    model.vit_pos_table = sincos_2d(config.vit_max_patches_per_side, config.llm.hidden_size).to(device)
    if config.visual_gen:
        model.latent_pos_table = sincos_2d(config.max_latent_size, config.llm.hidden_size).to(device)


def _init_weights(model: Bagel, generator: torch.Generator) -> None:
    """Random weights for the random flavours: N(0, 0.02) linears and embeddings, zero biases,
    unit norms. Generation twins get their own draws (no copy of the understanding weights),
    so a mix-up between experts shows in tests."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.normal_(0.0, 0.02, generator=generator)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, torch.nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
            elif hasattr(module, "eps") and isinstance(getattr(module, "weight", None), torch.nn.Parameter):
                module.weight.fill_(1.0)

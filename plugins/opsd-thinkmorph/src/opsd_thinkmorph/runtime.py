"""Running the model on packed rows: teacher forcing, cached prefill and decoding.

Owns: moving packed rows through embeddings and the decoder, with or without a KV cache, the
bookkeeping of cached decoding (which cache slots are real, each row's next RoPE id), and the
fixed-shape decoders kept between calls (:class:`DecoderCache`, keyed by batch size and a
bucket of cache positions, :func:`cache_bucket`).
Does not know: contexts, tokenizers, sampling policy or losses.
"""

from __future__ import annotations

import functools
import weakref
from collections import OrderedDict
from collections.abc import Callable

import torch

from opsd_core.api import kernels
from opsd_thinkmorph.model import Bagel, KVCache, call_layer, one_row_layer
from opsd_thinkmorph.packing import PackedRows

# Fixed-shape caches never hold fewer positions than this (short answers share one bucket).
SMALLEST_BUCKET = 256


def forward_rows(model: Bagel, rows: PackedRows, cache: KVCache | None = None) -> torch.Tensor:
    """Final hidden states float (B, T, D) of ``rows`` (after ``cache``'s positions, if given)."""
    parameter = next(model.parameters())
    rows = rows.to(parameter.device)
    h = model.input_embeddings(rows.token_ids, rows.images, rows.image_slots, rows.latents, rows.latent_slots)
    mask = rows.mask
    if cache is not None:
        start = cache.length
        if not cache.layers[0].frozen:
            cache.valid[:, start : start + rows.valid.shape[1]] = rows.valid
        mask = torch.cat([cache.valid[:, :start].unsqueeze(1).expand(-1, mask.shape[1], -1), mask], dim=2)
    return model.llm_forward(h, rows.positions, mask, rows.gen, cache)


@functools.cache
def compiled_decode_layer(run_layer: Callable = call_layer) -> Callable:
    """``run_layer`` (a decoder layer's step) through ``torch.compile``, shared by every layer
    (the weights are graph inputs, so the 28 layers reuse one compiled graph)."""
    return torch.compile(run_layer)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether FSDP manages any part of ``model``."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(module, FSDPModule) for module in model.modules())


def is_shard(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is this rank's shard of a parameter (a DTensor), not the whole of it."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def cache_bucket(positions: int) -> int:
    """The cache capacity a fixed-shape decoder allocates for ``positions`` positions: at least
    :data:`SMALLEST_BUCKET`, above it ``positions`` rounded up to a multiple of a quarter of the
    power of two below it (four buckets per doubling: 256, 320, 384, 448, 512, 640, ..., never
    more than a quarter above what is needed), so answers of similar lengths share a decoder."""
    if positions <= SMALLEST_BUCKET:
        return SMALLEST_BUCKET
    step = 1 << max((positions - 1).bit_length() - 3, 0)
    return -(-positions // step) * step


def weight_addresses(model: torch.nn.Module) -> tuple[tuple[str, int], ...]:
    """(name, data pointer) of every parameter and buffer of ``model``'s language model: what a
    captured decode step reads. Updates in place (optimizer steps, EMA, loading weights) keep
    them; replacing a tensor or a module (``.to``, merging LoRA adapters) changes them."""
    llm = model.language_model
    tensors = [*llm.named_parameters(), *llm.named_buffers()]
    return tuple((name, tensor.data_ptr()) for name, tensor in tensors)


class FixedShapeDecoder:
    """Decode steps whose every tensor has a fixed shape, replayed from a CUDA graph on GPUs.

    Each step writes its keys and values at ``slot`` (= the cache length) and attends over the
    whole preallocated cache with a mask of the written slots, so nothing depends on the
    length: on CUDA the step is captured once, after the first :meth:`prefill`, and replayed, which
    removes the per-step launch overhead that bounds cached decoding of a large model. On CPU
    the same step runs eagerly. With ``kernels``, steps of one row run
    :func:`~opsd_thinkmorph.model.one_row_layer` (four weight passes and one-query attention per
    layer) and the lm_head as a one-row kernel. With ``compile``, each decoder layer runs
    through ``torch.compile`` (its RMSNorms, RoPE, attention softmax and SwiGLU become a few
    fused kernels instead of dozens of small ones); the compile happens in the warm-up, before
    the capture.

    One decoder serves batch after batch of ``batch`` rows (:meth:`prefill` empties its cache
    in place), so the compile and the capture are paid once. The captured step reads the
    model's weights where they are; updates in place are seen by the next replay. The model is
    held weakly: a kept decoder never keeps it alive.
    """

    def __init__(
        self, model: Bagel, cache: KVCache, batch: int, capture: bool, compile: bool = False, kernels: bool = False
    ):
        device = cache.valid.device
        self._model = weakref.ref(model)  # a kept decoder does not keep its model alive
        self.cache = cache
        self.one_row = kernels and batch == 1
        run_layer = one_row_layer if self.one_row else call_layer
        self.run_layer = compiled_decode_layer(run_layer) if compile else run_layer
        self.compiled = compile
        self.capture = capture
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        for layer in cache.layers:
            layer.slot = self.slot
        self.graph = None
        self.logits = None
        self.limit = cache.capacity
        self._owner: weakref.ref | None = None

    def prefill(self, rows: PackedRows, positions: int) -> torch.Tensor:
        """Final hidden states float (B, T, D) of ``rows``, written into the emptied cache, which
        then takes decode steps up to ``positions`` positions in all (<= its capacity)."""
        cache = self.cache
        if positions > cache.capacity:
            raise ValueError(f"{positions} positions asked of a decoder whose cache holds {cache.capacity}")
        cache.valid.zero_()
        for layer in cache.layers:
            # Zeros, as in a new cache: a reused decoder computes exactly what a new one would.
            layer.keys.zero_()
            layer.values.zero_()
            layer.length, layer.slot = 0, None
        hidden = forward_rows(self.model, rows, cache)
        for layer in cache.layers:
            layer.slot = self.slot
        self.limit = positions
        if self.capture and self.graph is None:
            self._capture()
        return hidden

    @property
    def model(self) -> Bagel | None:
        """The model whose steps this decoder takes (None once nothing else holds it)."""
        return self._model()

    def claim(self, owner: object) -> None:
        """Mark this decoder as in use while ``owner`` (the decoding state it steps) lives."""
        self._owner = weakref.ref(owner)

    @property
    def in_use(self) -> bool:
        """Whether the decoding state that claimed this decoder still exists."""
        return self._owner is not None and self._owner() is not None

    def _capture(self) -> None:
        device = self.cache.valid.device
        self.slot.fill_(self.cache.length)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up writes only the next slot, which the real step rewrites
            for _ in range(2):
                self._warm_up()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step()

    def _warm_up(self) -> None:
        try:
            self._step()
        except Exception as error:
            if not self.compiled:
                raise
            raise RuntimeError(
                f"compiling the decode step failed ({type(error).__name__}: {error}); set "
                "backend.compile_decoding = false to decode without torch.compile"
            ) from error

    def _step(self) -> torch.Tensor:
        self.cache.valid.index_fill_(1, self.slot, True)
        mask = self.cache.valid.unsqueeze(1)  # (B, 1, capacity)
        h = self.model.language_model.model.embed_tokens(self.tokens)
        hidden = self.model.llm_forward(h, self.positions, mask, None, self.cache, run_layer=self.run_layer)
        if self.one_row:
            return kernels.row_linear(hidden, [self.model.language_model.lm_head.weight]).view(1, -1)
        return self.model.lm_logits(hidden[:, -1])

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """float (B, V) logits after appending int64 (B,) ``tokens`` at RoPE ids ``positions``."""
        cache = self.cache
        if cache.length >= self.limit:
            raise RuntimeError(f"KV cache full: the decoding state was started with room for {self.limit} positions")
        self.tokens.copy_(tokens.view(-1, 1))
        self.positions.copy_(positions.view(-1, 1))
        self.slot.fill_(cache.length)
        if self.graph is not None:
            self.graph.replay()
            logits = self.logits.clone()
        else:
            logits = self._step()
        for layer in cache.layers:
            layer.length += 1
        return logits


class DecoderCache:
    """Fixed-shape decoders kept between calls: at most ``size``, the least recently used
    dropped first (0 keeps none: every call builds its own).

    A decoder is kept per (model, batch size, cache capacity) and handed out again while the
    model's weights stay where the captured step reads them (:func:`weight_addresses`); a
    decoder still claimed by a living decoding state is never handed out twice (a second state
    of the same shape gets one of its own, not kept). Decoders hold their model weakly: those
    of a model nothing else holds are dropped. ``builds`` counts the decoders built.
    """

    def __init__(self, size: int):
        self.size = size
        self.builds = 0
        self._kept: OrderedDict[tuple[int, int, int], tuple[tuple, FixedShapeDecoder]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._kept)

    def decoder(self, model: Bagel, batch: int, capacity: int, build: Callable[[], FixedShapeDecoder]) -> FixedShapeDecoder:
        """A kept decoder of ``model`` for ``batch`` rows and ``capacity`` positions, or ``build()``'s."""
        for dead in [k for k, (_, decoder) in self._kept.items() if decoder.model is None]:
            del self._kept[dead]
        key = (id(model), batch, capacity)
        weights = weight_addresses(model)
        kept = self._kept.get(key)
        if kept is not None and kept[1].model is model and kept[0] == weights:
            if kept[1].in_use:
                return self._build(build)
            self._kept.move_to_end(key)
            return kept[1]
        for stale in [k for k, (read, _) in self._kept.items() if k[0] == id(model) and read != weights]:
            del self._kept[stale]
        decoder = self._build(build)
        if self.size:
            self._kept[key] = (weights, decoder)
            while len(self._kept) > self.size:
                self._kept.popitem(last=False)
        return decoder

    def clear(self) -> None:
        """Drop every kept decoder (a decoder a living state still uses stays with that state)."""
        self._kept.clear()

    def _build(self, build: Callable[[], FixedShapeDecoder]) -> FixedShapeDecoder:
        self.builds += 1
        return build()

"""The Backend role: one unified multimodal model family.

Owns: turning contexts (text and image segments) into model inputs, the logits (or final
hidden states) at completion rows, incremental KV-cached decoding, visual-thought
generation, parallelisation and the on-disk weight layout.
Does not know: losses, teachers, optimizers or sampling policy. The same backend serves the
student and the teacher: every model-running method takes the ``model`` to run, so the
teacher is simply another module built by :meth:`Backend.build_model` or a copy of the student.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from opsd_core.errors import CapabilityError

if TYPE_CHECKING:
    import torch

    from opsd_core.interfaces.context import PrivilegedContextBuilder
    from opsd_core.types import (
        CompletionBatch,
        CompletionHidden,
        CompletionLogits,
        Context,
        Image,
        MemoryShape,
        Problem,
        Vocabulary,
    )


class DecodeState(ABC):
    """A backend's incremental decoding state for a batch (KV cache, positions, ...).

    Attributes read by the sampler:
        logits: float (B, V), the next-token logits after the last step.
    """

    logits: torch.Tensor


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do beyond the required methods, declared once on its class.

    The core reads these flags when a run's components are built (a run that needs what the
    backend lacks is refused then, in one message) and when it chooses a code path; it never
    probes a backend's methods. Each flag promises that the methods named below are
    implemented; a declaration without them is refused as a plugin error.

    Attributes:
        hidden_states: :meth:`Backend.completion_hidden`, for divergences that compute the loss
            from final hidden states (``jsd`` with ``fused = true``).
        sharded_hidden_states: ``completion_hidden`` also works while the model is sharded over
            several processes (its ``lm_head`` weight split by FSDP).
        meta_skeleton: :meth:`Backend.model_skeleton`, so that only rank 0 builds the weights in
            multi-process runs, and the memory planner counts parameters without weights.
        visual_thoughts: :meth:`Backend.generate_visual_thought` (the model draws its own VTs).
        interleaved_answers: :meth:`Backend.answer_with_visual_thoughts` (the family's own
            interleaved inference, for evaluation with visual thoughts).
        image_skips: :meth:`Backend.image_skip_tokens` and :meth:`Backend.image_skip_injection`
            (the paper's rule for rounds that ask for an image).
        sharding: :meth:`Backend.parallelize` (FSDP2 training over several processes).
        export: :meth:`Backend.export_model` (``opsd export``: a trained model in the layout the
            family's own inference code loads).
    """

    hidden_states: bool = False
    sharded_hidden_states: bool = False
    meta_skeleton: bool = False
    visual_thoughts: bool = False
    interleaved_answers: bool = False
    image_skips: bool = False
    sharding: bool = False
    export: bool = False

    def declared(self) -> list[str]:
        """The names of the flags that are set."""
        return [flag.name for flag in fields(self) if getattr(self, flag.name)]


# The methods each capability promises (the base class's versions refuse or return None).
CAPABILITY_METHODS: dict[str, tuple[str, ...]] = {
    "hidden_states": ("completion_hidden",),
    "sharded_hidden_states": ("completion_hidden",),
    "meta_skeleton": ("model_skeleton",),
    "visual_thoughts": ("generate_visual_thought",),
    "interleaved_answers": ("answer_with_visual_thoughts",),
    "image_skips": ("image_skip_tokens", "image_skip_injection"),
    "sharding": ("parallelize",),
    "export": ("export_model",),
}


# What :meth:`Backend.weights_read_directly` names for the module whose weight
# :meth:`Backend.completion_hidden` returns.
FUSED_HEAD = "completion_hidden"


class Backend(ABC):
    """One UMM family behind the interface the trainer, sampler and evaluator use.

    Subclasses set :attr:`capabilities` to what they implement beyond the abstract methods.
    """

    capabilities: ClassVar[Capabilities] = Capabilities()

    _placement: tuple[torch.device, torch.dtype] | None = None

    def place(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Backend:
        """Build models on ``device`` with weights in ``dtype`` (default fp32) from now on;
        returns ``self``.

        The core calls it with ``run.device`` and the weight dtype of ``run.precision`` (fp32
        for models that train: masters stay fp32) before it builds anything, so a backend has
        no device or dtype settings of its own. Backends that check the device (a kernel that
        needs CUDA) override it and call ``super().place``.
        """
        import torch

        self._placement = (torch.device(device), dtype or torch.float32)
        return self

    @property
    def device(self) -> torch.device:
        """Where :meth:`build_model` puts the model (CPU until :meth:`place` says otherwise)."""
        return self._placed()[0]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the weights :meth:`build_model` returns (fp32 until :meth:`place`)."""
        return self._placed()[1]

    def _placed(self) -> tuple[torch.device, torch.dtype]:
        if self._placement is None:
            self.place("cpu")
        return self._placement

    @property
    @abstractmethod
    def vocabulary(self) -> Vocabulary:
        """Vocabulary size, EOS/pad ids and named special tokens."""

    @abstractmethod
    def build_model(self) -> torch.nn.Module:
        """The model with its initial weights (loaded from the configured local path)."""

    def model_skeleton(self) -> torch.nn.Module | None:
        """The model :meth:`build_model` returns, on the meta device: same modules, parameter
        and buffer names, shapes, dtypes and ``requires_grad``, no memory.

        Multi-process training uses it so that only rank 0 builds (or loads) the real weights
        and the other ranks receive their shards: without it every rank holds the whole model
        for a moment, which large models cannot afford. Backends that implement it declare
        ``Capabilities(meta_skeleton=True)``; without it every rank calls :meth:`build_model`.
        A backend that returns a skeleton must accept it in :meth:`parallelize`: sharding a
        model on the meta device (weights are filled in afterwards), so ``parallelize`` must not
        run the model.
        """
        raise CapabilityError(f"{type(self).__name__} has no meta-device model skeleton")

    def memory_shape(self) -> MemoryShape | None:
        """The decoder's sizes, read from the model's config without building it, for the
        memory planner's activation and KV-cache estimates (``opsd plan``). The default, None,
        leaves those terms out of the estimate."""
        return None

    def parameter_group(self, name: str) -> str:
        """The group the planner counts the parameter ``name`` under; the default is its
        top-level module (``vit_model.encoder...`` -> ``vit_model``)."""
        return name.split(".", 1)[0]

    def frozen_parameters(self, model: torch.nn.Module) -> list[str]:
        """Names (as ``model.named_parameters()`` gives them) of the parameters training leaves
        frozen: those that receive no gradient from the student and teacher contexts, such as an
        image-generation expert that text-and-image understanding never runs.

        The trainer turns their ``requires_grad`` off, builds AdamW over the others only and
        shares them between the start model, the student and the teacher instead of copying
        them. Since AdamW leaves a parameter without a gradient untouched at
        ``optim.weight_decay = 0``, freezing them changes no update there. The default freezes
        nothing.
        """
        return []

    def recomputed_layers(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """The layers whose activations ``train.activation_checkpointing`` recomputes in
        backward instead of storing (typically every transformer block of ``model``).

        One-process runs wrap these with :func:`opsd_core.api.backend.checkpoint_forward`;
        a backend's :meth:`parallelize` does the same in multi-process runs. The default names
        none, and a run that asks for checkpointing is then refused.
        """
        return []

    def context_builder(self) -> PrivilegedContextBuilder:
        """The student/teacher context builder with this model family's prompt texts."""
        raise CapabilityError(f"{type(self).__name__} defines no context builder")

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""

    @abstractmethod
    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of ``token_ids``; ids with no token string are skipped."""

    @abstractmethod
    def preprocess_image(self, image: Image) -> torch.Tensor:
        """float32 (3, H, W): ``image`` in the model's normalised pixel space."""

    @abstractmethod
    def context_length(self, context: Context) -> int:
        """Number of positions ``context`` occupies, including the completion-opening tokens."""

    @abstractmethod
    def completion_logits(
        self, model: torch.nn.Module, contexts: Sequence[Context], completions: CompletionBatch
    ) -> CompletionLogits:
        """Logits at the N + 1 completion rows of each context followed by its completion.

        Row i predicts completion token i; row N (the completion's length) predicts EOS.
        Gradients flow when called with grad enabled; the caller decides.
        """

    def completion_hidden(
        self, model: torch.nn.Module, contexts: Sequence[Context], completions: CompletionBatch
    ) -> CompletionHidden:
        """Final hidden states at the rows :meth:`completion_logits` gives, and the lm_head weight.

        Lets a divergence that uses hidden states (``jsd`` with ``fused = true``) compute the
        loss without the (B, N + 1, V) logits. Gradients flow as in :meth:`completion_logits`.
        Backends that implement it declare ``Capabilities(hidden_states=True)``; a run asking
        for such a divergence on any other backend is refused when its components are built.
        Backends whose lm_head has a bias or a logit transform beyond the matmul must not
        provide it.
        """
        raise CapabilityError(f"{type(self).__name__} provides no completion hidden states")

    @abstractmethod
    def start_decoding(
        self, model: torch.nn.Module, contexts: Sequence[Context], max_new_tokens: int
    ) -> DecodeState:
        """Prefill the contexts (and completion-opening tokens) into a fresh cache.

        The state has room for ``max_new_tokens`` more tokens per row and its ``logits``
        predict the first completion token.
        """

    @abstractmethod
    def decode_step(self, state: DecodeState, tokens: torch.Tensor) -> torch.Tensor:
        """Append int64 (B,) ``tokens`` to the cache; return float (B, V) next-token logits.

        Rows the sampler has finished still receive a (pad) token; their logits are ignored.
        """

    def release_decoding_memory(self) -> None:
        """Drop what the backend keeps between decoding calls (decoders and their KV caches
        kept for the next answer). The trainer calls it around each step's sampling, so the
        teacher's and the student's forwards never share the GPU with caches kept for later;
        evaluation and ``opsd infer`` keep them between answers. The default keeps nothing."""

    def image_skip_tokens(self, completion: Sequence[int]) -> list[int] | None:
        """Tokens to inject when a round ended by EOS while asking for an image.

        The paper's sampler: a round whose text contains ``<image_start>`` gets its EOS
        replaced by ``<|im_end|>`` and a fresh ``<|im_start|>``, and sampling continues. Return
        the injected tokens (they are fed, not trained on), or None to let the EOS stand.
        ``completion`` is the round's tokens so far, without the EOS.

        A backend that overrides this also overrides :meth:`image_skip_injection` and declares
        ``Capabilities(image_skips=True)``.
        """
        return None

    def image_skip_injection(self) -> list[int] | None:
        """The tokens :meth:`image_skip_tokens` injects whenever it injects (None: it never does).

        The sampler injects them on the device as soon as a row samples EOS, without waiting
        for the host, and asks :meth:`image_skip_tokens` a few steps later; where the rule did
        not apply, the row is cut back to that EOS.
        """
        return None

    def generate_visual_thought(
        self, model: torch.nn.Module, problems: Sequence[Problem], generator: torch.Generator | None = None
    ) -> list[Image]:
        """Draw one visual thought per problem with the model's own image generator."""
        raise CapabilityError(f"{type(self).__name__} cannot generate images; use a task with stored VTs")

    def answer_with_visual_thoughts(
        self,
        model: torch.nn.Module,
        contexts: Sequence[Context],
        problems: Sequence[Problem],
        max_tokens: int,
        generator: torch.Generator | None = None,
        max_visual_thoughts: int = 3,
    ) -> list[tuple[list[int], int]]:
        """Greedy answers that may draw visual thoughts mid-answer (at most
        ``max_visual_thoughts`` each), as the model family's own interleaved inference does:
        ``(tokens, images drawn)`` per context. Backends without such a loop leave this
        unimplemented and evaluation draws the visual thought first."""
        raise CapabilityError(f"{type(self).__name__} has no interleaved visual-thought inference")

    def parallelize(self, model: torch.nn.Module, mesh: Any, config: Any) -> torch.nn.Module:
        """Shard ``model`` over ``mesh`` (FSDP2); single-device backends need not override."""
        raise CapabilityError(f"{type(self).__name__} does not support multi-device training")

    def check_run(self, config: Any) -> None:
        """Refuse a run config this backend cannot serve, before anything runs.

        Called with the resolved run config when a run's components are built (before the
        start checkpoint is loaded), so a limit of the model (positions, a checkpoint that
        cannot draw images) is a clear error then rather than a failure mid-run. Raise
        ``ConfigError`` naming the field and what to set instead. What the declared
        :attr:`capabilities` already say (hidden states, sharding, drawing) is checked by the
        core; this method covers the rest. The default accepts every config.
        """

    def start_checkpoint(self) -> Path | None:
        """The file or directory :meth:`build_model` reads the start weights from, or None when
        they are drawn from a seed (the backend section of the run config then determines them).

        A training checkpoint of a student with frozen parameters stores the trainable tensors
        only and names this path, with its SHA-256, as where the frozen ones come from; resuming
        refuses a start whose hash differs. The default is None.
        """
        return None

    def weights_read_directly(self) -> list[tuple[str, str]]:
        """Modules whose weights this backend, as configured, reads without calling the module
        (a one-row kernel, a fused product): ``(module-name pattern (fnmatch), reader)`` pairs,
        the reader being a setting of this backend (e.g. ``"backend.decode_kernels = true"``),
        or :data:`FUSED_HEAD` for the module whose weight :meth:`completion_hidden` returns.

        A LoRA adapter on such a module would be skipped there, so the core refuses a
        ``[backend.lora]`` target that adapts one, naming the setting to turn off (the
        :data:`FUSED_HEAD` module only when the divergence uses hidden states). A backend
        declaring ``hidden_states`` names its :data:`FUSED_HEAD` module here, or LoRA runs with
        such a divergence are refused. The default: nothing is read directly.
        """
        return []

    @abstractmethod
    def save_pretrained(self, model: torch.nn.Module, directory: Path) -> None:
        """Write ``model`` as a self-contained checkpoint directory (weights, config, tokenizer)."""

    @abstractmethod
    def load_weights(self, model: torch.nn.Module, directory: Path) -> None:
        """Load weights written by :meth:`save_pretrained` (or the official layout) into ``model``."""

    def export_model(
        self, model: torch.nn.Module, directory: Path, dtype: torch.dtype, max_shard_bytes: int | None
    ) -> None:
        """Write ``model`` in the layout of the family's released checkpoints, which its own
        inference code loads (``opsd export``).

        ``directory`` exists and is empty (the caller renames it into place afterwards); every
        floating-point tensor is written in ``dtype``; weights larger than ``max_shard_bytes`` are
        split into shards listed in a safetensors index (None: the family's default, e.g. one
        file as released). ``model`` is the caller's to discard: it may be cast in place. Backends that
        implement it declare ``Capabilities(export=True)``.
        """
        raise CapabilityError(f"{type(self).__name__} cannot export a model in its family's released layout")

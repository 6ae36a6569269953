"""Architecture hyper-parameters of BAGEL-7B-MoT (ThinkMorph) and of its tiny ``debug`` flavour.

Owns: :class:`BagelConfig` (LLM, ViT and generation sizes, special token ids), reading it from
the official ``llm_config.json`` / ``vit_config.json`` pair and writing it back.
Does not know: torch modules, weights or tokenizers beyond the four special ids.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from opsd_core.api import CheckpointError


class CheckpointFileError(CheckpointError, FileNotFoundError):
    """A checkpoint directory lacks a file, or the directory itself is missing."""


class CheckpointContentError(CheckpointError, ValueError):
    """A checkpoint file does not fit the model (keys, shapes, config fields)."""



@dataclass(frozen=True)
class LLMConfig:
    """The Qwen2.5 mixture-of-transformers decoder."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_layers: int = 28
    num_heads: int = 28
    num_kv_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class ViTConfig:
    """The SigLIP NaViT encoder, with the number of layers BAGEL actually uses."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_layers: int = 26
    num_heads: int = 16
    patch_size: int = 14
    num_channels: int = 3
    image_size: int = 980
    layer_norm_eps: float = 1e-6

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.num_channels


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the Qwen2.5 special tokens BAGEL uses (text turns and image blocks)."""

    im_start: int = 151644
    im_end: int = 151645
    vision_start: int = 151652
    vision_end: int = 151653
    endoftext: int = 151643


@dataclass(frozen=True)
class BagelConfig:
    """Everything needed to build the model; the composition constants are BAGEL's hard-coded ones."""

    llm: LLMConfig = field(default_factory=LLMConfig)
    vit: ViTConfig = field(default_factory=ViTConfig)
    special: SpecialTokens = field(default_factory=SpecialTokens)
    visual_gen: bool = True
    latent_patch_size: int = 2
    max_latent_size: int = 64
    latent_channels: int = 16
    vae_downsample: int = 8
    vit_max_patches_per_side: int = 70

    @property
    def latent_token_dim(self) -> int:
        return self.latent_patch_size * self.latent_patch_size * self.latent_channels

    @property
    def latent_downsample(self) -> int:
        """Pixels per latent token side (VAE downsampling x latent patch)."""
        return self.vae_downsample * self.latent_patch_size

    def with_visual_gen(self, visual_gen: bool) -> BagelConfig:
        return replace(self, visual_gen=visual_gen)

    # ------------------------------------------------------------------ official files
    @classmethod
    def from_directory(cls, directory: Path, visual_gen: bool = True) -> BagelConfig:
        """Read ``llm_config.json`` and ``vit_config.json`` as the official loader does.

        The ViT file states one layer more than is used (BAGEL drops the last layer), and the
        special ids come from ``special_tokens.json`` when the directory has one (our debug
        checkpoints do), otherwise they are Qwen2.5's.
        """
        directory = Path(directory)
        llm = json.loads(_required(directory, "llm_config.json", "the Qwen2 LLM config").read_text())
        vit = json.loads(_required(directory, "vit_config.json", "the SigLIP vision config").read_text())
        special = SpecialTokens()
        special_path = directory / "special_tokens.json"
        if special_path.is_file():
            special = SpecialTokens(**json.loads(special_path.read_text()))
        try:
            llm_config = LLMConfig(
                vocab_size=llm["vocab_size"],
                hidden_size=llm["hidden_size"],
                intermediate_size=llm["intermediate_size"],
                num_layers=llm["num_hidden_layers"],
                num_heads=llm["num_attention_heads"],
                num_kv_heads=llm["num_key_value_heads"],
                rms_norm_eps=llm.get("rms_norm_eps", 1e-6),
                rope_theta=llm.get("rope_theta", 1_000_000.0),
            )
            vit_config = ViTConfig(
                hidden_size=vit["hidden_size"],
                intermediate_size=vit["intermediate_size"],
                num_layers=vit["num_hidden_layers"] - 1,
                num_heads=vit["num_attention_heads"],
                patch_size=vit.get("patch_size", 14),
                num_channels=vit.get("num_channels", 3),
                image_size=vit.get("image_size", 980),
                layer_norm_eps=vit.get("layer_norm_eps", 1e-6),
            )
        except KeyError as missing:
            raise CheckpointContentError(f"{directory}: config file lacks the field {missing}") from None
        if llm.get("rope_scaling"):
            raise CheckpointContentError(f"{directory}/llm_config.json sets rope_scaling; BAGEL uses plain RoPE")
        return cls(llm=llm_config, vit=vit_config, special=special, visual_gen=visual_gen)

    def write(self, directory: Path) -> None:
        """Write the two official config files (and the special ids) to ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        llm = {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "hidden_act": "silu",
            "vocab_size": self.llm.vocab_size,
            "hidden_size": self.llm.hidden_size,
            "intermediate_size": self.llm.intermediate_size,
            "num_hidden_layers": self.llm.num_layers,
            "num_attention_heads": self.llm.num_heads,
            "num_key_value_heads": self.llm.num_kv_heads,
            "rms_norm_eps": self.llm.rms_norm_eps,
            "rope_theta": self.llm.rope_theta,
            "tie_word_embeddings": False,
            "bos_token_id": self.special.endoftext,
            "eos_token_id": self.special.im_end,
        }
        vit = {
            "architectures": ["SiglipVisionModel"],
            "model_type": "siglip_vision_model",
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_size": self.vit.hidden_size,
            "intermediate_size": self.vit.intermediate_size,
            "num_hidden_layers": self.vit.num_layers + 1,
            "num_attention_heads": self.vit.num_heads,
            "patch_size": self.vit.patch_size,
            "num_channels": self.vit.num_channels,
            "image_size": self.vit.image_size,
            "layer_norm_eps": self.vit.layer_norm_eps,
        }
        (directory / "llm_config.json").write_text(json.dumps(llm, indent=2) + "\n")
        (directory / "vit_config.json").write_text(json.dumps(vit, indent=2) + "\n")
        (directory / "special_tokens.json").write_text(json.dumps(asdict(self.special), indent=2) + "\n")


LAYOUT = (
    "llm_config.json, vit_config.json, model.safetensors or ema.safetensors (or shards listed in "
    "model.safetensors.index.json), ae.safetensors and the Qwen2 tokenizer files"
)


def _required(directory: Path, name: str, what: str) -> Path:
    if not directory.is_dir():
        raise CheckpointFileError(
            f"checkpoint directory {directory} does not exist: set backend.checkpoint to the local ThinkMorph-7B "
            f"directory (nothing is downloaded); it holds {LAYOUT}"
        )
    path = directory / name
    if not path.is_file():
        raise CheckpointFileError(f"{path} is missing ({what}); a ThinkMorph/BAGEL checkpoint directory holds {LAYOUT}")
    return path


def seven_b(num_layers: int | None = None) -> BagelConfig:
    """The full-size BAGEL-7B-MoT architecture (for random-weight benchmarks), with
    ``num_layers`` decoder layers instead of 28 when given (every width unchanged)."""
    config = BagelConfig()
    return config if num_layers is None else replace(config, llm=replace(config.llm, num_layers=num_layers))


# Debug vocabulary: 256 byte tokens, then the special tokens, padded to a multiple of 16 as Qwen pads.
DEBUG_SPECIAL = SpecialTokens(endoftext=256, im_start=257, im_end=258, vision_start=259, vision_end=260)
DEBUG_VOCAB_SIZE = 272


def debug() -> BagelConfig:
    """Same architecture, tiny sizes: runs full OPSD steps on a CPU in seconds."""
    return BagelConfig(
        llm=LLMConfig(
            vocab_size=DEBUG_VOCAB_SIZE,
            hidden_size=64,
            intermediate_size=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
        ),
        vit=ViTConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2),
        special=DEBUG_SPECIAL,
    )

"""The FLUX.1 autoencoder of BAGEL, run through diffusers' ``AutoencoderKL``.

Owns: the autoencoder's architecture per flavour, the translation between the FLUX file naming
of ``ae.safetensors`` and diffusers' parameter names, reading and writing that file, the
latent normalisation (``scaling_factor * (z - shift_factor)``) applied around the encoder and
decoder, and the packing of latents into the 64-wide tokens the LLM sees (2x2 latent pixels x
16 channels) together with their position ids on the 64x64 latent grid.
Does not know: the LLM, the time embedding, the flow-matching schedule, or how images are
resized before encoding. The autoencoder is frozen everywhere in BAGEL, so ``encode`` and
``decode`` run without gradients.

Latent shapes use h, w for the token grid (image side / 16); the latent image itself is
(2h, 2w) since the autoencoder downsamples by 8.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file, save_file

from opsd_core.api import CheckpointError

VAE_FILE = "ae.safetensors"
LATENT_PATCH = 2  # latent pixels per token side: 2x2 latent pixels x 16 channels = 64 features
PIXELS_PER_TOKEN = 16  # 8x autoencoder downsampling x 2x2 latent patch
_ERRORS_SHOWN = 5

_FLAVOURS: dict[str, dict] = {
    "7b": {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "norm_num_groups": 32},
    # Same topology (4 levels, 8x downsampling, 16 latent channels, mid attention) at toy widths.
    "debug": {"block_out_channels": (8, 16, 16, 16), "layers_per_block": 1, "norm_num_groups": 4},
}


class VaeFileMissingError(CheckpointError, FileNotFoundError):
    """``ae.safetensors`` is not where the caller said it would be."""


class VaeWeightsError(CheckpointError, ValueError):
    """``ae.safetensors`` exists but its keys or shapes do not fit the requested flavour."""


def flux_vae_config(flavour: str) -> dict:
    """``AutoencoderKL`` constructor kwargs for ``flavour`` ("7b": the FLUX.1 autoencoder; "debug": a tiny twin)."""
    if flavour not in _FLAVOURS:
        raise ValueError(f"unknown VAE flavour {flavour!r}; known flavours: {', '.join(sorted(_FLAVOURS))}")
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "latent_channels": 16,
        "act_fn": "silu",
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "mid_block_add_attention": True,
        "scaling_factor": 0.3611,
        "shift_factor": 0.1159,
        **_FLAVOURS[flavour],
    }


# ---------------------------------------------------------------------------------------------
# FLUX <-> diffusers naming
#
# Each row pairs a diffusers module path with its FLUX path; a key is the path plus ".weight" or
# ".bias". Placeholders: {side} encoder|decoder, {level}/{block} indices kept as they are, {up} a
# decoder level, whose order is reversed between the two namings (diffusers' up_blocks.0 is the
# lowest resolution, FLUX's up.0 the highest), {leaf} a resnet layer with the same name in both.
_NAME_PAIRS: tuple[tuple[str, str], ...] = (
    ("{side}.conv_in", "{side}.conv_in"),
    ("{side}.conv_out", "{side}.conv_out"),
    ("{side}.conv_norm_out", "{side}.norm_out"),
    ("encoder.down_blocks.{level}.resnets.{block}.{leaf}", "encoder.down.{level}.block.{block}.{leaf}"),
    ("encoder.down_blocks.{level}.resnets.{block}.conv_shortcut", "encoder.down.{level}.block.{block}.nin_shortcut"),
    ("encoder.down_blocks.{level}.downsamplers.0.conv", "encoder.down.{level}.downsample.conv"),
    ("decoder.up_blocks.{up}.resnets.{block}.{leaf}", "decoder.up.{up}.block.{block}.{leaf}"),
    ("decoder.up_blocks.{up}.resnets.{block}.conv_shortcut", "decoder.up.{up}.block.{block}.nin_shortcut"),
    ("decoder.up_blocks.{up}.upsamplers.0.conv", "decoder.up.{up}.upsample.conv"),
    ("{side}.mid_block.resnets.0.{leaf}", "{side}.mid.block_1.{leaf}"),
    ("{side}.mid_block.resnets.1.{leaf}", "{side}.mid.block_2.{leaf}"),
    ("{side}.mid_block.attentions.0.group_norm", "{side}.mid.attn_1.norm"),
    ("{side}.mid_block.attentions.0.to_q", "{side}.mid.attn_1.q"),
    ("{side}.mid_block.attentions.0.to_k", "{side}.mid.attn_1.k"),
    ("{side}.mid_block.attentions.0.to_v", "{side}.mid.attn_1.v"),
    ("{side}.mid_block.attentions.0.to_out.0", "{side}.mid.attn_1.proj_out"),
)
_PLACEHOLDERS = {
    "side": r"(?P<side>encoder|decoder)",
    "level": r"(?P<level>\d+)",
    "block": r"(?P<block>\d+)",
    "up": r"(?P<up>\d+)",
    "leaf": r"(?P<leaf>norm1|conv1|norm2|conv2)",
}
# FLUX stores the mid-block attention projections as 1x1 convolutions, diffusers as linears.
_FLUX_CONV_PROJECTIONS = re.compile(r"(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight")
_DIFFUSERS_LINEAR_PROJECTIONS = re.compile(
    r"(encoder|decoder)\.mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight"
)


def _template_regex(template: str) -> re.Pattern[str]:
    pattern = re.escape(template)
    for name, group in _PLACEHOLDERS.items():
        pattern = pattern.replace(re.escape("{" + name + "}"), group)
    return re.compile(pattern + r"\.(?P<param>weight|bias)")


_DIFFUSERS_TO_FLUX = tuple((_template_regex(src), dst) for src, dst in _NAME_PAIRS)
_FLUX_TO_DIFFUSERS = tuple((_template_regex(dst), src) for src, dst in _NAME_PAIRS)


def _decoder_levels(names: list[str], level_pattern: str) -> int:
    """Number of decoder levels in ``names`` (needed to reverse the up-block order); 0 if none."""
    levels = [int(m.group(1)) for name in names if (m := re.match(level_pattern, name))]
    return max(levels) + 1 if levels else 0


def _rename(
    state: Mapping[str, torch.Tensor], rules: tuple[tuple[re.Pattern[str], str], ...], num_levels: int
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename every key of ``state`` by the first matching rule; returns (renamed, keys no rule matched)."""
    renamed, unknown = {}, []
    for name, tensor in state.items():
        for pattern, target in rules:
            if match := pattern.fullmatch(name):
                fields = match.groupdict()
                if fields.get("up") is not None:
                    fields["up"] = str(num_levels - 1 - int(fields["up"]))
                renamed[target.format(**fields) + "." + fields["param"]] = tensor
                break
        else:
            unknown.append(name)
    return renamed, unknown


def flux_to_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a FLUX-named autoencoder state dict (``ae.safetensors``) to ``AutoencoderKL`` names.

    The mid-block attention weights q/k/v/proj_out go from 1x1 convolutions [C, C, 1, 1] to
    linears [C, C]; every other tensor is passed through unchanged (same storage). Raises
    ValueError naming the keys that are not FLUX autoencoder parameters.
    """
    num_levels = _decoder_levels(list(state), r"decoder\.up\.(\d+)\.")
    renamed, unknown = _rename(state, _FLUX_TO_DIFFUSERS, num_levels)
    if unknown:
        raise ValueError(f"not FLUX autoencoder parameter names: {_first(unknown)}")
    for name, tensor in list(renamed.items()):
        if _DIFFUSERS_LINEAR_PROJECTIONS.fullmatch(name) and tensor.ndim == 4:
            renamed[name] = tensor.flatten(1)  # [C, C, 1, 1] -> [C, C]
    return renamed


def diffusers_to_flux(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an ``AutoencoderKL`` state dict to the FLUX naming of ``ae.safetensors`` (inverse of flux_to_diffusers).

    The mid-block attention weights go from linears [C, C] to 1x1 convolutions [C, C, 1, 1].
    Raises ValueError naming the keys that are not ``AutoencoderKL`` parameters of this layout.
    """
    num_levels = _decoder_levels(list(state), r"decoder\.up_blocks\.(\d+)\.")
    renamed, unknown = _rename(state, _DIFFUSERS_TO_FLUX, num_levels)
    if unknown:
        raise ValueError(f"not AutoencoderKL parameter names of the FLUX layout: {_first(unknown)}")
    for name, tensor in list(renamed.items()):
        if _FLUX_CONV_PROJECTIONS.fullmatch(name) and tensor.ndim == 2:
            renamed[name] = tensor[:, :, None, None]  # [C, C] -> [C, C, 1, 1]
    return renamed


def _first(items: list[str]) -> str:
    shown = ", ".join(items[:_ERRORS_SHOWN])
    return shown + (f" (and {len(items) - _ERRORS_SHOWN} more)" if len(items) > _ERRORS_SHOWN else "")


# ---------------------------------------------------------------------------------------------
# ae.safetensors


def load_vae(
    path: Path, flavour: str = "7b", device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> AutoencoderKL:
    """Build the ``flavour`` autoencoder from ``path`` (an ``ae.safetensors`` in FLUX naming), in eval mode.

    Raises VaeFileMissingError (a FileNotFoundError) when ``path`` is not a file, and
    VaeWeightsError (a ValueError) listing the first missing keys, unexpected keys and shape
    mismatches when the file does not fit the flavour.
    """
    path = Path(path)
    if not path.is_file():
        raise VaeFileMissingError(
            f"no autoencoder weights at {path}: expected the FLUX.1 autoencoder (~335 MB for the 7b flavour), "
            f"a file named {VAE_FILE} in the checkpoint directory, in FLUX parameter naming"
        )
    with torch.device("meta"):
        vae = AutoencoderKL(**flux_vae_config(flavour))
    # Compared in the file's own naming and shapes, which is what a user can inspect.
    expected = diffusers_to_flux(vae.state_dict())
    state = load_file(str(path))
    problems = []
    if missing := sorted(set(expected) - set(state)):
        problems.append(f"missing keys: {_first(missing)}")
    if unexpected := sorted(set(state) - set(expected)):
        problems.append(f"unexpected keys: {_first(unexpected)}")
    mismatched = [
        f"{name} {tuple(state[name].shape)} in file vs {tuple(tensor.shape)} expected"
        for name, tensor in expected.items()
        if name in state and state[name].shape != tensor.shape
    ]
    if mismatched:
        problems.append(f"shape mismatches: {_first(mismatched)}")
    if problems:
        raise VaeWeightsError(f"{path} does not hold the {flavour!r} FLUX autoencoder: " + "; ".join(problems))
    vae.load_state_dict(flux_to_diffusers(state), assign=True)
    return vae.to(device=device, dtype=dtype).eval()


def save_vae(vae: AutoencoderKL, path: Path) -> None:
    """Write ``vae``'s weights to ``path`` in FLUX naming, in their own dtype (``load_vae`` reads them back exactly)."""
    tensors = {
        name: tensor.detach().to("cpu").contiguous() for name, tensor in diffusers_to_flux(vae.state_dict()).items()
    }
    save_file(tensors, str(path), metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------
# pixels <-> latents


@torch.no_grad()
def encode(
    vae: AutoencoderKL, pixels: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True
) -> torch.Tensor:
    """Normalised latents of ``pixels``.

    pixels: float (B, 3, H, W) in [-1, 1], H and W multiples of 16 (so the token grid is whole).
    Returns float (B, 16, H/8, W/8) in ``vae``'s dtype: ``scaling_factor * (z - shift_factor)``,
    with z drawn from the posterior with ``generator`` (BAGEL samples, also for context images),
    or the posterior mean when ``sample`` is False.
    """
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"pixels must be (B, 3, H, W); got shape {tuple(pixels.shape)}")
    height, width = pixels.shape[-2:]
    if height % PIXELS_PER_TOKEN or width % PIXELS_PER_TOKEN:
        raise ValueError(
            f"image size {height}x{width} is not a multiple of {PIXELS_PER_TOKEN}; resize or pad it first "
            f"(one latent token covers {PIXELS_PER_TOKEN}x{PIXELS_PER_TOKEN} pixels)"
        )
    posterior = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
    z = posterior.sample(generator) if sample else posterior.mode()
    return vae.config.scaling_factor * (z - vae.config.shift_factor)


@torch.no_grad()
def decode(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Pixels of normalised ``latents``: float (B, 16, 2h, 2w) -> float (B, 3, 16h, 16w) in about [-1, 1]."""
    if latents.ndim != 4 or latents.shape[1] != vae.config.latent_channels:
        raise ValueError(f"latents must be (B, {vae.config.latent_channels}, 2h, 2w); got {tuple(latents.shape)}")
    z = latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
    return vae.decode(z).sample


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """RGB images of float ``pixels`` (B, 3, H, W) in [-1, 1]; values are clamped, scaled to 255 and truncated."""
    scaled = ((pixels.detach().float() * 0.5 + 0.5).clamp(0, 1) * 255).to(torch.uint8)
    return [Image.fromarray(image.permute(1, 2, 0).cpu().numpy()) for image in scaled]


# ---------------------------------------------------------------------------------------------
# latents <-> tokens


def latents_to_tokens(latents: torch.Tensor) -> torch.Tensor:
    """Tokens of ``latents``: float (B, C, 2h, 2w) -> (B, h*w, 4C), C = 16 gives 64 features.

    Tokens run over the (r, c) grid row-major; each holds its 2x2 latent pixels with features
    ordered (p_row, p_col, channel).
    """
    batch, channels, height, width = latents.shape
    if height % LATENT_PATCH or width % LATENT_PATCH:
        raise ValueError(f"latent sides must be even to form 2x2 tokens; got {height}x{width}")
    h, w = height // LATENT_PATCH, width // LATENT_PATCH
    grid = latents.reshape(batch, channels, h, LATENT_PATCH, w, LATENT_PATCH)  # (B, C, h, p_row, w, p_col)
    grid = grid.permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p_row, p_col, C)
    return grid.reshape(batch, h * w, LATENT_PATCH * LATENT_PATCH * channels)


def tokens_to_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of ``latents_to_tokens``: float (B, h*w, 4C) -> (B, C, 2h, 2w)."""
    batch, length, features = tokens.shape
    if length != h * w or features % (LATENT_PATCH * LATENT_PATCH):
        raise ValueError(f"tokens of shape {tuple(tokens.shape)} do not form a {h}x{w} grid of 2x2 latent patches")
    channels = features // (LATENT_PATCH * LATENT_PATCH)
    grid = tokens.reshape(batch, h, w, LATENT_PATCH, LATENT_PATCH, channels)  # (B, h, w, p_row, p_col, C)
    grid = grid.permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p_row, w, p_col)
    return grid.reshape(batch, channels, h * LATENT_PATCH, w * LATENT_PATCH)


def latent_position_ids(h: int, w: int, max_latent_size: int = 64) -> torch.Tensor:
    """int64 (h*w,) ids ``r * max_latent_size + c`` of an h x w token grid placed top-left on the square table."""
    if not (0 < h <= max_latent_size and 0 < w <= max_latent_size):
        raise ValueError(
            f"a {h}x{w} token grid does not fit the {max_latent_size}x{max_latent_size} latent position table "
            f"(images up to {max_latent_size * PIXELS_PER_TOKEN} pixels a side)"
        )
    rows = torch.arange(h, dtype=torch.int64)[:, None]
    cols = torch.arange(w, dtype=torch.int64)[None, :]
    return (rows * max_latent_size + cols).reshape(-1)

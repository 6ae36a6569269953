"""Rectified-flow sampling of visual-thought latents with BAGEL's classifier-free guidance.

Owns: the shifted time schedule, the guidance settings and the three ways of combining guided
velocities, and the Euler loop that decides which guidance branches to evaluate at each step.
Does not know: the model, KV caches or how the branch contexts are built; a caller's
``velocity_fn(x, t, branches)`` hides all of that. Nor does it know the autoencoder: latents
here are already in token form.

Conventions (BAGEL): t = 1 is pure noise and t = 0 clean data, ``x_t = (1 - t) x0 + t noise``,
and the model predicts the velocity ``v = noise - x0`` (pointing from data to noise), so one
Euler update is ``x <- x - v(x, t_k) (t_k - t_{k+1})``. Latent tokens are float (B, M, 64):
M tokens of 2x2 latent pixels x 16 channels per image.

Dtypes are BAGEL's inference loop's (``Bagel.generate_image``): the schedule, its step sizes and
the state are float32 tensors, the guidance interval test compares the float32 time with the
bounds rounded to float32 (so a time that equals a bound in float32 is on the bound even where
the bound's python float is not), and the update multiplies the velocity by a 0-dim float32
step, which keeps the velocity's dtype for the product.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Literal, get_args

import torch

Branch = Literal["cond", "text_uncond", "image_uncond"]
RenormMode = Literal["global", "channel", "text_channel"]
VelocityFn = Callable[[torch.Tensor, float, tuple[Branch, ...]], Mapping[str, torch.Tensor]]

RENORM_MODES: tuple[str, ...] = get_args(RenormMode)
_NORM_EPS = 1e-8  # keeps the rescale finite when a guided velocity vanishes


def bagel_schedule(
    num_timesteps: int = 50, shift: float = 3.0, device: torch.device | str | None = None
) -> torch.Tensor:
    """float32 (num_timesteps,) times from 1 to 0: ``linspace(1, 0, N)`` shifted by ``s t / (1 + (s - 1) t)``.

    Computed in float32 in BAGEL's order of operations, so every time is bitwise the official
    one. A shift above 1 spends more of the N - 1 Euler updates near the noise end.
    """
    if num_timesteps < 2:
        raise ValueError(f"num_timesteps must be at least 2 (one Euler update); got {num_timesteps}")
    if shift <= 0:
        raise ValueError(f"shift must be positive; got {shift}")
    times = torch.linspace(1, 0, num_timesteps, dtype=torch.float32, device=device)
    return shift * times / (1 + (shift - 1) * times)


@dataclasses.dataclass(frozen=True)
class GuidanceConfig:
    """Classifier-free guidance and schedule settings of one visual-thought generation.

    The defaults are the ThinkMorph evaluation harness's (text 4.0, image 2.0, interval (0, 1],
    "text_channel" renorm). BAGEL's own inferencer uses text 3.0, image 1.5, interval (0.4, 1.0]
    and "global" renorm; both use renorm_min 0, 50 timesteps and shift 3.
    """

    text_scale: float = 4.0
    """Guidance towards the full context and away from the text-unconditional one; <= 1 disables all guidance."""
    image_scale: float = 2.0
    """Guidance away from the image-unconditional context, applied on top of text guidance; <= 1 skips it."""
    interval: tuple[float, float] = (0.0, 1.0)
    """Guidance applies at times t with lo < t <= hi, compared in float32; elsewhere only the conditional velocity is used."""
    renorm: RenormMode = "text_channel"
    """How the guided velocity is rescaled towards the conditional velocity's norm (see ``combine_guidance``)."""
    renorm_min: float = 0.0
    """Lower bound of the rescale factor ||v|| / ||v_guided||, whose upper bound is 1."""
    num_timesteps: int = 50
    """Points of the time schedule, including t = 1 and t = 0 (so num_timesteps - 1 Euler updates)."""
    shift: float = 3.0
    """Timestep shift s of the schedule, t' = s t / (1 + (s - 1) t)."""

    def __post_init__(self) -> None:
        for field in ("text_scale", "image_scale"):
            if getattr(self, field) < 0:
                raise ValueError(
                    f"GuidanceConfig.{field} must be >= 0 (1 or less disables it); got {getattr(self, field)}"
                )
        bounds = tuple(float(bound) for bound in self.interval)
        if len(bounds) != 2 or not 0.0 <= bounds[0] <= bounds[1] <= 1.0:
            raise ValueError(
                f"GuidanceConfig.interval must be (lo, hi) with 0 <= lo <= hi <= 1; got {self.interval}. "
                "Use (0.0, 1.0) to guide every step"
            )
        object.__setattr__(self, "interval", bounds)
        if self.renorm not in RENORM_MODES:
            raise ValueError(f"GuidanceConfig.renorm must be one of {', '.join(RENORM_MODES)}; got {self.renorm!r}")
        if not 0.0 <= self.renorm_min <= 1.0:
            raise ValueError(
                f"GuidanceConfig.renorm_min must be in [0, 1] (0 allows any shrink); got {self.renorm_min}"
            )
        if self.num_timesteps < 2:
            raise ValueError(f"GuidanceConfig.num_timesteps must be at least 2; got {self.num_timesteps}")
        if self.shift <= 0:
            raise ValueError(f"GuidanceConfig.shift must be positive (1 = no shift); got {self.shift}")

    def guided_at(self, t: torch.Tensor | float) -> bool:
        """Whether ``t`` lies in the guidance interval, lo < t <= hi, with t and both bounds as float32.

        ``t`` is a float32 0-dim tensor from ``bagel_schedule`` (a python float is rounded to
        float32 first). BAGEL compares its float32 time tensor with the python bounds, which
        torch rounds to float32: at shift 2 and 25 points the time float32(0.4) is not above a
        lower bound of 0.4, though 0.4000000059604645 > 0.4 in float64.
        """
        t = torch.as_tensor(t, dtype=torch.float32)
        lo, hi = (torch.tensor(bound, dtype=torch.float32, device=t.device) for bound in self.interval)
        return bool((t > lo) & (t <= hi))

    def branches_at(self, t: torch.Tensor | float) -> tuple[Branch, ...]:
        """The velocity branches needed at time ``t``: guidance branches only inside the interval (``guided_at``)."""
        if self.text_scale <= 1 or not self.guided_at(t):
            return ("cond",)
        if self.image_scale > 1:
            return ("cond", "text_uncond", "image_uncond")
        return ("cond", "text_uncond")


def _rescale(guided: torch.Tensor, reference: torch.Tensor, per_token: bool, renorm_min: float) -> torch.Tensor:
    """``guided * clamp(||reference|| / ||guided||, renorm_min, 1)``, norms per token or per sample of (B, M, C)."""
    dims = (-1,) if per_token else (-2, -1)
    ratio = torch.linalg.vector_norm(reference, dim=dims, keepdim=True) / (
        torch.linalg.vector_norm(guided, dim=dims, keepdim=True) + _NORM_EPS
    )
    return guided * ratio.clamp(min=renorm_min, max=1.0)


def combine_guidance(
    v: torch.Tensor, v_text: torch.Tensor, v_image: torch.Tensor | None, config: GuidanceConfig
) -> torch.Tensor:
    """The guided velocity, float (B, M, C) from three float (B, M, C) velocities (C = 64 for BAGEL).

    v: conditional, v_text: text-unconditional, v_image: image-unconditional (may be None when
    ``config.image_scale <= 1``). With s_t, s_i the scales:

    * "global": ``g = v_text + s_t (v - v_text)``, then ``g = v_image + s_i (g - v_image)`` if
      s_i > 1, then ``g * clamp(||v|| / ||g||, renorm_min, 1)`` with norms over all tokens and
      channels of each sample;
    * "channel": the same with one norm per token;
    * "text_channel": only the text-guided ``g`` is rescaled (per token), and image guidance is
      applied after the rescale.

    The norm ratio's denominator carries a 1e-8 guard against a vanishing guided velocity.
    ``text_scale <= 1`` returns ``v`` unchanged: image guidance only exists on top of text guidance.
    """
    if config.text_scale <= 1:
        return v
    use_image = config.image_scale > 1
    if use_image and v_image is None:
        raise ValueError(f"image_scale is {config.image_scale} > 1 but no image-unconditional velocity was given")
    guided = v_text + config.text_scale * (v - v_text)
    if config.renorm == "text_channel":
        guided = _rescale(guided, v, per_token=True, renorm_min=config.renorm_min)
        return v_image + config.image_scale * (guided - v_image) if use_image else guided
    if use_image:
        guided = v_image + config.image_scale * (guided - v_image)
    return _rescale(guided, v, per_token=config.renorm == "channel", renorm_min=config.renorm_min)


def sample_visual_thought_latents(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    config: GuidanceConfig,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Integrate from ``noise`` at t = 1 to clean latent tokens at t = 0 with guided Euler steps.

    noise: float32 (B, M, 64), usually N(0, 1); the state stays float32 whatever the model's
    dtype (BAGEL's does). ``velocity_fn(x, t, branches)`` gets the state float32 (B, M, 64),
    the time as a python float in (0, 1] (exactly the float32 schedule value) and the branches
    to evaluate (``config.branches_at``), and returns a mapping branch -> float (B, M, 64)
    velocity. Each update is ``x - v * dt`` with dt a 0-dim float32 step of the schedule, as in
    BAGEL: the product keeps v's dtype, the difference is float32. ``progress(done, total)`` is
    called after each of the ``config.num_timesteps - 1`` updates. Returns float32 (B, M, 64)
    latent tokens.
    """
    if noise.dtype != torch.float32:
        raise ValueError(f"noise must be float32 (BAGEL integrates the latents in float32); got {noise.dtype}")
    schedule = bagel_schedule(config.num_timesteps, config.shift, device=noise.device)
    times, steps = schedule[:-1], schedule[:-1] - schedule[1:]  # float32 (N - 1,) each
    x = noise
    for index, t in enumerate(times):
        branches = config.branches_at(t)
        velocities = velocity_fn(x, t.item(), branches)
        if branches == ("cond",):
            v = velocities["cond"]
        else:
            v = combine_guidance(velocities["cond"], velocities["text_uncond"], velocities.get("image_uncond"), config)
        x = x - v * steps[index]
        if progress is not None:
            progress(index + 1, len(times))
    return x

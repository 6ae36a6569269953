"""Packing: BAGEL's sequence layout rules, from items to model-ready rows.

Owns: how a text turn, a ViT image block and a VAE latent block become positions (token ids,
RoPE ids, which expert, which split), the attention rule between splits, which rows carry
logits, and batching several sequences as right-padded rows with a per-row mask.
Does not know: prompts, tokenizers, pixels' origin, the VAE or the model's weights.

Layout rules (one sequence):
* text turn: ``<|im_start|>`` ids ``<|im_end|>``; one causal split; RoPE +1 per position. A turn
  marked ``open`` has no closing ``<|im_end|>`` (the completion being decoded). A turn with
  ``loss`` yields logit rows at its ``<|im_start|>`` and at every token (N tokens, N + 1 rows).
* ViT block: ``<|vision_start|>`` N patches ``<|vision_end|>``; one ``full`` split (bidirectional);
  all N + 2 positions share one RoPE id, then the counter advances by 1.
* latent block: ``<|vision_start|>`` M latent tokens ``<|vision_end|>``; a clean block is a ``full``
  split and advances RoPE by 1; a noisy block is a ``noise`` split, does not advance RoPE and is
  invisible to every position outside itself.
* attention: key k is visible to query q iff (k <= q or both lie in the same full/noise split)
  and k is not in another split's noisy block.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from opsd_thinkmorph.architecture import BagelConfig
from opsd_thinkmorph.model import ImageInputs, LatentInputs

CAUSAL, FULL, NOISE = 0, 1, 2
TEXT, VIT, LATENT = 0, 1, 2


@dataclass(frozen=True)
class TextItem:
    """A text turn. ``ids`` are the tokens between the turn markers."""

    ids: Sequence[int]
    loss: bool = False
    open: bool = False


@dataclass(frozen=True)
class ViTItem:
    """An image seen through the ViT: float (3, H, W) pixels in [-1, 1], H and W multiples of 14."""

    pixels: torch.Tensor


@dataclass(frozen=True)
class LatentItem:
    """A VAE latent block of an h x w token grid.

    Attributes:
        tokens: float (h*w, 64) x_t of each latent token (x_0 when clean).
        grid: (h, w).
        timestep: t in [0, 1]; 0 = clean.
        noisy: a noisy block (a flow-matching target), invisible to what follows.
    """

    tokens: torch.Tensor
    grid: tuple[int, int]
    timestep: float = 0.0
    noisy: bool = False


Item = TextItem | ViTItem | LatentItem


def patchify(pixels: torch.Tensor, patch: int, max_side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float (3, H, W) -> patches float (N, patch*patch*3) ordered (kh, kw, c), ids int64 (N,) r*max_side + c."""
    channels, height, width = pixels.shape
    if height % patch or width % patch:
        raise ValueError(f"image sides must be multiples of {patch}, got {height}x{width}")
    rows, cols = height // patch, width // patch
    if rows > max_side or cols > max_side:
        raise ValueError(f"image of {rows}x{cols} patches exceeds the {max_side}x{max_side} position grid")
    patches = pixels.reshape(channels, rows, patch, cols, patch).permute(1, 3, 2, 4, 0)  # (r, c, kh, kw, C)
    ids = (torch.arange(rows).unsqueeze(1) * max_side + torch.arange(cols)).flatten()
    return patches.reshape(rows * cols, -1), ids


def latent_position_ids(grid: tuple[int, int], max_latent_size: int) -> torch.Tensor:
    h, w = grid
    return (torch.arange(h).unsqueeze(1) * max_latent_size + torch.arange(w)).flatten()


@dataclass
class LaidOut:
    """One packed sequence, position by position (built by :func:`lay_out`)."""

    token_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    kinds: list[int] = field(default_factory=list)  # TEXT / VIT / LATENT
    splits: list[int] = field(default_factory=list)
    modes: list[int] = field(default_factory=list)
    logit_rows: list[int] = field(default_factory=list)
    label_ids: list[int] = field(default_factory=list)
    vit_patches: list[torch.Tensor] = field(default_factory=list)
    vit_ids: list[torch.Tensor] = field(default_factory=list)
    vit_lens: list[int] = field(default_factory=list)
    latent_tokens: list[torch.Tensor] = field(default_factory=list)
    latent_ids: list[torch.Tensor] = field(default_factory=list)
    latent_times: list[torch.Tensor] = field(default_factory=list)
    noisy_latent_rows: list[int] = field(default_factory=list)
    next_position: int = 0

    def __len__(self) -> int:
        return len(self.token_ids)

    def _add(self, ids: Sequence[int], position: int | None, kind: Sequence[int], split: int, mode: int):
        start = self.next_position
        self.token_ids += ids
        self.positions += [position] * len(ids) if position is not None else range(start, start + len(ids))
        self.kinds += kind
        self.splits += [split] * len(ids)
        self.modes += [mode] * len(ids)


def lay_out(items: Sequence[Item], config: BagelConfig, start_position: int = 0, first_split: int = 0) -> LaidOut:
    """Positions of ``items`` in order (see the module docstring for the rules)."""
    special = config.special
    seq = LaidOut(next_position=start_position)
    for split, item in enumerate(items, start=first_split):
        if isinstance(item, TextItem):
            ids = [special.im_start, *item.ids] + ([] if item.open else [special.im_end])
            if item.loss:
                first = len(seq)
                seq.logit_rows += range(first, first + len(item.ids) + 1)
                seq.label_ids += [*item.ids, special.im_end]
            seq._add(ids, None, [TEXT] * len(ids), split, CAUSAL)
            seq.next_position += len(ids)
        elif isinstance(item, ViTItem):
            patches, ids = patchify(item.pixels, config.vit.patch_size, config.vit_max_patches_per_side)
            count = patches.shape[0]
            seq.vit_patches.append(patches)
            seq.vit_ids.append(ids)
            seq.vit_lens.append(count)
            tokens = [special.vision_start] + [0] * count + [special.vision_end]
            seq._add(tokens, seq.next_position, [TEXT] + [VIT] * count + [TEXT], split, FULL)
            seq.next_position += 1
        elif isinstance(item, LatentItem):
            h, w = item.grid
            if tuple(item.tokens.shape) != (h * w, config.latent_token_dim):
                raise ValueError(f"latent block of grid {h}x{w} needs tokens ({h * w}, {config.latent_token_dim})")
            if h > config.max_latent_size or w > config.max_latent_size:
                raise ValueError(f"latent grid {h}x{w} exceeds {config.max_latent_size}x{config.max_latent_size}")
            if item.noisy:
                seq.noisy_latent_rows += range(len(seq) + 1, len(seq) + 1 + h * w)
            seq.latent_tokens.append(item.tokens)
            seq.latent_ids.append(latent_position_ids(item.grid, config.max_latent_size))
            seq.latent_times.append(torch.full((h * w,), float(item.timestep)))
            tokens = [special.vision_start] + [0] * (h * w) + [special.vision_end]
            mode = NOISE if item.noisy else FULL
            seq._add(tokens, seq.next_position, [TEXT] + [LATENT] * (h * w) + [TEXT], split, mode)
            if not item.noisy:
                seq.next_position += 1
        else:
            raise TypeError(f"cannot pack an item of type {type(item).__name__}")
    return seq


def attention_mask(splits: torch.Tensor, modes: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """bool (B, T, T) from per-position int64 (B, T) split ids and modes, and bool (B, T) validity.

    Padding queries see only themselves, so that no row of the softmax is empty.
    """
    T = splits.shape[1]
    index = torch.arange(T, device=splits.device)
    causal = index.unsqueeze(1) >= index.unsqueeze(0)  # (T, T): key <= query
    same = splits.unsqueeze(2) == splits.unsqueeze(1)  # (B, T, T)
    bidirectional = same & (modes != CAUSAL).unsqueeze(2)
    hidden_noise = (modes == NOISE).unsqueeze(1) & ~same
    allowed = (causal | bidirectional) & ~hidden_noise & valid.unsqueeze(1) & valid.unsqueeze(2)
    return allowed | (~valid).unsqueeze(2) & torch.eye(T, dtype=torch.bool, device=splits.device)


@dataclass
class PackedRows:
    """B sequences as right-padded rows of width T.

    Attributes:
        token_ids: int64 (B, T); image and latent slots hold 0.
        positions: int64 (B, T) RoPE ids.
        mask: bool (B, T, T) attention.
        valid: bool (B, T) real (not padding) positions.
        gen: bool (B, T) latent positions (generation expert), or None when there are none.
        image_slots, latent_slots: bool (B, T).
        images: ViT inputs of every image, in row-major slot order, or None.
        latents: latent inputs of every latent token, in row-major slot order, or None.
        logit_rows: per row, the positions whose logits are asked for (loss turns).
        label_ids: per row, the labels of those positions.
        noisy_latent_rows: per row, the positions of noisy latent tokens.
        next_positions: int64 (B,) the RoPE id the next appended token of each row would get.
        lengths: int64 (B,) real positions per row.
    """

    token_ids: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor
    valid: torch.Tensor
    gen: torch.Tensor | None
    image_slots: torch.Tensor
    latent_slots: torch.Tensor
    images: ImageInputs | None
    latents: LatentInputs | None
    logit_rows: list[list[int]]
    label_ids: list[list[int]]
    noisy_latent_rows: list[list[int]]
    next_positions: torch.Tensor
    lengths: torch.Tensor

    def to(self, device: torch.device) -> PackedRows:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        images = None
        if self.images is not None:
            images = ImageInputs(move(self.images.patches), move(self.images.position_ids), self.images.seqlens)
        latents = None
        if self.latents is not None:
            latents = LatentInputs(
                move(self.latents.tokens), move(self.latents.timesteps), move(self.latents.position_ids)
            )
        return PackedRows(
            move(self.token_ids),
            move(self.positions),
            move(self.mask),
            move(self.valid),
            move(self.gen),
            move(self.image_slots),
            move(self.latent_slots),
            images,
            latents,
            self.logit_rows,
            self.label_ids,
            self.noisy_latent_rows,
            move(self.next_positions),
            move(self.lengths),
        )


def pack_rows(sequences: Sequence[LaidOut], pad_id: int) -> PackedRows:
    """Batch laid-out sequences as right-padded rows."""
    B, T = len(sequences), max(len(seq) for seq in sequences)
    token_ids = torch.full((B, T), pad_id, dtype=torch.long)
    positions = torch.zeros(B, T, dtype=torch.long)
    kinds = torch.full((B, T), TEXT, dtype=torch.long)
    splits = torch.full((B, T), -1, dtype=torch.long)
    modes = torch.zeros(B, T, dtype=torch.long)
    valid = torch.zeros(B, T, dtype=torch.bool)
    for row, seq in enumerate(sequences):
        n = len(seq)
        token_ids[row, :n] = torch.tensor(seq.token_ids)
        positions[row, :n] = torch.tensor(seq.positions)
        kinds[row, :n] = torch.tensor(seq.kinds)
        splits[row, :n] = torch.tensor(seq.splits)
        modes[row, :n] = torch.tensor(seq.modes)
        valid[row, :n] = True
    # Padding keeps a split of its own so it never joins a real bidirectional block.
    splits = torch.where(valid, splits, -2 - torch.arange(T).unsqueeze(0))
    image_slots, latent_slots = kinds == VIT, kinds == LATENT
    images = latents = None
    if any(seq.vit_patches for seq in sequences):
        images = ImageInputs(
            torch.cat([p for seq in sequences for p in seq.vit_patches]),
            torch.cat([i for seq in sequences for i in seq.vit_ids]),
            [n for seq in sequences for n in seq.vit_lens],
        )
    if any(seq.latent_tokens for seq in sequences):
        latents = LatentInputs(
            torch.cat([t for seq in sequences for t in seq.latent_tokens]),
            torch.cat([t for seq in sequences for t in seq.latent_times]),
            torch.cat([i for seq in sequences for i in seq.latent_ids]),
        )
    return PackedRows(
        token_ids=token_ids,
        positions=positions,
        mask=attention_mask(splits, modes, valid),
        valid=valid,
        gen=latent_slots if bool(latent_slots.any()) else None,
        image_slots=image_slots,
        latent_slots=latent_slots,
        images=images,
        latents=latents,
        logit_rows=[list(seq.logit_rows) for seq in sequences],
        label_ids=[list(seq.label_ids) for seq in sequences],
        noisy_latent_rows=[list(seq.noisy_latent_rows) for seq in sequences],
        next_positions=torch.tensor([seq.next_position for seq in sequences], dtype=torch.long),
        lengths=torch.tensor([len(seq) for seq in sequences], dtype=torch.long),
    )


def pack(items_per_row: Sequence[Sequence[Item]], config: BagelConfig) -> PackedRows:
    """Lay out and batch: one row per item list."""
    return pack_rows([lay_out(items, config) for items in items_per_row], config.special.endoftext)

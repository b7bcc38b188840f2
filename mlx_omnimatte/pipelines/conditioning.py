"""Conditioning of the removal DiT: what every run computes once before
denoising, as the bundle's remover expects it (`removers.py`). Casper's is
below; ROSE's differs in its binary mask (no neutral level, no dilation),
the prompt "" and a zero CLIP context; MiniMax-Remover's is two latents per
trajectory (the video with a mid-grey hole, and the mask video itself) and
no text or image context.

Reference facts (Generative Omnimatte's Wan2.1-Fun pipeline):
* video and masks are area-resized to the model grid; masks are binarized
  at 240/255 and dilated 11x11 there; both are padded in time by appending
  the reversed clip;
* the condition latent is the VAE encoding of the *unmasked* video (the
  model must see the shadows it removes);
* mask channels: `1 - trimask`, frame 0 repeated 4 times in front so the
  pixel frames group by 4 per latent frame, the 4 sub-frames as channels,
  resized to the latent grid with trilinear (align_corners=False) filtering;
* CLIP sees the raw frame 0 at its source resolution;
* the caption of the clean background is encoded to 512 tokens, zero past
  its length; no classifier-free guidance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import mlx.core as mx
import numpy as np
from scipy import ndimage

from ..io.grid import GridPlan, pad_frames, plan_grid, resize_frames, resize_masks
from ..io.inputs import Clip
from ..io.masks import binarize_mask, build_trimask, dilate_mask, prepare_mask
from ..removers import CASPER, Remover

VAE_STRIDE = 8  # spatial compression
CHANNELS_PER_LATENT_FRAME = 4  # pixel frames per latent frame
CLIP_TOKENS = 257  # CLIP ViT-H/14 at 224: 256 patches + the class token


@dataclass
class Conditioning:
    plan: GridPlan
    video: np.ndarray  # float32 [T, H, W, 3] in [-1, 1] on the model grid, padded
    masks: list[np.ndarray]  # bool [T, H, W] per object, model grid, padded
    context: Optional[mx.array]  # [1, 512, 4096]; None without a text branch
    clip_fea: Optional[mx.array]  # [1, 257, 1280]; zeros for ROSE; None without an image branch
    cond_latent: Optional[mx.array]  # [1, T', h, w, 16]; None for MiniMax-Remover (per trajectory)
    remover: Remover = CASPER
    channels: dict = field(default_factory=dict)  # label -> the non-noise channels, when per trajectory

    @property
    def latent_shape(self) -> tuple:
        """[1, T', h, w, 16]: the shape of the noise latent."""
        like = self.cond_latent if self.cond_latent is not None else next(iter(self.channels.values()))
        return (*like.shape[:-1], 16)


def plan_for(clip: Clip, size=None, min_frames: int = 81) -> GridPlan:
    """The clip's model grid: the one its prepared run planned, else planned here."""
    if clip.plan is not None:
        return clip.plan
    return plan_grid(clip.size[0], clip.size[1], clip.num_frames, size=size, min_frames=min_frames)


def model_video(clip: Clip, plan: GridPlan) -> np.ndarray:
    """Area-resized, padded, in [-1, 1]."""
    frames = resize_frames(clip.frames.astype(np.float32) / 255.0, plan.size, "area")
    return pad_frames(frames, plan.frames) * 2.0 - 1.0


def model_masks(clip: Clip, plan: GridPlan, remover: Remover = CASPER) -> list[np.ndarray]:
    """bool [T, H, W] per object on the model grid, padded: binarized at the
    remover's threshold after the area resize, then dilated its way."""
    if remover.dilation.startswith("square:"):
        size = int(remover.dilation.split(":")[1])
        return [pad_frames(prepare_mask(m, plan.size, remover.threshold, size), plan.frames) for m in clip.masks]
    gray = [resize_masks(m, plan.size, "area") for m in clip.masks]
    return [pad_frames(dilate_remover(binarize_mask(g, remover.threshold), remover), plan.frames) for g in gray]


def dilate_remover(mask: np.ndarray, remover: Remover) -> np.ndarray:
    """bool [T, H, W] dilated as the remover's reference does: "cross:N" is
    scipy's binary_dilation with its default 3x3 cross, N iterations, per frame."""
    kind, _, n = remover.dilation.partition(":")
    if kind == "none":
        return mask
    if kind == "square":
        return dilate_mask(mask, int(n))
    return np.stack([ndimage.binary_dilation(f, iterations=int(n)) for f in mask])


def removal_mask(masks: list[np.ndarray], remove, remover: Remover = CASPER) -> np.ndarray:
    """float32 [T, H, W]: Casper's trimask, or the binary mask (1 where an
    object to remove is, 0 elsewhere) of ROSE and MiniMax-Remover."""
    if remover.mask == "trimask":
        return build_trimask(masks, remove)
    return build_trimask(masks, remove, neutral=0.0)


def grey_hole_channels(video: np.ndarray, mask: np.ndarray, encode: Callable) -> mx.array:
    """MiniMax-Remover's 32 channels after the noise: the latent of the video
    with a mid-grey hole (video * (1 - mask), in [-1, 1]), then the latent of
    the mask as a 3-channel video in [-1, 1] (2 * mask - 1); `encode` is the
    VAE's normalised encoding of ([1, T, H, W, 3], "video" | "mask")."""
    m = mask[..., None].astype(np.float32)
    hole = encode(mx.array((video * (1.0 - m))[None]), "video")
    mask_video = encode(mx.array(np.repeat(2.0 * m - 1.0, 3, axis=-1)[None]), "mask")
    return mx.concatenate([hole.astype(mx.float32), mask_video.astype(mx.float32)], axis=-1)


def remover_prompt(remover: Remover, caption: str | None) -> str | None:
    """The text the remover is prompted with: the caption, "", or None (no text encoder)."""
    return {"caption": caption or "", "empty": "", "none": None}[remover.prompt]


def trajectory_channels(cond: Conditioning, label: str, remove) -> mx.array:
    """The non-noise DiT channels of one trajectory (removing `remove`)."""
    if label in cond.channels:
        return cond.channels[label]
    return condition_channels(removal_mask(cond.masks, remove, cond.remover), cond.cond_latent)


def mask_channels(trimask: np.ndarray) -> mx.array:
    """Trimask [T, H, W] (T = 4n+1) -> mask channels [1, T', H/8, W/8, 4]."""
    inv = 1.0 - trimask.astype(np.float32)
    grouped = np.concatenate([np.repeat(inv[:1], CHANNELS_PER_LATENT_FRAME, axis=0), inv[1:]], axis=0)
    t4, h, w = grouped.shape
    grouped = grouped.reshape(t4 // CHANNELS_PER_LATENT_FRAME, CHANNELS_PER_LATENT_FRAME, h, w)
    # Bilinear downsampling by exactly 8 with align_corners=False samples the
    # centre of each 8x8 block: the mean of its two middle rows and columns.
    mid = VAE_STRIDE // 2
    rows = 0.5 * (grouped[:, :, mid - 1 :: VAE_STRIDE] + grouped[:, :, mid::VAE_STRIDE])
    small = 0.5 * (rows[..., mid - 1 :: VAE_STRIDE] + rows[..., mid::VAE_STRIDE])
    return mx.array(small.transpose(0, 2, 3, 1)[None])


def condition_channels(trimask: np.ndarray, cond_latent: mx.array) -> mx.array:
    """The 20 channels after the noise: mask channels, then the condition latent."""
    return mx.concatenate([mask_channels(trimask), cond_latent.astype(mx.float32)], axis=-1)


def model_input(latent: mx.array, y: mx.array) -> mx.array:
    """The 36 DiT input channels in the reference order: noise, mask, condition."""
    return mx.concatenate([latent.astype(mx.float32), y], axis=-1)

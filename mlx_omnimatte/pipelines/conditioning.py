"""Conditioning of the Casper / Fun-InP DiT: what every run computes once
before denoising.

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

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..io.grid import GridPlan, pad_frames, plan_grid, resize_frames
from ..io.inputs import Clip
from ..io.masks import prepare_mask

VAE_STRIDE = 8  # spatial compression
CHANNELS_PER_LATENT_FRAME = 4  # pixel frames per latent frame


@dataclass
class Conditioning:
    plan: GridPlan
    video: np.ndarray  # float32 [T, H, W, 3] in [-1, 1] on the model grid, padded
    masks: list[np.ndarray]  # bool [T, H, W] per object, model grid, padded
    context: mx.array  # [1, 512, 4096]
    clip_fea: mx.array  # [1, 257, 1280]
    cond_latent: mx.array  # [1, T', h, w, 16]


def plan_for(clip: Clip, size=None, min_frames: int = 81) -> GridPlan:
    """The clip's model grid: the one its prepared run planned, else planned here."""
    if clip.plan is not None:
        return clip.plan
    return plan_grid(clip.size[0], clip.size[1], clip.num_frames, size=size, min_frames=min_frames)


def model_video(clip: Clip, plan: GridPlan) -> np.ndarray:
    """Area-resized, padded, in [-1, 1]."""
    frames = resize_frames(clip.frames.astype(np.float32) / 255.0, plan.size, "area")
    return pad_frames(frames, plan.frames) * 2.0 - 1.0


def model_masks(clip: Clip, plan: GridPlan) -> list[np.ndarray]:
    return [pad_frames(prepare_mask(m, plan.size), plan.frames) for m in clip.masks]


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

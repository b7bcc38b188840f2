"""Generative Omnimatte's second stage: fit each layer's alpha and colour by
test-time optimization of a small U-Net, so that the layer over the
background reproduces the video; then detail transfer.

Per layer (the reference, DESIGN sec. 9): input = the solo frame and
|solo - background|; output RGBA; loss = L2 reconstruction of
``rgb * a + bg * (1 - a)`` against the solo video, alpha L0 sparsity
``mean((sigmoid(5a) - 0.5) * 2)`` (0.075) and L1 (0.75), both scaled by the
mask's mean, and a masked L2 pulling alpha to the (eroded) mask (10, off from
step 1000); AdamW lr 5e-4, betas (0.9, 0.99), x0.1 at steps 500/1000/2000;
each step one random window of ``batch_frames`` consecutive frames.
Inference runs in windows of the same length, so memory does not grow with
the clip.

Clean-plate mode with several objects (no solo videos exist): the layers are
fitted jointly against the plate, one U-Net per object, composited front to
back (mask order), and each network also sees its object's mask (7 input
channels) so that the layers stay apart once mask supervision ends.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from ..compositing import as_float
from ..errors import OmnimatteError
from ..io.grid import mirror_indices, resize_frames
from ..io.masks import dilate_mask
from ..models.unet import DOWNSAMPLE, UNet, UNetConfig, init_weights

Report = Callable[[str, int, "int | None", str], None]
FIT_MODES = ("stretch", "crop", "loop")
STAGE = "optimize"


@dataclass
class OptimizeSettings:
    iterations: int = 6000
    batch_frames: int = 16
    lr: float = 5e-4
    seed: int = 0
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.01  # torch AdamW's default, which the reference keeps
    milestones: tuple[int, ...] = (500, 1000, 2000)
    gamma: float = 0.1
    w_recon: float = 1.0
    w_l0: float = 0.075
    w_l1: float = 0.75
    l0_k: float = 5.0
    w_mask: float = 10.0
    mask_steps: int = 1000  # mask supervision is switched off from this step
    erode: int = 5  # square erosion of the mask before supervision
    detail_threshold: float = 0.98
    detail_transfer: bool = True
    nf: int = 32
    norm_identity: bool = False  # True: BatchNorm starts at scale 1 (short runs; see unet.init_weights)
    compile: bool = True

    def scaled(self, iterations: int) -> "OptimizeSettings":
        """The same settings for a shorter (or longer) run: the step schedule
        (lr milestones, mask cut-off) scaled by ``iterations / self.iterations``."""
        f = iterations / max(self.iterations, 1)
        return replace(self, iterations=iterations, milestones=tuple(round(m * f) for m in self.milestones),
                       mask_steps=round(self.mask_steps * f))

    def lr_at(self, step: int) -> float:
        return self.lr * self.gamma ** sum(step >= m for m in self.milestones)


# --- losses ---------------------------------------------------------------------


def sparsity_l0(alpha: mx.array, k: float = 5.0) -> mx.array:
    return mx.mean((mx.sigmoid(alpha * k) - 0.5) * 2.0)


def sparsity_l1(alpha: mx.array) -> mx.array:
    return mx.mean(mx.abs(alpha))


def masked_l2(pred: mx.array, target: mx.array, mask: mx.array) -> mx.array:
    return mx.sum(mx.square(pred - target) * mask) / (mx.sum(mask) + 1e-9)


def mask_loss(alpha: mx.array, mask: mx.array) -> mx.array:
    """Alpha pulled to 1 inside the mask and to 0 outside, each side averaged."""
    return masked_l2(alpha, mask, mask) + masked_l2(alpha, mask, 1.0 - mask)


def over(layers: list[tuple[mx.array, mx.array]], background: mx.array) -> mx.array:
    """(rgb, alpha) layers listed front to back, composited over ``background``."""
    out = background
    for rgb, a in reversed(layers):
        out = rgb * a + out * (1.0 - a)
    return out


def layer_losses(layers, background, target, masks, mask_means, l0_k: float = 5.0) -> dict:
    """The reference loss terms, summed over layers; ``masks`` [K, N, H, W, 1]."""
    recon = mx.mean(mx.square(target - over(layers, background)))
    l0 = sum(m * sparsity_l0(a, l0_k) for (_, a), m in zip(layers, mask_means))
    l1 = sum(m * sparsity_l1(a) for (_, a), m in zip(layers, mask_means))
    sup = sum(mask_loss(a, masks[k]) for k, (_, a) in enumerate(layers))
    return {"recon": recon, "l0": l0, "l1": l1, "mask": sup}


def total_loss(terms: dict, weights: mx.array) -> mx.array:
    """``weights`` = [recon, l0, l1, mask] (an array, so a compiled step never
    retraces when the mask term switches off)."""
    return (weights[0] * terms["recon"] + weights[1] * terms["l0"] + weights[2] * terms["l1"]
            + weights[3] * terms["mask"])


# --- the networks ------------------------------------------------------------------


class LayerNets(nn.Module):
    """One U-Net per layer; with several layers each also sees its mask."""

    def __init__(self, layers: int, nf: int = 32):
        super().__init__()
        cfg = UNetConfig(in_channels=6 if layers == 1 else 7, nf=nf)
        self.nets = [UNet(cfg) for _ in range(layers)]

    def __call__(self, video: mx.array, background: mx.array, masks: mx.array) -> list:
        """video/background [N, Hp, Wp, 3] (padded to multiples of 32), masks
        [K, N, Hp, Wp, 1] -> (rgb, alpha) per layer."""
        x = mx.concatenate([video, mx.abs(video - background)], axis=-1)
        out = []
        for k, net in enumerate(self.nets):
            inp = x if len(self.nets) == 1 else mx.concatenate([x, masks[k]], axis=-1)
            rgba = net(inp)
            out.append((rgba[..., :3], rgba[..., 3:]))
        return out


def build_nets(layers: int, settings: OptimizeSettings) -> LayerNets:
    nets = LayerNets(layers, settings.nf)
    for k, net in enumerate(nets.nets):
        init_weights(net, settings.seed + k, settings.norm_identity)
    return nets


# --- data --------------------------------------------------------------------------


@dataclass
class Problem:
    """Float32 arrays at the working size, padded to multiples of 32."""

    video: np.ndarray  # [T, Hp, Wp, 3] the solo video (or the clip, jointly)
    background: np.ndarray  # [T, Hp, Wp, 3]
    masks: np.ndarray  # [K, T, Hp, Wp, 1] eroded supervision masks
    valid: tuple[int, int]  # (H, W) before padding

    @property
    def frames(self) -> int:
        return self.video.shape[0]

    def window(self, start: int, stop: int):
        sl = slice(start, stop)
        return mx.array(self.video[sl]), mx.array(self.background[sl]), mx.array(self.masks[:, sl])


def pad32(x: np.ndarray, axes=(1, 2)) -> np.ndarray:
    """Edge-pad spatial axes up to multiples of 32 (bottom / right)."""
    pad = [(0, 0)] * x.ndim
    for a in axes:
        pad[a] = (0, (-x.shape[a]) % DOWNSAMPLE)
    return np.pad(x, pad, mode="edge")


def binary_mask(mask) -> np.ndarray:
    """bool as is; uint8 above 127; float above 0.5."""
    m = np.asarray(mask)
    if m.dtype == bool:
        return m
    return m > (127 if m.dtype == np.uint8 else 0.5)


def erode(mask: np.ndarray, size: int) -> np.ndarray:
    return ~dilate_mask(~np.asarray(mask, dtype=bool), size) if size > 1 else np.asarray(mask, dtype=bool)


def make_problem(video, background, masks: list, settings: OptimizeSettings) -> Problem:
    v, bg = as_float(video), as_float(background)
    if v.shape != bg.shape or v.ndim != 4 or v.shape[-1] != 3:
        raise OmnimatteError(f"optimize: video {v.shape} and background {bg.shape} must both be [T, H, W, 3]")
    for k, m in enumerate(masks):
        if np.shape(m) != v.shape[:3]:
            raise OmnimatteError(f"optimize: mask {k} has shape {np.shape(m)}, expected {v.shape[:3]}")
    m = np.stack([erode(binary_mask(mk), settings.erode) for mk in masks]).astype(np.float32)[..., None]
    return Problem(pad32(v), pad32(bg), pad32(m, axes=(2, 3)), v.shape[1:3])


def sample_window(rng: np.random.Generator, frames: int, length: int) -> int:
    """The reference's start: uniform in [-length, frames), clamped, so the
    clip's ends are seen as often as its middle."""
    return int(np.clip(rng.integers(-length, frames), 0, max(frames - length, 0)))


# --- training -----------------------------------------------------------------------


def make_step(nets: LayerNets, opt: optim.Optimizer, valid: tuple[int, int], settings: OptimizeSettings):
    h, w = valid

    def loss_fn(model, video, bg, masks, means, weights):
        layers = [(rgb[:, :h, :w], a[:, :h, :w]) for rgb, a in model(video, bg, masks)]
        terms = layer_losses(layers, bg[:, :h, :w], video[:, :h, :w], masks[:, :, :h, :w], means, settings.l0_k)
        return total_loss(terms, weights)

    grad_fn = nn.value_and_grad(nets, loss_fn)

    def step(video, bg, masks, means, weights):
        loss, grads = grad_fn(nets, video, bg, masks, means, weights)
        opt.update(nets, grads)
        return loss

    if not settings.compile:
        return step
    state = [nets.state, opt.state]
    return mx.compile(step, inputs=state, outputs=state)


def step_weights(settings: OptimizeSettings, step: int) -> mx.array:
    mask_w = settings.w_mask if step < settings.mask_steps else 0.0
    return mx.array([settings.w_recon, settings.w_l0, settings.w_l1, mask_w], dtype=mx.float32)


def fit(problem: Problem, settings: OptimizeSettings, report: Report | None = None) -> LayerNets:
    """Run the optimization; returns the fitted networks."""
    mx.random.seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    nets = build_nets(problem.masks.shape[0], settings)
    opt = optim.AdamW(learning_rate=settings.lr, betas=list(settings.betas),
                      weight_decay=settings.weight_decay, bias_correction=True)
    step = make_step(nets, opt, problem.valid, settings)
    # The reference scales the sparsity terms by the whole clip's mask mean.
    means = mx.array(problem.masks[..., :problem.valid[0], :problem.valid[1], :].mean(axis=(1, 2, 3, 4)))
    length = min(settings.batch_frames, problem.frames)
    nets.train()
    if report:
        report(STAGE, 0, settings.iterations, "")
    for i in range(settings.iterations):
        opt.learning_rate = settings.lr_at(i)
        start = sample_window(rng, problem.frames, length)
        loss = step(*problem.window(start, start + length), means, step_weights(settings, i))
        mx.eval(loss, nets.state, opt.state)
        if report:
            report(STAGE, i + 1, settings.iterations, f"loss {loss.item():.5f}")
    return nets


def predict(nets: LayerNets, problem: Problem, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Alpha [K, T, H, W] and rgb [K, T, H, W, 3] over all frames, in windows."""
    h, w = problem.valid
    k, t = problem.masks.shape[:2]
    alpha = np.empty((k, t, h, w), dtype=np.float32)
    rgb = np.empty((k, t, h, w, 3), dtype=np.float32)
    nets.eval()
    for s in range(0, t, window):
        e = min(s + window, t)
        layers = nets(*problem.window(s, e))
        for j, (c, a) in enumerate(layers):
            mx.eval(c, a)
            alpha[j, s:e] = np.array(a[:, :h, :w, 0])
            rgb[j, s:e] = np.array(c[:, :h, :w])
    return alpha, rgb


def transmission(alpha: np.ndarray) -> np.ndarray:
    """How much of each layer (front to back, [K, ...]) reaches the camera."""
    out = alpha.copy()
    out[1:] *= np.cumprod(1.0 - alpha, axis=0)[:-1]
    return out


def transfer_detail(alpha: np.ndarray, rgb: np.ndarray, source: np.ndarray, masks: list,
                    threshold: float = 0.98) -> np.ndarray:
    """Where a layer is seen almost fully (transmission > threshold) or inside
    its input mask, its colour becomes the source pixel (the reference's
    detail transfer); ``alpha`` [K, T, H, W], ``rgb`` [K, T, H, W, 3]."""
    seen = transmission(alpha)
    src = as_float(source)
    out = rgb.copy()
    for k in range(alpha.shape[0]):
        take = (seen[k] > threshold) | np.asarray(masks[k], dtype=bool)
        out[k][take] = src[take]
    return out


# --- entry points -----------------------------------------------------------------


def optimize_layers(video, background, masks: list, settings: OptimizeSettings | None = None,
                    report: Report | None = None, detail_source=None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Fit len(masks) layers (front to back) so that they, over ``background``,
    give ``video``. Inputs uint8 or float in [0, 1], [T, H, W, 3]; masks bool
    (or float / uint8, thresholded at half) [T, H, W]. Returns (alpha float32
    [T, H, W], fg float32 [T, H, W, 3]) per layer."""
    settings = settings or OptimizeSettings()
    if not masks:
        raise OmnimatteError("optimize: no object masks")
    if settings.iterations < 0 or settings.batch_frames < 1:
        raise OmnimatteError("optimize: iterations must be >= 0 and batch frames >= 1")
    problem = make_problem(video, background, masks, settings)
    nets = fit(problem, settings, report)
    alpha, rgb = predict(nets, problem, settings.batch_frames)
    if settings.detail_transfer:
        source = video if detail_source is None else detail_source
        rgb = transfer_detail(alpha, rgb, source, [binary_mask(m) for m in masks], settings.detail_threshold)
    return [(alpha[k], rgb[k]) for k in range(alpha.shape[0])]


def optimize_layer(solo, background, mask, settings: OptimizeSettings | None = None,
                   report: Report | None = None, detail_source=None) -> tuple[np.ndarray, np.ndarray]:
    """One object: ``solo`` (the object kept, all else removed), the
    ``background`` (everything removed) and the object's ``mask``, all at
    the working size. Returns (alpha [T, H, W], fg [T, H, W, 3]) float32."""
    return optimize_layers(solo, background, [mask], settings, report, detail_source)[0]


def run_clean_plate(frames, masks: list, plate, settings: OptimizeSettings | None = None,
                    report: Report | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Layers against a user-given clean plate (already fitted to the clip,
    see ``fit_plate``): one object is the reference problem with solo = the
    clip; several are fitted jointly, front to back in mask order."""
    return optimize_layers(frames, plate, list(masks), settings, report)


# --- the clean plate ----------------------------------------------------------------


def fit_plate(plate_frames: np.ndarray, num_frames: int, size: tuple[int, int], fit: str | None = None) -> np.ndarray:
    """A plate ([H, W, 3] image or [T, H, W, 3] video) as ``num_frames``
    frames at ``size`` (W, H). A single image is repeated. Another size or
    fewer frames is an error unless ``fit``: ``stretch`` (resize and
    time-stretch), ``crop`` (scale to cover and centre-crop; a short plate is
    then mirrored in time) or ``loop`` (repeat in time, forth and back; a
    plate of another size is resized). A longer plate is trimmed."""
    plate = np.asarray(plate_frames)
    if plate.ndim == 3:
        plate = plate[None]
    if plate.ndim != 4 or plate.shape[-1] not in (3, 4):
        raise OmnimatteError(f"clean plate: expected an image or a video, got an array of shape {plate.shape}")
    if fit is not None and fit not in FIT_MODES:
        raise OmnimatteError(f"clean plate: --fit {fit}: expected one of {', '.join(FIT_MODES)}")
    plate = plate[..., :3]
    t, h, w = plate.shape[:3]
    if (w, h) != tuple(size):
        if fit is None:
            raise OmnimatteError(f"clean plate: {w}x{h} differs from the clip's {size[0]}x{size[1]} "
                                 "(pass --fit stretch, crop or loop to adapt it)")
        plate = _crop_cover(plate, size) if fit == "crop" else resize_frames(plate, size)
    if t == 1:
        return np.broadcast_to(plate, (num_frames,) + plate.shape[1:])
    if t < num_frames:
        if fit is None:
            raise OmnimatteError(f"clean plate: {t} frames, fewer than the clip's {num_frames} "
                                 "(pass --fit stretch, crop or loop to extend it)")
        if fit == "stretch":
            return plate[np.minimum((np.arange(num_frames) * t) // num_frames, t - 1)]
        return plate[mirror_indices(t, num_frames)]
    return plate[:num_frames]


def _crop_cover(plate: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    w, h = size
    s = max(w / plate.shape[2], h / plate.shape[1])
    cw, ch = max(w, round(plate.shape[2] * s)), max(h, round(plate.shape[1] * s))
    big = resize_frames(plate, (cw, ch))
    x0, y0 = (cw - w) // 2, (ch - h) // 2
    return big[:, y0:y0 + h, x0:x0 + w]

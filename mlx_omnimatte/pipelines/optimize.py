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

The mask is eroded by 5 pixels of a 480-pixel-high frame, scaled to the
working grid (a fixed 5 pixels eats a small grid's objects).

Clean-plate mode (ours): outside the mask, alpha is supervised towards the
least alpha that explains each pixel over the plate (0 where plate and
video agree, the darkening fraction under a shadow) instead of towards 0,
and that supervision stays on for the whole run (`for_plate`). With several
objects (no solo videos exist) the layers are fitted jointly against the
plate, one U-Net per object, composited front to back (mask order); each
network also sees its object's mask (7 input channels), and each pixel's
plate difference goes to the nearest object's layer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from ..compositing import as_float, least_alpha, over
from ..errors import OmnimatteError
from ..io.compose import fit_frames
from ..io.masks import dilate_mask
from ..models.unet import DOWNSAMPLE, UNet, UNetConfig, init_weights, running

Report = Callable[[str, int, "int | None", str], None]
STAGE = "optimize"
PLATE_MILESTONES = (0.7, 0.9)  # clean plate: lr x0.1 at these fractions of the run


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
    erode: int = 5  # square erosion of the mask before supervision, in pixels of a
    erode_side: int = 480  # frame of this shorter side (the reference's 480x832); scaled to the grid
    detail_threshold: float = 0.98
    detail_transfer: bool = True
    nf: int = 32
    norm_identity: bool = False  # True: BatchNorm starts at scale 1 (short runs; see unet.init_weights)
    # Clean plate: outside the mask, alpha is supervised towards the least
    # alpha that explains the pixel over the plate instead of towards 0, so
    # mask supervision teaches the effects rather than suppressing them.
    plate_prior: bool = False
    prior_floor: float = 0.02  # plate differences up to this count as noise
    compile: bool = True

    def scaled(self, iterations: int) -> "OptimizeSettings":
        """The same settings for a shorter (or longer) run: the step schedule
        (lr milestones, mask cut-off) scaled by ``iterations / self.iterations``."""
        f = iterations / max(self.iterations, 1)
        return replace(self, iterations=iterations, milestones=tuple(round(m * f) for m in self.milestones),
                       mask_steps=round(self.mask_steps * f))

    def erosion(self, height: int, width: int) -> int:
        """The erosion in pixels on a working grid of this size: a mask is as
        coarse relative to the frame at 64 pixels as at 480."""
        return max(1, round(self.erode * min(height, width) / self.erode_side))

    def for_plate(self) -> "OptimizeSettings":
        """Clean-plate mode (no reference: ours). The plate is exact, so the
        least alpha that explains each pixel over it is a target worth
        keeping: mask supervision stays on for the whole run, pulling alpha
        to it outside the mask, and the learning rate stays up for most of
        the run (x0.1 at 70% and 90%) instead of the reference's early drops,
        which stall a short run before the effects are learnt."""
        n = self.iterations
        return replace(self, plate_prior=True, mask_steps=n,
                       milestones=tuple(round(f * n) for f in PLATE_MILESTONES))

    def lr_at(self, step: int) -> float:
        return self.lr * self.gamma ** sum(step >= m for m in self.milestones)


def check_optimize(s: OptimizeSettings) -> None:
    """Numbers that cannot work, refused before any step."""
    if not (np.isfinite(s.lr) and s.lr > 0):
        raise OmnimatteError(f"--lr {s.lr}: must be a finite number above 0")
    if s.iterations < 1:
        raise OmnimatteError(f"--iterations {s.iterations}: the U-Net needs at least one step")
    if s.batch_frames < 1:
        raise OmnimatteError(f"--batch-frames {s.batch_frames}: must be at least 1")


# --- losses ---------------------------------------------------------------------


def sparsity_l0(alpha: mx.array, k: float = 5.0) -> mx.array:
    return mx.mean((mx.sigmoid(alpha * k) - 0.5) * 2.0)


def sparsity_l1(alpha: mx.array) -> mx.array:
    return mx.mean(mx.abs(alpha))


def masked_l2(pred: mx.array, target: mx.array, mask: mx.array) -> mx.array:
    return mx.sum(mx.square(pred - target) * mask) / (mx.sum(mask) + 1e-9)


def mask_loss(alpha: mx.array, mask: mx.array, outside=0.0) -> mx.array:
    """Alpha pulled to 1 inside the mask and to ``outside`` (the reference: 0)
    elsewhere, each side averaged."""
    return masked_l2(alpha, mask, mask) + masked_l2(alpha, outside, 1.0 - mask)


def front_to_back_over(layers: list[tuple[mx.array, mx.array]], background: mx.array) -> mx.array:
    """(rgb, alpha) layers as the reference lists them, front to back, over
    ``background``."""
    return over(background, [(a, rgb) for rgb, a in reversed(layers)])


def layer_losses(layers, background, target, masks, mask_means, l0_k: float = 5.0, outside=None) -> dict:
    """The reference loss terms, summed over layers; ``masks`` [K, N, H, W, 1];
    ``outside``: per layer the alpha supervised outside its mask (None: 0)."""
    recon = mx.mean(mx.square(target - front_to_back_over(layers, background)))
    l0 = sum(m * sparsity_l0(a, l0_k) for (_, a), m in zip(layers, mask_means))
    l1 = sum(m * sparsity_l1(a) for (_, a), m in zip(layers, mask_means))
    sup = sum(mask_loss(a, masks[k], 0.0 if outside is None else outside[k]) for k, (_, a) in enumerate(layers))
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
    outside: np.ndarray | None = None  # [K, T, Hp, Wp, 1] alpha supervised outside each mask (None: 0)

    @property
    def frames(self) -> int:
        return self.video.shape[0]

    def window(self, start: int, stop: int):
        sl = slice(start, stop)
        return mx.array(self.video[sl]), mx.array(self.background[sl]), mx.array(self.masks[:, sl])

    def outside_window(self, start: int, stop: int) -> mx.array:
        if self.outside is None:
            return mx.zeros((self.masks.shape[0], 1, 1, 1, 1), dtype=mx.float32)
        return mx.array(self.outside[:, start:stop])


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
    full = np.stack([binary_mask(mk) for mk in masks])
    size = settings.erosion(*v.shape[1:3])
    m = np.stack([erode(mk, size) for mk in full]).astype(np.float32)[..., None]
    outside = plate_prior(v, bg, full, settings.prior_floor)[..., None] if settings.plate_prior else None
    return Problem(pad32(v), pad32(bg), pad32(m, axes=(2, 3)), v.shape[1:3],
                   None if outside is None else pad32(outside, axes=(2, 3)))


def nearest_owner(masks: np.ndarray, stride: int = 4) -> np.ndarray:
    """For each pixel of [K, T, H, W] bool masks, the index of the nearest
    mask (chessboard distance on a grid ``stride`` times coarser; ties to the
    front), -1 where a frame has no mask at all."""
    k, t, h, w = masks.shape
    ph, pw = -h % stride, -w % stride
    coarse = np.pad(masks, ((0, 0), (0, 0), (0, ph), (0, pw)))
    coarse = coarse.reshape(k, t, (h + ph) // stride, stride, (w + pw) // stride, stride).any(axis=(3, 5))
    owner = np.full(coarse.shape[1:], -1, dtype=np.int32)
    grown = coarse.copy()
    while True:
        for j in range(k):
            owner[(owner < 0) & grown[j]] = j
        wider = dilate_mask(grown, 3)
        if (owner >= 0).all() or (wider == grown).all():
            break
        grown = wider
    return owner.repeat(stride, axis=1).repeat(stride, axis=2)[:, :h, :w]


def plate_prior(video: np.ndarray, plate: np.ndarray, masks: np.ndarray, floor: float) -> np.ndarray:
    """Per layer [K, T, H, W]: the least alpha explaining each pixel over the
    plate, given to the nearest object's layer, 0 inside other objects' masks."""
    least = least_alpha(video, plate, floor)
    if masks.shape[0] == 1:
        return least[None]
    owner = nearest_owner(masks)
    inside_any = masks.any(axis=0)
    return np.stack([np.where((owner == j) & ~inside_any, least, 0.0) for j in range(masks.shape[0])])


def sample_window(rng: np.random.Generator, frames: int, length: int) -> int:
    """The reference's start: uniform in [-length, frames), clamped, so the
    clip's ends are seen as often as its middle."""
    return int(np.clip(rng.integers(-length, frames), 0, max(frames - length, 0)))


# --- training -----------------------------------------------------------------------


def make_step(nets: LayerNets, opt: optim.Optimizer, valid: tuple[int, int], settings: OptimizeSettings):
    h, w = valid

    def loss_fn(model, video, bg, masks, outside, means, weights):
        layers = [(rgb[:, :h, :w], a[:, :h, :w]) for rgb, a in model(video, bg, masks)]
        terms = layer_losses(layers, bg[:, :h, :w], video[:, :h, :w], masks[:, :, :h, :w], means, settings.l0_k,
                             outside[:, :, :h, :w])
        return total_loss(terms, weights)

    grad_fn = nn.value_and_grad(nets, loss_fn)

    def step(video, bg, masks, outside, means, weights):
        loss, grads = grad_fn(nets, video, bg, masks, outside, means, weights)
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
        loss = step(*problem.window(start, start + length), problem.outside_window(start, start + length), means,
                    step_weights(settings, i))
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
    with running():
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
    return optimize_layers(frames, plate, list(masks), (settings or OptimizeSettings()).for_plate(), report)


# --- the clean plate ----------------------------------------------------------------


PLATE, AGAINST = "clean plate", "the clip's"  # the two sides in the fitting messages


def fit_plate(plate_frames: np.ndarray, num_frames: int, size: tuple[int, int], fit: str | None = None) -> np.ndarray:
    """A plate ([H, W, 3] image or [T, H, W, 3] video) as ``num_frames``
    frames at ``size`` (W, H), by the one fitting rule of ``io.compose``: an
    image repeats, a longer plate is trimmed, another size or fewer frames is
    an error unless ``fit`` (stretch, crop or loop)."""
    return fit_frames(plate_frames, num_frames, size, fit, what=PLATE, against=AGAINST)

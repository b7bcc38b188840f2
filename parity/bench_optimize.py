"""Seconds per optimization iteration (U-Net forward + backward + AdamW at
one window of frames) for MLX and for the same network, losses and optimizer
in torch, on this machine; their ratio; and an estimate for an M-series GPU.

    python parity/bench_optimize.py                      # 672x384 batch 16, then 352x192 batch 4
    python parity/bench_optimize.py --size 160x96 --batch 4 --iters 3
    python parity/bench_optimize.py --size 352x192 --form plain    # the U-Net's plain form on the CPU
    python parity/bench_optimize.py --quality 60,120 --size 128x96 --batch 4   # decomposition figures

MLX runs as ``optimize_layers`` runs it (``unet.running()``: glibc's heap
kept for reuse, one OpenBLAS thread per batch part). torch runs twice: first
as it runs by default (glibc's heap, which hands big buffers back to the
kernel and takes them again as zeroed pages), then under the same kept heap,
its iterations taking turns with MLX's (after one warm-up each) so that load
from other processes weighs on both alike. Each side's median is reported. ``--form``: the U-Net's form (``unet.REARRANGE``; default by device:
the rearranged form on the CPU); ``--parts``: the rearranged form's batch
parts (``unet.PARTS``).

``--quality N,M,...``: on a synthetic clip (16 frames, a 50%-opacity shadow)
with its true clean plate, run the clean-plate optimization for each
iteration count (lr 5e-3 and the clean-plate schedule: the plate prior
supervised throughout, lr x0.1 at 70% and 90%) and print IoU, alpha MAE on
the object and on the shadow, recomposition PSNR / SSIM and the seconds
taken.

The estimate counts the network's multiply-adds (forward; backward is about
twice the forward) and divides by a sustained fp32 convolution throughput
assumed for the GPU (``--gpu-tflops``, default 4: about 30% of an M2/M3 Max's
~14 TFLOPS peak, what convolution-heavy MLX training typically sustains)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from mlx_omnimatte.memory import kept_heap  # noqa: E402
from mlx_omnimatte.models import unet  # noqa: E402
from mlx_omnimatte.pipelines import optimize as opt  # noqa: E402


def conv_macs(h: int, w: int, nf: int = 32, cin: int = 6) -> int:
    """Multiply-adds of one U-Net forward on one h x w frame."""
    k = 16
    enc = [(cin, nf, 2), (nf, 2 * nf, 4), (2 * nf, 4 * nf, 8), (4 * nf, 4 * nf, 16), (4 * nf, 4 * nf, 32),
           (4 * nf, 4 * nf, 32), (4 * nf, 4 * nf, 32)]
    dec = [(8 * nf, 4 * nf, 16), (8 * nf, 4 * nf, 8), (8 * nf, 2 * nf, 4), (4 * nf, nf, 2), (2 * nf, nf, 1)]
    macs = sum(k * i * o * (h // s) * (w // s) for i, o, s in enc)
    # a transposed conv: every input pixel meets all 16 taps
    macs += sum(k * i * o * (h // s) * (w // s) // 4 for i, o, s in dec)
    return macs + k * nf * 4 * h * w


def mlx_step(h, w, batch):
    """One MLX iteration as a thunk (compiled and warmed up)."""
    s = opt.OptimizeSettings(batch_frames=batch)
    nets = opt.build_nets(1, s)
    adam = optim.AdamW(learning_rate=s.lr, betas=list(s.betas), weight_decay=s.weight_decay, bias_correction=True)
    nets.train()
    step = opt.make_step(nets, adam, (h, w), s)
    rng = np.random.default_rng(0)
    v, bg = (mx.array(rng.random((batch, h, w, 3)).astype(np.float32)) for _ in range(2))
    m = mx.array((rng.random((1, batch, h, w, 1)) > 0.8).astype(np.float32))
    outside = mx.zeros((1, 1, 1, 1, 1))  # the reference: alpha pulled to 0 outside the mask
    args = (v, bg, m, outside, mx.array([0.2]), opt.step_weights(s, 0))

    def run():
        with unet.running():  # as optimize_layers runs it
            mx.eval(step(*args), nets.state, adam.state)

    run()  # compile + warm-up
    return run


def torch_step(h, w, batch):
    """One torch iteration as a thunk (warmed up)."""
    import torch

    from unet_reference import TorchUNet, reference_step

    model = TorchUNet()
    topt = torch.optim.AdamW(model.parameters(), lr=5e-4, betas=(0.9, 0.99))
    g = torch.Generator().manual_seed(0)
    v, bg = torch.rand(batch, 3, h, w, generator=g), torch.rand(batch, 3, h, w, generator=g)
    m = (torch.rand(batch, 1, h, w, generator=g) > 0.8).float()
    reference_step(model, topt, v, bg, m, 0.2)
    return lambda: reference_step(model, topt, v, bg, m, 0.2)


def seconds(steps: dict, iters: int) -> dict:
    """Median seconds per call of each thunk, the thunks taking turns."""
    times = {k: [] for k in steps}
    for _ in range(iters):
        for k, f in steps.items():
            start = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - start)
    return {k: float(np.median(v)) for k, v in times.items()}


def compare(w: int, h: int, batch: int, iters: int, with_torch: bool) -> None:
    t = {}
    if with_torch:  # first: mallopt leaves glibc's dynamic thresholds off for the process
        t["torch, glibc's default heap"] = seconds({"t": torch_step(h, w, batch)}, iters)["t"]
    with kept_heap():
        steps = {"MLX": mlx_step(h, w, batch)}
        if with_torch:
            steps["torch, heap kept as for MLX"] = torch_step(h, w, batch)
        t.update(seconds(steps, iters))
    for k, v in t.items():
        print(f"{w}x{h}, batch {batch}: {k} {v:.3f} s/iteration ({1 / v:.2f} it/s)", flush=True)
    for k in (k for k in t if k.startswith("torch")):
        print(f"{w}x{h}, batch {batch}: MLX / torch ({k[7:]}) time ratio {t['MLX'] / t[k]:.2f}", flush=True)


def quality(w: int, h: int, batch: int, counts: list[int], seed: int = 3, frames: int = 16) -> None:
    from mlx_omnimatte.evaluation import metrics
    from mlx_omnimatte.compositing import recompose
    from mlx_omnimatte.io.masks import dilate_mask
    from mlx_omnimatte.synth import make_clip

    clip = make_clip(seed, frames=frames, size=(w, h), shadow_opacity=0.5)
    obj = clip.object_alpha[0] > 0.5
    shadow = (clip.effect[0] > 0.05) & ~dilate_mask(obj, 5)
    truth = clip.alpha[0]
    for n in counts:
        s = opt.OptimizeSettings(batch_frames=batch, lr=5e-3).scaled(n)  # run_clean_plate: the plate schedule
        start = time.perf_counter()
        [(alpha, fg)] = opt.run_clean_plate(clip.video, clip.masks, clip.background, s)
        sec = time.perf_counter() - start
        rec = recompose(alpha, fg, clip.background)
        print(f"{w}x{h} x{frames}, batch {batch}, {n} iterations, {sec:.0f} s: IoU {metrics.iou(alpha, truth):.3f}, "
              f"object MAE {metrics.alpha_errors(alpha, truth, obj)['mae']:.4f}, "
              f"shadow MAE {metrics.alpha_errors(alpha, truth, shadow)['mae']:.4f} "
              f"(truth {truth[shadow].mean():.3f}, predicted {alpha[shadow].mean():.3f}), "
              f"recomposition {metrics.psnr(rec, clip.video):.2f} dB / SSIM {metrics.ssim(rec, clip.video):.4f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default=None, help="width x height (multiples of 32); default 672x384 and 352x192")
    ap.add_argument("--batch", type=int, default=None, help="default 16 at 672x384, else 4")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations per side (default 2 at 672x384, else 5)")
    ap.add_argument("--form", choices=["auto", "rearranged", "plain"], default="auto")
    ap.add_argument("--parts", type=int, default=unet.PARTS)
    ap.add_argument("--gpu-tflops", type=float, default=4.0)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--quality", default=None, help="iteration counts, e.g. 60,120: decomposition figures")
    a = ap.parse_args()
    unet.REARRANGE, unet.PARTS = {"auto": None, "rearranged": True, "plain": False}[a.form], a.parts
    sizes = [(int(x) for x in a.size.lower().split("x"))] if a.size else [(672, 384), (352, 192)]
    for w, h in sizes:
        batch = a.batch or (16 if (w, h) == (672, 384) else 4)
        if a.quality:
            quality(w, h, batch, [int(n) for n in a.quality.split(",")])
            continue
        form = f"rearranged (CPU) form, {unet.PARTS} batch parts" if unet.rearranged() else "plain form"
        print(f"{w}x{h}, batch {batch}, U-Net in its {form}", flush=True)
        compare(w, h, batch, a.iters or (2 if (w, h, batch) == (672, 384, 16) else 5), not a.no_torch)
        gpu_estimate(w, h, batch, a.gpu_tflops)


def gpu_estimate(w: int, h: int, batch: int, tflops: float) -> None:
    flops = 2 * 3 * conv_macs(h, w) * batch  # forward + backward (~2x forward), 2 flops per MAC
    t_gpu = flops / (tflops * 1e12)
    print(f"network: {flops / 1e9:.1f} GFLOP per iteration (forward + backward, {batch} frames)")
    print(f"M-series estimate at {tflops:g} TFLOPS sustained fp32: {t_gpu:.3f} s/iteration "
          f"({1 / t_gpu:.1f} it/s; 6000 iterations in {6000 * t_gpu / 60:.1f} min per layer)")


if __name__ == "__main__":
    main()

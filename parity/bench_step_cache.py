"""Step caches on the tiny bundle: DiT forwards, denoise and wall time of
`remove` with `--cache` at two thresholds each against no cache.

    python parity/bench_step_cache.py [--work DIR] [--steps 50] [--size 128x64]

The tiny random bundle (tests/tiny_models.py) with its time MLP limited to
the low frequencies, as in tests/test_step_cache.py (so e0 moves with t as a
trained model's does). Each run is `mlx-omnimatte remove` in a subprocess as
a user runs it; the clip is padded to 81 frames (21 latent frames, one
window). The denoise seconds come from the run's stage table; the background
difference is against the run without a cache (uint8 PNG frames). The tiny
DiT is cheap next to the encoders and the VAE, so the wall time falls far
less than the forward count: on a real 1.3B DiT the forwards are most of it.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_step_cache import smooth_time_embedding  # noqa: E402
from tiny_models import tiny_bundle  # noqa: E402

from mlx_omnimatte.io.video import read_video  # noqa: E402
from mlx_omnimatte.io.writers import write_png_frames, write_video  # noqa: E402

CLI = [sys.executable, "-m", "mlx_omnimatte.cli.main"]
CACHES = ("none", "teacache:0.05", "teacache:0.1", "magcache:0.12", "magcache:0.24")


def make_clip(folder: Path, size: tuple[int, int]) -> tuple[Path, Path]:
    if (folder / "video.mp4").exists():
        return folder / "video.mp4", folder / "mask"
    w, h = size
    rng = np.random.default_rng(0)
    video = (rng.random((9, h, w, 3)) * 60 + 100).astype(np.uint8)
    mask = np.zeros((9, h, w), np.uint8)
    for t in range(9):
        mask[t, h // 4: h // 2, t: t + w // 4] = 255
        video[t, h // 4: h // 2, t: t + w // 4] = 220
    folder.mkdir(parents=True, exist_ok=True)
    write_video(folder / "video.mp4", video, 16)
    write_png_frames(folder / "mask", mask)
    return folder / "video.mp4", folder / "mask"


def remove(bundle: Path, clip, out: Path, cache: str, steps: int, size: str) -> tuple[float, float, str, str]:
    """(wall seconds, denoise seconds, 'computed N/M', the plan's expected
    count a window) of one run."""
    args = ["remove", clip[0], "--mask", clip[1], "--bundle", bundle, "-o", out, "--steps", steps, "--size", size,
            "--cache", cache, "--background-format", "png", "--dtype", "float32", "--overwrite"]
    start = time.perf_counter()
    done = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, args))}\n{done.stderr}")
    denoise = float(re.search(r"^denoise all\s+([\d.]+)", done.stderr, re.M).group(1))
    count = re.search(r"computed \d+/\d+", done.stderr)
    expected = re.search(r"expected (\d+) of (\d+)", done.stderr)
    return (wall, denoise, count.group(0) if count else f"computed {steps}/{steps}",
            f"{expected.group(1)}/{expected.group(2)}" if expected else f"{steps}/{steps}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=None, help="Folder for the bundle, clip and outputs (default: temp).")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--size", default="128x64", help="Model grid WxH.")
    a = ap.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="bench-step-cache-"))
    bundle = work / "bundle"
    if not bundle.exists():
        tiny_bundle(work)
        smooth_time_embedding(bundle / "transformer")
    size = tuple(int(v) for v in a.size.split("x"))
    clip = make_clip(work / "clip", size)
    print(f"tiny bundle, remove, {a.steps} Euler steps, grid {a.size}, 81 frames (one window), float32")
    print(f"{'--cache':<16} {'forwards':>16} {'plan expected':>14} {'denoise s':>10} {'wall s':>8} "
          f"{'mean |bg - bg_none|':>20}")
    plain = None
    for cache in CACHES:
        out = work / f"out-{cache.replace(':', '-')}"
        wall, denoise, count, expected = remove(bundle, clip, out, cache, a.steps, a.size)
        bg = read_video(out / "background_all")[0].astype(np.float32)
        plain = bg if plain is None else plain
        print(f"{cache:<16} {count:>16} {expected:>14} {denoise:>10.1f} {wall:>8.1f} "
              f"{np.abs(bg - plain).mean():>20.2f}")


if __name__ == "__main__":
    main()

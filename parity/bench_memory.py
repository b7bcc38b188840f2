"""Host memory of a real-size run: max RSS of `decompose` (tiny random
bundle, `--size 128x64 --steps 1`) on a 1080p clip of 85 frames and of 4x
that length, next to what `--dry-run` predicts per stage.

    python parity/bench_memory.py --work /tmp/bench-memory [--frames 85] [--size 1920x1080]
    python parity/bench_memory.py --work /tmp/bench-memory --clip ../shared/data/examples/boys-beach --grid 320x192

Prints, per clip length: the planner's predicted peak (MLX + host) and the
measured max RSS of the run (os.wait4 of the child process), and the ratio
of the long run's RSS to the short one's. No weights are downloaded: the
bundle is the tiny random one of `mlx-omnimatte tiny-bundle`, converted by the real converter.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from mlx_omnimatte.convert.tiny import write_tiny_bundle
from mlx_omnimatte.io.grid import mirror_indices, resize_frames
from mlx_omnimatte.io.writers import video_sink
from mlx_omnimatte.synth import make_clip

ROOT = Path(__file__).resolve().parents[1]

GB = 1024 ** 3
STAGE_LINES = ("write", "read video", "vae encode", "load experts", "load vae", "load transformer", "image encoder",
               "text encoder") + tuple(f"{s} {k:02d}" for k in range(4) for s in ("denoise", "vae decode"))


def write_clip(folder: Path, frames: int, size: tuple[int, int]) -> tuple[Path, Path]:
    """A synthetic clip upscaled to ``size``, streamed to H.264 (video + mask)."""
    video, mask = folder / "input_video.mp4", folder / "mask_00.mp4"
    if video.exists() and mask.exists():
        return video, mask
    folder.mkdir(parents=True, exist_ok=True)
    small = make_clip(7, frames=21, size=(192, 108), shadow_opacity=0.5)
    order = mirror_indices(len(small.video), frames)
    with video_sink(video, 16) as v, video_sink(mask, 16) as m:
        for t in order:
            v.add(resize_frames(small.video[t:t + 1], size, "bilinear")[0])
            m.add(resize_frames(small.masks[0][t:t + 1].astype(np.uint8) * 255, size, "nearest")[0])
    return video, mask


def run(args: list[str]) -> tuple[int, str]:
    """Exit status and max RSS (bytes) of one CLI run in a child process."""
    p = subprocess.Popen([sys.executable, "-m", "mlx_omnimatte.cli.main", *map(str, args)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        raise SystemExit(f"run failed ({p.returncode}):\n{out}")
    rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return rss, out


def measure(video: Path, bundle: Path, out: Path, extra: list) -> int:
    """Print the plan and the run's stage table; return the max RSS."""
    common = [video, *extra, "--bundle", bundle, "--steps", "1", "-o", out, "--overwrite"]
    _, plan = run(["decompose", *common, "--dry-run"])
    rss, log = run(["decompose", *common])  # stderr is a pipe: plain progress lines, filtered out here
    table = [line for line in log.splitlines() if not (":" in line and line.split(":")[0].startswith(STAGE_LINES))]
    print(f"predicted:\n{plan.strip()}\nmeasured:\n" + "\n".join(table) + f"\nmax RSS {rss / GB:.2f} GB\n",
          flush=True)
    return rss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--frames", type=int, default=85)
    ap.add_argument("--size", default="1920x1080")
    ap.add_argument("--clip", type=Path, default=None,
                    help="measure this clip folder instead (one run)")
    ap.add_argument("--grid", default=None, help="with --clip: the model grid WxH (default: the run's own)")
    a = ap.parse_args()
    size = tuple(int(v) for v in a.size.lower().split("x"))
    bundle = a.work / "bundle"
    if not bundle.exists():
        write_tiny_bundle(bundle, experts=True)
    if a.clip is not None:
        return measure(a.clip, bundle, a.work / "out_clip", ["--size", a.grid] if a.grid else [])
    figures = {}
    for n in (a.frames, 4 * a.frames):
        video, mask = write_clip(a.work / f"clip{n}", n, size)
        print(f"--- {size[0]}x{size[1]}, {n} frames")
        figures[n] = measure(video, bundle, a.work / f"out{n}", ["--mask", mask, "--size", "128x64"])
    short, long = figures[a.frames], figures[4 * a.frames]
    print(f"max RSS: {a.frames} frames {short / GB:.2f} GB, {4 * a.frames} frames {long / GB:.2f} GB, "
          f"ratio {long / short:.2f}")


if __name__ == "__main__":
    main()

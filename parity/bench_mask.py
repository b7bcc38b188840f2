"""`mask` at 640x384: the tiny random-weight SAM3 (tests/sam3_utils.py)
measured frame by frame against the figures `mask --dry-run` predicts, and
the released SAM3's predicted figures.

    python parity/bench_mask.py [--frames 12] [--objects 2] [--video clip.mp4]

Frames are predicted one by one, as `mask` runs them, and each is timed;
the first frame pays for the prompts and warm-up and is reported apart. With
--frames past the tracker's bank (7 memories) the last frames attend to a
full bank, as the prediction assumes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from sam3_utils import tiny_config, tiny_sam3  # noqa: E402

from mlx_omnimatte.memory import format_bytes, fused_attention  # noqa: E402
from mlx_omnimatte.io.video import probe_video  # noqa: E402
from mlx_omnimatte.models.sam3 import RELEASED_PARAMS, load_sam3, model_config, sam3_figures  # noqa: E402
from mlx_omnimatte.pipelines.cost import machine_rates  # noqa: E402
from mlx_omnimatte.pipelines.masking import SAM3_EFFICIENCY, MaskRequest, Prompt, released_config, track  # noqa: E402,E501

VIDEO = Path(__file__).resolve().parents[2] / "shared" / "data" / "examples" / "boys-beach" / "input_video.mp4"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--video", type=Path, default=VIDEO)
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--objects", type=int, default=2)
    args = ap.parse_args()
    info = probe_video(args.video)
    info = replace(info, frames=min(args.frames, info.frames))
    prompts = [Prompt("point", (info.width * (k + 1) / (args.objects + 1), info.height / 2))
               for k in range(args.objects)]
    with tempfile.TemporaryDirectory() as tmp:
        folder = tiny_sam3(Path(tmp) / "tiny")
        model, processor = load_sam3(folder)
        request = MaskRequest(args.video, info, prompts, str(folder))
        mx.reset_peak_memory()
        times, start = [], time.perf_counter()
        for _ in track(model, processor, request):
            now = time.perf_counter()
            times.append(now - start)
            start = now
        peak = mx.get_peak_memory()
    fused = fused_attention()
    tiny = sam3_figures(model_config(tiny_config()), 4, args.objects, 1, fused=fused)
    later = sum(times[1:]) / max(len(times) - 1, 1)
    print(f"tiny SAM3 at {info.width}x{info.height}, {args.objects} objects, {info.frames} frames:")
    print(f"  measured: first frame {times[0]:.2f} s, then {later:.2f} s per frame; MLX peak {format_bytes(peak)}")
    print(f"  predicted: {tiny.params / 1e6:.2f} M parameters, weights {format_bytes(tiny.weight_bytes)}, "
          f"activations {format_bytes(tiny.activation_bytes)}, held {format_bytes(tiny.held_bytes)}, "
          f"peak ~{format_bytes(tiny.peak_bytes)}, {tiny.flops / 1e9:.1f} GFLOP a frame")
    rate = machine_rates(("flops",)).flops("float32")
    print(f"  FLOPs at this machine's float32 matmul rate ({rate / 1e9:.0f} GFLOP/s) x {SAM3_EFFICIENCY}: "
          f"{tiny.flops / (rate * SAM3_EFFICIENCY):.2f} s a frame from FLOPs alone (a tiny model's time goes to "
          "work at its fixed 1008x1008 input that FLOPs miss: resizing, convolutions, unfused attention)")
    big = sam3_figures(released_config(), 2, args.objects, params=RELEASED_PARAMS, fused=fused)
    print(f"released SAM3, bfloat16 weights, {args.objects} objects:")
    print(f"  {big.params / 1e6:.1f} M parameters x 2 bytes = {format_bytes(big.weight_bytes)}; per frame at "
          f"1008x1008: activations {format_bytes(big.activation_bytes)}, held {format_bytes(big.held_bytes)}, "
          f"peak ~{format_bytes(big.peak_bytes)}, {big.flops / 1e12:.2f} TFLOP, "
          f"~{big.flops / (rate * SAM3_EFFICIENCY):.0f} s a frame here")


if __name__ == "__main__":
    main()

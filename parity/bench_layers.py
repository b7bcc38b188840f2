"""Layers at real size: the fast layer solver against Generative Omnimatte's
U-Net, and the run plan's time estimates against measured wall time.

    python parity/bench_layers.py --work /tmp/bench-layers [--unet-minutes 10]

1. `synth` writes a two-object clip (a shadow and a reflection) at 81 frames
   of 832x480 with both plates: the exact one and an imperfect one as a
   removal model gives it (`--plate removal`).
2. `decompose --clean-plate` with the default (fast) solver against each
   plate: the whole command's wall time (read, solve, write) and
   `evaluate`'s measures against the truth.
3. The same through `--layer-solver unet` at the iterations that fit in
   ``--unet-minutes`` (a first short run measures the seconds an iteration).
4. `--dry-run`'s estimate against the measured wall time for three runs of
   different sizes and solvers.

Every command runs as a user runs it (a subprocess of `mlx-omnimatte`), so
the figures include start-up, reading and writing.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

CLI = [sys.executable, "-m", "mlx_omnimatte.cli.main"]
COLUMNS = ("iou", "object_mae", "effect_mae", "false_alpha")


def run(args: list, quiet: bool = True) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, args))}\n{done.stderr}")
    return seconds, done.stdout + done.stderr


def synth(work: Path, name: str, frames: int, size: str, objects: int) -> Path:
    clip = work / name
    if not clip.exists():
        effects = [a for e in ("shadow", "reflection")[:objects] for a in ("--effect", e)]
        run(["synth", "-o", clip, "--seed", 3, "--frames", frames, "--size", size, "--objects", objects,
             *effects, "--plate", "removal"])
    return clip


def estimate(args: list) -> float:
    """The dry run's estimated seconds (the sum of its stage column)."""
    _, out = run([*args, "--dry-run"])
    table = out[out.index("est. s"):].splitlines()[1:]
    return sum(float(line.split()[-1]) for line in table if re.search(r"\d+\.\d$", line))


def decompose(clip: Path, plate: str, out: Path, extra: list) -> tuple[float, dict]:
    args = ["decompose", clip, "--clean-plate", clip / "truth" / plate, "-o", out, "--overwrite", *extra]
    seconds, _ = run(args)
    scores = out.parent / f"{out.name}.json"
    run(["evaluate", out, "--clip", clip, "--truth", clip / "truth", "--json", scores])
    return seconds, json.loads(scores.read_text())


def row(label: str, seconds: float, scores: dict) -> str:
    cells = []
    for name in ("00", "01"):
        r = scores.get(name, {})
        cells += [f"{r.get(c, float('nan')):.3f}" if r.get(c) is not None else "-" for c in COLUMNS]
    return f"| {label} | {seconds:.1f} | " + " | ".join(cells) + " |"


def quality_table(clip: Path, work: Path, unet_minutes: float, unet: bool = True) -> list[str]:
    lines = ["| run | wall s | " + " | ".join(f"{n} {c}" for n in ("00", "01") for c in COLUMNS) + " |",
             "|---" * (2 + 2 * len(COLUMNS)) + "|"]
    for plate in ("background", "background_removal"):
        seconds, scores = decompose(clip, plate, work / f"fast-{plate}", [])
        lines.append(row(f"fast, {plate}", seconds, scores))
    if not unet:
        return lines
    probe = 2
    seconds, _ = decompose(clip, "background", work / "unet-probe", ["--layer-solver", "unet", "--iterations",
                                                                       probe, "--batch-frames", 4])
    per_iteration = seconds / probe  # includes reading and writing: on the safe side
    iterations = max(1, int(unet_minutes * 60 / per_iteration / 2))  # two plates share the budget
    for plate in ("background", "background_removal"):
        seconds, scores = decompose(clip, plate, work / f"unet-{plate}", ["--layer-solver", "unet", "--iterations",
                                                                         iterations, "--batch-frames", 4])
        lines.append(row(f"unet {iterations} it., {plate}", seconds, scores))
    return lines


def tiny_bundle_path(work: Path) -> Path:
    """The tests' tiny random-weight bundle (meaningless output, real stages)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_models import tiny_bundle

    folder = work / "tiny"
    if not (folder / "bundle").exists():
        tiny_bundle(folder, experts=False)
    return folder / "bundle"


def estimate_table(work: Path, big: Path) -> list[str]:
    small = synth(work, "clip-416x240", 33, "416x240", 1)
    tiny = synth(work, "clip-128x96", 17, "128x96", 1)
    plate = ["--clean-plate"]
    runs = [("clean plate, fast, 832x480x81, 2 objects", big, [*plate, big / "truth" / "background"]),
            ("clean plate, fast, 416x240x33, 1 object", small, [*plate, small / "truth" / "background"]),
            ("clean plate, unet 30 it., 128x96x17, 1 object", tiny,
             [*plate, tiny / "truth" / "background", "--layer-solver", "unet", "--iterations", 30,
              "--batch-frames", 4])]
    examples = Path(__file__).resolve().parents[2] / "shared" / "data" / "examples" / "boys-beach"
    if examples.is_dir():
        runs.append(("two-stage, tiny bundle, 128x64x9, 4 steps", examples,
                     ["--bundle", tiny_bundle_path(work), "--size", "128x64", "--frames", 9, "--steps", 4]))
    lines = ["| run | estimated s | measured s | ratio |", "|---|---|---|---|"]
    for label, clip, extra in runs:
        args = ["decompose", clip, "-o", work / "est-out", "--overwrite", "--quiet", *extra]
        guess = estimate(args)
        seconds, _ = run(args)
        lines.append(f"| {label} | {guess:.1f} | {seconds:.1f} | {max(guess, seconds) / min(guess, seconds):.2f} |")
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="scratch folder (clips and outputs)")
    p.add_argument("--unet-minutes", type=float, default=10.0)
    p.add_argument("--skip-unet", action="store_true")
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    clip = synth(a.work, "clip-832x480", 81, "832x480", 2)
    print(f"synth 81x832x480, two objects, both plates: {time.perf_counter() - start:.1f} s")
    print("\n".join(quality_table(clip, a.work, a.unet_minutes, not a.skip_unet)))
    print()
    print("\n".join(estimate_table(a.work, clip)))


if __name__ == "__main__":
    main()

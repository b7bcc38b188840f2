"""The truth a synthetic clip carries (``truth/`` of a clip folder, written
by `synth.write_clip`): the clean plate, and per object the layer alpha
with its effect, the effect alone, the object alone (16-bit grayscale PNG)
and the layer colour. Read by evaluation, training-data preparation and the
effect analysis."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import OmnimatteError
from ..jsonfile import read_json
from .video import list_frame_files, read_video

ALPHA_BITS = 16  # truth alpha maps are 16-bit grayscale PNG
WORKERS = 4  # threads for the frames (at most the CPU count)


def workers() -> int:
    return max(1, min(WORKERS, os.cpu_count() or 1))


def each_frame(count: int, work) -> None:
    """``work(i)`` for every frame, on a few threads: the frames are
    independent and numpy lets go of the GIL in its array loops."""
    with ThreadPoolExecutor(max_workers=workers()) as pool:
        for _ in pool.map(work, range(count)):
            pass  # re-raises a frame's error


def _read_gray16(file: Path) -> np.ndarray:
    with Image.open(file) as im:
        scale = 65535.0 if im.mode.startswith("I") else 255.0
        return np.asarray(im, dtype=np.float32) / scale


def _read_alpha16(folder: Path) -> np.ndarray:
    files = list_frame_files(folder)
    if not files:
        raise OmnimatteError(f"{folder}: no frames")
    first = _read_gray16(files[0])
    out = np.empty((len(files),) + first.shape, np.float32)  # filled in place, no stacked copy

    def frame(i):
        out[i] = _read_gray16(files[i]) if i else first

    each_frame(len(files), frame)  # Pillow decodes without the GIL
    return out


def read_truth(folder, foreground: bool = True) -> dict:
    """The truth of a written clip (``folder`` = the clip or its truth/);
    ``foreground=False`` leaves out the layers' colours."""
    folder = Path(folder)
    truth = folder / "truth" if (folder / "truth").is_dir() else folder
    meta_file = truth / "meta.json"
    if not meta_file.is_file():
        raise OmnimatteError(f"{folder}: no truth/meta.json (not a synthetic clip)")
    meta = read_json(meta_file)
    out = {"background": read_video(truth / "background")[0], "names": list(meta["names"]), "meta": meta}
    for key in ("alpha", "effect", "object_alpha"):
        out[key] = [_read_alpha16(truth / f"{key}_{n}") for n in meta["names"]]
    if foreground:
        out["foreground"] = [read_video(truth / f"foreground_{n}")[0] for n in meta["names"]]
    return out

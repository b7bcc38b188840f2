"""A clip to decompose: video, validated object masks, background caption.

The Generative Omnimatte example layout is one folder::

    clip/
      input_video.mp4      the video (or any video suffix, or a frame folder
                           named input_video/)
      mask_00.mp4, ...     one binary mask per object (white = object), or
                           frame folders mask_00/, ...; natural sort order
      prompt.json          {"bg": "caption of the clean background"}  (optional)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import OmnimatteError
from .masks import load_mask
from .video import VideoInfo, natural_key, read_video

VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".mkv", ".avi", ".m4v")
VIDEO_STEM = "input_video"
MASK_PREFIX = "mask_"
PROMPT_FILE = "prompt.json"


@dataclass
class Clip:
    """frames uint8 ``[T, H, W, 3]``; masks: raw grayscale uint8 ``[T, H, W]``
    per object, already checked against the video (binarize/dilate them on the
    model grid with ``masks.prepare_mask``)."""

    frames: np.ndarray
    fps: float
    masks: list[np.ndarray]
    names: list[str]
    caption: str | None
    info: VideoInfo
    mask_infos: list[VideoInfo] = field(default_factory=list)
    source: Path | None = None

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return (int(self.frames.shape[2]), int(self.frames.shape[1]))


def _is_source(p: Path) -> bool:
    return p.is_dir() or (p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)


def mask_name(path: Path) -> str:
    """``mask_00.mp4`` -> ``00``; other names -> their stem."""
    stem = path.name if path.is_dir() else path.stem
    return stem[len(MASK_PREFIX):] if stem.startswith(MASK_PREFIX) and len(stem) > len(MASK_PREFIX) else stem


def read_caption(path: str | Path) -> str:
    """The ``"bg"`` string of a prompt.json."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OmnimatteError(f"{path}: not a readable JSON file ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict) or not isinstance(data.get("bg"), str):
        raise OmnimatteError(f'{path}: expected {{"bg": "caption of the clean background"}}')
    return data["bg"]


def find_clip_files(folder: str | Path) -> tuple[Path, list[Path], Path | None]:
    """(video, masks in natural order, prompt.json or None) of a clip folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise OmnimatteError(f"{folder}: not a clip folder")
    videos = [p for p in folder.iterdir() if (p.stem if p.is_file() else p.name) == VIDEO_STEM and _is_source(p)]
    if not videos:
        raise OmnimatteError(f"{folder}: no {VIDEO_STEM}.mp4 (or other video / frame folder named {VIDEO_STEM})")
    if len(videos) > 1:
        names = ", ".join(sorted(p.name for p in videos))
        raise OmnimatteError(f"{folder}: several input videos ({names}); keep one")
    masks = sorted(
        (p for p in folder.iterdir() if p.name.startswith(MASK_PREFIX) and _is_source(p)),
        key=lambda p: natural_key(p.name),
    )
    if not masks:
        raise OmnimatteError(f"{folder}: no object masks ({MASK_PREFIX}00.mp4, ...)")
    prompt = folder / PROMPT_FILE
    return videos[0], masks, prompt if prompt.is_file() else None


def load_clip(
    video: str | Path,
    masks: Sequence[str | Path],
    caption: str | None = None,
    names: Sequence[str] | None = None,
    fps: float | None = None,
) -> Clip:
    """Build a Clip from explicit paths; every mask is validated against the video.

    ``fps`` is only used for frame folders (default 16); ``names`` default to
    the mask file names (``mask_00.mp4`` -> ``00``).
    """
    if not masks:
        raise OmnimatteError(f"{video}: no object masks given")
    frames, info = read_video(video, fps=fps)
    mask_paths = [Path(m) for m in masks]
    names = list(names) if names is not None else [mask_name(p) for p in mask_paths]
    if len(names) != len(mask_paths):
        raise OmnimatteError(f"{video}: {len(names)} names for {len(mask_paths)} masks")
    if len(set(names)) != len(names):
        raise OmnimatteError(f"{video}: object names are not unique ({', '.join(names)})")
    arrays, infos = [], []
    for p in mask_paths:
        m, mi = load_mask(p, info)
        arrays.append(m)
        infos.append(mi)
    return Clip(frames, info.fps, arrays, names, caption, info, infos, Path(video))


def load_clip_folder(folder: str | Path, fps: float | None = None, caption: str | None = None) -> Clip:
    """Read a clip folder in the Generative Omnimatte layout.

    ``caption`` overrides prompt.json; without either the caption is None.
    """
    video, masks, prompt = find_clip_files(folder)
    if caption is None and prompt is not None:
        caption = read_caption(prompt)
    clip = load_clip(video, masks, caption=caption, fps=fps)
    clip.source = Path(folder)
    return clip

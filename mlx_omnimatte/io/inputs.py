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

import itertools
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import OmnimatteError
from ..jsonfile import read_json
from ..progress import Report, stage
from .grid import GridPlan, resize_frames, resize_masks
from .masks import check_mask_counts, check_mask_matches, mask_counts
from .video import VideoInfo, iter_frames, natural_key, probe_video

VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".mkv", ".avi", ".m4v")
VIDEO_STEM = "input_video"
MASK_PREFIX = "mask_"
PROMPT_FILE = "prompt.json"


@dataclass
class Clip:
    """A clip as a run holds it: ``frames`` uint8 ``[T, h, w, 3]`` and raw
    grayscale ``masks`` uint8 ``[T, h, w]`` per object, on the grid they were
    read at (the model grid for a run: the source is never held at its own
    resolution), checked against the video; ``first_frame`` at the source's
    resolution (the image encoder sees it); ``info`` describes the source."""

    frames: np.ndarray
    fps: float
    masks: list[np.ndarray]
    names: list[str]
    caption: str | None
    info: VideoInfo
    mask_infos: list[VideoInfo] = field(default_factory=list)
    source: Path | None = None
    first_frame: np.ndarray | None = None
    plan: GridPlan | None = None  # the model grid a prepared run read it for (carried to its stages)

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        """The source's (width, height)."""
        return self.info.size

    @property
    def grid_size(self) -> tuple[int, int]:
        """(width, height) of ``frames``."""
        return (int(self.frames.shape[2]), int(self.frames.shape[1]))


def _is_source(p: Path) -> bool:
    return p.is_dir() or (p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)


def _clip_videos(folder: Path) -> list[Path]:
    """The ``input_video`` file(s) or frame folder(s) of a clip folder."""
    return [p for p in folder.iterdir() if (p.stem if p.is_file() else p.name) == VIDEO_STEM and _is_source(p)]


def mask_name(path: Path) -> str:
    """``mask_00.mp4`` -> ``00``; other names -> their stem."""
    stem = path.name if path.is_dir() else path.stem
    return stem[len(MASK_PREFIX):] if stem.startswith(MASK_PREFIX) and len(stem) > len(MASK_PREFIX) else stem


def read_caption(path: str | Path) -> str:
    """The ``"bg"`` string of a prompt.json."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data.get("bg"), str):
        raise OmnimatteError(f'{path}: expected {{"bg": "caption of the clean background"}}')
    return data["bg"]


def find_clip_files(folder: str | Path) -> tuple[Path, list[Path], Path | None]:
    """(video, masks in natural order, prompt.json or None) of a clip folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise OmnimatteError(f"{folder}: not a clip folder")
    videos = _clip_videos(folder)
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


@dataclass
class ClipSpec:
    """A clip resolved from the command line or the API without decoding it:
    paths, names, caption, and the probed video (``info.frames`` already
    limited by ``frames``). `read_clip` decodes it."""

    video: Path
    masks: list[Path]
    names: list[str]
    caption: str | None
    info: VideoInfo
    fps: float | None = None  # the rate of frame folders
    source: Path | None = None
    caption_from: str = "given"  # "given", "prompt.json" or "none"

    @property
    def num_objects(self) -> int:
        return len(self.masks)


def parse_mask(arg) -> tuple[str | None, Path]:
    """``--mask PATH`` or ``--mask NAME=PATH`` (so two ``mask.mp4`` from
    different folders can be told apart)."""
    text = str(arg)
    name, sep, rest = text.partition("=")
    if sep and name and "/" not in name and not Path(text).exists():
        text = rest
    if not text.strip():
        raise OmnimatteError(f"--mask {arg}: no path given (expected PATH or NAME=PATH)")
    path = Path(text)
    if path.is_dir() and _clip_videos(path):
        raise OmnimatteError(f"--mask {arg}: a clip folder, not a mask (give one of its mask files, or the "
                             "folder alone as INPUT without --mask)")
    return (name if text is rest else None), path


def _explicit(video: Path, masks, caption):
    parsed = [parse_mask(m) for m in masks]
    paths = [p for _, p in parsed]
    names = [n if n is not None else mask_name(p) for n, p in parsed]
    return video, paths, names, caption, "given" if caption is not None else "none"


def _from_folder(folder: Path, caption):
    video, paths, prompt = find_clip_files(folder)
    how = "given"
    if caption is None and prompt is not None:
        caption, how = read_caption(prompt), "prompt.json"
    elif caption is None:
        how = "none"
    return video, paths, [mask_name(p) for p in paths], caption, how


def resolve_clip(input, masks: Sequence = (), caption: str | None = None, frames: int | None = None,
                 fps: float | None = None, names: Sequence[str] | None = None) -> ClipSpec:
    """The one place inputs are resolved (CLI and API alike): a clip folder
    alone, or a video (file or frame folder) with its masks. Probes the video
    and every mask (no decoding) and checks them against each other."""
    input = Path(input)
    if not input.exists():
        raise OmnimatteError(f"{input}: no such file or directory")
    if masks:
        videos = _clip_videos(input) if input.is_dir() else []
        if videos:
            raise OmnimatteError(f"{input}: a clip folder takes no --mask (its mask_XX files are used); "
                                 f"to give masks, pass the video ({videos[0]}) instead")
        video, paths, auto, caption, how = _explicit(input, masks, caption)
    elif input.is_dir() and not (input / "00000.png").exists():
        video, paths, auto, caption, how = _from_folder(input, caption)
    else:
        raise OmnimatteError(f"{input}: give at least one object mask (--mask)")
    names = list(names) if names is not None else auto
    if len(names) != len(paths):
        raise OmnimatteError(f"{input}: {len(names)} names for {len(paths)} masks")
    if len(set(names)) != len(names):
        raise OmnimatteError(f"{input}: object names are not unique ({', '.join(names)}); "
                             "name them with --mask NAME=PATH")
    if frames is not None and (isinstance(frames, bool) or not isinstance(frames, int) or frames < 1):
        raise OmnimatteError(f"--frames {frames}: must be at least 1")
    info = probe_video(video, fps)
    for p in paths:
        check_mask_matches(probe_video(p, fps if fps is not None else info.fps), info)
    if frames is not None:
        info = replace(info, frames=min(frames, info.frames))
    return ClipSpec(video, paths, names, caption, info, fps, input, how)


def read_frames(path: Path, count: int, size: tuple[int, int] | None, gray: bool = False,
                tick=None, inspect=None) -> tuple[np.ndarray, np.ndarray]:
    """Decode ``count`` frames, each area-resized to ``size`` (W, H; None:
    as they are) as it arrives, into one uint8 array; returns (frames, the
    first frame at the source's size). Gray frames are floored, so that a
    threshold at an integer decides as on the float averages; a 0/1 frame of
    a folder is scaled to 0/255 first. ``inspect`` sees each source frame."""
    out, first, n = None, None, 0
    for frame in itertools.islice(iter_frames(path, gray=gray), count):
        if first is None:
            first = frame
            h, w = frame.shape[:2] if size is None else (size[1], size[0])
            out = np.empty((count, h, w) + frame.shape[2:], dtype=np.uint8)
        elif frame.shape != first.shape:
            raise OmnimatteError(f"{path}: the frame size changes within the video (frame {n})")
        if gray and path.is_dir() and frame.max() == 1:
            frame = frame * np.uint8(255)
        if inspect:
            inspect(frame)
        out[n] = _resized(frame, size, gray)
        n += 1
        if tick:
            tick()
    if first is None:
        raise OmnimatteError(f"{path}: the video has no frames")
    if n < count:
        raise OmnimatteError(f"{path}: decoding stopped after {n} of the {count} frames its container declares: "
                             f"the file is damaged or truncated (re-export it, or pass --frames {n})")
    return out, first


def _resized(frame: np.ndarray, size, gray: bool) -> np.ndarray:
    if size is None or (frame.shape[1], frame.shape[0]) == tuple(size):
        return frame
    if gray:
        return np.floor(resize_masks(frame[None], size, "area")[0]).astype(np.uint8)
    return resize_frames(frame[None], size, "area")[0]


def _read_mask(path: Path, count: int, size, tick) -> np.ndarray:
    """One mask, streamed: checked binary and not empty on its source pixels."""
    counts = np.zeros(3, dtype=np.int64)

    def inspect(frame):
        counts[:] += mask_counts(frame)

    mask, _ = read_frames(path, count, size, gray=True, tick=tick, inspect=inspect)
    check_mask_counts(counts, path)
    return mask


def read_clip(spec: ClipSpec, size: tuple[int, int] | None = None, report: Report = None) -> Clip:
    """Decode a resolved clip (its first ``spec.info.frames`` frames) in one
    streaming pass per file, each frame resized to ``size`` (W, H; None: keep
    the source's) as it is decoded. The masks were matched against the video
    from their headers (`resolve_clip`)."""
    n, k = spec.info.frames, len(spec.masks)
    # the count is of frames over every file: the name says which files
    name = "read video" + (f" + {k} mask{'s' if k > 1 else ''}" if k else "")
    with stage(report, name, n * (1 + k)) as tick:
        frames, first = read_frames(spec.video, n, size, tick=tick)
        masks = [_read_mask(p, n, size, tick) for p in spec.masks]
    infos = [replace(probe_video(p, spec.info.fps), frames=n) for p in spec.masks]
    return Clip(frames, spec.info.fps, masks, list(spec.names), spec.caption, spec.info, infos, spec.source, first)


def load_clip(video, masks: Sequence, caption: str | None = None, names: Sequence[str] | None = None,
              fps: float | None = None, frames: int | None = None) -> Clip:
    """A Clip from a video and explicit mask paths (names default to the mask
    file names: ``mask_00.mp4`` -> ``00``); ``fps`` is for frame folders."""
    if not masks:
        raise OmnimatteError(f"{video}: no object masks given")
    return read_clip(resolve_clip(video, masks, caption, frames, fps, names))


def load_clip_folder(folder, fps: float | None = None, caption: str | None = None,
                     frames: int | None = None) -> Clip:
    """A clip folder in the Generative Omnimatte layout; ``caption`` overrides
    prompt.json (without either the caption is None)."""
    if not Path(folder).is_dir():
        raise OmnimatteError(f"{folder}: not a clip folder")
    return read_clip(resolve_clip(folder, (), caption, frames, fps))

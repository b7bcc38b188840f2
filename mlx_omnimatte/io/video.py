"""Read videos and frame folders into channels-last uint8 arrays.

A *source* is either a video file that FFmpeg (through PyAV) can demux
(mp4, mov, webm, mkv, ...) or a folder of still frames (png/jpg/...), sorted
naturally so that ``frame_2.png`` comes before ``frame_10.png``. A folder has
no frame rate of its own: the caller passes one (default 16, the rate of the
Wan2.1 models and of the example clips).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import av
import numpy as np
from PIL import Image

from ..errors import OmnimatteError

DEFAULT_FPS = 16.0
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class VideoInfo:
    """What planning needs to know about a source, without its pixels."""

    path: Path
    fps: float
    frames: int
    width: int
    height: int

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return (self.width, self.height)


def natural_key(name: str) -> list:
    """Sort key that orders embedded numbers by value (``f2`` < ``f10``)."""
    return [int(p) if p.isdigit() else p.lower() for p in re.split(r"(\d+)", name)]


def list_frame_files(folder: Path) -> list[Path]:
    """Image files of a frame folder, naturally sorted; hidden files skipped."""
    files = [
        p
        for p in Path(folder).iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    ]
    return sorted(files, key=lambda p: natural_key(p.name))


def as_rate(fps: float | Fraction) -> Fraction:
    """A frame rate as the exact fraction FFmpeg wants (29.97002997 -> 30000/1001)."""
    return Fraction(fps).limit_denominator(1001)


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise OmnimatteError(f"{path}: no such file or folder")


def _open(path: Path) -> av.container.InputContainer:
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise OmnimatteError(f"{path}: not a readable video ({_one_line(e)})") from None
    if not container.streams.video:
        container.close()
        raise OmnimatteError(f"{path}: has no video stream")
    return container


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _stream_fps(path: Path, stream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate or rate <= 0:
        raise OmnimatteError(f"{path}: the video has no frame rate")
    return float(rate)


def _folder_info(folder: Path, fps: float) -> tuple[list[Path], VideoInfo]:
    files = list_frame_files(folder)
    if not files:
        raise OmnimatteError(
            f"{folder}: folder holds no frames ({', '.join(IMAGE_EXTENSIONS)})"
        )
    try:
        with Image.open(files[0]) as im:
            width, height = im.size
    except OSError as e:
        raise OmnimatteError(f"{files[0]}: not a readable image ({_one_line(e)})") from None
    return files, VideoInfo(Path(folder), float(fps), len(files), width, height)


def probe_video(path: str | Path, fps: float | None = None) -> VideoInfo:
    """Frame count, size and fps of a video file or frame folder, cheaply.

    For files only the first frame is decoded (its display rotation decides
    which side is the width); the frame count is the container's when it has
    one, else (webm/mkv usually) a count of the demuxed packets. ``fps`` is
    used for folders (default 16) and ignored for files.
    """
    path = Path(path)
    _check_exists(path)
    if path.is_dir():
        return _folder_info(path, fps or DEFAULT_FPS)[1]
    container = _open(path)
    try:
        stream = container.streams.video[0]
        cc = stream.codec_context
        width, height = cc.width, cc.height
        first = next(container.decode(stream), None)  # the display rotation lives on frames
        if first is None:
            raise OmnimatteError(f"{path}: the video has no frames")
        if int(round(first.rotation / 90.0)) % 2:
            width, height = height, width
        frames = stream.frames
        if frames <= 0:
            container.seek(0)
            frames = sum(1 for p in container.demux(stream) if p.size)
        info = VideoInfo(path, _stream_fps(path, stream), int(frames), width, height)
    except av.FFmpegError as e:
        raise OmnimatteError(f"{path}: not a readable video ({_one_line(e)})") from None
    finally:
        container.close()
    if info.frames == 0:
        raise OmnimatteError(f"{path}: the video has no frames")
    return info


def _upright(frame: av.VideoFrame, fmt: str) -> np.ndarray:
    """Pixels as displayed: phone videos store a rotation in a display
    matrix (counter-clockwise degrees) instead of rotating the pixels."""
    array = frame.to_ndarray(format=fmt)
    k = int(round(frame.rotation / 90.0)) % 4 if frame.rotation else 0
    return np.ascontiguousarray(np.rot90(array, k)) if k else array


def _decode(path: Path, fmt: str) -> Iterator[np.ndarray]:
    container = _open(path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            yield _upright(frame, fmt)
    except av.FFmpegError as e:
        raise OmnimatteError(f"{path}: decoding failed ({_one_line(e)})") from None
    finally:
        container.close()


def _load_image(file: Path, mode: str, size: tuple[int, int]) -> np.ndarray:
    try:
        with Image.open(file) as im:
            if im.size != size:
                raise OmnimatteError(
                    f"{file}: frame size {im.size[0]}x{im.size[1]} differs from the first frame's {size[0]}x{size[1]}"
                )
            if mode == "L" and im.mode in ("I;16", "I;16B", "I;16L", "I"):
                # 16-bit grayscale: keep the top 8 bits rather than clipping.
                return (np.asarray(im, dtype=np.uint32) >> 8).astype(np.uint8)
            return np.asarray(im.convert(mode))
    except OSError as e:
        raise OmnimatteError(f"{file}: not a readable image ({_one_line(e)})") from None


def iter_frames(path: str | Path, gray: bool = False) -> Iterator[np.ndarray]:
    """Yield frames one by one: uint8 [H, W, 3] (or [H, W] if ``gray``)."""
    path = Path(path)
    _check_exists(path)
    if path.is_dir():
        files, info = _folder_info(path, DEFAULT_FPS)
        for f in files:
            yield _load_image(f, "L" if gray else "RGB", info.size)
    else:
        yield from _decode(path, "gray" if gray else "rgb24")


class FrameStream:
    """The first ``count`` frames of a video, read in order one at a time:
    what the writers need of a clean-plate background, which they ask for
    frame 0, 1, ... (the same frame again, as several layers share it, is
    served from the last one read)."""

    def __init__(self, path: str | Path, count: int):
        self.path, self.count = Path(path), count
        self._frames, self._t, self._last = None, -1, None

    def __len__(self) -> int:
        return self.count

    def frame(self, t: int) -> np.ndarray:
        if t == self._t:
            return self._last
        if t == 0 or self._frames is None or t != self._t + 1:
            if t != 0:
                raise OmnimatteError(f"{self.path}: frames are streamed in order (asked for {t} after {self._t})")
            self._frames = iter_frames(self.path)
        self._last = next(self._frames, None)
        if self._last is None:
            raise OmnimatteError(f"{self.path}: decoding stopped after {t} of {self.count} frames")
        self._t = t
        return self._last


def read_video(
    path: str | Path, fps: float | None = None, gray: bool = False, max_frames: int | None = None
) -> tuple[np.ndarray, VideoInfo]:
    """Decode a whole video or frame folder (its first ``max_frames`` frames
    when given).

    Returns (frames, info): frames uint8 ``[T, H, W, 3]`` (``[T, H, W]`` if
    ``gray``); ``info.fps`` is the file's rate, or ``fps`` (default 16) for a
    folder. ``info.frames`` is the number of frames actually decoded.
    """
    path = Path(path)
    info = probe_video(path, fps)
    frames = list(itertools.islice(iter_frames(path, gray=gray), max_frames))
    if not frames:
        raise OmnimatteError(f"{path}: the video has no frames")
    if any(f.shape != frames[0].shape for f in frames):
        raise OmnimatteError(f"{path}: the frame size changes within the video")
    array = np.stack(frames)
    t, h, w = array.shape[:3]
    # The decoded count and size are the truth; a container's header may differ.
    return array, VideoInfo(info.path, info.fps, t, w, h)


def _decode_rgba(path: Path) -> list[np.ndarray]:
    container = _open(path)
    try:
        stream = container.streams.video[0]
        if stream.codec_context.name == "vp9":
            # FFmpeg's native vp9 decoder drops the alpha that WebM carries as
            # BlockAdditional side data; libvpx-vp9 decodes it.
            try:
                ctx = av.codec.CodecContext.create("libvpx-vp9", "r")
            except (av.FFmpegError, ValueError):
                raise OmnimatteError(
                    f"{path}: reading VP9 alpha needs FFmpeg's libvpx-vp9 decoder, missing from this PyAV build"
                ) from None
            frames = []
            for packet in container.demux(stream):
                if packet.size:
                    frames += ctx.decode(packet)
            frames += ctx.decode(None)
        else:
            stream.thread_type = "AUTO"
            frames = list(container.decode(stream))
        return [_upright(f, "rgba") for f in frames]
    except av.FFmpegError as e:
        raise OmnimatteError(f"{path}: decoding failed ({_one_line(e)})") from None
    finally:
        container.close()


def read_rgba(path: str | Path, fps: float | None = None) -> tuple[np.ndarray, VideoInfo]:
    """Read an RGBA layer: PNG folder, ProRes 4444 ``.mov`` or VP9 ``.webm``.

    Returns uint8 ``[T, H, W, 4]`` (alpha 255 where the source has none) and
    its ``VideoInfo``.
    """
    path = Path(path)
    info = probe_video(path, fps)
    if path.is_dir():
        files, _ = _folder_info(path, info.fps)
        frames = [_load_image(f, "RGBA", info.size) for f in files]
    else:
        frames = _decode_rgba(path)
    if not frames:
        raise OmnimatteError(f"{path}: the video has no frames")
    array = np.stack(frames)
    t, h, w = array.shape[:3]
    return array, VideoInfo(info.path, info.fps, t, w, h)

"""Layers over a new background: the `composite` command's math and its
one fitting rule for a background or clean plate of another size or length
(``fit_frames``, shared with the clean-plate method), checked from the
sizes and lengths alone so that a mismatch is refused before decoding."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import av
import numpy as np
from PIL import Image

from ..compositing import alpha_channel, as_float, over
from ..errors import OmnimatteError
from ..progress import Report, stage
from .grid import mirror_indices, resize_frames
from .video import list_frame_files
from .writers import write_video

FIT_MODES = ("stretch", "crop", "loop")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")  # Pillow modes that carry alpha
LAYER_OUTPUTS = "object_<name>/layer, layer.mov or layer.webm"

# --- fitting a background (or clean plate) to the layers' grid ---------------------


def check_fit_mode(fit: str | None, what: str) -> None:
    if fit is not None and fit not in FIT_MODES:
        raise OmnimatteError(f"{what}: --fit {fit}: expected one of {', '.join(FIT_MODES)}")


def check_size(have: tuple[int, int], size: tuple[int, int], fit: str | None, what: str, against: str) -> None:
    """Another size is refused unless ``fit`` says how to adapt it."""
    if tuple(have) != tuple(size) and fit is None:
        raise OmnimatteError(f"{what}: {have[0]}x{have[1]} differs from {against} {size[0]}x{size[1]} "
                             "(pass --fit stretch, crop or loop to adapt it)")


def fit_times(length: int, num_frames: int, fit: str | None, what: str, against: str) -> np.ndarray:
    """Which of ``length`` frames shows at each of ``num_frames``: an image
    repeats, a longer video is trimmed, a shorter one is refused unless
    ``fit``: time-stretched (stretch) or mirrored forth and back (crop, loop)."""
    if length == 1:
        return np.zeros(num_frames, np.intp)
    if length >= num_frames:
        return np.arange(num_frames)
    if fit is None:
        raise OmnimatteError(f"{what}: {length} frames, fewer than {against} {num_frames} "
                             "(pass --fit stretch, crop or loop to extend it)")
    if fit == "stretch":
        return np.minimum((np.arange(num_frames) * length) // num_frames, length - 1)
    return mirror_indices(length, num_frames)


def _crop_cover(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Scaled to cover ``size`` (the aspect kept), then centre-cropped."""
    w, h = size
    s = max(w / frames.shape[2], h / frames.shape[1])
    cw, ch = max(w, round(frames.shape[2] * s)), max(h, round(frames.shape[1] * s))
    big = resize_frames(frames, (cw, ch))
    x0, y0 = (cw - w) // 2, (ch - h) // 2
    return big[:, y0:y0 + h, x0:x0 + w]


def as_video(frames: np.ndarray, what: str) -> np.ndarray:
    """An image ``[H, W, C]`` or video ``[T, H, W, C]`` as RGB ``[T, H, W, 3]``."""
    v = np.asarray(frames)
    v = v[None] if v.ndim == 3 else v
    if v.ndim != 4 or v.shape[-1] not in (3, 4):
        raise OmnimatteError(f"{what}: expected an image or a video, got an array of shape {np.shape(frames)}")
    return v[..., :3]


def fit_size(frames: np.ndarray, size: tuple[int, int], fit: str | None, what: str, against: str) -> np.ndarray:
    """``[T, H, W, 3]`` frames at ``size`` (W, H): resized (stretch, loop) or
    cover-cropped (crop); another size without ``fit`` is refused."""
    check_size((frames.shape[2], frames.shape[1]), size, fit, what, against)
    if (frames.shape[2], frames.shape[1]) == tuple(size):
        return frames
    return _crop_cover(frames, size) if fit == "crop" else resize_frames(frames, size)


def fit_frames(frames: np.ndarray, num_frames: int, size: tuple[int, int], fit: str | None = None,
               what: str = "background", against: str = "the layers'") -> np.ndarray:
    """An image or video as ``num_frames`` frames at ``size`` (W, H), by the
    rules of ``fit_size`` and ``fit_times``; ``what`` and ``against`` name
    the two sides in the messages."""
    check_fit_mode(fit, what)
    video = fit_size(as_video(frames, what), size, fit, what, against)
    if video.shape[0] == 1:  # no copy per frame
        return np.broadcast_to(video, (num_frames,) + video.shape[1:])
    return video[fit_times(video.shape[0], num_frames, fit, what, against)]


# --- layers -------------------------------------------------------------------------


def _image_has_alpha(file: Path) -> bool:
    try:
        with Image.open(file) as im:
            return im.mode in ALPHA_MODES or "transparency" in im.info
    except OSError:
        raise OmnimatteError(f"{file}: not a readable image") from None


def _video_has_alpha(path: Path) -> bool:
    # WebM keeps VP9 alpha beside the picture (the track says alpha_mode=1);
    # other codecs decode to a pixel format with or without an alpha plane.
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            if stream.codec_context.name == "vp9":
                tags = {k.lower(): v for k, v in stream.metadata.items()}
                return tags.get("alpha_mode") == "1"
            first = next(container.decode(stream), None)
            return first is not None and any(c.is_alpha for c in first.format.components)
    except (av.FFmpegError, OSError, IndexError):
        raise OmnimatteError(f"{path}: not a readable video") from None


def check_layer_alpha(path: str | Path) -> None:
    """Refuse a layer whose frames carry no alpha (RGB PNGs, an H.264 video):
    composited, it would hide the whole background."""
    path = Path(path)
    if path.is_dir():
        files = list_frame_files(path)
        found = bool(files) and _image_has_alpha(files[0])
    else:
        found = _video_has_alpha(path)
    if not found:
        raise OmnimatteError(f"{path}: the layer has no alpha channel; give a layer that decompose wrote "
                             f"({LAYER_OUTPUTS})")


def _layer_grid(layers: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[int, int, int]:
    """(T, H, W) shared by every ``(alpha, fg)`` layer, else an error."""
    if not layers:
        raise OmnimatteError("composite: no layers given")
    t, h, w = np.shape(layers[0][1])[:3]
    for k, (alpha, fg) in enumerate(layers):
        a, f = np.shape(alpha), np.shape(fg)
        if f != (t, h, w, 3) or a not in ((t, h, w), (t, h, w, 1)):
            raise OmnimatteError(f"composite: layer {k} has fg {f} and alpha {a}, expected ({t}, {h}, {w}, 3)")
    return t, h, w


def over_float(background: np.ndarray, layers: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """``(alpha, fg)`` layers, back to front, over ``background`` (any shape
    that broadcasts); float32 in [0, 1]."""
    out = over(as_float(background), [(alpha_channel(a), as_float(fg)) for a, fg in layers])
    return out.astype(np.float32, copy=False)


def composite_frames(layers: Sequence[tuple[np.ndarray, np.ndarray]], background: np.ndarray,
                     times: np.ndarray) -> Iterator[np.ndarray]:
    """The composite frame by frame (memory of one float frame): frame t is
    the layers' frame t over ``background[times[t]]``, already at their size."""
    t, h, w = _layer_grid(layers)
    if background.shape[1:3] != (h, w) or len(times) != t:
        raise OmnimatteError(f"composite: background {background.shape[1:3]} x {len(times)} frames, "
                             f"expected ({h}, {w}) x {t}")
    for i in range(t):
        yield over_float(background[times[i]], [(a[i], f[i]) for a, f in layers])


def write_composite(path: str | Path, layers: Sequence[tuple[np.ndarray, np.ndarray]], background: np.ndarray,
                    times: np.ndarray, fps: float, overwrite: bool = False, report: Report = None) -> Path:
    """Stream the composite into an H.264 video (atomic: nothing is left on
    an error), reporting the stage "write composite" frame by frame."""
    with stage(report, "write composite", len(times)) as tick:
        return write_video(path, _ticking(composite_frames(layers, background, times), tick), fps, overwrite)


def _ticking(frames: Iterator[np.ndarray], tick) -> Iterator[np.ndarray]:
    for frame in frames:
        yield frame
        tick()  # after the writer took the frame

"""Layer outputs, written atomically.

Every writer builds its output under a hidden temporary sibling
(``.NAME.tmp-XXXX``, same suffix so FFmpeg picks the same muxer) and renames
it into place only when complete; on any exception, KeyboardInterrupt
included, the temporary is removed. An existing output is an error unless
``overwrite=True``, checked before any work is done.

Formats (frame count, size and rate of the input are preserved):

* RGBA layer: PNG frame folder (default, lossless), ProRes 4444 ``.mov``
  (``prores_ks``, yuva444p10le, profile 4444, 10-bit colour + 16-bit alpha
  coding) or VP9 ``.webm`` with alpha (``libvpx-vp9``, yuva420p; FFmpeg's
  encoder stores alpha as a BlockAdditional stream and tags the track
  ``alpha_mode=1``, so it needs the libvpx-vp9 *decoder* to be read back --
  FFmpeg's native vp9 decoder drops alpha; see ``video.read_rgba``).
* Alpha: grayscale PNG frame folder or H.264 ``.mp4``.
* Background (or any RGB video): H.264 ``.mp4``/``.mov``/``.mkv`` or PNG frames.

H.264 uses yuv420p (plays everywhere) when both sides are even, else yuv444p
(4:2:0 cannot code odd sizes). Encoded videos are converted with, and tagged
as, BT.709 limited range; readers (``video.read_video``) honour the tags.
"""

from __future__ import annotations

import os
import secrets
import shutil
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator

import av
import numpy as np
from av.video.reformatter import ColorRange, Colorspace
from PIL import Image

from ..compositing import alpha_channel, rgba, to_uint8
from ..errors import OmnimatteError
from .video import as_rate

H264_CRF = 16  # colour: visually lossless
ALPHA_CRF = 8  # alpha through H.264: keep edges close to the PNG values
VP9_CRF = 18
PNG_COMPRESS = 3  # zlib level: much faster than the default 6, ~10% bigger
RGB_VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".m4v")
RGBA_VIDEO_SUFFIXES = (".mov", ".webm")
BT709 = 1  # AVCOL_SPC/PRI/TRC_BT709
LIMITED_RANGE = 1  # AVCOL_RANGE_MPEG


# --- atomic outputs ---------------------------------------------------------


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def check_output(path: str | Path, overwrite: bool = False) -> Path:
    """Fail early, before any work: ``path`` exists and ``overwrite`` is off,
    or it would lie under a file, or its nearest existing folder cannot be
    written (missing folders are created when writing)."""
    path = Path(path)
    if _exists(path) and not overwrite:
        raise OmnimatteError(f"{path}: already exists (pass overwrite / --overwrite to replace it)")
    parent = path.absolute().parent
    above = next(p for p in (parent, *parent.parents) if p.exists())
    if not above.is_dir():
        raise OmnimatteError(f"{path}: {above} is a file, not a folder")
    if not os.access(above, os.W_OK | os.X_OK):
        raise OmnimatteError(f"{path}: the folder {above} is not writable")
    return path


@contextmanager
def atomic_output(path: str | Path, overwrite: bool = False, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; move it to ``path`` on success.

    ``directory``: the temporary is created as an empty folder (for frame
    folders); otherwise it is a file name that does not exist yet, with the
    same suffix as ``path``.
    """
    path = check_output(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(4)
    tmp = path.with_name(f".{path.stem}.tmp-{token}{path.suffix}")
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        if not _exists(tmp):
            raise OmnimatteError(f"{path}: the writer produced nothing")
        if _exists(path):
            if not overwrite:  # appeared while we were writing
                raise OmnimatteError(f"{path}: already exists (pass overwrite / --overwrite to replace it)")
            old = path.with_name(f".{path.name}.old-{token}")
            os.rename(path, old)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(old, path)
                raise
            _remove(old)
        else:
            os.rename(tmp, path)
    except OSError as e:  # disk full, permissions: said of the output, not of its hidden folder
        _remove(tmp)
        raise OmnimatteError(f"{path}: writing failed ({e.strerror or e}); nothing was written") from None
    except BaseException:
        _remove(tmp)
        raise


# --- frame folders ----------------------------------------------------------


def frame_name(index: int) -> str:
    return f"{index:05d}.png"


def write_png_frames(folder: str | Path, frames: np.ndarray | Iterable[np.ndarray], overwrite: bool = False) -> Path:
    """PNG frames ``00000.png``, ... from ``[T, H, W]`` (gray), ``[T, H, W, 3]``
    or ``[T, H, W, 4]`` arrays (uint8, or float in [0, 1])."""
    folder = Path(folder)
    with atomic_output(folder, overwrite, directory=True) as tmp:
        n = 0
        for i, frame in enumerate(frames):
            Image.fromarray(to_uint8(frame)).save(tmp / frame_name(i), compress_level=PNG_COMPRESS)
            n += 1
        if n == 0:
            raise OmnimatteError(f"{folder}: no frames to write")
    return folder


# --- encoded videos ---------------------------------------------------------


def _tag_bt709(cc) -> None:
    # Untagged video is read as BT.601 by FFmpeg but as BT.709 by most players
    # once it is HD; convert with BT.709 and say so, as HD video usually is.
    cc.colorspace = cc.color_primaries = cc.color_trc = BT709
    cc.color_range = LIMITED_RANGE


def _yuv_frame(frame: np.ndarray, in_format: str, pix_fmt: str) -> av.VideoFrame:
    vf = av.VideoFrame.from_ndarray(frame, format=in_format).reformat(
        format=pix_fmt, src_colorspace=Colorspace.ITU709, dst_colorspace=Colorspace.ITU709,
        dst_color_range=ColorRange.MPEG,
    )
    vf.colorspace, vf.color_range = BT709, LIMITED_RANGE
    return vf


def _encode(
    path: Path,
    frames: Iterable[np.ndarray],
    fps: float | Fraction,
    codec: str,
    pix_fmt: str,
    in_format: str,
    options: dict[str, str],
    overwrite: bool,
) -> Path:
    channels = {"rgb24": 3, "rgba": 4}[in_format]
    rate = as_rate(fps)
    if rate <= 0:
        raise OmnimatteError(f"{path}: frame rate {fps} must be positive")
    with atomic_output(path, overwrite) as tmp:
        container = av.open(str(tmp), mode="w")
        done = False
        try:
            stream = None
            n = 0
            for i, frame in enumerate(frames):
                frame = np.ascontiguousarray(to_uint8(frame))
                if stream is None:
                    h, w = frame.shape[:2]
                    if pix_fmt == "yuv420p" and (w % 2 or h % 2):
                        pix_fmt = "yuv444p"
                    stream = container.add_stream(codec, rate=rate)
                    stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
                    stream.options = dict(options)
                    _tag_bt709(stream.codec_context)
                if frame.shape[2:] != (channels,) or frame.shape[:2] != (h, w):
                    raise OmnimatteError(
                        f"{path}: frame {i} has shape {frame.shape}, expected ({h}, {w}, {channels})"
                    )
                vf = _yuv_frame(frame, in_format, pix_fmt)
                vf.pts = i
                for packet in stream.encode(vf):
                    container.mux(packet)
                n += 1
            if stream is None:
                raise OmnimatteError(f"{path}: no frames to write")
            for packet in stream.encode():
                container.mux(packet)
            done = True
        except av.FFmpegError as e:
            raise OmnimatteError(f"{path}: encoding failed ({' '.join(str(e).split())})") from None
        finally:
            try:
                container.close()  # writes the trailer
            except av.FFmpegError as e:
                if done:  # otherwise the first error is the one to report
                    raise OmnimatteError(f"{path}: finishing the file failed ({' '.join(str(e).split())})") from None
    return path


def _rgb_frames(frames: np.ndarray | Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    for f in frames:
        f = to_uint8(f)
        if f.ndim == 2:
            f = np.repeat(f[..., None], 3, axis=-1)
        elif f.shape[-1] == 1:
            f = np.repeat(f, 3, axis=-1)
        yield f[..., :3]


def write_video(
    path: str | Path,
    frames: np.ndarray | Iterable[np.ndarray],
    fps: float | Fraction,
    overwrite: bool = False,
    crf: int = H264_CRF,
) -> Path:
    """H.264 video (mp4/mov/mkv) from RGB ``[T, H, W, 3]`` or gray ``[T, H, W]``."""
    path = Path(path)
    if path.suffix.lower() not in RGB_VIDEO_SUFFIXES:
        raise OmnimatteError(f"{path}: H.264 output needs one of {', '.join(RGB_VIDEO_SUFFIXES)}")
    options = {"crf": str(crf), "preset": "medium"}
    return _encode(path, _rgb_frames(frames), fps, "libx264", "yuv420p", "rgb24", options, overwrite)


def write_rgba_video(
    path: str | Path,
    frames: np.ndarray | Iterable[np.ndarray],
    fps: float | Fraction,
    overwrite: bool = False,
) -> Path:
    """RGBA ``[T, H, W, 4]`` (straight alpha) as ProRes 4444 ``.mov`` or VP9 ``.webm``."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".mov":
        options = {"profile": "4444", "vendor": "apl0"}
        return _encode(path, frames, fps, "prores_ks", "yuva444p10le", "rgba", options, overwrite)
    if suffix == ".webm":
        options = {"crf": str(VP9_CRF), "b": "0", "row-mt": "1", "deadline": "good", "cpu-used": "2"}
        return _encode(path, frames, fps, "libvpx-vp9", "yuva420p", "rgba", options, overwrite)
    raise OmnimatteError(f"{path}: RGBA video output needs .mov (ProRes 4444) or .webm (VP9)")


def write_layer(
    path: str | Path,
    alpha: np.ndarray,
    foreground: np.ndarray,
    fps: float | Fraction,
    overwrite: bool = False,
) -> Path:
    """One object layer as RGBA: a PNG folder (no suffix), ``.mov`` or ``.webm``.

    alpha ``[T, H, W]`` / ``[T, H, W, 1]``, foreground ``[T, H, W, 3]``, uint8
    or float in [0, 1]; colour is stored straight (not premultiplied).
    """
    path = Path(path)
    check_output(path, overwrite)
    frames = (rgba(alpha[t], foreground[t]) for t in range(len(foreground)))
    if path.suffix.lower() in RGBA_VIDEO_SUFFIXES:
        return write_rgba_video(path, frames, fps, overwrite)
    if path.suffix:
        raise OmnimatteError(f"{path}: layer output is a folder (no suffix), .mov or .webm")
    return write_png_frames(path, frames, overwrite)


def write_alpha(
    path: str | Path, alpha: np.ndarray, fps: float | Fraction, overwrite: bool = False
) -> Path:
    """Alpha matte as grayscale PNG frames (no suffix) or H.264 ``.mp4``."""
    path = Path(path)
    frames = (to_uint8(alpha_channel(a)[..., 0]) for a in alpha)
    if path.suffix.lower() in RGB_VIDEO_SUFFIXES:
        return write_video(path, frames, fps, overwrite, crf=ALPHA_CRF)
    if path.suffix:
        raise OmnimatteError(f"{path}: alpha output is a folder (no suffix) or .mp4")
    return write_png_frames(path, frames, overwrite)


def write_background(
    path: str | Path, frames: np.ndarray, fps: float | Fraction, overwrite: bool = False
) -> Path:
    """RGB video as H.264 (``.mp4``/``.mov``/``.mkv``) or PNG frames (no suffix)."""
    path = Path(path)
    if path.suffix.lower() in RGB_VIDEO_SUFFIXES:
        return write_video(path, frames, fps, overwrite)
    if path.suffix:
        raise OmnimatteError(f"{path}: background output is a folder (no suffix) or .mp4")
    return write_png_frames(path, frames, overwrite)

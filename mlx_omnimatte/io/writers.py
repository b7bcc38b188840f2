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

import errno
import os
import secrets
import shutil
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator

import av
import mlx.core as mx
import numpy as np
from av.video.reformatter import ColorRange, Colorspace
from PIL import Image

from ..compositing import alpha_channel, to_uint8
from ..errors import OmnimatteError
from ..memory import format_bytes
from .video import as_rate

H264_CRF = 16  # colour: visually lossless
# x264 holds its lookahead frames at full size (~370 MB at 1080p by default);
# a shorter lookahead costs little quality and keeps several encoders cheap.
X264_MEMORY = {"rc-lookahead": "10", "threads": "2"}
ALPHA_CRF = 8  # alpha through H.264: keep edges close to the PNG values
VP9_CRF = 18
PNG_COMPRESS = 3  # zlib level: much faster than the default 6, ~10% bigger
RGB_VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".m4v")
RGBA_VIDEO_SUFFIXES = (".mov", ".webm")
BT709 = 1  # AVCOL_SPC/PRI/TRC_BT709
LIMITED_RANGE = 1  # AVCOL_RANGE_MPEG


# --- atomic outputs ---------------------------------------------------------


class WriteError(OmnimatteError):
    """Writing an output failed (disk full, permissions); an output written
    inside another's hidden folder re-raises it under the outer name."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: writing failed ({reason}); nothing was written")
        self.reason = reason



def free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def save_safetensors(path: str | Path, arrays: dict, metadata: dict | None = None) -> None:
    """``mx.save_safetensors`` in the system's words: MLX reports a failed
    write (a full disk) as a RuntimeError, which would escape the one-line
    error policy as a traceback."""
    try:
        mx.save_safetensors(str(path), arrays, metadata=metadata or {})
    except RuntimeError as e:
        path = Path(path)
        if free_bytes(path.parent) < sum(a.nbytes for a in arrays.values()):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
        raise WriteError(path, " ".join(str(e).split())) from None


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
    if not str(path).strip():
        raise OmnimatteError("the output path is empty")
    path = Path(path)
    here = Path.cwd().resolve()
    if path.resolve() == here or path.resolve() in here.parents:
        raise OmnimatteError(f"{path}: the output would replace the current folder {here}")
    if _exists(path) and not overwrite:
        raise OmnimatteError(f"{path}: already exists (add --overwrite to replace it)")
    parent = path.absolute().parent
    above = next(p for p in (parent, *parent.parents) if p.exists())
    if not above.is_dir():
        raise OmnimatteError(f"{path}: {above} is a file, not a folder")
    if not os.access(above, os.W_OK | os.X_OK):
        raise OmnimatteError(f"{path}: the folder {above} is not writable")
    return path


def check_not_input(out: str | Path, inputs) -> None:
    """No output may be, or contain, anything the run reads."""
    target = Path(out).resolve()
    for p in filter(None, inputs):
        p = Path(p).resolve()
        if target == p or target in p.parents:
            raise OmnimatteError(f"{out}: the output would replace the input {p}")


def check_space(path: str | Path, needed: int) -> None:
    """Refuse before any work when the outputs would not fit on the disk."""
    above = next(p for p in (Path(path).absolute(), *Path(path).absolute().parents) if p.exists())
    free = shutil.disk_usage(above).free
    if needed > free:
        raise OmnimatteError(f"{path}: the outputs need about {format_bytes(needed)} but {above} has "
                             f"{format_bytes(free)} free (free some space or shorten the clip with --frames)")


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
                raise OmnimatteError(f"{path}: already exists (add --overwrite to replace it)")
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
    except (OSError, WriteError) as e:  # disk full, permissions: said of the output, not of its hidden folder
        _remove(tmp)
        reason = e.reason if isinstance(e, WriteError) else (e.strerror or str(e))
        raise WriteError(path, reason) from None
    except BaseException:
        _remove(tmp)
        raise


# --- frame sinks ------------------------------------------------------------
#
# A sink takes frames one at a time, so an output is written as it is computed
# (several sinks can be open at once: one pass over the source writes every
# format). Entered, it writes into a hidden temporary; leaving without an
# error moves the finished output into place, leaving on an error removes it.


def frame_name(index: int) -> str:
    return f"{index:05d}.png"


class PngSink:
    """A PNG frame folder ``00000.png``, ... of gray, RGB or RGBA frames."""

    def __init__(self, folder: str | Path, overwrite: bool = False):
        self.path, self.overwrite, self.count = Path(folder), overwrite, 0

    def __enter__(self) -> "PngSink":
        self._ctx = atomic_output(self.path, self.overwrite, directory=True)
        self._tmp = self._ctx.__enter__()
        return self

    def add(self, frame: np.ndarray) -> None:
        Image.fromarray(to_uint8(frame)).save(self._tmp / frame_name(self.count), compress_level=PNG_COMPRESS)
        self.count += 1

    def __exit__(self, *exc) -> bool:
        if exc[0] is None and self.count == 0:
            err = OmnimatteError(f"{self.path}: no frames to write")
            self._ctx.__exit__(OmnimatteError, err, None)
            raise err
        return bool(self._ctx.__exit__(*exc))


class MappedSink:
    """A sink whose frames are converted first (alpha -> gray, gray -> RGB)."""

    def __init__(self, sink, convert):
        self.sink, self.convert, self.path = sink, convert, sink.path

    def __enter__(self) -> "MappedSink":
        self.sink.__enter__()
        return self

    def add(self, frame: np.ndarray) -> None:
        self.sink.add(self.convert(frame))

    def __exit__(self, *exc) -> bool:
        return self.sink.__exit__(*exc)


class EncodedSink:
    """A video file encoded with FFmpeg (through PyAV), frame by frame."""

    def __init__(self, path: Path, fps, codec: str, pix_fmt: str, in_format: str, options: dict,
                 overwrite: bool = False):
        self.path, self.codec, self.pix_fmt, self.in_format = Path(path), codec, pix_fmt, in_format
        self.options, self.overwrite, self.count = dict(options), overwrite, 0
        self.channels = {"rgb24": 3, "rgba": 4}[in_format]
        self.rate = as_rate(fps)
        if self.rate <= 0:
            raise OmnimatteError(f"{path}: frame rate {fps} must be positive")

    def __enter__(self) -> "EncodedSink":
        self._ctx = atomic_output(self.path, self.overwrite)
        tmp = self._ctx.__enter__()
        self._container, self._stream = av.open(str(tmp), mode="w"), None
        return self

    def _open_stream(self, h: int, w: int) -> None:
        if self.pix_fmt == "yuv420p" and (w % 2 or h % 2):
            self.pix_fmt = "yuv444p"  # 4:2:0 cannot code odd sizes
        stream = self._container.add_stream(self.codec, rate=self.rate)
        stream.width, stream.height, stream.pix_fmt = w, h, self.pix_fmt
        stream.options = dict(self.options)
        _tag_bt709(stream.codec_context)
        self._stream, self._shape = stream, (h, w, self.channels)

    def add(self, frame: np.ndarray) -> None:
        frame = np.ascontiguousarray(to_uint8(frame))
        if self._stream is None:
            self._open_stream(*frame.shape[:2])
        if frame.shape != self._shape:
            raise OmnimatteError(f"{self.path}: frame {self.count} has shape {frame.shape}, expected {self._shape}")
        vf = _yuv_frame(frame, self.in_format, self.pix_fmt)
        vf.pts = self.count
        try:
            for packet in self._stream.encode(vf):
                self._container.mux(packet)
        except av.FFmpegError as e:
            raise OmnimatteError(f"{self.path}: encoding failed ({' '.join(str(e).split())})") from None
        self.count += 1

    def _finish(self) -> None:
        if self._stream is None:
            raise OmnimatteError(f"{self.path}: no frames to write")
        try:
            for packet in self._stream.encode():
                self._container.mux(packet)
            self._container.close()  # writes the trailer
        except av.FFmpegError as e:
            raise OmnimatteError(f"{self.path}: finishing the file failed ({' '.join(str(e).split())})") from None

    def __exit__(self, *exc) -> bool:
        if exc[0] is None:
            try:
                self._finish()
            except BaseException as e:
                self._abort()
                self._ctx.__exit__(type(e), e, e.__traceback__)
                raise
            return bool(self._ctx.__exit__(None, None, None))
        self._abort()
        return bool(self._ctx.__exit__(*exc))

    def _abort(self) -> None:
        try:
            self._container.close()
        except (av.FFmpegError, ValueError):
            pass  # the first error is the one to report


def write_frames(sink, frames: Iterable[np.ndarray]):
    """Every frame into one sink; returns its path."""
    with sink:
        for frame in frames:
            sink.add(frame)
    return sink.path


def write_png_frames(folder: str | Path, frames: np.ndarray | Iterable[np.ndarray], overwrite: bool = False) -> Path:
    """PNG frames ``00000.png``, ... from ``[T, H, W]`` (gray), ``[T, H, W, 3]``
    or ``[T, H, W, 4]`` arrays (uint8, or float in [0, 1])."""
    return write_frames(PngSink(folder, overwrite), frames)


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


def _rgb(frame: np.ndarray) -> np.ndarray:
    f = to_uint8(frame)
    if f.ndim == 2:
        f = f[..., None]
    return np.repeat(f, 3, axis=-1) if f.shape[-1] == 1 else f[..., :3]


def video_sink(path: str | Path, fps: float | Fraction, overwrite: bool = False, crf: int = H264_CRF):
    """H.264 (mp4/mov/mkv) of RGB ``[H, W, 3]`` or gray ``[H, W]`` frames."""
    path = Path(path)
    if path.suffix.lower() not in RGB_VIDEO_SUFFIXES:
        raise OmnimatteError(f"{path}: H.264 output needs one of {', '.join(RGB_VIDEO_SUFFIXES)}")
    options = {"crf": str(crf), "preset": "medium", **X264_MEMORY}
    return MappedSink(EncodedSink(path, fps, "libx264", "yuv420p", "rgb24", options, overwrite), _rgb)


def rgba_video_sink(path: str | Path, fps: float | Fraction, overwrite: bool = False):
    """RGBA ``[H, W, 4]`` (straight alpha) as ProRes 4444 ``.mov`` or VP9 ``.webm``."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".mov":
        options = {"profile": "4444", "vendor": "apl0"}
        return EncodedSink(path, fps, "prores_ks", "yuva444p10le", "rgba", options, overwrite)
    if suffix == ".webm":
        options = {"crf": str(VP9_CRF), "b": "0", "row-mt": "1", "deadline": "good", "cpu-used": "2"}
        return EncodedSink(path, fps, "libvpx-vp9", "yuva420p", "rgba", options, overwrite)
    raise OmnimatteError(f"{path}: RGBA video output needs .mov (ProRes 4444) or .webm (VP9)")


def layer_sink(path: str | Path, fps: float | Fraction, overwrite: bool = False):
    """One object layer of RGBA frames (colour straight, not premultiplied):
    a PNG folder (no suffix), ``.mov`` or ``.webm``."""
    path = check_output(path, overwrite)
    if path.suffix.lower() in RGBA_VIDEO_SUFFIXES:
        return rgba_video_sink(path, fps, overwrite)
    if path.suffix:
        raise OmnimatteError(f"{path}: layer output is a folder (no suffix), .mov or .webm")
    return PngSink(path, overwrite)


def alpha_sink(path: str | Path, fps: float | Fraction, overwrite: bool = False):
    """Alpha mattes ``[H, W]`` / ``[H, W, 1]`` as grayscale PNG frames (no
    suffix) or H.264 ``.mp4``."""
    path = Path(path)
    if path.suffix.lower() in RGB_VIDEO_SUFFIXES:
        sink = video_sink(path, fps, overwrite, crf=ALPHA_CRF)
    elif path.suffix:
        raise OmnimatteError(f"{path}: alpha output is a folder (no suffix) or .mp4")
    else:
        sink = PngSink(path, overwrite)
    return MappedSink(sink, lambda a: to_uint8(alpha_channel(a)[..., 0]))


def background_sink(path: str | Path, fps: float | Fraction, overwrite: bool = False):
    """RGB frames as H.264 (``.mp4``/``.mov``/``.mkv``) or PNG frames (no suffix)."""
    path = Path(path)
    if path.suffix.lower() in RGB_VIDEO_SUFFIXES:
        return video_sink(path, fps, overwrite)
    if path.suffix:
        raise OmnimatteError(f"{path}: background output is a folder (no suffix) or .mp4")
    return PngSink(path, overwrite)


def write_video(path, frames, fps, overwrite: bool = False, crf: int = H264_CRF) -> Path:
    """H.264 video (mp4/mov/mkv) from RGB ``[T, H, W, 3]`` or gray ``[T, H, W]``."""
    return write_frames(video_sink(path, fps, overwrite, crf), frames)

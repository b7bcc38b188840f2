"""Object masks from prompts (a few words, a click, a box) with SAM3's video
predictor, written as a clip folder the other commands read.

The video is streamed in windows of frames and predicted frame by frame:
the predictor computes a frame's features, they are dropped once its masks
are out, and every object's memory bank (its last few frames' memories, a
fixed size) carries the tracking on, so memory does not grow with the
clip's length. Masks are
cleaned (`io.hygiene`), resized back to the source and written frame by frame
into one atomic folder: ``input_video``, ``mask_00/``, ... (lossless PNG, the
video's rate), ``prompt.json`` and ``masks_preview.mp4``.

The predictor tracks forwards: an object prompted on frame F is empty on the
frames before F.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator, Sequence

import mlx.core as mx
import numpy as np

from ..convert.hub import download_file, download_snapshot
from ..errors import OmnimatteError
from ..io.grid import resize_frames
from ..io.hygiene import Hygiene, MajorityWindow, clean_frame
from ..io.inputs import PROMPT_FILE, VIDEO_STEM, VIDEO_SUFFIXES
from ..io.video import VideoInfo, iter_frames, list_frame_files
from ..io.writers import PngSink, atomic_output, video_sink
from ..memory import format_bytes, fused_attention
from ..models.sam3 import (RELEASED_PARAMS, box_prompt, feature_grid, load_sam3, mlx_vlm_module, model_config,
                           point_prompt, read_sam3_config, sam3_figures, weight_dtype_bytes)
from ..progress import Report, stage
from .cost import format_seconds

WINDOW = 8  # frames decoded at once (the predictor holds one frame's features)
PREVIEW_FILE = "masks_preview.mp4"
TINT = 0.5  # preview: weight of an object's colour over its pixels
COLOURS = np.array([(255, 64, 64), (64, 160, 255), (80, 220, 80), (255, 200, 40), (200, 80, 255), (40, 220, 220)],
                   dtype=np.float32)
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
SAM3_EFFICIENCY = 0.5  # of the matmul rate, an assumption (ViT matmuls dominate the FLOPs)
MODEL_FILES = ["*.json", "*.safetensors", "*.txt"]  # config, weights, tokenizer (vocab.json, merges.txt)


@dataclass(frozen=True)
class Prompt:
    """One object: ``kind`` text | point | box, its value (the words, (x, y)
    or (x0, y0, x1, y1) in source pixels), the frame it is given on."""

    kind: str
    value: object
    frame: int = 0
    name: str | None = None

    def describe(self) -> str:
        value = self.value if self.kind == "text" else ",".join(f"{v:g}" for v in self.value)
        return f"--{self.kind} {value!r}" + (f" on frame {self.frame}" if self.frame else "")


@dataclass
class MaskRequest:
    """A `mask` run: the video (``info.frames`` may be fewer than the
    file's), one prompt per object, the model (folder or hub id) and the
    hygiene, caption and text-detection threshold."""

    video: Path
    info: VideoInfo
    prompts: list[Prompt]
    model: str
    hygiene: Hygiene = field(default_factory=Hygiene)
    caption: str = ""
    threshold: float = 0.5


def check_prompts(prompts: Sequence[Prompt], info: VideoInfo) -> None:
    """Every prompt lies inside the frame, on a frame the clip has."""
    if not prompts:
        raise OmnimatteError("give at least one prompt (--text, --point or --box), one per object")
    w, h = info.size
    for p in prompts:
        if not 0 <= p.frame < info.frames:
            raise OmnimatteError(f"{p.describe()}: frame {p.frame} does not exist (the clip has {info.frames}: "
                                 f"0..{info.frames - 1})")
        if p.kind == "point" and not (0 <= p.value[0] < w and 0 <= p.value[1] < h):
            raise OmnimatteError(f"{p.describe()}: outside the {w}x{h} frame")
        if p.kind == "box":
            x0, y0, x1, y1 = p.value
            if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
                raise OmnimatteError(f"{p.describe()}: not a box inside the {w}x{h} frame "
                                     "(0 <= X0 < X1 <= width, 0 <= Y0 < Y1 <= height)")
        if p.kind == "text" and not str(p.value).strip():
            raise OmnimatteError("--text '': give a few words naming the object")


def object_names(prompts: Sequence[Prompt]) -> list[str]:
    """Mask folder names in prompt order: ``mask_00``, or ``mask_00_NAME``."""
    out = []
    for i, p in enumerate(prompts):
        if p.name is not None and not NAME.fullmatch(p.name):
            raise OmnimatteError(f"--name {p.name!r}: use letters, digits, '_' and '-'")
        out.append(f"mask_{i:02d}" + (f"_{p.name}" if p.name else ""))  # the index keeps them unique
    return out


def resolve_model(model: str) -> tuple[Path | None, dict]:
    """(local folder or None for a hub id not downloaded yet, config.json):
    the config is checked before any weight is read or downloaded."""
    path = Path(model)
    if path.exists():
        return path, read_sam3_config(path)
    if model.count("/") != 1 or model.startswith(("/", ".")):
        raise OmnimatteError(f"--model {model}: no such folder, and not a hub id (owner/name)")
    config = download_file(model, "config.json")
    return None, read_sam3_config(config.parent)


def model_folder(model: str) -> Path:
    path, _ = resolve_model(model)
    return path if path is not None else download_snapshot(model, MODEL_FILES)


# --- streaming the video through the predictor --------------------------------


class FrameWindow:
    """The predictor's view of the video: indexable frames, of which only the
    current window (and frame 0, whose shape the predictor reads) is held."""

    def __init__(self, video: Path, count: int):
        self.video, self.count, self._source = video, count, itertools.islice(iter_frames(video), count)
        self.first = None
        self._frames: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, t: int) -> np.ndarray:
        return self.first if t == 0 else self._frames[t]

    def load(self, start: int, stop: int) -> list[np.ndarray]:
        self._frames = {}
        for t in range(start, stop):
            frame = next(self._source, None)
            if frame is None:
                raise OmnimatteError(f"{self.video}: decoding stopped after {t} of the {self.count} frames its "
                                     f"container declares (re-export it, or pass --frames {t})")
            self._frames[t] = frame
        if start == 0:
            self.first = self._frames[0]
        return [self._frames[t] for t in range(start, stop)]


def add_prompts(predictor, prompts: Sequence[Prompt], size: tuple[int, int], cfg) -> list[int]:
    """Register each prompt with the predictor; its object ids, in order."""
    ids, grid, side = [], feature_grid(cfg), cfg.tracker_config.image_size
    for p in prompts:
        if p.kind == "text":
            ids.append(predictor.add_text_prompt(str(p.value), frame_idx=p.frame))
        elif p.kind == "point":
            pts = point_prompt(p.value[0], p.value[1], size, grid, side)
            ids.append(predictor.add_point_prompt(pts, np.ones(1, dtype=np.int32), frame_idx=p.frame))
        else:
            ids.append(predictor.add_box_prompt(box_prompt(p.value, size, side), frame_idx=p.frame))
    return ids


def to_source(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A predictor mask (0/1 at its own square size) as a bool mask of the
    source's (W, H): bilinear, cut at one half (smoother than nearest)."""
    m = np.asarray(mask, dtype=np.float32)[None]
    return resize_frames(m, size, "bilinear")[0] >= 0.5


def _frame_masks(result, ids: list[int], size: tuple[int, int]) -> list[np.ndarray | None]:
    """Per object (in prompt order) its source-size mask, or None where the
    predictor does not track it yet (before its prompt's frame)."""
    where = {o: k for k, o in enumerate(result.object_ids or [])}
    return [to_source(result.masks[where[i]], size) if i in where else None for i in ids]


def _check_found(prompt: Prompt, mask: np.ndarray, score: float, threshold: float) -> None:
    if not mask.any() or (prompt.kind == "text" and score < threshold):
        raise OmnimatteError(f"{prompt.describe()}: found nothing on frame {prompt.frame} "
                             f"(score {score:.2f}); nothing was written")


def track(model, processor, request: MaskRequest, report: Report = None,
          window: int = WINDOW) -> Iterator[tuple[np.ndarray, list[np.ndarray]]]:
    """Yield (source frame, one raw bool mask per object) for every frame:
    frames are decoded ``window`` at a time and predicted one by one, each
    frame's features dropped as soon as its masks are out."""
    info, prompts = request.info, request.prompts
    predictor = mlx_vlm_module("models.sam3.generate").Sam3VideoPredictor(model, processor, request.threshold)
    frames = FrameWindow(request.video, info.frames)
    predictor.set_video(frames)
    ids = add_prompts(predictor, prompts, info.size, model.config)
    empty = np.zeros((info.height, info.width), dtype=bool)
    with stage(report, f"segment {len(prompts)} object{'s' * (len(prompts) > 1)}", info.frames) as tick:
        for start in range(0, info.frames, window):
            for t, src in enumerate(frames.load(start, min(start + window, info.frames)), start):
                result = predictor.propagate(t, t + 1)[0]
                predictor._frame_features[t] = None  # the predictor's feature cache: one frame at a time
                masks = _frame_masks(result, ids, info.size)
                for p, m, i in zip(prompts, masks, ids):
                    if p.frame == t:
                        _check_found(p, m, float(result.scores[list(result.object_ids).index(i)]),
                                     request.threshold)
                yield src, [empty if m is None else m for m in masks]
                tick()


# --- the clip folder ----------------------------------------------------------


def preview_frame(frame: np.ndarray, masks: Sequence[np.ndarray]) -> np.ndarray:
    """The frame with each object's mask tinted in its own colour."""
    out = frame.astype(np.float32)
    for k, m in enumerate(masks):
        colour = COLOURS[k % len(COLOURS)]
        out[m] = (1 - TINT) * out[m] + TINT * colour
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def clean_stream(stream, objects: int, hygiene: Hygiene):
    """Spatial hygiene per frame, then the temporal majority (which delays
    its output by half its window): yields (frame, cleaned masks)."""
    votes = [MajorityWindow(1 if hygiene.raw else hygiene.majority) for _ in range(objects)]
    pending: list[np.ndarray] = []
    for frame, masks in stream:
        pending.append(frame)
        ready = [v.push(clean_frame(m, hygiene)) for v, m in zip(votes, masks)]
        for masks_out in zip(*ready):
            yield pending.pop(0), list(masks_out)
    for masks_out in zip(*[v.flush() for v in votes]):
        yield pending.pop(0), list(masks_out)


def copy_video(video: Path, info: VideoInfo, folder: Path, whole: bool):
    """The clip's ``input_video``: the source copied as it is when it is used
    whole, else None (its frames are then encoded as they stream)."""
    if video.is_dir():
        target = folder / VIDEO_STEM
        target.mkdir()
        for f in list_frame_files(video)[:info.frames]:
            shutil.copy2(f, target / f.name)
        return None
    if whole and video.suffix.lower() in VIDEO_SUFFIXES:
        shutil.copy2(video, folder / f"{VIDEO_STEM}{video.suffix.lower()}")
        return None
    return video_sink(folder / f"{VIDEO_STEM}.mp4", info.fps)


def disk_bytes(request: MaskRequest) -> int:
    """A generous bound on the clip folder: the video (copied, or encoded at
    H.264's visually lossless rates), 1 bit a pixel of PNG per mask frame
    (they compress far below it) and 2 bits a pixel of preview."""
    info = request.info
    pixels = info.frames * info.width * info.height
    video = request.video
    size = sum(f.stat().st_size for f in list_frame_files(video)) if video.is_dir() else video.stat().st_size
    return size + pixels // 4 + pixels * len(request.prompts) // 8 + pixels // 4


def write_mask_clip(out: Path, request: MaskRequest, stream, whole: bool, overwrite: bool = False) -> dict:
    """Write the clip folder from a stream of (frame, raw masks); returns the
    per-object counts of frames where the object is present."""
    names = object_names(request.prompts)
    present = np.zeros(len(names), dtype=np.int64)
    with atomic_output(out, overwrite, directory=True) as tmp:
        encoder = copy_video(request.video, request.info, tmp, whole)
        with ExitStack() as open_sinks:
            sinks = [open_sinks.enter_context(PngSink(tmp / n)) for n in names]
            preview = open_sinks.enter_context(video_sink(tmp / PREVIEW_FILE, request.info.fps))
            if encoder is not None:
                open_sinks.enter_context(encoder)
            for frame, masks in clean_stream(stream, len(names), request.hygiene):
                for k, m in enumerate(masks):
                    sinks[k].add(m.astype(np.uint8) * np.uint8(255))
                    present[k] += bool(m.any())
                preview.add(preview_frame(frame, masks))
                if encoder is not None:
                    encoder.add(frame)
        _check_present(request.prompts, present)
        (tmp / PROMPT_FILE).write_text(json.dumps({"bg": request.caption}) + "\n")
        (tmp / "masks.json").write_text(json.dumps(_record(request, names, present), indent=2) + "\n")
    return dict(zip(names, present.tolist()))


def _check_present(prompts: Sequence[Prompt], present: np.ndarray) -> None:
    for p, n in zip(prompts, present):
        if n == 0:
            raise OmnimatteError(f"{p.describe()}: nothing is left of the object after cleaning (try --raw); "
                                 "nothing was written")


def _record(request: MaskRequest, names: list[str], present: np.ndarray) -> dict:
    return {"model": request.model, "hygiene": asdict(request.hygiene),
            "objects": [{"mask": n, "prompt": p.kind, "value": p.value, "frame": p.frame, "frames_present": int(c)}
                        for n, p, c in zip(names, request.prompts, present)]}


def make_masks(out: Path, request: MaskRequest, whole: bool, overwrite: bool = False, report: Report = None) -> dict:
    """Load the model and write the clip folder."""
    folder = model_folder(request.model)
    with stage(report, "load SAM3", 1) as tick:
        model, processor = load_sam3(folder, text=any(p.kind == "text" for p in request.prompts))
        tick()
    stream = track(model, processor, request, report)
    return write_mask_clip(out, request, stream, whole, overwrite)


# --- the dry run's figures ------------------------------------------------------


PROBE_FRAMES = 3  # frame 0 (prompts, warm-up) untimed; frames 1, 2 track against banks of 1 and 2 memories
PROBE_MEMORIES = 1.5


def probe(folder: Path, request: MaskRequest, frames: int = PROBE_FRAMES) -> tuple[float, int]:
    """(seconds per frame, MLX peak bytes) of this model on the clip's first
    frames with its prompts (moved to frame 0): the first frame pays for
    set-up and is not timed; the later ones track against small banks."""
    model, processor = load_sam3(folder, text=any(p.kind == "text" for p in request.prompts))
    prompts = [Prompt(p.kind, p.value, 0, p.name) for p in request.prompts]
    short = MaskRequest(request.video, _first(request.info, frames), prompts, request.model, threshold=-1.0)
    mx.reset_peak_memory()
    stream = track(model, processor, short)
    next(stream)
    start = time.perf_counter()
    n = sum(1 for _ in stream)
    return (time.perf_counter() - start) / max(n, 1), int(mx.get_peak_memory())


def _first(info: VideoInfo, frames: int) -> VideoInfo:
    return replace(info, frames=min(frames, info.frames))


def released_config():
    """The released SAM3's config: mlx-vlm's defaults are facebook/sam3's."""
    return model_config({})


def _figure_line(label: str, f, dtype_bytes: int, objects: int) -> str:
    dtype = {2: "16-bit", 4: "float32", 1: "8-bit"}.get(dtype_bytes, f"{dtype_bytes}-byte")
    return (f"{label}: {f.params / 1e6:.2f} M parameters x {dtype} = {format_bytes(f.weight_bytes)} of weights; "
            f"per frame at its {f.resolution}x{f.resolution} input: activations {format_bytes(f.activation_bytes)}, "
            f"held {format_bytes(f.held_bytes)} (a frame's features, {objects} object memory bank"
            f"{'s' * (objects > 1)}), "
            f"peak ~{format_bytes(f.peak_bytes)}, {f.flops / 1e12:.3g} TFLOP")


def dry_run_lines(request: MaskRequest, folder: Path | None, cfg: dict, rates=None) -> list[str]:
    """The plan: what runs, this model's figures (measured on the clip's
    first frames when the model is on disk), and the released SAM3's."""
    info, objects = request.info, len(request.prompts)
    lines = [f"mask: {objects} object{'s' * (objects > 1)} over {info.frames} frames of {info.width}x{info.height}, "
             f"decoded {WINDOW} frames at a time, predicted one by one"]
    dtype_bytes, fused = weight_dtype_bytes(folder) if folder else 2, fused_attention()
    mine = sam3_figures(model_config(cfg), dtype_bytes, objects, fused=fused)
    lines.append(_figure_line(f"model {request.model} (predicted)", mine, dtype_bytes, objects))
    if folder is not None:
        seconds, peak = probe(folder, request)
        small = sam3_figures(model_config(cfg), dtype_bytes, objects, 1, mine.params, fused, PROBE_MEMORIES)
        full = seconds * mine.flops / small.flops  # a full bank costs more: scaled by the FLOPs
        lines.append(f"model {request.model} (measured here on frames 1-{PROBE_FRAMES - 1}, banks of 1-2 memories): "
                     f"{seconds:.2f} s per frame, MLX peak {format_bytes(peak)}; with full banks ~{full:.2f} s per "
                     f"frame, the whole clip ~{format_seconds(full * info.frames)}")
    else:
        lines.append(f"model {request.model}: not on disk yet (the run downloads it); not measured")
    released = sam3_figures(released_config(), 2, objects, params=RELEASED_PARAMS, fused=fused)
    lines.append(_figure_line("released SAM3 (facebook/sam3, bfloat16)", released, 2, objects))
    if rates is not None:
        # frames enter as float32, so bfloat16 weights still multiply at the float32 rate
        per_frame = released.flops / (rates.flops("float32") * SAM3_EFFICIENCY)
        lines.append(f"released SAM3 on this machine: ~{per_frame:.1f} s per frame at its float32 matmul rate, "
                     f"~{format_seconds(per_frame * info.frames)} for the clip (an estimate)")
    return lines

"""SAM3 (Segment Anything 3) through mlx-vlm: loading a model folder, the
prompt coordinates its video predictor takes, and the model's size and
per-frame activations, from its config alone.

mlx-vlm (the optional extra ``masks``) holds the network and its video
predictor; it is imported only when a mask is made, so the rest of the
package never needs it. Facts of mlx-vlm 0.7 that the code below relies on:

* a model folder is ``config.json`` with ``model_type: sam3_video`` plus
  ``*.safetensors`` (facebook/sam3's own files, or mlx-vlm's conversion of
  them), loaded by ``mlx_vlm.utils.load_model``;
* every frame is resized (stretched) to ``image_size`` squared (1008) and
  the predictor's masks come back at ``low_res_mask_size`` squared (288);
* the tracker's prompt encoder takes points in cells of the backbone's
  feature grid (``image_size / patch_size`` = 72 cells a side, shifted by
  half a cell) and boxes as ``x0, y0, x1, y1`` fractions of the frame, where
  the reference (transformers' Sam3Tracker) takes pixels of the 1008 input
  shifted by half a pixel: the conversions below give the reference's
  normalized coordinates (parity/test_sam3_prompts_parity.py). Unlike the
  reference, mlx-vlm adds no padding token after points alone or a box;
* text prompts are tokenized with the CLIP tokenizer; mlx-vlm fetches it
  from the hub unless one is set, so a folder's own tokenizer files are used
  (offline use).
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import OmnimatteError
from ..jsonfile import read_json

MODEL_TYPE = "sam3_video"
INSTALL = 'masks need mlx-vlm: pip install "mlx-omnimatte[masks]" (or pip install "mlx-vlm>=0.7")'
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
RELEASED_PARAMS = 859_922_360  # count_params of the released config (tests/test_mask.py checks it)
FLOAT32 = 4  # activations: frames enter as float32, so the matmuls run in float32


def mlx_vlm_module(name: str):
    """``mlx_vlm.<name>``, or the one line saying what to install."""
    try:
        return importlib.import_module(f"mlx_vlm.{name}")
    except ImportError:
        raise OmnimatteError(INSTALL) from None


def read_sam3_config(folder: Path) -> dict:
    """The config.json of a SAM3 model folder; anything else is refused."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise OmnimatteError(f"{folder}: not a SAM3 model folder (no config.json)")
    cfg = read_json(path)
    kind = cfg.get("model_type")
    if kind != MODEL_TYPE:
        raise OmnimatteError(f"{folder}: not a SAM3 video model (config.json model_type is {kind!r}, "
                             f"expected {MODEL_TYPE!r})")
    return cfg


def model_config(cfg: dict):
    """mlx-vlm's ModelConfig of a config dict."""
    return mlx_vlm_module("models.sam3").ModelConfig.from_dict(cfg)


def has_tokenizer(folder: Path) -> bool:
    return any((Path(folder) / f).is_file() for f in TOKENIZER_FILES)


def load_sam3(folder: Path, text: bool = False):
    """(model, processor) of a SAM3 folder; with ``text`` the folder's own
    CLIP tokenizer is attached (mlx-vlm would otherwise download one)."""
    folder = Path(folder)
    read_sam3_config(folder)
    if text and not has_tokenizer(folder):
        raise OmnimatteError(f"{folder}: --text needs the model's CLIP tokenizer ({' or '.join(TOKENIZER_FILES)}) "
                             "in the folder")
    model = mlx_vlm_module("utils").load_model(folder)
    processor = mlx_vlm_module("models.sam3.processing_sam3").Sam3Processor.from_pretrained(str(folder))
    if text:
        from_pretrained = importlib.import_module("transformers").CLIPTokenizer.from_pretrained
        processor._tokenizer = from_pretrained(str(folder))  # the processor's own tokenizer cache
    return model, processor


def feature_grid(cfg) -> int:
    """Cells a side of the tracker's feature grid (72 for SAM3)."""
    t = cfg.tracker_config
    return t.image_size // t.vision_config.backbone_config.patch_size


def _unit(v: float, extent: int, image_size: int) -> float:
    """A source coordinate as the reference's prompt encoder normalizes it:
    rescaled to the square model input, shifted half a pixel, over its side
    (transformers' Sam3Tracker processor and prompt encoder)."""
    return v / extent + 0.5 / image_size


def point_prompt(x: float, y: float, size: tuple[int, int], grid: int, image_size: int) -> np.ndarray:
    """A frame pixel (x, y) of a ``size`` = (W, H) frame as mlx-vlm's point:
    the reference's normalized coordinate in feature cells, less the half
    cell its encoder adds back."""
    w, h = size
    return np.array([[_unit(x, w, image_size) * grid - 0.5, _unit(y, h, image_size) * grid - 0.5]],
                    dtype=np.float32)


def box_prompt(box: tuple[float, float, float, float], size: tuple[int, int], image_size: int) -> np.ndarray:
    """A frame box (x0, y0, x1, y1) in pixels as mlx-vlm's box: the
    reference's normalized corners (its encoder adds no shift to boxes)."""
    w, h = size
    x0, y0, x1, y1 = box
    return np.array([_unit(x0, w, image_size), _unit(y0, h, image_size), _unit(x1, w, image_size),
                     _unit(y1, h, image_size)], dtype=np.float32)


# --- size and activations ----------------------------------------------------


@dataclass(frozen=True)
class Sam3Figures:
    """What one SAM3 config costs: its parameters, the bytes its weights take
    in their dtype, and per frame the activation peak and FLOPs at its input
    resolution."""

    params: int
    weight_bytes: int
    activation_bytes: int
    held_bytes: int  # the features of ``window`` frames, every object's memory bank, the neck's outputs
    flops: float
    resolution: int

    @property
    def peak_bytes(self) -> int:
        return self.weight_bytes + self.held_bytes + self.activation_bytes


def count_params(cfg) -> int:
    """Parameters of mlx-vlm's SAM3 for a ModelConfig (built lazily: nothing
    is allocated)."""
    tree_flatten = importlib.import_module("mlx.utils").tree_flatten
    model = mlx_vlm_module("models.sam3").Model(cfg)
    return int(sum(v.size for _, v in tree_flatten(model.parameters())))


def _vit(cfg, fused: bool) -> tuple[float, int]:
    """(FLOPs, activation peak in float32 elements) of the ViT backbone;
    ``fused``: SDPA holds no score matrix (``memory.fused_attention``)."""
    b = cfg.detector_config.vision_config.backbone_config
    n, c, i = (b.image_size // b.patch_size) ** 2, b.hidden_size, b.intermediate_size
    win = b.window_size ** 2
    glob = len(b.global_attn_indexes)
    dense = b.num_hidden_layers * 2 * n * (4 * c * c + 2 * c * i)
    attention = 4 * n * c * (glob * n + (b.num_hidden_layers - glob) * win)
    peak = n * (6 * c + i) + (0 if fused else b.num_attention_heads * n * n)  # a global layer's scores
    return dense + attention + 2 * n * 3 * b.patch_size ** 2 * c, peak


def _neck(cfg, d: int) -> tuple[float, int]:
    """(FLOPs, output elements) of one FPN neck: upsampled levels x4, x2,
    x1, x0.5 of the ViT grid, each projected to ``d`` channels (1x1, 3x3)."""
    b = cfg.detector_config.vision_config.backbone_config
    n, c = (b.image_size // b.patch_size) ** 2, b.hidden_size
    levels = 16 + 4 + 1 + 0.25
    upsample = 2 * n * (16 * c // 2 * c // 4 + 4 * c * c // 2 + 4 * c * c // 2)
    return upsample + 2 * n * levels * (c * d + 9 * d * d), int(n * levels * d)


def _memory_attention(cfg, objects: int, fused: bool, memories: float | None) -> tuple[float, int, int]:
    """(FLOPs, peak elements, memory-bank elements) of the tracker's memory
    attention for ``objects`` against a bank of ``memories`` frames (None:
    full, ``num_maskmem``)."""
    t = cfg.tracker_config
    n, d = feature_grid(cfg) ** 2, t.memory_attention_hidden_size
    m = int((t.num_maskmem if memories is None else memories) * n)
    per_layer = 2 * n * (4 * d * d + 2 * d * t.memory_attention_feed_forward_hidden_size) + 4 * n * (n + m) * d
    peak = (0 if fused else t.memory_attention_num_attention_heads * n * m) + n * 8 * d
    bank = objects * m * t.memory_encoder_output_channels
    return objects * t.memory_attention_num_layers * per_layer, peak, bank


def sam3_figures(cfg, dtype_bytes: int, objects: int = 1, window: int = 1, params: int | None = None,
                 fused: bool = False, memories: float | None = None) -> Sam3Figures:
    """Size and per-frame cost of a SAM3 ModelConfig with weights of
    ``dtype_bytes``, tracking ``objects`` over frames read ``window`` at a
    time against banks of ``memories`` frames (None: full); ``fused``:
    attention scores are never held (Metal)."""
    params = count_params(cfg) if params is None else params
    b = cfg.detector_config.vision_config.backbone_config
    n = (b.image_size // b.patch_size) ** 2
    vit_flops, vit_peak = _vit(cfg, fused)
    neck_flops, neck_out = _neck(cfg, cfg.tracker_config.vision_config.fpn_hidden_size)
    mem_flops, mem_peak, bank = _memory_attention(cfg, objects, fused, memories)
    held = FLOAT32 * (window * n * b.hidden_size + bank + neck_out)
    return Sam3Figures(params, params * dtype_bytes, FLOAT32 * max(vit_peak, mem_peak), held,
                       vit_flops + neck_flops + mem_flops, b.image_size)


def weight_dtype_bytes(folder: Path) -> int:
    """Bytes per parameter of a folder's safetensors (their header's first
    floating dtype; 4 when the folder has none yet)."""
    sizes = {"F32": 4, "BF16": 2, "F16": 2}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        for v in header.values():
            if isinstance(v, dict) and v.get("dtype") in sizes:
                return sizes[v["dtype"]]
    return 4

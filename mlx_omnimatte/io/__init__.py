"""Inputs and outputs: videos, masks, clip folders, the model grid, layer
writers and previews (numpy + PyAV + Pillow; no MLX)."""

from .grid import GridPlan, from_model_grid, masks_to_model_grid, plan_grid, to_model_grid
from .inputs import Clip, load_clip, load_clip_folder
from .masks import build_trimask, prepare_mask
from .video import VideoInfo, probe_video, read_rgba, read_video

__all__ = [
    "Clip", "GridPlan", "VideoInfo", "build_trimask", "from_model_grid", "load_clip",
    "load_clip_folder", "masks_to_model_grid", "plan_grid", "prepare_mask", "probe_video",
    "read_rgba", "read_video", "to_model_grid",
]

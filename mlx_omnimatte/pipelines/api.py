"""The Python API, mirroring the command line; returns arrays.

    import mlx_omnimatte as mo
    layers = mo.decompose("clips/boys-beach", bundle="models/omnimatte-1.3b")
    layers["00"].alpha        # float32 [T, H, W] in [0, 1]
    bgs = mo.remove("clip.mp4", masks=["person.mp4"], bundle="models/casper-1.3b",
                    caption="a beach")
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from ..branch.experts import check_tau
from ..bundle import COMPONENTS, open_bundle
from ..errors import OmnimatteError
from ..io.inputs import Clip, load_clip, load_clip_folder
from ..progress import Progress
from .omnimatte import Layers, experts_needed, run_decompose
from .removal import run_removal
from .stages import Settings


def read_clip(video, masks=None, caption: str | None = None, fps: float | None = None) -> Clip:
    """A clip folder in the Generative Omnimatte layout, or a video (file or
    frame folder) with explicit mask paths."""
    if isinstance(video, Clip):
        return video
    video = Path(video)
    if not video.exists():
        raise OmnimatteError(f"{video}: no such file or directory")
    if not masks:
        if video.is_dir() and not (video / "00000.png").exists():
            return load_clip_folder(video, fps=fps, caption=caption)
        raise OmnimatteError(f"{video}: give at least one object mask (--mask)")
    return load_clip(video, masks, caption=caption, fps=fps)


def settings_from(**kwargs) -> Settings:
    known = {f.name for f in fields(Settings)}
    unknown = set(kwargs) - known
    if unknown:
        raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")
    settings = Settings(**{k: v for k, v in kwargs.items() if v is not None})
    if settings.tau is not None:
        check_tau(settings.tau)
    return settings


def remove(video, masks=None, *, bundle, caption=None, progress: bool = False, **settings) -> dict:
    """label ("all", "without_<name>") -> background float32 [T, H, W, 3] in [0, 1]."""
    s = settings_from(**settings)
    b = open_bundle(bundle, COMPONENTS)
    return run_removal(read_clip(video, masks, caption), b, s, Progress(enabled=progress))


def decompose(video, masks=None, *, bundle, caption=None, progress: bool = False, **settings) -> dict[str, Layers]:
    """object name -> Layers(alpha, foreground, background), on the source grid."""
    s = settings_from(**settings)
    b = open_bundle(bundle, COMPONENTS, experts_needed(s.tau))
    return run_decompose(read_clip(video, masks, caption), b, s, Progress(enabled=progress))

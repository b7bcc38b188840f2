"""mlx-omnimatte: video layer decomposition (omnimatte) with MLX.

Python API:
    load_model(path)            a converted component directory -> MLX module
    remove(clip, bundle, ...)   the clean background (Casper removal)
    decompose(clip, bundle, ...) per object alpha, foreground and background
"""

from .errors import OmnimatteError
from .weights import load_model

__version__ = "0.1.0"


def __getattr__(name):
    # the pipelines pull in every model; import them only when asked for
    if name in ("remove", "decompose"):
        from .pipelines import api

        return getattr(api, name)
    raise AttributeError(name)


__all__ = ["OmnimatteError", "load_model", "remove", "decompose"]

"""Parity of `mask`'s prompt coordinates: a click and a box in source pixels,
converted by `models.sam3` and embedded by mlx-vlm's SAM3 prompt encoder,
against transformers' Sam3Tracker (the processor's rescaling to the 1008
input, then its prompt encoder) with the same weights, fp32, at the released
width (256). The reference appends a padding token (not-a-point) after
points alone and after a box; mlx-vlm does not, so the prompts' own tokens
are compared."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("mlx_vlm", reason='the masks extra (mlx-vlm) is not installed: pip install -e ".[masks]"')

import mlx.core as mx  # noqa: E402
from mlx_vlm.models.sam3.config import PromptEncoderConfig  # noqa: E402
from mlx_vlm.models.sam3.sam_components import SAMPromptEncoder  # noqa: E402
from transformers.models.sam3_tracker.configuration_sam3_tracker import Sam3TrackerPromptEncoderConfig  # noqa: E402
from transformers.models.sam3_tracker.modeling_sam3_tracker import Sam3TrackerPromptEncoder  # noqa: E402

from helpers import rel_err  # noqa: E402
from mlx_omnimatte.models.sam3 import box_prompt, point_prompt  # noqa: E402

pytestmark = pytest.mark.torch
TOL = 1e-5
SIZE = (640, 384)  # source (W, H)
SIDE, PATCH = 1008, 14


@pytest.fixture(scope="module")
def encoders():
    torch.manual_seed(0)
    ref = Sam3TrackerPromptEncoder(Sam3TrackerPromptEncoderConfig()).eval()
    with torch.no_grad():
        ref.shared_embedding.positional_embedding.normal_()
        ref.point_embed.weight.normal_()
        ref.not_a_point_embed.weight.normal_()
    mine = SAMPromptEncoder(PromptEncoderConfig())
    mine.shared_embedding.positional_embedding = mx.array(ref.shared_embedding.positional_embedding.numpy())
    mine.point_embed.weight = mx.array(ref.point_embed.weight.detach().numpy())
    mine.not_a_point_embed.weight = mx.array(ref.not_a_point_embed.weight.detach().numpy())
    return ref, mine


def _rescaled(xy: np.ndarray) -> torch.Tensor:
    """The reference processor: source pixels -> pixels of the square input."""
    scale = np.array([SIDE / SIZE[0], SIDE / SIZE[1]] * (xy.shape[-1] // 2), dtype=np.float32)
    return torch.from_numpy((xy * scale).astype(np.float32))


@pytest.mark.parametrize("x,y", [(0, 0), (320, 200), (639, 383), (17.25, 301.5)])
def test_point(encoders, x, y):
    ref, mine = encoders
    with torch.no_grad():
        sparse, _ = ref(_rescaled(np.array([[[[x, y]]]], np.float32)), torch.ones(1, 1, 1, dtype=torch.long),
                        None, None)
    got, _ = mine(points=(mx.array(point_prompt(x, y, SIZE, SIDE // PATCH, SIDE))[None], mx.ones((1, 1))))
    assert sparse.shape[2] == 2  # the point and the reference's padding token
    assert rel_err(np.array(got[0, 0]), sparse[0, 0, 0].numpy()) < TOL


@pytest.mark.parametrize("box", [(0, 0, 640, 384), (100, 80, 300, 360), (12.5, 7, 13.5, 9)])
def test_box(encoders, box):
    ref, mine = encoders
    with torch.no_grad():
        sparse, _ = ref(None, None, _rescaled(np.array([[box]], np.float32)), None)
    got, _ = mine(boxes=mx.array(box_prompt(box, SIZE, SIDE))[None, None])
    assert sparse.shape[2] == 3  # two corners and the reference's padding token
    assert rel_err(np.array(got[0, :2]), sparse[0, 0, :2].numpy()) < TOL

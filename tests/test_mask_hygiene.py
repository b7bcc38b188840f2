"""Mask hygiene (`io.hygiene`) on constructed masks with exact expected
outputs, the prompt coordinates SAM3's predictor takes, and the parsing of
`mask`'s prompts. None of this needs mlx-vlm."""

from __future__ import annotations

import numpy as np
import pytest

from mlx_omnimatte.cli.mask import gather_prompts, parse_at
from mlx_omnimatte.errors import OmnimatteError
from mlx_omnimatte.io.hygiene import (Hygiene, MajorityWindow, clean_frame, drop_specks, erode_mask, fill_holes,
                                      temporal_majority)
from mlx_omnimatte.models.sam3 import box_prompt, point_prompt
from mlx_omnimatte.pipelines.masking import Prompt, clean_stream, object_names, preview_frame, to_source


def grid(rows: str) -> np.ndarray:
    """A bool mask from lines of '#' (on) and '.' (off)."""
    return np.array([[c == "#" for c in r] for r in rows.split()], dtype=bool)


def test_fill_holes_fills_small_enclosed_holes_only():
    m = grid("""
        ........
        .#####..
        .#.#.#..
        .#####..
        .#...#..
        .#...#..
        .#####..
        ........""")
    # the two 1-pixel holes are filled; the 6-pixel hole too at max_area 6, not at 5
    assert (fill_holes(m, 1) == grid("""
        ........
        .#####..
        .#####..
        .#####..
        .#...#..
        .#...#..
        .#####..
        ........""")).all()
    assert fill_holes(m, 5).sum() == m.sum() + 2
    assert fill_holes(m, 6).sum() == m.sum() + 2 + 6


def test_fill_holes_leaves_background_touching_the_border():
    m = grid("""
        ##.##
        #...#
        #####""")
    assert (fill_holes(m, 100) == m).all()  # the gap at the top opens the "hole" to the border


def test_drop_specks_counts_diagonal_neighbours_as_one_component():
    m = grid("""
        #.....
        ......
        ...#..
        ....#.
        .###..
        .###..""")
    assert (drop_specks(m, 2) == grid("""
        ......
        ......
        ...#..
        ....#.
        .###..
        .###..""")).all()  # the lone pixel goes; the diagonal pair joins the block
    assert drop_specks(m, 8).sum() == 8 and drop_specks(m, 9).sum() == 0  # block + pair: one component of 8


def test_erode_keeps_edges_on_the_frame_border():
    m = np.zeros((7, 7), dtype=bool)
    m[1:6, 1:6] = True
    expect = np.zeros_like(m)
    expect[2:5, 2:5] = True
    assert (erode_mask(m, 3) == expect).all()
    edge = np.zeros((5, 5), dtype=bool)
    edge[:, :3] = True  # cut by the left border
    assert (erode_mask(edge, 3) == np.pad(np.ones((5, 2), bool), ((0, 0), (0, 3)))).all()
    assert (erode_mask(m, 1) == m).all()


def test_clean_frame_order_and_raw():
    m = np.zeros((40, 40), dtype=bool)
    m[10:30, 10:30] = True
    m[19, 19] = False  # a hole
    m[2, 2] = True  # a speck
    h = Hygiene(dilate=3, erode=0, speck_fraction=2 / 1600, hole_fraction=2 / 1600)
    expect = np.zeros_like(m)
    expect[9:31, 9:31] = True  # hole filled, speck dropped, grown by one pixel each side
    assert (clean_frame(m, h) == expect).all()
    assert (clean_frame(m, Hygiene(raw=True, dilate=3)) == m).all()


def test_temporal_majority_removes_flicker():
    on, off = np.ones((1, 1), bool), np.zeros((1, 1), bool)
    assert temporal_majority([on, off, on], 1).all()  # a one-frame drop-out is filled
    assert not temporal_majority([off, on, off], 1).any()  # a one-frame blip is removed
    # at the clip's ends two frames vote: a tie keeps the frame's own value
    assert temporal_majority([on, off], 0).all() and not temporal_majority([on, off], 1).any()


def test_majority_window_streams_the_same_votes():
    rng = np.random.default_rng(0)
    frames = rng.random((11, 4, 5)) > 0.5
    w = MajorityWindow(3)
    out = [m for f in frames for m in w.push(f)] + w.flush()
    want = [temporal_majority(frames[max(t - 1, 0):t + 2], min(t, 1)) for t in range(11)]
    assert len(out) == 11 and all((a == b).all() for a, b in zip(out, want))
    assert len(w.frames) == 3  # it never holds more than its window
    with pytest.raises(ValueError):
        MajorityWindow(4)


def test_clean_stream_keeps_frames_and_masks_paired():
    frames = [np.full((2, 2, 3), t, np.uint8) for t in range(5)]
    masks = [[np.full((2, 2), t % 2 == 0)] for t in range(5)]  # on, off, on, off, on
    out = list(clean_stream(zip(frames, masks), 1, Hygiene(speck_fraction=0, hole_fraction=0)))
    assert [int(f[0, 0, 0]) for f, _ in out] == [0, 1, 2, 3, 4]
    # votes: (0,1) tie -> frame 0's on, (0,1,2) on, (1,2,3) off, (2,3,4) on, (3,4) tie -> frame 4's on
    assert [bool(m[0][0, 0]) for _, m in out] == [True, True, False, True, True]
    raw = list(clean_stream(zip(frames, masks), 1, Hygiene(raw=True)))
    assert [bool(m[0][0, 0]) for _, m in raw] == [True, False, True, False, True]


def test_prompt_coordinates():
    # the reference: x * 1008 / W + 0.5, over 1008; mlx-vlm's point encoder adds half a cell and divides by 72
    h = 0.5 / 1008
    p = point_prompt(320, 192, (640, 384), 72, 1008)
    assert p.shape == (1, 2) and np.allclose((p + 0.5) / 72, [[0.5 + h, 0.5 + h]])
    assert np.allclose(point_prompt(0, 0, (640, 384), 72, 1008), [[h * 72 - 0.5, h * 72 - 0.5]])
    assert np.allclose(box_prompt((64, 96, 320, 384), (640, 384), 1008), [0.1 + h, 0.25 + h, 0.5 + h, 1.0 + h])


def test_to_source_and_preview():
    small = np.zeros((4, 4), np.uint8)
    small[:2, :2] = 1
    m = to_source(small, (8, 6))
    assert m.shape == (6, 8) and m[:3, :4].all() and not m[3:, :].any() and not m[:, 4:].any()
    frame = np.zeros((2, 2, 3), np.uint8)
    out = preview_frame(frame, [np.array([[True, False], [False, False]])])
    assert out[0, 0].tolist() == [128, 32, 32] and out[1, 1].tolist() == [0, 0, 0]


def test_prompt_parsing_and_names():
    assert parse_at("320,200", "--point", 2) == ((320.0, 200.0), 0)
    assert parse_at(" 1.5, 2 @7", "--point", 2) == ((1.5, 2.0), 7)
    assert parse_at("1,2,30,40@3", "--box", 4) == ((1.0, 2.0, 30.0, 40.0), 3)
    with pytest.raises(OmnimatteError, match="expected X,Y"):
        parse_at("320", "--point", 2)
    ps = gather_prompts(["a dog "], ["1,2"], ["1,2,3,4@1"], ["dog", "ball", "toy"])
    assert [(p.kind, p.frame, p.name) for p in ps] == [("text", 0, "dog"), ("point", 0, "ball"), ("box", 1, "toy")]
    assert ps[0].value == "a dog"
    assert object_names(ps) == ["mask_00_dog", "mask_01_ball", "mask_02_toy"]
    assert object_names([Prompt("text", "x")]) == ["mask_00"]
    with pytest.raises(OmnimatteError, match="2 names for 1 objects"):
        gather_prompts(["a"], [], [], ["x", "y"])
    with pytest.raises(OmnimatteError, match="--name 'a b'"):
        object_names([Prompt("text", "x", name="a b")])

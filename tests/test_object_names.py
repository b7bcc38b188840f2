"""Object output folders are named as the README says: object_NN for a clip
folder's mask_NN, object_NAME for --mask NAME=PATH, else the mask file's name
without its extension."""

from __future__ import annotations

import shutil

import pytest

from mlx_omnimatte.synth import make_clip, write_clip
from helpers import run_cli


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("names") / "clip"
    write_clip(make_clip(seed=3, frames=5, size=(64, 48)), folder)
    return folder


def test_object_folders_are_named_as_the_readme_says(clip, tmp_path, capsys):
    masks = tmp_path / "masks"
    shutil.copytree(clip / "mask_00", masks / "car")
    shutil.copytree(clip / "mask_00", masks / "mask")
    runs = {"folder": ([clip], ["object_00"]),
            "stems": ([clip / "input_video", "--mask", masks / "car", "--mask", masks / "mask_00"],
                      ["object_00", "object_car"]),
            "named": ([clip / "input_video", "--mask", f"dog={masks / 'mask'}"], ["object_dog"])}
    shutil.copytree(clip / "mask_00", masks / "mask_00")
    for name, (given, objects) in runs.items():
        out = tmp_path / name
        code, _, err = run_cli(["decompose", *given, "--clean-plate", clip / "truth" / "background", "-o", out,
                                "-q", "--no-preview"], capsys)
        assert code == 0, err
        assert sorted(p.name for p in out.iterdir() if p.name.startswith("object_")) == objects, name

"""Every JSON file the tool reads goes through one reader: missing,
unreadable, not JSON or not an object is one line naming the file."""

from __future__ import annotations

import pytest

from mlx_omnimatte.bundle import open_bundle
from mlx_omnimatte.errors import OmnimatteError
from mlx_omnimatte.io.inputs import read_caption
from mlx_omnimatte.io.truth import read_truth
from mlx_omnimatte.jsonfile import parse_json, read_json
from mlx_omnimatte.weights import read_config


@pytest.mark.parametrize("text,pattern", [
    ("{\"a\": 1,", r"x\.json: not valid JSON \(Expecting property name enclosed in double quotes: line 1"),
    ("[1, 2]", r"x\.json: must be a JSON object, not list"),
    (b"\xff\xfe{", r"x\.json: not valid JSON \("),
])
def test_read_json_refuses_in_one_line(tmp_path, text, pattern):
    path = tmp_path / "x.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(OmnimatteError, match=pattern) as e:
        read_json(path)
    assert "\n" not in str(e.value)


def test_read_json_reads_objects_and_names_missing_files(tmp_path):
    (tmp_path / "ok.json").write_text('{"bg": "a wall", "n": [1, 2]}')
    assert read_json(tmp_path / "ok.json") == {"bg": "a wall", "n": [1, 2]}
    with pytest.raises(OmnimatteError, match=r"nope\.json: not readable \(No such file or directory\)"):
        read_json(tmp_path / "nope.json")
    assert parse_json('{"r": 8}', "metadata") == {"r": 8}
    with pytest.raises(OmnimatteError, match="metadata: must be a JSON object, not str"):
        parse_json('"r"', "metadata")


def _broken(folder, name):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("[\"not\", \"an object\"]")
    return folder


@pytest.mark.parametrize("reader,name", [
    (lambda p: open_bundle(p), "manifest.json"),
    (lambda p: read_config(p), "config.json"),
    (lambda p: read_caption(p / "prompt.json"), "prompt.json"),
    (lambda p: read_truth(p.parent), "meta.json"),
])
def test_each_reader_uses_it(tmp_path, reader, name):
    folder = _broken(tmp_path / "clip" / "truth", name)
    with pytest.raises(OmnimatteError, match=rf"{name}: must be a JSON object, not list"):
        reader(folder)

"""`convert HUB_ID --transformer F --expert KIND=F` checks the user's own
files before anything is downloaded (at most the base's config.json when
its width is not known), and every hub error is one sentence. The hub
client's download functions are stubbed: each call is recorded, and one
that a test did not expect fails it."""

from __future__ import annotations

import json
import os
import struct
from types import SimpleNamespace

import huggingface_hub
import pytest
from safetensors.numpy import save_file

from helpers import assert_refused
from mlx_omnimatte.convert import hub as convert_hub
from tiny_models import DIT, dit_state, lora_state

hub_errors = pytest.importorskip("huggingface_hub.errors")

KNOWN = "alibaba-pai/Wan2.1-Fun-1.3B-InP"  # width known without any download (1536)
UNKNOWN = "someone/tiny-fun"  # width only from its config.json
RAW = "RAW-LIBRARY-TEXT"  # in every stubbed error's own message: must not reach the user


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("prechecks")
    paths = SimpleNamespace(casper=root / "casper.safetensors", effect=root / "effect.safetensors",
                            narrow=root / "narrow_effect.safetensors")
    save_file(dit_state(7), str(paths.casper))
    save_file(lora_state(11, [DIT["num_layers"] - 1]), str(paths.effect))
    save_file(lora_state(11, [DIT["num_layers"] - 1], dim=128), str(paths.narrow))
    for name, dim in (("config", DIT["dim"]), ("wide_config", 2 * DIT["dim"])):
        (root / name).mkdir()
        arch = {k: DIT[k] for k in ("num_heads", "num_layers", "in_dim", "ffn_dim", "out_dim")}
        (root / name / "config.json").write_text(json.dumps({"_class_name": "WanModel", **arch, "dim": dim}))
        setattr(paths, name, root / name / "config.json")
    return paths


@pytest.fixture
def hub(monkeypatch):
    """`answers[name]`: the path a download returns or the error it raises."""
    calls, answers = [], {}

    def stub(name):
        def download(*args, **kwargs):
            calls.append(name)
            answer = answers.get(name, AssertionError(f"{name} must not be called"))
            if isinstance(answer, BaseException):
                raise answer
            return str(answer)

        return download

    for name in ("snapshot_download", "hf_hub_download"):
        monkeypatch.setattr(huggingface_hub, name, stub(name))
    return SimpleNamespace(calls=calls, answers=answers)


def refused(capsys, tmp_path, args, match):
    out = tmp_path / "bundle"
    assert_refused(["convert", *args, "-o", out], capsys, match, out)


# --------------------------------------------------------------------------- the user's files


def test_missing_transformer_file(hub, tmp_path, capsys):
    missing = tmp_path / "nope.safetensors"
    refused(capsys, tmp_path, [KNOWN, "--transformer", missing], f"--transformer: {missing}: no such file")
    assert hub.calls == []


@pytest.mark.parametrize("content", [b"not a safetensors file at all",
                                     struct.pack("<Q", 10_000) + b'{"blocks.0.x": '],
                         ids=["garbage", "truncated-header"])
def test_corrupt_header(hub, tmp_path, capsys, content):
    bad = tmp_path / "casper.safetensors"
    bad.write_bytes(content)
    refused(capsys, tmp_path, [KNOWN, "--transformer", bad], "not a safetensors file, or truncated or corrupt")
    assert hub.calls == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(hub, files, tmp_path, capsys):
    locked = tmp_path / "locked.safetensors"
    locked.write_bytes(files.casper.read_bytes())
    locked.chmod(0)
    refused(capsys, tmp_path, [KNOWN, "--transformer", locked], f"--transformer: {locked}")
    assert hub.calls == []


def test_transformer_given_as_expert(hub, files, tmp_path, capsys):
    refused(capsys, tmp_path, [KNOWN, "--expert", f"effect={files.casper}"],
            f"--expert effect: {files.casper}: not a LoRA file (it looks like a transformer checkpoint)")
    assert hub.calls == []


def test_expert_given_as_transformer(hub, files, tmp_path, capsys):
    refused(capsys, tmp_path, [KNOWN, "--transformer", files.effect], "not a transformer checkpoint")
    assert hub.calls == []


def test_transformer_of_another_width(hub, files, tmp_path, capsys):
    refused(capsys, tmp_path, [KNOWN, "--transformer", files.casper],
            f"width {DIT['dim']}, but the transformer of {KNOWN} has 1536")
    assert hub.calls == []


def test_width_checked_right_after_the_config(hub, files, tmp_path, capsys):
    hub.answers["hf_hub_download"] = files.wide_config
    refused(capsys, tmp_path, [UNKNOWN, "--transformer", files.casper],
            f"width {DIT['dim']}, but the transformer of {UNKNOWN} has {2 * DIT['dim']}")
    assert hub.calls == ["hf_hub_download"]  # the config only, no weights


def test_expert_of_another_width(hub, files, tmp_path, capsys):
    hub.answers["hf_hub_download"] = files.config
    refused(capsys, tmp_path, [UNKNOWN, "--transformer", files.casper, "--expert", f"effect={files.narrow}"],
            f"--expert effect: {files.narrow}: width 128, but the --transformer {files.casper} has {DIT['dim']}")
    assert hub.calls == ["hf_hub_download"]


def test_fitting_files_reach_the_download(hub, files, tmp_path, capsys):
    hub.answers["hf_hub_download"] = files.config
    hub.answers["snapshot_download"] = hub_error("RepositoryNotFoundError")
    refused(capsys, tmp_path, [UNKNOWN, "--transformer", files.casper, "--expert", f"effect={files.effect}"],
            f"{UNKNOWN}: not found on the Hugging Face hub")
    assert hub.calls == ["hf_hub_download", "snapshot_download"]


def test_repo_without_config_is_checked_from_the_weights_later(hub, files, tmp_path, capsys):
    hub.answers["hf_hub_download"] = hub_error("RemoteEntryNotFoundError")
    hub.answers["snapshot_download"] = ConnectionError(RAW)
    refused(capsys, tmp_path, [UNKNOWN, "--transformer", files.casper], "cannot reach the Hugging Face hub")
    assert hub.calls == ["hf_hub_download", "snapshot_download"]


# --------------------------------------------------------------------------- hub errors


def hub_error(name: str, status: int = 404) -> Exception:
    """A huggingface_hub error as the client raises it, with RAW as its text."""
    cls = getattr(hub_errors, name)
    if issubclass(cls, hub_errors.HfHubHTTPError):
        return cls(RAW, response=SimpleNamespace(status_code=status, headers={}, request=None))
    return cls(RAW)


HUB_CASES = {
    "not-found": (hub_error("RepositoryNotFoundError"),
                  "not found on the Hugging Face hub (check the id, or log in for a gated repo)"),
    "gated": (hub_error("GatedRepoError", 403), "a gated repository on the Hugging Face hub"),
    "offline": (hub_error("LocalEntryNotFoundError"), "model files not in the local hub cache, and the hub cannot be reached"),
    "offline-mode": (hub_error("OfflineModeIsEnabled"), "model files not in the local hub cache"),
    "connection": (ConnectionError(RAW), "cannot reach the Hugging Face hub"),
    "timeout": (TimeoutError(RAW), "cannot reach the Hugging Face hub"),
    "missing-file": (hub_error("RemoteEntryNotFoundError"), "no model files in this repository"),
    "server": (hub_error("HfHubHTTPError", 503), "the Hugging Face hub refused the download (HTTP 503)"),
}


@pytest.mark.parametrize("error,match", HUB_CASES.values(), ids=HUB_CASES)
def test_hub_error_is_one_sentence(hub, tmp_path, capsys, error, match):
    hub.answers["snapshot_download"] = error
    refused(capsys, tmp_path, [KNOWN], f"{KNOWN}: {match}")
    assert hub.calls == ["snapshot_download"]
    assert RAW not in str(convert_hub.hub_error(error, KNOWN, "model files"))


def test_config_download_error_stops_before_the_weights(hub, files, tmp_path, capsys):
    hub.answers["hf_hub_download"] = hub_error("GatedRepoError", 403)
    refused(capsys, tmp_path, [UNKNOWN, "--transformer", files.casper], f"{UNKNOWN}: a gated repository")
    assert hub.calls == ["hf_hub_download"]


def test_unknown_error_is_still_one_line(hub, tmp_path, capsys):
    hub.answers["snapshot_download"] = RuntimeError("first line\nsecond line")
    refused(capsys, tmp_path, [KNOWN], f"{KNOWN}: download from the hub failed (RuntimeError: first line second line)")

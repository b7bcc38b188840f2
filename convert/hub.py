"""Downloads from the Hugging Face hub, with the hub client's errors turned
into one sentence each (the library's own text is long, multi-line, and
names HTTP internals rather than what the user should do).

`huggingface_hub` is imported only when a download runs, so conversions of
local files never load it."""

from __future__ import annotations

from pathlib import Path

from mlx_omnimatte.errors import OmnimatteError

# (exception class names, any of which in the error's MRO matches) -> sentence.
# Matched by name so that huggingface_hub, requests and httpx of any version
# need not be imported; first match wins, so subclasses come before their
# bases (GatedRepoError < RepositoryNotFoundError, LocalEntryNotFoundError <
# EntryNotFoundError).
HUB_ERRORS = [
    (("GatedRepoError",), "{repo}: a gated repository on the Hugging Face hub: accept its conditions on "
                          "https://huggingface.co/{repo} and log in (hf auth login)"),
    (("RepositoryNotFoundError",), "{repo}: not found on the Hugging Face hub (check the id, or log in for a "
                                   "gated repo)"),
    (("DisabledRepoError",), "{repo}: disabled on the Hugging Face hub"),
    (("RevisionNotFoundError",), "{repo}: revision not found on the Hugging Face hub"),
    (("LocalEntryNotFoundError", "OfflineModeIsEnabled"),
     "{repo}: {file} not in the local hub cache, and the hub cannot be reached (offline, or HF_HUB_OFFLINE "
     "is set)"),
    (("EntryNotFoundError",), "{repo}: no {file} in this repository on the Hugging Face hub (is it a Wan2.1 "
                              "or Wan2.1-Fun model?)"),
    (("ConnectionError", "ConnectError", "NetworkError", "ProxyError", "Timeout", "TimeoutException",
      "TimeoutError"), "{repo}: cannot reach the Hugging Face hub (check the connection; HF_HUB_OFFLINE=1 "
                       "uses the local cache)"),
    (("HfHubHTTPError",), "{repo}: the Hugging Face hub refused the download (HTTP {status}): log in if "
                          "the repository needs it, or try again later"),
    (("HFValidationError",), "{repo}: not a valid Hugging Face repository id"),
]


def hub_error_kind(e: BaseException) -> str | None:
    """The first class name of HUB_ERRORS that the error is an instance of."""
    mro = {c.__name__ for c in type(e).__mro__}
    return next((names[0] for names, _ in HUB_ERRORS if mro & set(names)), None)


def hub_error(e: Exception, repo: str, file: str) -> OmnimatteError:
    """One line for the user, whatever the hub client raised."""
    kind = hub_error_kind(e)
    if kind is None:  # not a known hub error: its words, on one line
        reason = " ".join(str(e).split())
        return OmnimatteError(f"{repo}: download from the hub failed ({type(e).__name__}: {reason})")
    template = next(t for names, t in HUB_ERRORS if names[0] == kind)
    status = getattr(getattr(e, "response", None), "status_code", None) or "error"
    return OmnimatteError(template.format(repo=repo, file=file, status=status))


def download_file(repo: str, filename: str, optional: bool = False) -> Path | None:
    """One file of a hub repository; None when `optional` and the repository
    lacks it (an offline cache miss is still an error: the rest would fail too)."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=repo, filename=filename))
    except Exception as e:
        if optional and hub_error_kind(e) == "EntryNotFoundError":
            return None
        raise hub_error(e, repo, filename) from None


def download_snapshot(repo: str, patterns: list[str]) -> Path:
    """The files of a hub repository matching `patterns`, in the normal hub cache."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, allow_patterns=patterns))
    except Exception as e:
        raise hub_error(e, repo, "model files") from None

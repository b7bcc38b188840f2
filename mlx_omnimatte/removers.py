"""The removal models a bundle can hold, and the conventions each was trained
with (read from their public code). A bundle's manifest records its
remover's kind and these conventions; a run builds the conditioning they
name, loads only the encoders they use and takes its default sampler and
steps from them (the user's flags win).

* casper (Generative Omnimatte): trimask 1 remove / 127/255 neutral / 0
  keep, masks binarized at 240 and dilated 11x11, the DiT's 4 mask channels
  get 1 - trimask; the condition latent is the unmasked video's; the
  caption of the clean background; CLIP of frame 0; Euler, shift 5, 50.
* rose (Kunbyte-AI/ROSE, a full fine-tune of Wan2.1-Fun-1.3B-InP): a binary
  mask (1 remove, 0 elsewhere, no neutral level), binarized at 240, not
  dilated; the unmasked video's latent; the prompt "" (its guidance 6 with
  empty prompts is a no-op: skipped); a zero CLIP context, still through
  the DiT's image embedder; Euler, shift 5, 50; 16n+1 frames (each
  81-frame window is 16*5+1).
* minimax (zibojia/MiniMax-Remover): no text or image branch; 48 input
  channels = noise + the latent of the video with a mid-grey hole
  (video * (1 - mask) in [-1, 1]) + the latent of the mask itself as a
  3-channel video (2 * mask - 1); mask pixel > 20 means remove, dilated by
  6 iterations of a 3x3 cross; UniPC (its scheduler config), 12 steps as
  its README runs it, no guidance.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import OmnimatteError


@dataclass(frozen=True)
class Remover:
    kind: str
    name: str  # for people
    mask: str  # "trimask" | "binary" | "vae" (the mask video VAE-encoded)
    levels: tuple  # trimask values (remove, neutral, keep) before the DiT's 1 - m
    threshold: int  # a mask pixel (0-255) at or above this value marks the object
    dilation: str  # "square:N" (N x N) | "cross:N" (N iterations of a 3x3 cross) | "none"
    condition: str  # "unmasked" (the whole video's latent) | "grey-hole" (video * (1 - mask))
    prompt: str  # "caption" | "empty" | "none" (no text branch)
    clip: str  # "frame0" | "zeros" | "none" (no image branch)
    in_channels: int
    sampler: str
    steps: int
    shift: float
    licence: str

    @property
    def encoders(self) -> tuple[str, ...]:
        """The encoder components a run loads."""
        return (("t5",) if self.prompt != "none" else ()) + (("clip",) if self.clip == "frame0" else ())

    @property
    def components(self) -> tuple[str, ...]:
        """The bundle components this remover needs."""
        return ("transformer", "vae") + (("t5",) if self.prompt != "none" else ()) + (
            ("clip",) if self.clip == "frame0" else ())

    def record(self) -> dict:
        """The manifest's record (JSON-able)."""
        return {**asdict(self), "levels": list(self.levels)}


CASPER = Remover("casper", "Casper (Generative Omnimatte)", "trimask", (1.0, 127 / 255, 0.0), 240, "square:11",
                 "unmasked", "caption", "frame0", 36, "euler", 50, 5.0, "Apache-2.0 (code)")
ROSE = Remover("rose", "ROSE", "binary", (1.0, 0.0, 0.0), 240, "none", "unmasked", "empty", "zeros", 36,
               "euler", 50, 5.0, "Apache-2.0 (code)")
MINIMAX = Remover("minimax", "MiniMax-Remover", "vae", (1.0, 0.0, 0.0), 21, "cross:6", "grey-hole", "none", "none",
                  48, "unipc", 12, 5.0, "not stated in its repository (a third party says CC-BY-NC-4.0)")
REMOVERS = {r.kind: r for r in (CASPER, ROSE, MINIMAX)}


def remover_named(kind: str) -> Remover:
    if kind not in REMOVERS:
        raise OmnimatteError(f"remover {kind!r}: unknown (one of {', '.join(REMOVERS)})")
    return REMOVERS[kind]


def remover_from_manifest(manifest: dict, transformer: dict, where) -> Remover:
    """The bundle's remover: its manifest record checked against the known
    conventions of its kind and against the transformer's config (a bundle
    without a record is a Casper bundle). Sampler and shift may differ (a
    scheduler config says them); nothing else may."""
    record = manifest.get("remover")
    if record is None:
        base = CASPER
    else:
        if not isinstance(record, dict) or record.get("kind") not in REMOVERS:
            kind = record.get("kind") if isinstance(record, dict) else record
            raise OmnimatteError(f"{where}: remover {kind!r} in the manifest is unknown (one of {', '.join(REMOVERS)})")
        base = REMOVERS[record["kind"]]
        known = base.record()
        for key in ("mask", "levels", "threshold", "dilation", "condition", "prompt", "clip", "in_channels"):
            if key in record and _norm(record[key]) != _norm(known[key]):
                raise OmnimatteError(f"{where}: the manifest mixes conventions: {base.name} has {key} "
                                     f"{known[key]!r}, the manifest says {record[key]!r}")
        base = Remover(**{**known, **{k: record[k] for k in ("sampler", "steps", "shift") if k in record},
                          "levels": base.levels})
    check_transformer(base, transformer, where)
    return base


def _norm(v):
    return [float(x) for x in v] if isinstance(v, (list, tuple)) else v


def check_transformer(r: Remover, cfg: dict, where, said: str = "the manifest says") -> None:
    """The transformer's channels and branches must be the ones the remover feeds."""
    cross = cfg.get("cross_attn", True)
    have = (f"{cfg.get('in_dim')} input channels, {'a' if cross else 'no'} text and "
            f"{'an' if cfg.get('image_dim') is not None else 'no'} image branch")
    want = (f"{r.in_channels} input channels, {'a' if r.prompt != 'none' else 'no'} text and "
            f"{'an' if r.clip != 'none' else 'no'} image branch")
    if cfg.get("in_dim") != r.in_channels or cross != (r.prompt != "none") or (
            (cfg.get("image_dim") is not None) != (r.clip != "none")):
        raise OmnimatteError(f"{where}: {said} {r.name} ({want}); the transformer has {have}"
                             + (" (MiniMax-Remover's layout: convert its own folder)" if cfg.get("in_dim") == 48
                                and r.kind != "minimax" else ""))

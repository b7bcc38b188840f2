"""Block-wise effect analysis of a frozen DiT (EasyOmnimatte, section 3.2):
how much of an object's self-attention each block puts on the object's
effects (shadows, reflections).

For block b, S_b(y) is the attention from the object's query tokens to key
y, softmax-normalized per query over all keys and averaged over heads and
object queries: a distribution over the tokens, i.e. a map over every latent
frame. The block's raw score is S_b's mass on the effect region M^e, given
as a weight per token in [0, 1] (the share of the token's cell inside M^e);
its contribution C_b is the raw score normalized over blocks, sum_b C_b = 1.

The attention probabilities are formed only for a chunk of object queries at
a time, the chunk sized from the memory budget (never the L x L matrix); the
block itself gets the normal attention output, so the forward continues
exactly as without the probe.

The curve C_b splits at its troughs into three stages: context, effect
perception (around the peak) and effect suppression; the Effect expert's
LoRA goes on the suppression stage, the last K blocks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import numpy as np

from ..errors import OmnimatteError
from ..memory import DEFAULT_ATTENTION_BUDGET, query_chunk
from ..models.base import sdpa

STAGES = ("context", "perception", "suppression")
TROUGH_TOLERANCE = 0.1  # share of the peak's height above a trough still counted as the trough


def key_mass(q: mx.array, k: mx.array, rows: mx.array, chunk: int) -> mx.array:
    """Attention mass per key [Lk] (float32): softmax(q k^T / sqrt(d)) summed
    over the batch, the heads and the query rows `rows` (uint32 indices),
    `chunk` query rows at a time."""
    scale = q.shape[-1] ** -0.5
    kt = k.swapaxes(-1, -2)
    total = mx.zeros((k.shape[2],), mx.float32)
    for s in range(0, rows.size, chunk):
        # the scale on the (few) query rows, not on the scores: one score-sized
        # float32 buffer at a time besides the softmax
        scores = (mx.take(q, rows[s:s + chunk], axis=2) * scale) @ kt
        p = mx.softmax(scores.astype(mx.float32), axis=-1)
        total = total + p.sum(axis=(0, 1, 2))
        mx.eval(total)  # one chunk's probabilities alive at a time
    return total


def probe_chunk(heads: int, key_len: int, rows: int, batch: int = 1, budget_bytes: int | None = None) -> int:
    """Query rows per `key_mass` chunk: their float32 probabilities (whatever
    the weights' dtype) fit the attention budget of inference."""
    return query_chunk(budget_bytes or DEFAULT_ATTENTION_BUDGET, heads, key_len, mx.float32, batch, rows)


def probe_attn_fn(rows: mx.array, sink: list, budget_bytes: int | None = None) -> Callable:
    """A block's `attn_fn`: appends the object rows' attention mass per key
    (`key_mass`) to `sink` and returns the normal attention output."""

    def attn_fn(q, k, v):
        b, heads, _, _ = q.shape
        chunk = probe_chunk(heads, k.shape[2], rows.size, b, budget_bytes)
        sink.append(key_mass(q, k, rows, chunk))
        return sdpa(q, k, v, budget_bytes=budget_bytes)

    return attn_fn


@dataclass
class BlockScores:
    """One clip's analysis: per block the map S_b, its effect mass, and the
    block's forward time and memory."""

    maps: np.ndarray  # float32 [blocks, f, h, w]; each block's map sums to 1
    effect_mass: np.ndarray  # float64 [blocks]: sum of S_b * effect weight
    seconds: np.ndarray  # float64 [blocks]
    peak_bytes: np.ndarray  # int64 [blocks]: peak MLX memory during the block
    added_bytes: np.ndarray  # int64 [blocks]: that peak above the memory held when the block started

    @property
    def contribution(self) -> np.ndarray:
        return normalize(self.effect_mass)


def normalize(scores) -> np.ndarray:
    """Scores over blocks -> shares summing to 1 (Eq. 4)."""
    s = np.asarray(scores, dtype=np.float64)
    total = s.sum()
    if not total > 0:
        raise OmnimatteError("effect analysis: no attention reached the effect region in any block")
    return s / total


def check_token_masks(grid, object_tokens: np.ndarray, effect_weight: np.ndarray) -> None:
    for name, a in (("object", object_tokens), ("effect", effect_weight)):
        if tuple(np.shape(a)) != tuple(grid):
            raise ValueError(f"{name} token mask {np.shape(a)} does not match the token grid {tuple(grid)}")
    if not np.any(object_tokens):
        raise OmnimatteError("effect analysis: the object mask covers no token of the latent grid")
    if not np.any(np.asarray(effect_weight) > 0):
        raise OmnimatteError("effect analysis: the effect mask covers no token of the latent grid")


def block_scores(dit, x: mx.array, timestep: float, ctx: mx.array, object_tokens: np.ndarray,
                 effect_weight: np.ndarray, budget_bytes: int | None = None) -> BlockScores:
    """Run the blocks of `dit` once on the model input x [1, F, H, W, in_dim]
    at `timestep` (in [0, 1000]) with the embedded context `ctx`, probing
    every block's self-attention.

    object_tokens: bool [f, h, w] on the token grid, the object's queries;
    effect_weight: float [f, h, w] in [0, 1], M^e on the token grid."""
    if x.shape[0] != 1:
        raise ValueError(f"effect analysis runs one clip at a time, got a batch of {x.shape[0]}")
    tokens, grid = dit.patchify(x)
    check_token_masks(grid, object_tokens, effect_weight)
    _, e6 = dit.embed_time(mx.array([timestep], dtype=mx.float32))
    rope = dit.rope(grid)
    rows = mx.array(np.flatnonzero(np.asarray(object_tokens).ravel()).astype(np.uint32))
    sink, seconds, peaks, added = [], [], [], []
    for block in dit.blocks:
        mx.eval(tokens)
        held = mx.get_active_memory()
        mx.reset_peak_memory()
        start = time.perf_counter()
        tokens = block(tokens, e6, ctx, rope, probe_attn_fn(rows, sink, budget_bytes))
        mx.eval(tokens, sink[-1])
        seconds.append(time.perf_counter() - start)
        peaks.append(mx.get_peak_memory())
        added.append(max(0, peaks[-1] - held))
    return scores_from_mass(sink, grid, rows.size, dit.config.num_heads, effect_weight, seconds, peaks, added)


def scores_from_mass(sink, grid, num_rows: int, heads: int, effect_weight, seconds, peaks, added) -> BlockScores:
    """Attention masses per block -> maps S_b (the mean over heads and rows)
    and their mass on the effect weights."""
    maps = np.stack([np.array(m) for m in sink]).reshape(len(sink), *grid) / float(heads * num_rows)
    w = np.asarray(effect_weight, dtype=np.float64)
    effect = (maps.astype(np.float64) * w[None]).sum(axis=(1, 2, 3))
    return BlockScores(maps.astype(np.float32), effect, np.asarray(seconds, np.float64),
                       np.asarray(peaks, np.int64), np.asarray(added, np.int64))


# --------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class Stages:
    """A partition of the blocks 0..n-1 into three consecutive stages."""

    context: range
    perception: range
    suppression: range

    @property
    def k(self) -> int:
        """The recommended K: the blocks after the perception stage."""
        return len(self.suppression)

    def of(self, block: int) -> str:
        return next(name for name in STAGES if block in getattr(self, name))

    def as_dict(self) -> dict:
        return {name: [r.start, r.stop - 1] if len(r) else [] for name, r in
                ((s, getattr(self, s)) for s in STAGES)}


def _trough_after(c: np.ndarray, peak: int, tolerance: float) -> int:
    """First block after the peak that lies in the deepest trough after it
    (within `tolerance` of the peak's height above that trough); len(c) when
    the peak is the last block."""
    tail = c[peak + 1:]
    if not tail.size:
        return c.size
    level = tail.min() + tolerance * (c[peak] - tail.min())
    return peak + 1 + int(np.flatnonzero(tail <= level)[0])


def _trough_before(c: np.ndarray, peak: int, tolerance: float) -> int:
    """Last block before the peak in the deepest trough before it; -1 when
    the peak is the first block."""
    head = c[:peak]
    if not head.size:
        return -1
    level = head.min() + tolerance * (c[peak] - head.min())
    return int(np.flatnonzero(head <= level)[-1])


def partition(curve, tolerance: float = TROUGH_TOLERANCE) -> Stages:
    """Split the blocks at the troughs on either side of the curve's peak:
    context up to and including the trough before the peak, perception
    between the troughs, suppression from the trough after the peak on."""
    c = np.asarray(curve, dtype=np.float64)
    if c.ndim != 1 or not c.size:
        raise ValueError(f"curve: expected a 1-D array over blocks, got shape {c.shape}")
    peak = int(np.argmax(c))
    left, right = _trough_before(c, peak, tolerance), _trough_after(c, peak, tolerance)
    return Stages(range(0, left + 1), range(left + 1, right), range(right, c.size))


# --------------------------------------------------------------------------- the results


@dataclass
class ClipResult:
    name: str
    scores: BlockScores
    frames: np.ndarray | None  # uint8 [F', H, W, 3]: the model-grid input frame of each latent frame
    object_tokens: np.ndarray  # bool [f, h, w]
    effect_weight: np.ndarray  # float32 [f, h, w]


@dataclass
class Analysis:
    t: float
    results: list[ClipResult]
    stages: Stages

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.results]

    @property
    def contributions(self) -> np.ndarray:
        """[clips, blocks]: C_b per clip."""
        return np.stack([r.scores.contribution for r in self.results])

    @property
    def mean(self) -> np.ndarray:
        return self.contributions.mean(axis=0)

    @property
    def std(self) -> np.ndarray:
        return self.contributions.std(axis=0)

    def per_block(self, field: str) -> np.ndarray:
        """Mean over clips of a BlockScores field (seconds, peak_bytes, added_bytes)."""
        return np.mean([getattr(r.scores, field) for r in self.results], axis=0)


# --------------------------------------------------------------------------- inputs

"""The expert trainer: flow matching on the alpha half, LoRA on the replica.

Per sample (latents from the cache, see `cache.py`): one timestep t, two
noises; both halves are noised at the same t,

    z_alpha_t = (1 - s) z_alpha + s n_alpha        s = t / 1000
    z_bg_t    = (1 - s) z_bg    + s n_bg           (the inpaint half's input:
                                                    the noisy clean background)

and the loss is ``mean |(n_alpha - z_alpha) - v_alpha(z_t, t)|^2`` on the
replica half's velocity only (the inpaint half is the frozen model and has
no loss). Effect: LoRA on the last K blocks, mask B; Quality: all blocks,
mask C (see `forward.py` for the exact shortcuts each mask allows).

Randomness is a pure function of (seed, step, position in the global batch):
which samples, their timesteps and their noises. So a resumed run equals
the uninterrupted one, and N processes that split a global batch compute
the same update as one process that holds it all.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map

from ..branch.experts import DEFAULT_MASK, DEFAULT_TAU, KINDS
from ..errors import OmnimatteError
from ..sampling import DEFAULT_SEED, NUM_TRAIN_TIMESTEPS, shift_sigmas
from . import distributed
from .forward import expert_from_lora, init_lora, inpaint_pass, lora_blocks, replica_pass

DEFAULT_RANK = {"effect": 128, "quality": 64}
TIMESTEP_SAMPLING = ("uniform",)
Report = Callable[[str, int, "int | None", str], None]


@dataclass
class TrainSettings:
    """Every knob of a training run; defaults follow DESIGN.md section 10."""

    kind: str = "effect"
    rank: int | None = None  # None: 128 (Effect) / 64 (Quality)
    alpha: float | None = None  # None: = rank
    k: int | None = None  # Effect: LoRA on the last K blocks (None: the last third)
    steps: int = 8000
    lr: float = 1e-3
    weight_decay: float = 0.01  # AdamW's usual default (the paper gives none)
    betas: tuple = (0.9, 0.999)
    batch: int = 1  # samples per micro-batch per process
    grad_accum: int = 1
    seed: int = DEFAULT_SEED
    # timesteps: uniform over the training schedule's 1000 steps, with the
    # schedule's sigma shift (Casper's training script: uniform, shift 5)
    timesteps: str = "uniform"
    shift: float = 5.0
    max_grad_norm: float | None = None
    checkpoint_every: int = 500
    grad_checkpoint: bool = True  # mx.checkpoint per LoRA block
    compile: bool | None = None  # None: on the GPU only (on the CPU tracing costs more than it saves)
    fixed_noise: bool = False  # the same samples, timesteps and noises every step (overfitting checks)
    tau: float = DEFAULT_TAU  # written into the expert as its default
    budget_bytes: int | None = None  # attention scores per call (see memory.py)

    def resolve(self, num_layers: int) -> "TrainSettings":
        """Defaults filled in and every value checked (one-line errors)."""
        if self.kind not in KINDS:
            raise OmnimatteError(f"expert kind {self.kind!r}: one of effect, quality")
        rank = DEFAULT_RANK[self.kind] if self.rank is None else self.rank
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise OmnimatteError(f"--rank {rank!r}: must be a positive integer")
        alpha = float(rank if self.alpha is None else self.alpha)
        if not alpha > 0:
            raise OmnimatteError(f"--alpha {self.alpha!r}: must be positive")
        k = len(lora_blocks(self.kind, num_layers, self.k)) if self.kind == "effect" else None
        for name in ("steps", "batch", "grad_accum", "checkpoint_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise OmnimatteError(f"--{name.replace('_', '-')} {v!r}: must be a positive integer")
        if not self.lr > 0:
            raise OmnimatteError(f"--lr {self.lr!r}: must be positive")
        if self.timesteps not in TIMESTEP_SAMPLING:
            raise OmnimatteError(f"timestep sampling {self.timesteps!r}: one of {', '.join(TIMESTEP_SAMPLING)}")
        return TrainSettings(**{**asdict(self), "rank": rank, "alpha": alpha, "k": k})

    @property
    def mask_type(self) -> str:
        return DEFAULT_MASK[self.kind]

    @property
    def scale(self) -> float:
        return float(self.alpha) / float(self.rank)


@dataclass
class TrainState:
    step: int
    lora: dict
    optimizer: optim.Optimizer
    losses: list[float] = field(default_factory=list)  # mean loss of each step


def make_optimizer(settings: TrainSettings) -> optim.Optimizer:
    # bias correction on, as torch.optim.AdamW
    return optim.AdamW(learning_rate=settings.lr, betas=list(settings.betas), eps=1e-8,
                       weight_decay=settings.weight_decay, bias_correction=True)


def new_state(model, settings: TrainSettings) -> TrainState:
    cfg = model.config
    blocks = lora_blocks(settings.kind, cfg.num_layers, settings.k)
    lora = init_lora(cfg.dim, blocks, settings.rank, settings.seed)
    opt = make_optimizer(settings)
    opt.init(lora)
    return TrainState(0, lora, opt)


# --------------------------------------------------------------------------- randomness


def draw_timesteps(rng: np.random.Generator, n: int, settings: TrainSettings) -> np.ndarray:
    """Model timesteps in (0, 1000]: a uniform index of the 1000-step
    training grid, shifted as the schedule is."""
    u = rng.integers(1, NUM_TRAIN_TIMESTEPS + 1, n) / NUM_TRAIN_TIMESTEPS
    return (NUM_TRAIN_TIMESTEPS * shift_sigmas(u, settings.shift)).astype(np.float32)


def step_plan(settings: TrainSettings, step: int, num_samples: int, world: int = 1):
    """The global batch of a step: (sample indices, timesteps), each of
    length batch * grad_accum * world, from (seed, step) alone."""
    g = settings.batch * settings.grad_accum * world
    rng = np.random.default_rng([settings.seed, draw_step(settings, step)])
    return rng.integers(0, num_samples, g), draw_timesteps(rng, g, settings)


def draw_step(settings: TrainSettings, step: int) -> int:
    return 0 if settings.fixed_noise else step


def sample_noise(seed: int, step: int, position: int, shape) -> tuple[np.ndarray, np.ndarray]:
    """(n_bg, n_alpha) of one position in a step's global batch."""
    rng = np.random.default_rng([seed, step, position, 1])
    return (rng.standard_normal(shape, dtype=np.float32), rng.standard_normal(shape, dtype=np.float32))


def local_positions(settings: TrainSettings, world: int, rank: int) -> list[list[int]]:
    """Positions of the global batch this process computes, per micro-batch:
    micro-batch m of process r holds positions (m * world + r) * batch + j."""
    b = settings.batch
    return [[(m * world + rank) * b + j for j in range(b)] for m in range(settings.grad_accum)]


# --------------------------------------------------------------------------- loss and step


def stack_batch(samples: Sequence[dict], text_len: int) -> dict:
    """Samples (dicts of arrays, see `cache.py`) -> a batch; contexts are
    zero-padded to the model's text length."""
    def pad(c):
        c = np.asarray(c, np.float32)
        return np.concatenate([c, np.zeros((text_len - c.shape[0], c.shape[1]), np.float32)]) \
            if c.shape[0] < text_len else c

    out = {key: mx.array(np.stack([np.asarray(s[key], np.float32) for s in samples]))
           for key in ("cond", "alpha", "bg")}
    out["context"] = mx.array(np.stack([pad(s["context"]) for s in samples]))
    if samples[0].get("clip") is not None:
        out["clip"] = mx.array(np.stack([np.asarray(s["clip"], np.float32) for s in samples]))
    return out


def flow_loss(model, settings: TrainSettings, lora, batch, t, n_bg, n_alpha):
    """The flow-matching loss of the replica half (see the module doc)."""
    s = (t / NUM_TRAIN_TIMESTEPS).reshape(-1, 1, 1, 1, 1)
    z_alpha = (1 - s) * batch["alpha"] + s * n_alpha
    ctx = model.embed_context(batch["context"], batch.get("clip"))
    kvs = None
    if settings.mask_type == "B":
        z_bg = (1 - s) * batch["bg"] + s * n_bg
        _, kvs = inpaint_pass(model, z_bg, t, batch["cond"], ctx, settings.budget_bytes)
    v = replica_pass(model, lora, settings.scale, z_alpha, t, batch["cond"], ctx, kvs,
                     settings.grad_checkpoint, settings.budget_bytes)
    return mx.mean(mx.square(v - (n_alpha - batch["alpha"])))


def make_grad_fn(model, settings: TrainSettings):
    """(lora, batch, t, n_bg, n_alpha) -> (loss, grads), compiled when
    ``settings.compile`` (the frozen weights are constants of the graph)."""
    def loss(lora, batch, t, n_bg, n_alpha):
        return flow_loss(model, settings, lora, batch, t, n_bg, n_alpha)

    fn = mx.value_and_grad(loss)
    compiled = settings.compile if settings.compile is not None else mx.default_device() == mx.gpu
    return mx.compile(fn) if compiled else fn


def micro_batch(samples, settings: TrainSettings, step: int, positions, indices, times, text_len: int):
    batch = stack_batch([samples[int(indices[p])] for p in positions], text_len)
    noises = [sample_noise(settings.seed, draw_step(settings, step), p, batch["alpha"].shape[1:])
              for p in positions]
    n_bg = mx.array(np.stack([n[0] for n in noises]))
    n_alpha = mx.array(np.stack([n[1] for n in noises]))
    return batch, mx.array(times[list(positions)]), n_bg, n_alpha


def clip_by_norm(grads, max_norm: float | None):
    if max_norm is None:
        return grads
    return optim.clip_grad_norm(grads, max_norm)[0]


def global_gradients(state: TrainState, model, samples, settings: TrainSettings, grad_fn,
                     world: int = 1, rank: int = 0):
    """(mean loss, mean gradients) over the step's global batch: this
    process's share, accumulated over micro-batches, summed across processes."""
    indices, times = step_plan(settings, state.step, len(samples), world)
    text_len = model.config.text_len
    total, grads = mx.array(0.0), None
    micro = local_positions(settings, world, rank)
    for positions in micro:
        loss, g = grad_fn(state.lora, *micro_batch(samples, settings, state.step, positions, indices, times,
                                                   text_len))
        total = total + loss
        grads = g if grads is None else tree_map(mx.add, grads, g)
        mx.eval(total, grads)
    n = float(len(micro) * world)
    loss, grads = distributed.sum_tree(total) / n, tree_map(lambda a: a / n, distributed.sum_tree(grads))
    mx.eval(loss, grads)  # every process runs its collectives here, in the same order
    return loss, grads


def train_step(state: TrainState, model, samples, settings: TrainSettings, grad_fn,
               world: int = 1, rank: int = 0) -> float:
    """One optimizer step over the global batch. Returns its mean loss."""
    loss, grads = global_gradients(state, model, samples, settings, grad_fn, world, rank)
    grads = clip_by_norm(grads, settings.max_grad_norm)
    state.lora = state.optimizer.apply_gradients(grads, state.lora)
    mx.eval(state.lora, state.optimizer.state, loss)
    state.step += 1
    state.losses.append(float(loss.item()))
    return state.losses[-1]


def train(model, samples, settings: TrainSettings, state: TrainState | None = None,
          report: Report | None = None, on_checkpoint: Callable[[TrainState], None] | None = None,
          world: int = 1, rank: int = 0) -> TrainState:
    """Run to ``settings.steps`` from ``state`` (a fresh one when None);
    ``on_checkpoint(state)`` every ``checkpoint_every`` steps and at the end.
    ``report("train", step, steps, "loss ..., steps/s, peak ...")`` per step."""
    if len(samples) == 0:
        raise OmnimatteError("training data: no samples")
    state = state or new_state(model, settings)
    grad_fn = make_grad_fn(model, settings)
    if report:
        report("train", state.step, settings.steps, "resumed" if state.step else "")
    start, first = time.perf_counter(), state.step
    while state.step < settings.steps:
        loss = train_step(state, model, samples, settings, grad_fn, world, rank)
        if report:
            rate = (state.step - first) / max(time.perf_counter() - start, 1e-9)
            report("train", state.step, settings.steps,
                   f"loss {loss:.4g}, {rate:.2f} steps/s, peak {mx.get_peak_memory() / 2**30:.2f} GB")
        if on_checkpoint and (state.step % settings.checkpoint_every == 0 or state.step == settings.steps):
            on_checkpoint(state)
    return state


def trained_expert(state: TrainState, model, settings: TrainSettings):
    cfg = model.config
    return expert_from_lora(state.lora, settings.kind, settings.rank, settings.alpha, cfg.dim, cfg.num_layers,
                            settings.k, settings.mask_type, settings.tau)

"""Training parity: one MLX expert training step (loss, LoRA gradients, the
AdamW update) against torch (diffusers' Wan DiT; PEFT LoRA for Quality, the
branch reference with trainable LoRA for Effect; torch.optim.AdamW), float32,
with the same model (converted by the CLI), LoRA, timestep and noises.
Bound: max|mlx - ref| <= 1e-4 * max|ref|.

    pytest parity/test_train_parity.py -s
"""

from __future__ import annotations


import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from helpers import rel_err, run_cli  # noqa: E402
from mlx_omnimatte.models.wan.transformer import Config  # noqa: E402
from mlx_omnimatte.train.trainer import (TrainSettings, global_gradients, make_grad_fn, micro_batch,  # noqa: E402
                                         new_state, step_plan, train_step)
from mlx_omnimatte.weights import load_model  # noqa: E402
from wan_reference import build_reference, write_format  # noqa: E402

pytestmark = pytest.mark.torch

from train_reference import reference_step  # noqa: E402 (the torch reference)


# --------------------------------------------------------------------------- the test

BOUND = 1e-4
TINY = Config(dim=256, ffn_dim=512, num_heads=2, num_layers=3, in_dim=36, image_dim=1280)
LATENT = (2, 4, 4)


def sample(cfg, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)
    return {"cond": f32(*LATENT, 20), "alpha": f32(*LATENT, 16), "bg": f32(*LATENT, 16),
            "context": f32(12, cfg.text_dim), "clip": f32(257, cfg.image_dim)}


def nonzero_lora(state, seed=5):
    """B != 0 so that every LoRA tensor has a gradient."""
    rng = np.random.default_rng(seed)
    for p in state.lora.values():
        p["b"] = mx.array((0.2 * rng.standard_normal(p["b"].shape)).astype(np.float32))
    return {name: (np.array(p["a"]), np.array(p["b"])) for name, p in state.lora.items()}


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train-parity")
    src = write_format(build_reference(TINY, seed=1), folder, "original", "safetensors")
    assert run_cli(["convert", str(src), "-o", str(folder / "dit"), "--dtype", "float32"])[0] == 0
    return load_model(folder / "dit", "transformer")


@pytest.mark.parametrize("kind", ["quality", "effect"])
def test_one_training_step_matches_torch(dit, kind):
    s = TrainSettings(kind=kind, rank=4, alpha=8.0, k=2, steps=1, lr=1e-3, seed=3).resolve(TINY.num_layers)
    data = [sample(TINY)]
    state = new_state(dit, s)
    lora = nonzero_lora(state)
    indices, times = step_plan(s, 0, 1)
    batch, t, n_bg, n_alpha = micro_batch(data, s, 0, [0], indices, times, TINY.text_len)
    np_batch = {k: np.array(v) for k, v in batch.items()}
    ref_loss, ref_grads, ref_params = reference_step(build_reference(TINY, seed=1), kind, lora, s.rank, s.alpha,
                                                     np_batch, np.array(t), np.array(n_bg), np.array(n_alpha),
                                                     s.lr, s.weight_decay)
    loss, grads = global_gradients(state, dit, data, s, make_grad_fn(dit, s))
    got = {k: np.array(v) for k, v in tree_flatten(grads)}
    assert got.keys() == ref_grads.keys()
    g_err = max(rel_err(got[k], ref_grads[k]) for k in got)
    train_step(state, dit, data, s, make_grad_fn(dit, s))
    params = {k: np.array(v) for k, v in tree_flatten(state.lora)}
    p_err = max(rel_err(params[k], ref_params[k]) for k in params)
    l_err = abs(float(loss) - ref_loss) / abs(ref_loss)
    print(f"\n{kind}: t {float(t[0]):.1f}  loss {ref_loss:.4f} (rel err {l_err:.1e})  "
          f"grads rel err {g_err:.1e}  updated params rel err {p_err:.1e}")
    assert l_err <= BOUND and g_err <= BOUND and p_err <= BOUND
    assert min(np.abs(g).max() for g in ref_grads.values()) > 0

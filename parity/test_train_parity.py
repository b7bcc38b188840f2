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

from helpers import rel_err  # noqa: E402
from mlx_omnimatte.cli.main import main  # noqa: E402
from mlx_omnimatte.models.wan.transformer import Config  # noqa: E402
from mlx_omnimatte.train.trainer import (TrainSettings, global_gradients, make_grad_fn, micro_batch,  # noqa: E402
                                         new_state, step_plan, train_step)
from mlx_omnimatte.weights import load_model  # noqa: E402
import branch_reference as br  # noqa: E402
from wan_reference import build_reference, write_format  # noqa: E402

pytestmark = pytest.mark.torch

# --------------------------------------------------------------------------- the torch reference
# (also used by bench_train.py)
# * Quality (mask C): the replica half never sees the inpaint half, so the reference is diffusers'
#   WanTransformer3DModel with a standard PEFT LoRA on the targeted projections, run on the noisy
#   alpha latent alone.
# * Effect (mask B): the branch reference (branch_reference.py: dense (2N)^2 mask, LoRA deltas on
#   the replica half) with the LoRA tensors trainable.
# Both: the flow-matching loss on the alpha half, torch.autograd, torch.optim.AdamW.

DIFFUSERS = {"self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
             "self_attn.o": "attn1.to_out.0", "cross_attn.q": "attn2.to_q", "cross_attn.o": "attn2.to_out.0"}


def cf(a: np.ndarray) -> torch.Tensor:
    """channels-last numpy -> channels-first torch."""
    return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 4, 1, 2, 3)


def peft_quality(model, lora: dict, rank: int, alpha: float) -> dict[str, torch.nn.Parameter]:
    """Inject a PEFT LoRA with the given (A, B) numpy pairs; returns the
    trainable tensors by "blocks.i.target.a|b"."""
    from peft import LoraConfig, inject_adapter_in_model

    names = {f"blocks.{n.split('.')[1]}.{DIFFUSERS[n.split('.', 2)[2]]}": n for n in lora}
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(names), init_lora_weights=False,
                        lora_dropout=0.0)
    inject_adapter_in_model(config, model)
    params = {}
    for module_name, ours in names.items():
        module = model.get_submodule(module_name)
        a, b = lora[ours]
        module.lora_A["default"].weight.data.copy_(torch.from_numpy(a))
        module.lora_B["default"].weight.data.copy_(torch.from_numpy(b))
        params[f"{ours}.a"] = module.lora_A["default"].weight
        params[f"{ours}.b"] = module.lora_B["default"].weight
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return params


def quality_velocity(model, x_alpha, t, context, clip):
    return model(x_alpha, t, context, clip, return_dict=False)[0]


def effect_params(lora: dict) -> dict[str, torch.nn.Parameter]:
    out = {}
    for name, (a, b) in lora.items():
        out[f"{name}.a"] = torch.nn.Parameter(torch.from_numpy(a.copy()))
        out[f"{name}.b"] = torch.nn.Parameter(torch.from_numpy(b.copy()))
    return out


def effect_velocity(model, params, scale, x_bg, x_alpha, t, context, clip):
    """The branch reference under mask B with trainable LoRA tensors."""
    def block_lora(_adapter, _scale, i, attn):
        roles = {}
        for role in "qkvo":
            key = f"blocks.{i}.{attn}.{role}"
            if f"{key}.a" in params:
                roles[role] = (params[f"{key}.a"], params[f"{key}.b"], scale)
        return roles

    saved, br._block_lora = br._block_lora, block_lora
    try:
        _, v_alpha = br.branch_forward_torch.__wrapped__(model, x_bg, x_alpha, t, context, clip, "B", None, scale)
    finally:
        br._block_lora = saved
    return v_alpha


def reference_step(model, kind: str, lora: dict, rank: int, alpha: float, batch: dict, t: np.ndarray,
                   n_bg: np.ndarray, n_alpha: np.ndarray, lr: float, weight_decay: float, model_dtype=torch.float32):
    """(loss, grads, updated params) of one AdamW step; numpy channels-last batch."""
    scale = alpha / rank
    params = peft_quality(model, lora, rank, alpha) if kind == "quality" else effect_params(lora)
    if model_dtype != torch.float32:
        model.to(model_dtype)
    for p in params.values():
        p.data = p.data.float()
    s = torch.from_numpy(t / 1000.0).reshape(-1, 1, 1, 1, 1)
    z0, n_a = cf(batch["alpha"]), cf(n_alpha)
    z_alpha = (1 - s) * z0 + s * n_a
    cond = cf(batch["cond"])
    ctx, clip, tt = (torch.from_numpy(batch["context"]), torch.from_numpy(batch["clip"]), torch.from_numpy(t))
    cast = lambda x: x.to(model_dtype)
    if kind == "quality":
        v = quality_velocity(model, cast(torch.cat([z_alpha, cond], 1)), tt, cast(ctx), cast(clip))
    else:
        z_bg = (1 - s) * cf(batch["bg"]) + s * cf(n_bg)
        v = effect_velocity(model, params, scale, cast(torch.cat([z_bg, cond], 1)),
                            cast(torch.cat([z_alpha, cond], 1)), tt, cast(ctx), cast(clip))
    loss = torch.mean((v.float() - (n_a - z0)) ** 2)
    loss.backward()
    grads = {k: p.grad.detach().clone().numpy() for k, p in params.items()}
    opt = torch.optim.AdamW(list(params.values()), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    opt.step()
    return float(loss.detach()), grads, {k: p.detach().clone().numpy() for k, p in params.items()}


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
    with pytest.raises(SystemExit) as e:
        main(["convert", str(src), "-o", str(folder / "dit"), "--dtype", "float32"])
    assert e.value.code == 0
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

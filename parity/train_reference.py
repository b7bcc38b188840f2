"""The torch reference of one expert training step, shared by
test_train_parity.py and bench_train.py (torch, diffusers and PEFT)."""

from __future__ import annotations

import numpy as np
import torch

import branch_reference as br

# --------------------------------------------------------------------------- the torch reference
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

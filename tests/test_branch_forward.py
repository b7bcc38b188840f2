"""The branch forward on a tiny DiT: what each half may see, LoRA on the
replica only, merged weights == runtime delta, wrapper reuse."""

import mlx.core as mx
import numpy as np
import pytest

from helpers import rel_err
from mlx_omnimatte.branch import Expert, LoRA, branch_forward, expert_applied, merge_expert
from mlx_omnimatte.branch.lora import ReplicaLoRALinear
from branch_utils import TINY, inputs, random_adapter, tiny_model

T = mx.array([700.0])


def _expert(kind, blocks, mask, rank=4, seed=1, domain=None):
    ad = random_adapter(blocks, rank=rank, seed=seed)
    lora = {m: LoRA(mx.array(a), mx.array(b)) for m, (a, b) in ad.items()}
    return Expert(kind=kind, lora=lora, rank=rank, alpha=2 * rank, dim=64, num_layers=TINY["num_layers"],
                  mask_type=mask, k=len(blocks) if kind == "effect" else None, domain_embedding=domain)


@pytest.fixture(scope="module")
def setup():
    model = tiny_model()
    x = inputs(model)
    x["x_bg"] = mx.concatenate([x["z_bg"], x["cond"]], -1)
    x["x_alpha"] = mx.concatenate([x["z_alpha"], x["cond"]], -1)
    plain_bg = model(x["x_bg"], T, x["context"], x["clip_fea"])
    return model, x, plain_bg


def _run(model, expert, x, mask=None, **kw):
    return branch_forward(model, expert, x["x_bg"], x["x_alpha"], T, x["context"], x["clip_fea"], mask, **kw)


def test_background_half_is_the_plain_model_under_b_and_c(setup):
    model, x, plain_bg = setup
    effect = _expert("effect", [2, 3], "B")
    quality = _expert("quality", range(4), "C")
    for expert in (effect, quality, None):
        for mask in ("B", "C"):
            v_bg, v_alpha = _run(model, expert, x, mask)
            assert rel_err(v_bg, plain_bg) < 1e-5, (expert and expert.kind, mask)
    # under A the background sees the alpha tokens
    v_bg, _ = _run(model, None, x, "A")
    assert rel_err(v_bg, plain_bg) > 1e-3


def test_identical_halves_share_positions(setup):
    """Same input in both halves, no LoRA: every mask type gives the plain
    output twice (duplicated keys at the same RoPE positions do not change a
    softmax), which fails if the replica had other positions."""
    model, x, _ = setup
    plain = model(x["x_alpha"], T, x["context"], x["clip_fea"])
    for mask in "ABC":
        a, b = branch_forward(model, None, x["x_alpha"], x["x_alpha"], T, x["context"], x["clip_fea"], mask)
        assert rel_err(a, plain) < 1e-5 and rel_err(b, plain) < 1e-5, mask


def test_quality_replica_equals_merged_model(setup):
    """Quality expert under mask C: the replica half alone is a plain forward of
    the model with the LoRA merged into its weights, on the alpha tokens."""
    model, x, plain_bg = setup
    quality = _expert("quality", range(4), "C")
    _, v_alpha = _run(model, quality, x)
    merged = merge_expert(tiny_model(), quality)  # same seed = same weights
    ref = merged(x["x_alpha"], T, x["context"], x["clip_fea"])
    assert rel_err(v_alpha, ref) < 1e-5
    unmerged = model(x["x_alpha"], T, x["context"], x["clip_fea"])
    assert rel_err(ref, unmerged) > 1e-2  # the LoRA changes the output


def test_effect_lora_only_on_its_blocks(setup):
    """LoRA on blocks 2-3 only: zeroing those LoRA tensors gives the base
    branch output, LoRA on blocks 0-1 would not be touched."""
    model, x, _ = setup
    effect = _expert("effect", [2, 3], "B")
    _, v = _run(model, effect, x)
    _, v0 = _run(model, None, x, "B")
    assert rel_err(v, v0) > 1e-2
    zero = Expert(**{**effect.__dict__, "lora": {m: LoRA(l.a, mx.zeros_like(l.b)) for m, l in effect.lora.items()},
                     "_cache": {}})
    _, vz = _run(model, zero, x)
    assert rel_err(vz, v0) < 1e-6


def test_domain_embedding_goes_to_the_replica(setup):
    model, x, plain_bg = setup
    dom = mx.array(np.linspace(-1, 1, 64).astype(np.float32))
    e = _expert("effect", [3], "B", domain=dom)
    e0 = _expert("effect", [3], "B")
    v_bg, v_a = _run(model, e, x)
    _, v_a0 = _run(model, e0, x)
    assert rel_err(v_bg, plain_bg) < 1e-5 and rel_err(v_a, v_a0) > 1e-3


def test_cond_argument_and_precomputed_ctx(setup):
    model, x, _ = setup
    e = _expert("quality", range(4), "C")
    a = _run(model, e, x)
    ctx = model.embed_context(x["context"], x["clip_fea"])
    b = branch_forward(model, e, x["z_bg"], x["z_alpha"], 700.0, cond=x["cond"], ctx=ctx)
    for u, w in zip(a, b):
        assert float(mx.abs(u - w).max()) == 0.0


def test_wrappers_built_once_and_restored(setup):
    model, x, _ = setup
    e = _expert("quality", range(4), "C")
    q0 = model.blocks[0].self_attn.q
    with expert_applied(model, e):
        w = model.blocks[0].self_attn.q
        assert isinstance(w, ReplicaLoRALinear) and w.base is q0
    assert model.blocks[0].self_attn.q is q0
    with pytest.raises(RuntimeError, match="boom"):
        with expert_applied(model, e):
            assert model.blocks[0].self_attn.q is w  # the cached wrapper, not a new one
            raise RuntimeError("boom")
    assert model.blocks[0].self_attn.q is q0 and model.blocks[3].cross_attn.o is not None
    assert not any(isinstance(getattr(b.self_attn, n), ReplicaLoRALinear) for b in model.blocks for n in "qkvo")

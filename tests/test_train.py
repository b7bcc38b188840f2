"""The expert trainer on a tiny random DiT: the replica-only forwards equal
the branch forward, training touches nothing but the LoRA, the loss falls
when overfitting one sample, resume and gradient accumulation are exact,
and the written expert loads through the normal path."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlx_omnimatte as mo
from branch_utils import LATENT, WIDE, sample, tiny_model
from mlx_omnimatte.branch.forward import branch_forward
from mlx_omnimatte.errors import OmnimatteError
from mlx_omnimatte.train import store
from mlx_omnimatte.train.forward import expert_from_lora, init_lora, inpaint_pass, lora_blocks, replica_pass
from mlx_omnimatte.train.trainer import TrainSettings, global_gradients, make_grad_fn, new_state, train

def random_lora(cfg, blocks, rank=4, seed=3):
    rng = np.random.default_rng(seed)
    lora = init_lora(cfg.dim, blocks, rank, seed)
    for p in lora.values():
        p["b"] = mx.array((0.3 * rng.standard_normal(p["b"].shape)).astype(np.float32))
    return lora


def inputs(cfg, seed=1):
    rng = np.random.default_rng(seed)
    a = lambda *s: mx.array(rng.standard_normal(s).astype(np.float32))
    return a(1, *LATENT, 16), a(1, *LATENT, 16), a(1, *LATENT, 20), a(1, 5, cfg.text_dim), a(1, 257, cfg.image_dim)


@pytest.mark.parametrize("kind", ["quality", "effect"])
def test_replica_pass_equals_branch_forward(kind):
    model = tiny_model(0, num_layers=3)
    cfg = model.config
    blocks = lora_blocks(kind, 3, 2)
    lora = random_lora(cfg, blocks)
    expert = expert_from_lora(lora, kind, 4, 8.0, cfg.dim, 3, k=2)
    x_bg, x_alpha, cond, context, clip = inputs(cfg)
    ctx = model.embed_context(context, clip)
    t = mx.array([700.0])
    v_bg, v_alpha = branch_forward(model, expert, x_bg, x_alpha, t, cond=cond, ctx=ctx)
    kvs = None
    if kind == "effect":
        bg_alone, kvs = inpaint_pass(model, x_bg, t, cond, ctx)
        assert float(mx.abs(bg_alone - v_bg).max()) <= 1e-5 * float(mx.abs(v_bg).max())
    v = replica_pass(model, lora, expert.scale, x_alpha, t, cond, ctx, kvs)
    assert float(mx.abs(v_alpha).max()) > 0.1
    assert float(mx.abs(v - v_alpha).max()) <= 1e-5 * float(mx.abs(v_alpha).max())
    # the LoRA matters: the base model's replica output differs
    _, base = branch_forward(model, None, x_bg, x_alpha, t, cond=cond, ctx=ctx, mask_type=expert.mask_type)
    assert float(mx.abs(base - v_alpha).max()) > 1e-2


def _params(model):
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


@pytest.mark.parametrize("kind", ["quality", "effect"])
def test_training_changes_only_the_lora(kind):
    model = tiny_model(0, **WIDE)
    before = _params(model)
    s = TrainSettings(kind=kind, rank=4, k=1, steps=3, lr=1e-2).resolve(2)
    fresh = new_state(model, s)
    lora0 = {k: np.array(v) for k, v in tree_flatten(fresh.lora)}
    state = train(model, [sample(model.config)], s)
    after = _params(model)
    assert before.keys() == after.keys()
    for k in before:
        assert np.array_equal(before[k], after[k]), k
    lora1 = {k: np.array(v) for k, v in tree_flatten(state.lora)}
    assert lora0.keys() == lora1.keys()
    assert all(not np.array_equal(lora0[k], lora1[k]) for k in lora0)
    wanted = {f"blocks.{i}" for i in lora_blocks(kind, 2, 1)}
    assert {k.split(".")[0] + "." + k.split(".")[1] for k in lora1} == wanted


def test_inpaint_half_unchanged_by_training():
    model = tiny_model(0, **WIDE)
    cfg = model.config
    s = TrainSettings(kind="effect", rank=4, k=2, steps=3, lr=1e-2).resolve(2)
    untrained = new_state(model, s)
    trained = train(model, [sample(cfg)], s)
    x_bg, x_alpha, cond, context, clip = inputs(cfg)
    ctx = model.embed_context(context, clip)
    outs = [branch_forward(model, expert_from_lora(st.lora, "effect", 4, 4.0, cfg.dim, 2, k=2),
                           x_bg, x_alpha, mx.array([600.0]), cond=cond, ctx=ctx) for st in (untrained, trained)]
    assert np.array_equal(np.array(outs[0][0]), np.array(outs[1][0]))  # background: bit-identical
    assert float(mx.abs(outs[0][1] - outs[1][1]).max()) > 1e-3  # alpha: trained


@pytest.mark.parametrize("kind", ["quality", "effect"])
def test_overfitting_one_sample_lowers_the_loss_tenfold(kind):
    model = tiny_model(0, **WIDE)
    s = TrainSettings(kind=kind, rank=8, k=2, steps=60, lr=3e-3, fixed_noise=True).resolve(2)
    state = train(model, [sample(model.config)], s)
    assert state.losses[0] > 1.0
    assert state.losses[-1] <= state.losses[0] / 10, state.losses[::10]


def test_resume_equals_uninterrupted(tmp_path):
    model = tiny_model(0, **WIDE)
    data = [sample(model.config, 0), sample(model.config, 1)]
    s6 = TrainSettings(kind="quality", rank=4, steps=6, lr=1e-2).resolve(2)
    whole = train(model, data, s6)
    s3 = TrainSettings(kind="quality", rank=4, steps=3, lr=1e-2).resolve(2)
    half = train(model, data, s3)
    store.save_checkpoint(tmp_path / "ck", half, s3, {"base_model": "x"})
    resumed = train(model, data, s6, store.load_checkpoint(tmp_path / "ck", s6))
    assert resumed.step == 6 and resumed.losses == pytest.approx(whole.losses, abs=1e-6)
    got = dict(tree_flatten(resumed.lora))
    assert got.keys() == dict(tree_flatten(whole.lora)).keys()
    for k, a in tree_flatten(whole.lora):
        assert float(mx.abs(a - got[k]).max()) <= 1e-6, k
    assert float(mx.abs(whole.lora["blocks.0.self_attn.q"]["b"]).max()) > 1e-3


def max_rel_diff(a: dict, b: dict) -> float:
    fa, fb = dict(tree_flatten(a)), dict(tree_flatten(b))
    assert fa.keys() == fb.keys()
    scale = max(float(mx.abs(v).max()) for v in fa.values())
    return max(float(mx.abs(fa[k] - fb[k]).max()) for k in fa) / scale


def test_grad_accumulation_equals_one_big_batch():
    model = tiny_model(0, **WIDE)
    data = [sample(model.config, i) for i in range(3)]
    state = train(model, data, TrainSettings(kind="quality", rank=4, steps=2).resolve(2))  # B != 0
    results = []
    for batch, accum in ((2, 1), (1, 2)):
        s = TrainSettings(kind="quality", rank=4, steps=2, batch=batch, grad_accum=accum).resolve(2)
        results.append(global_gradients(state, model, data, s, make_grad_fn(model, s)))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert abs(float(loss_a) - float(loss_b)) <= 1e-6 * abs(float(loss_a))
    assert max_rel_diff(grads_a, grads_b) <= 1e-6


def test_gradient_checkpointing_changes_nothing():
    model = tiny_model(0, **WIDE)
    data = [sample(model.config)]
    runs = [train(model, data, TrainSettings(kind="effect", rank=4, k=2, steps=2, lr=1e-2,
                                             grad_checkpoint=g).resolve(2)) for g in (True, False)]
    for (k, a), (_, b) in zip(tree_flatten(runs[0].lora), tree_flatten(runs[1].lora)):
        assert float(mx.abs(a - b).max()) <= 1e-6, k


@pytest.mark.slow
def test_compiled_step_equals_eager():
    model = tiny_model(0, **WIDE)
    data = [sample(model.config)]
    runs = [train(model, data, TrainSettings(kind="quality", rank=4, steps=3, lr=1e-2, compile=c).resolve(2))
            for c in (True, False)]
    assert runs[0].losses == pytest.approx(runs[1].losses, abs=1e-5)


def test_written_expert_loads_and_matches(tmp_path):
    model = tiny_model(0, **WIDE)
    cfg = model.config
    s = TrainSettings(kind="effect", rank=4, alpha=2.0, k=1, steps=2, lr=1e-2).resolve(2)
    state = train(model, [sample(cfg)], s)
    out = tmp_path / "effect"
    out.mkdir()
    store.write_expert_into(out, state.lora, s, cfg, {"base_model": "abc"})
    config = json.loads((out / "config.json").read_text())
    assert {k: config[k] for k in ("component", "kind", "rank", "alpha", "blocks", "k", "mask_type",
                                    "tau_default", "dim", "num_layers")} == {
        "component": "expert", "kind": "effect", "rank": 4, "alpha": 2.0, "blocks": [1], "k": 1,
        "mask_type": "B", "tau_default": 0.5, "dim": 256, "num_layers": 2}
    assert config["source"]["base_model"] == "abc" and config["source"]["base_dim"] == 256
    expert = mo.load_model(out, "expert")
    for name, p in state.lora.items():
        assert np.array_equal(np.array(expert.lora[name].a), np.array(p["a"]))
        assert np.array_equal(np.array(expert.lora[name].b), np.array(p["b"]))
    assert expert.scale == 0.5


def test_bad_settings_are_refused():
    with pytest.raises(OmnimatteError, match="--rank 0"):
        TrainSettings(kind="quality", rank=0).resolve(2)
    with pytest.raises(OmnimatteError, match="--k 3: larger than the transformer's 2 blocks"):
        TrainSettings(kind="effect", k=3).resolve(2)
    with pytest.raises(OmnimatteError, match="--steps"):
        TrainSettings(kind="effect", steps=0).resolve(2)
    assert TrainSettings(kind="effect").resolve(30).k == 10
    assert TrainSettings(kind="quality").resolve(30).rank == 64
    assert TrainSettings(kind="effect").resolve(30).rank == 128

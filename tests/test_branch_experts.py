"""Expert routing by timestep, tau checks, width checks, and the dual-expert
sampling loop that `decompose` runs (`pipelines.stages.sample_trajectory`:
both latents stepped together, experts switched at tau)."""

import mlx.core as mx
import pytest

from mlx_omnimatte import sampling
from mlx_omnimatte.branch import Expert, LoRA, branch_forward, check_tau, route, select
from mlx_omnimatte.errors import OmnimatteError
from mlx_omnimatte.pipelines.omnimatte import DualExpert
from mlx_omnimatte.pipelines.settings import Settings
from mlx_omnimatte.weights import load_model
from branch_utils import adapter_keys, convert_expert, inputs, random_adapter, sample_layers, tiny_model, write_lora


def test_route_and_tau():
    assert route(1000.0, 0.5) == "effect" and route(500.1, 0.5) == "effect"
    assert route(500.0, 0.5) == "quality" and route(10.0, 0.5) == "quality"
    assert route(1000.0, 1.0) == "quality" and route(999.0, 1.0) == "quality"  # tau=1: Quality only
    assert route(1.0, 0.0) == "effect" and route(0.5, 0.0) == "effect"  # tau=0: Effect only
    assert check_tau("0.25") == 0.25
    for bad in (-0.01, 1.01, 5, float("nan"), "abc", None):
        with pytest.raises(OmnimatteError, match="tau"):
            route(500.0, bad)


def _expert(kind, blocks, mask, dim=64, seed=1):
    ad = random_adapter(blocks, dim=dim, seed=seed)
    return Expert(kind=kind, lora={m: LoRA(mx.array(a), mx.array(b)) for m, (a, b) in ad.items()},
                  rank=4, alpha=4, dim=dim, num_layers=4, mask_type=mask)


def sample_branch(model, x, steps, effect=None, quality=None, tau=None, sampler="euler", shift=5.0):
    """The product's loop on the test inputs; returns (z_bg, z_alpha) and the
    expert that ran at each step (from the progress reports)."""
    ctx = model.embed_context(x["context"], x["clip_fea"])
    experts = {k: e for k, e in (("effect", effect), ("quality", quality)) if e is not None}
    dual = DualExpert.of(experts, tau)
    kinds = []

    def report(stage, done, total, detail=""):
        if done:
            kinds.append(detail.split()[0])

    settings = Settings(steps=steps, shift=shift, sampler=sampler, dtype="float32")
    zb, za = sample_layers(model, dual, x["z_bg"], x["z_alpha"], x["cond"], ctx, settings, report)
    return zb, za, kinds


def test_select_needs_the_routed_expert():
    q = _expert("quality", range(4), "C")
    assert select(100.0, 0.5, None, q) is q
    with pytest.raises(OmnimatteError, match="effect expert is needed at timestep 900.0"):
        select(900.0, 0.5, None, q)


def test_expert_for_another_width(tmp_path):
    src = write_lora(tmp_path / "wide.safetensors", adapter_keys(random_adapter(range(2), dim=96), "peft"),
                     {"kind": "quality", "num_layers": 4})
    wide = convert_expert(src, tmp_path / "wide")
    assert wide.dim == 96
    model = tiny_model()
    x = inputs(model)
    with pytest.raises(OmnimatteError, match=r"wide: expert for model width 96, the transformer has width 64"):
        sample_branch(model, x, 2, quality=wide, tau=1.0)
    with pytest.raises(OmnimatteError, match=r"wide: expert for model width 96"):
        branch_forward(model, wide, x["z_bg"], x["z_alpha"], 500.0, x["context"], x["clip_fea"], cond=x["cond"])
    with pytest.raises(OmnimatteError, match="LoRA on block 5, the transformer has 4 blocks"):
        _expert("effect", [5], "B").check_model(64, 4)


def test_load_model_returns_expert(tmp_path):
    src = write_lora(tmp_path / "e.safetensors", adapter_keys(random_adapter([2, 3]), "kohya", alpha=2.0),
                     {"num_layers": 4, "tau_default": 0.7})
    convert_expert(src, tmp_path / "out")
    e = load_model(tmp_path / "out", component="expert")
    assert isinstance(e, Expert) and e.kind == "effect" and e.scale == 0.5 and e.tau_default == 0.7
    assert e.blocks == (2, 3) and e.k == 2 and e.mask_type == "B"


def test_dual_expert_sampling_matches_manual_loop():
    model = tiny_model()
    x = inputs(model)
    effect, quality = _expert("effect", [2, 3], "B", seed=2), _expert("quality", range(4), "C", seed=3)
    sampler = sampling.make_sampler("euler", 6, 5.0)
    zb, za, kinds = sample_branch(model, x, 6, effect, quality, tau=0.5)
    expect = ["effect" if t / 1000 > 0.5 else "quality" for t in sampler.timesteps]
    assert kinds == expect and "effect" in kinds and "quality" in kinds
    # by hand: one branch forward per step, both latents stepped with the same sigmas
    sigmas = sampler.sigmas
    b, a = x["z_bg"], x["z_alpha"]
    for i, t in enumerate(sampler.timesteps):
        e = effect if t / 1000 > 0.5 else quality
        vb, va = branch_forward(model, e, b, a, float(t), x["context"], x["clip_fea"], cond=x["cond"])
        dt = float(sigmas[i + 1] - sigmas[i])
        b, a = b + dt * vb, a + dt * va
    assert float(mx.abs(zb - b).max()) <= 1e-5 * float(mx.abs(b).max())
    assert float(mx.abs(za - a).max()) <= 1e-5 * float(mx.abs(a).max())
    # the alpha latent differs from the background one
    assert float(mx.abs(za - zb).max()) > 0.1


@pytest.mark.parametrize("tau,only", [(0.0, "effect"), (1.0, "quality")])
def test_tau_extremes_use_one_expert(tau, only):
    model = tiny_model(num_layers=2)
    x = inputs(model, frames=1)
    effect, quality = _expert("effect", [1], "B"), _expert("quality", range(2), "C")
    for e in (effect, quality):
        e.num_layers = 2
    _, _, kinds = sample_branch(model, x, 3, effect if only == "effect" else None,
                                quality if only == "quality" else None, tau=tau, sampler="unipc")
    assert kinds == [only] * 3


def test_bad_tau_and_missing_expert_fail_before_sampling():
    model = tiny_model(num_layers=2)
    x = inputs(model, frames=1)
    q = _expert("quality", range(2), "C")
    steps = []

    def counting(stage, done, total, detail=""):
        steps.append(done)

    ctx = model.embed_context(x["context"], x["clip_fea"])
    with pytest.raises(OmnimatteError, match=r"tau 1.5: must lie in \[0, 1\]"):
        sample_branch(model, x, 3, None, q, tau=1.5)
    with pytest.raises(OmnimatteError, match="effect expert is needed"):
        sample_layers(model, DualExpert.of({"quality": q}, 0.5), x["z_bg"], x["z_alpha"], x["cond"], ctx,
                       Settings(steps=3), counting)
    assert steps == []  # refused before the first step
    with pytest.raises(OmnimatteError, match="needs an Effect or a Quality expert"):
        sample_branch(model, x, 3, None, None, tau=0.5)

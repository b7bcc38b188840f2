"""Branch forward parity: MLX `branch_forward` against a torch reference on
diffusers' `WanTransformer3DModel` with dense (2N)^2 masks and explicit
replica-half LoRA deltas (parity/branch_reference.py), float32.

Weights reach MLX only through the real path: the DiT written by torch in the
original layout and converted by the CLI; the experts written as LoRA files
(Effect: kohya layout + alpha + domain embedding; Quality: PEFT with
diffusers names) and converted by the CLI. Every mask type (A, B, C) with
every expert (Effect: LoRA on the last K blocks; Quality: all blocks), and a
6-step dual-expert Euler run against diffusers' FlowMatchEulerDiscreteScheduler.
Bound: max|mlx - ref| <= 1e-4 * max|ref|.

    pytest parity/test_branch_parity.py -m "not slow" -s      # tiny width
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \
        pytest parity/test_branch_parity.py -m slow -s          # 1.3B width, 3 layers
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import mlx.core as mx  # noqa: E402
from branch_reference import (  # noqa: E402
    random_adapter, reference_branch, reference_dual_expert_sampling, write_adapter)
from wan_reference import build_reference, reference_forward, write_format  # noqa: E402

from branch_utils import sample_layers  # noqa: E402
from helpers import rel_err, run_cli  # noqa: E402
from mlx_omnimatte.branch import branch_forward  # noqa: E402
from mlx_omnimatte.pipelines.omnimatte import DualExpert  # noqa: E402
from mlx_omnimatte.pipelines.settings import Settings  # noqa: E402
from mlx_omnimatte.models.wan.transformer import PRESETS, Config  # noqa: E402
from mlx_omnimatte.weights import load_model  # noqa: E402

pytestmark = pytest.mark.torch

BOUND = 1e-4
TINY = Config(dim=256, ffn_dim=512, num_heads=2, num_layers=4, in_dim=36, image_dim=1280)
WIDE = replace(PRESETS["fun-inp-1.3b"], num_layers=3)


def convert_cli(src, out):
    assert run_cli(["convert", str(src), "-o", str(out), "--dtype", "float32"])[0] == 0
    return json.loads((out / "config.json").read_text())



class Case:
    """Reference DiT + two experts, converted to MLX; inputs for one step."""

    def __init__(self, cfg: Config, grid, folder, k: int, ranks=(8, 4), domain: bool = True):
        self.cfg = cfg
        self.torch_model = build_reference(cfg, seed=1)
        convert_cli(write_format(self.torch_model, folder, "original", "safetensors"), folder / "dit")
        self.model = load_model(folder / "dit", component="transformer")
        L, D = cfg.num_layers, cfg.dim
        rng = np.random.default_rng(7)
        dom = (0.5 * rng.standard_normal(D)).astype(np.float32) if domain else None
        r_e, r_q = ranks
        effect = random_adapter(range(L - k, L), D, r_e, seed=11)
        quality = random_adapter(range(L), D, r_q, seed=12)
        # Effect: kohya with alpha = 2 * rank (scale 2); Quality: PEFT without alpha (scale 1)
        src_e = write_adapter(effect, folder / "effect/effect.safetensors", "kohya", alpha=2 * r_e,
                              manifest={"kind": "effect", "k": k, "num_layers": L}, domain=dom)
        src_q = write_adapter(quality, folder / "quality/quality.safetensors", "peft",
                              manifest={"kind": "quality", "num_layers": L})
        cfg_e, cfg_q = convert_cli(src_e, folder / "mlx-effect"), convert_cli(src_q, folder / "mlx-quality")
        assert (cfg_e["kind"], cfg_e["mask_type"], cfg_e["blocks"], cfg_e["k"]) == ("effect", "B",
                                                                                   list(range(L - k, L)), k)
        assert (cfg_q["kind"], cfg_q["mask_type"], cfg_q["blocks"]) == ("quality", "C", list(range(L)))
        self.experts = {"effect": load_model(folder / "mlx-effect"), "quality": load_model(folder / "mlx-quality")}
        self.ref_experts = {"effect": (effect, 2.0, "B", dom), "quality": (quality, 1.0, "C", None)}
        # inputs: noisy latents, shared mask + condition channels
        f, h, w = grid
        self.z_bg, self.z_alpha = (rng.standard_normal((1, f, h, w, 16)).astype(np.float32) for _ in range(2))
        self.cond = rng.standard_normal((1, f, h, w, cfg.in_dim - 16)).astype(np.float32)
        self.context = np.zeros((1, cfg.text_len, cfg.text_dim), np.float32)
        self.context[:, :20] = rng.standard_normal((1, 20, cfg.text_dim))
        self.clip = rng.standard_normal((1, 257, cfg.image_dim)).astype(np.float32)
        self.x_bg = np.concatenate([self.z_bg, self.cond], -1)
        self.x_alpha = np.concatenate([self.z_alpha, self.cond], -1)

    def reference(self, kind, mask, t=650.0):
        adapter, scale, _, dom = self.ref_experts[kind]
        return reference_branch(self.torch_model, self.x_bg, self.x_alpha, [t], self.context, self.clip, mask,
                                adapter, scale, dom)

    def mlx(self, kind, mask, t=650.0):
        vb, va = branch_forward(self.model, self.experts[kind], mx.array(self.x_bg), mx.array(self.x_alpha),
                                mx.array([t]), mx.array(self.context), mx.array(self.clip), mask)
        return np.array(vb), np.array(va)

    def check(self, kind, mask, label):
        ref_bg, ref_a = self.reference(kind, mask)
        out_bg, out_a = self.mlx(kind, mask)
        e_bg, e_a = rel_err(out_bg, ref_bg), rel_err(out_a, ref_a)
        print(f"\n{label} {kind} mask {mask}: bg {e_bg:.2e}  alpha {e_a:.2e}  (max|ref| {np.abs(ref_a).max():.2f})")
        assert 0.3 < np.abs(ref_a).max() < 30
        assert e_bg <= BOUND and e_a <= BOUND
        return ref_bg, ref_a


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return Case(TINY, (3, 8, 8), tmp_path_factory.mktemp("branch-tiny"), k=2)


def test_reference_processor_agrees_with_diffusers(tiny):
    """The reference's own machinery: under B and C the background half is
    diffusers' plain forward (its own processor), and identical halves under A
    give the plain output twice."""
    plain = reference_forward(tiny.torch_model, {"x": tiny.x_bg, "t": np.array([650.0], np.float32),
                                                 "context": tiny.context, "clip_fea": tiny.clip})
    for mask in "BC":
        v_bg, _ = reference_branch(tiny.torch_model, tiny.x_bg, tiny.x_alpha, [650.0], tiny.context, tiny.clip,
                                   mask)
        assert rel_err(v_bg, plain) < 1e-5
    a, b = reference_branch(tiny.torch_model, tiny.x_bg, tiny.x_bg, [650.0], tiny.context, tiny.clip, "A")
    assert rel_err(a, plain) < 1e-5 and rel_err(b, plain) < 1e-5


@pytest.mark.parametrize("mask", ["A", "B", "C"])
@pytest.mark.parametrize("kind", ["effect", "quality"])
def test_tiny_branch_parity(tiny, kind, mask):
    ref_bg, ref_a = tiny.check(kind, mask, "tiny")
    # LoRA and mask matter: the replica output is not the background's
    assert np.abs(ref_a - ref_bg).max() > 0.1 * np.abs(ref_a).max()


def test_tiny_dual_expert_sampling(tiny):
    steps, tau = 6, 0.85  # 3 Effect steps, then 3 Quality steps
    zb_ref, za_ref, kinds = reference_dual_expert_sampling(
        tiny.torch_model, tiny.z_bg, tiny.z_alpha, tiny.cond, tiny.context, tiny.clip, tiny.ref_experts, tau, steps)
    assert "effect" in kinds and "quality" in kinds
    ran = []

    def report(stage, done, total, detail=""):
        if done:
            ran.append(detail.split()[0])

    # the loop `decompose` runs (windows, routing, schedule check)
    ctx = tiny.model.embed_context(mx.array(tiny.context), mx.array(tiny.clip))
    dual = DualExpert.of(tiny.experts, tau)
    zb, za = sample_layers(tiny.model, dual, mx.array(tiny.z_bg), mx.array(tiny.z_alpha), mx.array(tiny.cond),
                            ctx, Settings(steps=steps, shift=5.0, dtype="float32"), report)
    assert ran == kinds
    e_bg, e_a = rel_err(np.array(zb), zb_ref), rel_err(np.array(za), za_ref)
    print(f"\ntiny dual-expert Euler {steps} steps ({kinds.count('effect')} effect, "
          f"{kinds.count('quality')} quality): bg {e_bg:.2e}  alpha {e_a:.2e}")
    assert e_bg <= BOUND and e_a <= BOUND


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    return Case(WIDE, (2, 16, 16), tmp_path_factory.mktemp("branch-wide"), k=2, ranks=(128, 64))


@pytest.mark.slow
@pytest.mark.parametrize("mask", ["A", "B", "C"])
@pytest.mark.parametrize("kind", ["effect", "quality"])
def test_wide_branch_parity(wide, kind, mask):
    wide.check(kind, mask, "1.3B width, 3 layers, 2x128 tokens")

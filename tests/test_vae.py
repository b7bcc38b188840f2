"""Wan2.1 VAE without torch: tiny random checkpoints in both source formats
through the real CLI, causal chunking, tiling, bad input.

The tiny VAE has Wan2.1's layout (dim_mult [1,2,4,4], 2 residual blocks,
temporal downsampling [False, True, True], z_dim 16) with base_dim 8.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from ckpt_utils import save_torch_zip
from safetensors.numpy import save_file

from mlx_omnimatte.convert import vae as convert_vae
from mlx_omnimatte.convert.readers import Checkpoint, LazyTensor
from mlx_omnimatte.errors import OmnimatteError
from mlx_omnimatte.models.wan import vae as V
from mlx_omnimatte.models.wan import vae_tiling as T
from mlx_omnimatte.weights import load_model
from helpers import run_cli

DIM = 8


# --------------------------------------------------------------------------- the two layouts


def wan21_vae_layout(dim: int = DIM, z: int = 16) -> list[tuple[str, str, tuple]]:
    """(diffusers name, original name, torch shape) of every Wan2.1 VAE tensor,
    written out from the two reference module trees (diffusers AutoencoderKLWan,
    original wan/modules/vae.py), independently of convert/vae.py."""
    rows = []

    def conv(d, o, cin, cout, k):
        rows.append((f"{d}.weight", f"{o}.weight", (cout, cin, *k)))
        rows.append((f"{d}.bias", f"{o}.bias", (cout,)))

    def res(d, o, cin, cout):
        rows.append((f"{d}.norm1.gamma", f"{o}.residual.0.gamma", (cin, 1, 1, 1)))
        conv(f"{d}.conv1", f"{o}.residual.2", cin, cout, (3, 3, 3))
        rows.append((f"{d}.norm2.gamma", f"{o}.residual.3.gamma", (cout, 1, 1, 1)))
        conv(f"{d}.conv2", f"{o}.residual.6", cout, cout, (3, 3, 3))
        if cin != cout:
            conv(f"{d}.conv_shortcut", f"{o}.shortcut", cin, cout, (1, 1, 1))

    def attn(d, o, c):
        rows.append((f"{d}.norm.gamma", f"{o}.norm.gamma", (c, 1, 1)))
        conv(f"{d}.to_qkv", f"{o}.to_qkv", c, 3 * c, (1, 1))
        conv(f"{d}.proj", f"{o}.proj", c, c, (1, 1))

    def resample(d, o, c, mode):
        up = mode.startswith("up")
        conv(f"{d}.resample.1", f"{o}.resample.1", c, c // 2 if up else c, (3, 3))
        if mode == "up3d":
            conv(f"{d}.time_conv", f"{o}.time_conv", c, 2 * c, (3, 1, 1))
        if mode == "down3d":
            conv(f"{d}.time_conv", f"{o}.time_conv", c, c, (3, 1, 1))

    def middle(side, c):
        res(f"{side}.mid_block.resnets.0", f"{side}.middle.0", c, c)
        attn(f"{side}.mid_block.attentions.0", f"{side}.middle.1", c)
        res(f"{side}.mid_block.resnets.1", f"{side}.middle.2", c, c)

    d1, d2, d4 = dim, 2 * dim, 4 * dim
    conv("encoder.conv_in", "encoder.conv1", 3, d1, (3, 3, 3))
    enc = [("res", d1, d1), ("res", d1, d1), ("down2d", d1), ("res", d1, d2), ("res", d2, d2), ("down3d", d2),
           ("res", d2, d4), ("res", d4, d4), ("down3d", d4), ("res", d4, d4), ("res", d4, d4)]
    for i, blk in enumerate(enc):
        d, o = f"encoder.down_blocks.{i}", f"encoder.downsamples.{i}"
        res(d, o, blk[1], blk[2]) if blk[0] == "res" else resample(d, o, blk[1], blk[0])
    middle("encoder", d4)
    rows.append(("encoder.norm_out.gamma", "encoder.head.0.gamma", (d4, 1, 1, 1)))
    conv("encoder.conv_out", "encoder.head.2", d4, 2 * z, (3, 3, 3))
    conv("quant_conv", "conv1", 2 * z, 2 * z, (1, 1, 1))
    conv("post_quant_conv", "conv2", z, z, (1, 1, 1))
    conv("decoder.conv_in", "decoder.conv1", z, d4, (3, 3, 3))
    middle("decoder", d4)
    ups = [(d4, d4, "up3d"), (d2, d4, "up3d"), (d2, d2, "up2d"), (d1, d1, None)]
    for j, (cin, cout, mode) in enumerate(ups):
        for k in range(3):
            res(f"decoder.up_blocks.{j}.resnets.{k}", f"decoder.upsamples.{4 * j + k}", cin if k == 0 else cout, cout)
        if mode:
            resample(f"decoder.up_blocks.{j}.upsamplers.0", f"decoder.upsamples.{4 * j + 3}", cout, mode)
    rows.append(("decoder.norm_out.gamma", "decoder.head.0.gamma", (d1, 1, 1, 1)))
    conv("decoder.conv_out", "decoder.head.2", d1, 3, (3, 3, 3))
    return rows


def random_tensors(seed: int = 0, dim: int = DIM) -> list[tuple[str, str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for dname, oname, shape in wan21_vae_layout(dim):
        if dname.endswith("gamma"):
            a = 1.0 + 0.2 * rng.standard_normal(shape)
        elif dname.endswith("bias"):
            a = 0.05 * rng.standard_normal(shape)
        else:
            a = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
        out.append((dname, oname, a.astype(np.float32)))
    return out


@pytest.fixture(scope="module")
def tiny_sources(tmp_path_factory):
    """A diffusers vae/ folder and an original .pth holding the same tensors."""
    root = tmp_path_factory.mktemp("vae_src")
    tensors = random_tensors()
    folder = root / "vae"
    folder.mkdir()
    save_file({d: a for d, _, a in tensors}, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "_class_name": "AutoencoderKLWan", "base_dim": DIM, "z_dim": 16, "dim_mult": [1, 2, 4, 4],
        "num_res_blocks": 2, "attn_scales": [], "temperal_downsample": [False, True, True],
        "latents_mean": list(V.LATENTS_MEAN), "latents_std": list(V.LATENTS_STD)}))
    pth = root / "Wan2.1_VAE.pth"
    save_torch_zip(pth, {o: a for _, o, a in tensors})
    return folder, pth


@pytest.fixture(scope="module")
def tiny_models(tiny_sources, tmp_path_factory):
    folder, pth = tiny_sources
    out = tmp_path_factory.mktemp("vae_out")
    for src, name in ((folder, "diffusers"), (pth, "original")):
        assert run_cli(["convert", src, "-o", out / name])[0] == 0
    return {name: load_model(out / name, "vae") for name in ("diffusers", "original")}, out


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return tiny_models[0]["diffusers"]


def video(t=9, h=32, w=48, b=1, seed=1):
    return mx.array(np.random.default_rng(seed).uniform(-1, 1, (b, t, h, w, 3)).astype(np.float32))


# --------------------------------------------------------------------------- conversion


def test_both_formats_detected_and_identical(tiny_models):
    models, out = tiny_models
    cfg = {n: json.loads((out / n / "config.json").read_text()) for n in models}
    assert cfg["diffusers"]["source"]["source_format"] == "diffusers"
    assert cfg["original"]["source"]["source_format"] == "original"
    assert cfg["original"]["source"]["file_format"] == "torch"
    for c in cfg.values():
        assert (c["component"], c["base_dim"], c["z_dim"], c["dtype"]) == ("vae", DIM, 16, "float32")
        assert c["latents_std"] == pytest.approx(list(V.LATENTS_STD))
    from mlx.utils import tree_flatten
    a = dict(tree_flatten(models["diffusers"].parameters()))
    b = dict(tree_flatten(models["original"].parameters()))
    assert a.keys() == b.keys() and len(a) == len(wan21_vae_layout())
    assert all(mx.array_equal(a[k], b[k]).item() for k in a)


def test_conv_weights_moved_to_channels_last(tiny, tiny_sources):
    from safetensors.numpy import load_file
    src = load_file(str(tiny_sources[0] / "diffusion_pytorch_model.safetensors"))
    w = np.array(tiny.decoder.upsamples[3].time_conv.weight)  # torch (2C, C, 3, 1, 1)
    np.testing.assert_array_equal(w, src["decoder.up_blocks.0.upsamplers.0.time_conv.weight"].transpose(0, 2, 3, 4, 1))
    g = np.array(tiny.encoder.middle[1].norm.gamma)
    np.testing.assert_array_equal(g, src["encoder.mid_block.attentions.0.norm.gamma"])


def test_detect_claims_only_vae_keys():
    def ckpt(keys):
        empty = LazyTensor((1,), "F32", lambda: np.zeros(1, np.float32))
        return Checkpoint({k: empty for k in keys}, "x", "safetensors")
    diffusers = [d for d, _, _ in wan21_vae_layout()]
    original = [o for _, o, _ in wan21_vae_layout()]
    assert convert_vae.detect(ckpt(diffusers)) == "diffusers"
    assert convert_vae.detect(ckpt(original)) == "original"
    assert convert_vae.detect(ckpt(["vae." + k for k in original])) is None  # unknown wrapper
    assert convert_vae.detect(ckpt(["model." + k for k in original])) == "original"
    others = {
        "transformer": ["patch_embedding.weight", "blocks.0.self_attn.q.weight", "head.head.weight",
                        "text_embedding.0.weight", "time_embedding.0.weight"],
        "t5": ["shared.weight", "encoder.block.0.layer.0.SelfAttention.q.weight", "encoder.final_layer_norm.weight"],
        "clip": ["visual.conv1.weight", "visual.transformer.resblocks.0.attn.in_proj_weight", "visual.proj"],
        "lora": ["diffusion_model.blocks.0.self_attn.q.lora_A.weight",
                 "diffusion_model.blocks.0.self_attn.q.lora_B.weight"],
    }
    for name, keys in others.items():
        assert convert_vae.detect(ckpt(keys)) is None, name


def test_transformer_checkpoint_as_vae_exits_2(tmp_path, capsys):
    rng = np.random.default_rng(0)
    f = tmp_path / "dit.safetensors"
    save_file({k: rng.standard_normal(s).astype(np.float32) for k, s in {
        "patch_embedding.weight": (16, 36, 1, 2, 2), "patch_embedding.bias": (16,),
        "blocks.0.self_attn.q.weight": (16, 16), "blocks.0.self_attn.q.bias": (16,),
        "head.head.weight": (64, 16), "text_embedding.0.weight": (16, 32)}.items()}, str(f))
    code, out, err = run_cli(["convert", f, "-o", tmp_path / "out", "--component", "vae"], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "not a vae checkpoint" in lines[0]
    assert not (tmp_path / "out").exists()


def test_incomplete_vae_checkpoint_names_the_missing_weight(tmp_path, tiny_sources, capsys):
    from safetensors.numpy import load_file
    src = load_file(str(tiny_sources[0] / "diffusion_pytorch_model.safetensors"))
    del src["decoder.up_blocks.1.resnets.0.conv_shortcut.weight"]
    (tmp_path / "vae").mkdir()
    save_file(src, str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))
    code, _, err = run_cli(["convert", tmp_path / "vae", "-o", tmp_path / "out", "--component", "vae"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "decoder.upsamples.4.conv_shortcut.weight" in err


def test_wan22_config_refused(tmp_path, tiny_sources, capsys):
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(
        (tiny_sources[0] / "diffusion_pytorch_model.safetensors").read_bytes())
    (folder / "config.json").write_text(json.dumps({"base_dim": DIM, "z_dim": 16, "is_residual": True}))
    code, _, err = run_cli(["convert", folder, "-o", tmp_path / "out"], capsys)
    assert code == 2 and "Wan2.1" in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------- shapes and bad input


def test_encode_decode_shapes_and_range(tiny):
    x = video(9, 32, 48, b=2)
    z = tiny.encode(x)
    assert z.shape == (2, 3, 4, 6, 16) and z.dtype == mx.float32
    y = tiny.decode(z)
    assert y.shape == (2, 9, 32, 48, 3)
    assert float(mx.abs(y).max()) <= 1.0
    z1 = tiny.encode(video(1, 16, 16))
    assert z1.shape == (1, 1, 2, 2, 16) and tiny.decode(z1).shape == (1, 1, 16, 16, 3)


@pytest.mark.parametrize("shape, words", [
    ((1, 8, 32, 32, 3), "4n+1"),
    ((1, 6, 32, 32, 3), "4n+1"),
    ((1, 5, 32, 32, 4), "3 channels"),
    ((1, 5, 32, 32, 1), "3 channels"),
    ((5, 32, 32, 3), "[B, T, H, W, 3]"),
    ((1, 5, 36, 32, 3), "multiples of 8"),
])
def test_bad_video_is_one_line_error(tiny, shape, words):
    with pytest.raises(OmnimatteError) as e:
        tiny.encode(mx.zeros(shape))
    msg = str(e.value)
    assert words in msg and "\n" not in msg and msg.startswith("video:")


def test_bad_latents_and_out_buffer(tiny):
    with pytest.raises(OmnimatteError, match="latents: expected"):
        tiny.decode(mx.zeros((1, 2, 4, 4, 4)))
    with pytest.raises(OmnimatteError, match="out has shape"):
        tiny.decode(mx.zeros((1, 2, 4, 4, 16)), out=np.empty((1, 4, 32, 32, 3), np.float32))


# --------------------------------------------------------------------------- causality of the chunking


def test_encoding_is_causal_over_chunks(tiny):
    """Latent frames 0..k depend only on frames 0..4k: the chunk caches carry
    exactly what a longer run would have seen."""
    x = video(13, 32, 32)
    full = np.array(tiny.encode(x))
    for t in (1, 5, 9):
        part = np.array(tiny.encode(x[:, :t]))
        np.testing.assert_allclose(part, full[:, : part.shape[1]], rtol=0, atol=1e-5)


def test_decoding_is_causal_over_latent_frames(tiny):
    z = mx.array(np.random.default_rng(2).standard_normal((1, 4, 4, 4, 16)).astype(np.float32))
    full = np.array(tiny.decode(z))
    assert full.shape[1] == 13
    for t in (1, 2, 3):
        part = np.array(tiny.decode(z[:, :t]))
        assert part.shape[1] == 1 + 4 * (t - 1)
        np.testing.assert_allclose(part, full[:, : part.shape[1]], rtol=0, atol=1e-5)
    # and the last latent frame matters for its 4 frames only
    z2 = mx.concatenate([z[:, :3], z[:, 3:] + 1.0], axis=1)
    other = np.array(tiny.decode(z2))
    assert np.abs(other[:, :9] - full[:, :9]).max() < 1e-5
    assert np.abs(other[:, 9:] - full[:, 9:]).max() > 1e-2


def test_decode_into_memmap(tiny, tmp_path):
    z = tiny.encode(video(5, 16, 24))
    ref = np.array(tiny.decode(z))
    out = np.lib.format.open_memmap(tmp_path / "v.npy", "w+", np.float32, tiny.video_shape(z.shape))
    got = tiny.decode(z, out=out)
    assert got is out
    np.testing.assert_array_equal(np.asarray(out), ref)


def test_bfloat16_close_to_float32(tiny_models):
    _, out = tiny_models
    m16 = load_model(out / "diffusers", "vae", dtype="bfloat16")
    m32 = load_model(out / "diffusers", "vae")
    assert m16.dtype == mx.bfloat16
    x = video(5, 16, 16)
    z32, z16 = np.array(m32.encode(x)), np.array(m16.encode(x))
    assert z16.dtype == np.float32
    rel = np.abs(z16 - z32).max() / np.abs(z32).max()
    assert 0 < rel < 0.05, rel
    y32, y16 = np.array(m32.decode(mx.array(z32))), np.array(m16.decode(mx.array(z32)))
    assert 0 < np.abs(y16 - y32).max() < 0.1


# --------------------------------------------------------------------------- tiling


def test_tile_starts_cover_with_overlap():
    for size, tile, ov in [(60, 32, 8), (104, 32, 8), (33, 16, 4), (10, 16, 4), (64, 32, 0)]:
        starts = T.tile_starts(size, tile, ov)
        assert starts[0] == 0 and min(starts[-1] + tile, size) == size
        for a, b in zip(starts, starts[1:]):
            assert a + tile - b >= ov  # at least the requested overlap
            assert b > a


def test_blend_weights_are_a_partition_of_unity():
    h, w = 20, 27
    total = np.zeros((h * 8, w * 8))
    tiles = list(T.tiles(h, w, 8, 10, 3, 8))
    assert len(tiles) > 4
    for y0, y1, x0, x1, wt in tiles:
        assert wt.shape == ((y1 - y0) * 8, (x1 - x0) * 8) and wt.min() > 0
        total[y0 * 8:y1 * 8, x0 * 8:x1 * 8] += wt
    np.testing.assert_allclose(total, 1.0, atol=1e-6)


def _pointwise(monkeypatch, model):
    """Replace the networks by per-position maps, so that tiling must be exact."""
    def fake_encode(self, video, tick):
        v = np.array(video)
        b, t, h, w, _ = v.shape  # every 4th frame, 8x8 average pooled
        pooled = v[:, ::4].reshape(b, (t - 1) // 4 + 1, h // 8, 8, w // 8, 8, 3).mean((3, 5))
        return mx.array(np.tile(pooled, (1, 1, 1, 1, 6))[..., :16])

    def fake_decode(self, z, buf, weight, tick):
        zz = np.array(z)[..., :3]
        up = np.repeat(np.repeat(zz, 8, axis=2), 8, axis=3)
        frames = np.concatenate([up[:, :1], np.repeat(up[:, 1:], 4, axis=1)], axis=1) * 0.1
        if weight is None:
            buf[...] = frames
        else:
            buf += frames * weight

    monkeypatch.setattr(V.Model, "_encode_frames", fake_encode)
    monkeypatch.setattr(V.Model, "_decode_frames", fake_decode)


@pytest.mark.parametrize("tl", [T.Tiling(32, 32, 8), T.Tiling(24, 40, 16), T.Tiling(64, 16, 8)])
def test_tiling_is_exact_for_pointwise_networks(tiny, monkeypatch, tl):
    _pointwise(monkeypatch, tiny)
    x = video(5, 56, 72)
    z_full, z_tiled = np.array(tiny.encode(x, tiling=False)), np.array(tiny.encode(x, tiling=tl))
    np.testing.assert_allclose(z_tiled, z_full, atol=1e-5)
    y_full, y_tiled = np.array(tiny.decode(mx.array(z_full), tiling=False)), \
        np.array(tiny.decode(mx.array(z_full), tiling=tl))
    np.testing.assert_allclose(y_tiled, y_full, atol=1e-5)


@pytest.fixture(scope="module")
def damped(tiny_models):
    """The tiny VAE with residual branches and attention output scaled by 0.1, as
    in trained networks whose residual updates are small: with fully random
    branches the network is chaotic and any seam changes everything."""
    models, out = tiny_models
    m = load_model(out / "diffusers", "vae")
    from mlx.utils import tree_flatten
    m.load_weights([(k, v * 0.1 if k.endswith(("conv2.weight", "proj.weight")) else v)
                    for k, v in tree_flatten(m.parameters())])
    return m


def test_tiled_decode_close_to_untiled(damped):
    """Real (tiny, random) network: one tile covering the frame is exact; smaller
    tiles differ (the middle attention is global, the receptive field wide) by a
    bounded amount that shrinks with the overlap."""
    m = damped
    x = video(5, 64, 96)
    z = m.encode(x)
    ref = np.array(m.decode(z, tiling=False))
    np.testing.assert_array_equal(np.array(m.decode(z, tiling=T.Tiling(64, 96, 16))), ref)
    errs = {}
    for tl in (T.Tiling(48, 64, 16), T.Tiling(48, 80, 32)):
        d = np.abs(np.array(m.decode(z, tiling=tl)) - ref)
        dz = np.abs(np.array(m.encode(x, tiling=tl)) - np.array(z))
        errs[tl.overlap] = (d.max(), d.mean(), dz.max(), dz.mean())
        print(f"tiny VAE {tl}: decode max {d.max():.4f} mean {d.mean():.5f}; "
              f"encode max {dz.max():.4f} mean {dz.mean():.5f}")
    # measured: decode max 0.340 / mean 0.029, encode mean 0.017 (48x64, overlap 16);
    # decode max 0.235 / mean 0.024, encode mean 0.014 (48x80, overlap 32)
    assert 0 < errs[16][0] < 0.5 and errs[16][1] < 0.04 and errs[16][3] < 0.03
    assert errs[32][1] < errs[16][1] and errs[32][3] < errs[16][3]


def test_automatic_tiling_follows_the_budget(tiny):
    h, w = 480, 832
    assert tiny._tiling_for("decode", h, w, None, None) is None
    assert tiny._tiling_for("decode", h, w, None, 1 << 40) is None
    assert tiny._tiling_for("decode", h, w, False, 1) is None
    assert tiny._tiling_for("decode", h, w, True, None) == T.Tiling()
    full = T.estimate_peak_bytes("decode", h, w, mx.float32, DIM, tiny.weights_bytes)
    tl = tiny._tiling_for("decode", h, w, None, full // 3)
    assert isinstance(tl, T.Tiling) and tl.height * tl.width < h * w
    assert T.estimate_peak_bytes("decode", tl.height, tl.width, mx.float32, DIM, tiny.weights_bytes) <= full // 3
    # the full-size model at 81 x 480 x 832 within 8 GiB on the CPU backend needs tiles
    assert T.estimate_peak_bytes("decode", h, w, device="cpu") > 8 << 30
    big = T.choose_tiling(h, w, 8 << 30, lambda a, b: T.estimate_peak_bytes("decode", a, b, device="cpu"))
    assert T.estimate_peak_bytes("decode", big.height, big.width, device="cpu") <= 8 << 30
    with pytest.raises(OmnimatteError, match="tiling"):
        tiny.decode(mx.zeros((1, 1, 4, 4, 16)), tiling=T.Tiling(12, 16, 8))


def test_automatic_tiling_runs(tiny, monkeypatch):
    z = tiny.encode(video(5, 144, 96))
    est = T.estimate_peak_bytes("decode", 144, 96, mx.float32, DIM, tiny.weights_bytes)
    calls = []
    real = V.Model._decode_frames
    monkeypatch.setattr(V.Model, "_decode_frames", lambda self, *a: calls.append(a[0].shape) or real(self, *a))
    y = tiny.decode(z, memory_budget=est - 1)  # just too small: tiles
    assert y.shape == (1, 5, 144, 96, 3) and float(mx.abs(y).max()) <= 1
    assert len(calls) == 2 and all(c[2] < 18 for c in calls)  # two tiles of < 18 latent rows


def test_progress_per_chunk_and_latent_frame():
    """encode reports each chunk (frame 0, then 4 frames at a time), decode
    each latent frame, with the totals, also through tiles."""
    m = V.Model(V.Config(base_dim=8, z_dim=16))
    video = mx.zeros((1, 9, 32, 48, 3))
    enc = []
    z = m.encode(video, on_chunk=lambda d, t: enc.append((d, t)))
    assert enc == [(1, 3), (2, 3), (3, 3)]
    dec = []
    m.decode(z, on_chunk=lambda d, t: dec.append((d, t)))
    assert dec == [(1, 3), (2, 3), (3, 3)]
    tiled = []
    m.decode(z, tiling=T.Tiling(16, 32, 8), on_chunk=lambda d, t: tiled.append((d, t)))
    assert tiled[-1][0] == tiled[-1][1] == 3 * len(list(T.tiles(4, 6, 2, 4, 1, 8)))

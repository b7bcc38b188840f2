"""Tiny random removal models in their released layouts, for end-to-end tests
through the real converter (no torch):

* ROSE: a lone `.safetensors` with the Fun-InP / Casper key names (the same
  transformer class), converted over the tiny Fun-InP folder with
  `--remover rose`;
* MiniMax-Remover: its diffusers folder, `transformer/` (diffusers names of
  its custom transformer: no text/image embedder, no `attn2`, 48 input
  channels) and `vae/` (AutoencoderKLWan) each with a config.json, and
  `scheduler/scheduler_config.json` (flow UniPC).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from test_vae import DIM as VAE_DIM, random_tensors
from tiny_models import DIT, dit_state, source_state, write_fun_folder
from mlx_omnimatte.cli.main import main
from mlx_omnimatte.models.wan import transformer as W
from mlx_omnimatte.models.wan import vae as V

MINIMAX_DIT = dict(DIT, in_dim=48, image_dim=None, cross_attn=False)
# MLX name -> MiniMax-Remover's (diffusers-style) name
MINIMAX_NAMES = [
    (r"time_embedding\.0\.(.+)", r"condition_embedder.time_embedder.linear_1.\1"),
    (r"time_embedding\.2\.(.+)", r"condition_embedder.time_embedder.linear_2.\1"),
    (r"time_projection\.1\.(.+)", r"condition_embedder.time_proj.\1"),
    (r"blocks\.(\d+)\.modulation", r"blocks.\1.scale_shift_table"),
    (r"blocks\.(\d+)\.self_attn\.q\.(.+)", r"blocks.\1.attn1.to_q.\2"),
    (r"blocks\.(\d+)\.self_attn\.k\.(.+)", r"blocks.\1.attn1.to_k.\2"),
    (r"blocks\.(\d+)\.self_attn\.v\.(.+)", r"blocks.\1.attn1.to_v.\2"),
    (r"blocks\.(\d+)\.self_attn\.o\.(.+)", r"blocks.\1.attn1.to_out.0.\2"),
    (r"blocks\.(\d+)\.self_attn\.(norm_q|norm_k)\.(.+)", r"blocks.\1.attn1.\2.\3"),
    (r"blocks\.(\d+)\.ffn\.0\.(.+)", r"blocks.\1.ffn.net.0.proj.\2"),
    (r"blocks\.(\d+)\.ffn\.2\.(.+)", r"blocks.\1.ffn.net.2.\2"),
    (r"head\.head\.(.+)", r"proj_out.\1"),
    (r"head\.modulation", r"scale_shift_table"),
]
UNIPC_CONFIG = {"_class_name": "UniPCMultistepScheduler", "num_train_timesteps": 1000, "solver_order": 2,
                "prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 3.0,
                "solver_type": "bh2", "lower_order_final": True, "predict_x0": True}


def minimax_config(cfg: dict) -> dict:
    """The transformer's config.json as its diffusers class writes it."""
    return {"_class_name": "Transformer3DModel", "patch_size": [1, 2, 2], "num_attention_heads": cfg["num_heads"],
            "attention_head_dim": cfg["dim"] // cfg["num_heads"], "in_channels": cfg["in_dim"],
            "out_channels": cfg["out_dim"], "freq_dim": 256, "ffn_dim": cfg["ffn_dim"],
            "num_layers": cfg["num_layers"], "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads",
            "eps": 1e-6, "added_kv_proj_dim": None, "rope_max_seq_len": 1024}


def minimax_state(seed: int = 21, cfg: dict = MINIMAX_DIT) -> dict[str, np.ndarray]:
    model = W.Model(W.Config(**cfg))
    state = source_state(model, MINIMAX_NAMES, seed=seed)
    rng = np.random.default_rng(seed)
    for k in state:
        if k.endswith("scale_shift_table"):
            state[k] = (0.1 * rng.standard_normal(state[k].shape)).astype(np.float32)
    return state


def write_minimax_folder(root: Path, scheduler: dict | None = UNIPC_CONFIG) -> Path:
    """What `huggingface-cli download zibojia/minimax-remover --include vae transformer scheduler` gives."""
    folder = Path(root) / "minimax-remover"
    (folder / "transformer").mkdir(parents=True)
    save_file(minimax_state(), str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    (folder / "transformer" / "config.json").write_text(json.dumps(minimax_config(MINIMAX_DIT)))
    (folder / "vae").mkdir()
    save_file({d: a for d, _, a in random_tensors(seed=1)}, str(folder / "vae" / "diffusion_pytorch_model.safetensors"))
    (folder / "vae" / "config.json").write_text(json.dumps({
        "_class_name": "AutoencoderKLWan", "base_dim": VAE_DIM, "z_dim": 16, "dim_mult": [1, 2, 4, 4],
        "num_res_blocks": 2, "attn_scales": [], "temperal_downsample": [False, True, True],
        "latents_mean": list(V.LATENTS_MEAN), "latents_std": list(V.LATENTS_STD)}))
    if scheduler is not None:
        (folder / "scheduler").mkdir()
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    return folder


def write_rose_file(root: Path, seed: int = 9) -> Path:
    """ROSE's transformer checkpoint: the Fun-InP keys, other weights."""
    path = Path(root) / "rose.safetensors"
    save_file(dit_state(seed), str(path))
    return path


def convert_ok(args) -> None:
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        assert e.code == 0, e.code


def rose_bundle(root: Path) -> Path:
    folder = write_fun_folder(root)
    out = Path(root) / "rose-bundle"
    convert_ok(["convert", folder, "--transformer", write_rose_file(root), "--remover", "rose", "-o", out])
    return out


def minimax_bundle(root: Path) -> Path:
    out = Path(root) / "minimax-bundle"
    convert_ok(["convert", write_minimax_folder(root), "-o", out])
    return out


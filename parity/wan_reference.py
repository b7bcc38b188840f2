"""Torch references for the Wan2.1 DiT: a diffusers `WanTransformer3DModel`
with every parameter randomized (also those initialized to zero or one), its
state dict written in the three source key layouts, and the reference forward
on channels-last numpy inputs.

The original-layout state dict is produced by a hand-written rename and then
checked against diffusers' own original -> diffusers converter
(`convert_wan_transformer_to_diffusers`, used by `from_single_file`), so the
key names are confirmed by an independent reference, not by our tables.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import torch
from diffusers import WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from safetensors.torch import save_file

from mlx_omnimatte.models.wan.transformer import Config

FORMATS = ("original", "diffusers", "diffsynth")
FILE_TYPES = ("safetensors", "pth")
DIFFSYNTH_PREFIX = "pipe.dit."  # what DiffSynth's trainer leaves unless told to remove it


def diffusers_kwargs(cfg: Config) -> dict:
    return dict(
        patch_size=tuple(cfg.patch_size),
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim,
        out_channels=cfg.out_dim,
        text_dim=cfg.text_dim,
        freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers,
        cross_attn_norm=cfg.cross_attn_norm,
        eps=cfg.eps,
        image_dim=cfg.image_dim,
        added_kv_proj_dim=cfg.dim if cfg.image_dim else None,
        rope_max_seq_len=cfg.rope_max_seq_len,
    )


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int, fp16_exact: bool = False) -> None:
    """Every parameter random, scaled so activations stay O(1): matrices
    N(0, 1/fan_in), biases N(0, 0.05^2), norm weights 1 + N(0, 0.1^2),
    modulation tables N(0, 1/D). `fp16_exact` rounds values to float16 (so a
    float16 file holds the exact weights of the float32 reference)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        r = torch.randn(p.shape, generator=g, dtype=torch.float64)
        leaf = name.rsplit(".", 1)[-1]
        if "scale_shift_table" in name:
            v = r / math.sqrt(p.shape[-1])
        elif "norm" in name and leaf == "weight":
            v = 1 + 0.1 * r
        elif leaf == "bias":
            v = 0.05 * r
        else:  # linear / conv weight (out, in, *k)
            v = r / math.sqrt(math.prod(p.shape[1:]))
        if fp16_exact:
            v = v.to(torch.float16)
        p.copy_(v.to(p.dtype))


def build_reference(cfg: Config, seed: int = 0, fp16_exact: bool = False) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    model = WanTransformer3DModel(**diffusers_kwargs(cfg)).float().eval()
    randomize_(model, seed, fp16_exact)
    return model


# --------------------------------------------------------------------------- key layouts

# diffusers -> original, written by hand from the two model sources
_TO_ORIGINAL = [
    (r"condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"condition_embedder\.time_proj\.", "time_projection.1."),
    (r"condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"condition_embedder\.image_embedder\.norm1\.", "img_emb.proj.0."),
    (r"condition_embedder\.image_embedder\.ff\.net\.0\.proj\.", "img_emb.proj.1."),
    (r"condition_embedder\.image_embedder\.ff\.net\.2\.", "img_emb.proj.3."),
    (r"condition_embedder\.image_embedder\.norm2\.", "img_emb.proj.4."),
    (r"^blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation"),
    (r"\.attn1\.", ".self_attn."),
    (r"\.attn2\.", ".cross_attn."),
    (r"\.to_q\.", ".q."),
    (r"\.to_k\.", ".k."),
    (r"\.to_v\.", ".v."),
    (r"\.to_out\.0\.", ".o."),
    (r"\.add_k_proj\.", ".k_img."),
    (r"\.add_v_proj\.", ".v_img."),
    (r"\.norm_added_k\.", ".norm_k_img."),
    (r"^blocks\.(\d+)\.norm2\.", r"blocks.\1.norm3."),
    (r"\.ffn\.net\.0\.proj\.", ".ffn.0."),
    (r"\.ffn\.net\.2\.", ".ffn.2."),
    (r"^proj_out\.", "head.head."),
    (r"^scale_shift_table$", "head.modulation"),
]


def to_original(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        for pattern, repl in _TO_ORIGINAL:
            k = re.sub(pattern, repl, k)
        out[k] = v
    # independent check: diffusers' own converter must map it back exactly
    back = convert_wan_transformer_to_diffusers(dict(out))
    assert set(back) == set(sd), sorted(set(back) ^ set(sd))[:5]
    assert all(back[k] is sd[k] or torch.equal(back[k], sd[k]) for k in sd)
    return out


def state_dict_in(model: WanTransformer3DModel, fmt: str) -> dict:
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if fmt == "diffusers":
        return sd
    orig = to_original(sd)
    if fmt == "original":
        return orig
    if fmt == "diffsynth":
        return {DIFFSYNTH_PREFIX + k: v for k, v in orig.items()}
    raise ValueError(fmt)


def write_checkpoint(sd: dict, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, str(path))
    return path


def write_format(model: WanTransformer3DModel, folder: Path, fmt: str, file_type: str) -> Path:
    """One checkpoint file in its own folder. The diffusers safetensors goes in a
    real `save_pretrained` folder (config.json beside the weights); the others
    are lone files, so the converter infers the architecture from shapes."""
    folder = Path(folder) / f"{fmt}-{file_type}"
    if fmt == "diffusers" and file_type == "safetensors":
        model.save_pretrained(str(folder), safe_serialization=True)
        return folder / "diffusion_pytorch_model.safetensors"
    sd = state_dict_in(model, fmt)
    name = {"original": "casper", "diffsynth": "dit", "diffusers": "diffusion_pytorch_model"}[fmt]
    return write_checkpoint(sd, folder / f"{name}.{'safetensors' if file_type == 'safetensors' else 'pth'}")


# --------------------------------------------------------------------------- inputs and forward


def make_inputs(cfg: Config, frames: int, height: int, width: int, batch: int = 1, text_tokens: int = 24,
                seed: int = 0, t=(700.0,)) -> dict:
    """Channels-last numpy inputs. The context is zero past `text_tokens`, as
    the T5 embeddings the pipeline feeds are."""
    rng = np.random.default_rng(seed)
    ctx = np.zeros((batch, cfg.text_len, cfg.text_dim), np.float32)
    ctx[:, :text_tokens] = rng.standard_normal((batch, text_tokens, cfg.text_dim))
    inputs = {
        "x": rng.standard_normal((batch, frames, height, width, cfg.in_dim)).astype(np.float32),
        "t": np.resize(np.asarray(t, np.float32), batch),
        "context": ctx,
    }
    if cfg.image_dim:
        inputs["clip_fea"] = rng.standard_normal((batch, 257, cfg.image_dim)).astype(np.float32)
    return inputs


@torch.no_grad()
def reference_forward(model: WanTransformer3DModel, inputs: dict, dtype=torch.float32, device="cpu") -> np.ndarray:
    """diffusers forward on channels-first tensors (on the model's `device`);
    returns channels-last float32 numpy."""
    x = torch.from_numpy(inputs["x"]).permute(0, 4, 1, 2, 3).to(device, dtype)
    ctx = torch.from_numpy(inputs["context"]).to(device, dtype)
    img = inputs.get("clip_fea")
    img = torch.from_numpy(img).to(device, dtype) if img is not None else None
    out = model(x, torch.from_numpy(inputs["t"]).to(device), ctx, img, return_dict=False)[0]
    return out.float().permute(0, 2, 3, 4, 1).contiguous().cpu().numpy()


def load_bf16_reference(pretrained_dir: Path) -> WanTransformer3DModel:
    """diffusers' own bfloat16 model (from_pretrained keeps its fp32 modules)."""
    return WanTransformer3DModel.from_pretrained(str(pretrained_dir), torch_dtype=torch.bfloat16).eval()


def versions(device: str = "cpu") -> dict:
    import diffusers

    out = {"torch": torch.__version__, "diffusers": diffusers.__version__, "device": device,
           "threads": torch.get_num_threads()}
    if device.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def save_json(path: Path, obj) -> None:
    Path(path).write_text(json.dumps(obj, indent=2))

"""Write the stored reference outputs of the tiny Wan2.1 DiT that
tests/test_fixtures.py checks MLX against without torch.

    python parity/make_fixtures.py            # writes parity/fixtures/wan_dit_tiny/
    python parity/make_fixtures.py --device cuda --out results/fixtures   # the reference on a GPU

The fixture is a real diffusers `save_pretrained` folder (config.json +
diffusion_pytorch_model.safetensors, float16 weights whose values the float32
reference used exactly), the inputs and the diffusers float32 output
(inputs.npz, the context unpadded: the model pads it), and meta.json (library
versions, device, config, bound). Kept under 2 MB.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from wan_reference import build_reference, make_inputs, reference_forward, save_json, versions  # noqa: E402

from mlx_omnimatte.models.wan.transformer import Config  # noqa: E402

OUT = Path(__file__).parent / "fixtures" / "wan_dit_tiny"
# two heads of 64 (the RoPE split 24/20/20), image branch, small text/image widths
CFG = Config(dim=128, ffn_dim=256, num_heads=2, num_layers=2, in_dim=36, out_dim=16, text_dim=64,
             image_dim=64)
GRID = (2, 8, 8)
T = (900.0, 150.0)
TEXT_TOKENS = 16


def main(out: Path = OUT, device: str = "cpu") -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # a float32 reference
    model = build_reference(CFG, seed=5, fp16_exact=True)
    inputs = make_inputs(CFG, *GRID, batch=2, text_tokens=TEXT_TOKENS, seed=6, t=T)
    ref = reference_forward(model.to(device), inputs, device=device)
    model.half().save_pretrained(str(out), safe_serialization=True)
    np.savez_compressed(out / "inputs.npz", x=inputs["x"], t=inputs["t"],
                        context=inputs["context"][:, :TEXT_TOKENS], clip_fea=inputs["clip_fea"], output=ref)
    save_json(out / "meta.json", {
        **versions(device),
        "what": f"diffusers WanTransformer3DModel float32 forward on {device} (TF32 off); weights stored as float16 "
                "(the values the reference used exactly); context zero-padded to 512 by the model",
        "config": CFG.to_dict(), "grid": list(GRID), "t": list(T), "text_tokens": TEXT_TOKENS,
        "bound": "max|mlx-ref| <= 1e-4 * max|ref|", "max_abs_ref": float(np.abs(ref).max()),
    })
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote {out} ({size / 1e6:.2f} MB), output max|ref| {np.abs(ref).max():.3f}")
    assert size < 2e6


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--device", default="cpu", help="torch device of the reference forward (cpu, cuda)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    main(args.out, args.device)

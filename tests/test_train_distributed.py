"""Data parallel: 2 processes on localhost (mlx.launch, ring backend), each
with half the global batch, give the same gradients, loss and update as one
process holding the whole global batch (as 2 accumulated micro-batches)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).parent))

from branch_utils import WIDE, sample, tiny_model  # noqa: E402
from mlx_omnimatte.train import distributed  # noqa: E402
from mlx_omnimatte.train.trainer import TrainSettings, global_gradients, make_grad_fn, new_state, train_step  # noqa: E402

WORKER = Path(__file__)  # run as a script, this file is one process of the check
LAUNCH = shutil.which("mlx.launch") or str(Path(sys.executable).parent / "mlx.launch")


def run(out: Path, batch: int, accum: int) -> None:
    """One process: its share of the global batch; rank 0 saves gradients,
    loss and the updated LoRA."""
    size, rank = distributed.world()
    model = tiny_model(0, **WIDE)
    data = [sample(model.config, i) for i in range(4)]
    s = TrainSettings(kind="effect", rank=4, k=2, steps=2, batch=batch, grad_accum=accum, lr=1e-2).resolve(2)
    state = new_state(model, s)
    fn = make_grad_fn(model, s)
    train_step(state, model, data, s, fn, size, rank)  # B != 0 from here on
    loss, grads = global_gradients(state, model, data, s, fn, size, rank)
    train_step(state, model, data, s, fn, size, rank)
    if rank == 0:
        arrays = {f"grad.{k}": v for k, v in tree_flatten(grads)}
        arrays.update({f"lora.{k}": v for k, v in tree_flatten(state.lora)})
        arrays["loss"] = loss
        mx.save_safetensors(str(out), arrays, metadata={"world": str(size)})


@pytest.mark.skipif(not Path(LAUNCH).exists(), reason="mlx.launch not installed")
def test_two_processes_equal_one(tmp_path):
    two, one = tmp_path / "two.safetensors", tmp_path / "one.safetensors"
    cmd = [LAUNCH, "-n", "2", "--backend", "ring", sys.executable, str(WORKER), str(two), "1", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0 and two.is_file(), done.stderr[-2000:]
    subprocess.run([sys.executable, str(WORKER), str(one), "1", "2"], check=True, timeout=240)
    a, b = mx.load(str(two)), mx.load(str(one))
    assert a.keys() == b.keys() and len(a) > 20
    assert abs(float(a["loss"]) - float(b["loss"])) <= 1e-6 * abs(float(b["loss"]))
    for k in a:
        scale = max(float(mx.abs(b[k]).max()), 1e-12)
        assert float(mx.abs(a[k] - b[k]).max()) <= 1e-6 * scale, k
    assert max(float(mx.abs(b[k]).max()) for k in b if k.startswith("grad.")) > 0


if __name__ == "__main__":
    run(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))

"""Data parallel training through `mx.distributed`.

Every process holds the frozen model and the same LoRA; each computes the
gradient of its share of the global batch (see `trainer.local_positions`)
and the gradients are summed across processes, so the update equals one
process holding the whole global batch. Launch with `mlx.launch` (ring
backend over TCP between Macs or on one host, MPI or NCCL where present);
a plain `python` run is a group of one and all of this is a no-op.
"""

from __future__ import annotations

import mlx.core as mx
from mlx.utils import tree_map

_GROUP = None


def group():
    """The process group (initialized on first use; size 1 without a launcher)."""
    global _GROUP
    if _GROUP is None:
        _GROUP = mx.distributed.init()
    return _GROUP


def world() -> tuple[int, int]:
    """(size, rank) of this process."""
    g = group()
    return g.size(), g.rank()


def sum_tree(tree):
    """Sum every array of ``tree`` over the processes (identity for one).
    On the CPU stream: the ring backend's all-reduce runs there."""
    g = group()
    if g.size() == 1:
        return tree
    return tree_map(lambda a: mx.distributed.all_sum(a, group=g, stream=mx.cpu), tree)


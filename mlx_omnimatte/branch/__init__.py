"""EasyOmnimatte branch machinery: [inpaint | replica] tokens in one DiT pass,
LoRA on the replica half only, masked attention types A/B/C without a
(2N)^2 mask, and the Effect/Quality experts routed by timestep."""

from .attention import MASK_TYPES, branch_attention, make_attn_fn
from .experts import Expert, LoRA, check_tau, route, select
from .forward import (branch_forward, branch_velocity_fn, expert_applied, merge_expert, resolve_tau,
                      sample_branch)
from .lora import ReplicaLoRALinear, merge_lora

__all__ = [
    "MASK_TYPES", "branch_attention", "make_attn_fn", "Expert", "LoRA", "check_tau", "route", "select",
    "branch_forward", "branch_velocity_fn", "expert_applied", "merge_expert", "resolve_tau",
    "sample_branch", "ReplicaLoRALinear", "merge_lora",
]

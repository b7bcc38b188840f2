"""EasyOmnimatte branch machinery: [inpaint | replica] tokens in one DiT pass,
LoRA on the replica half only, masked attention types A/B/C without a
(2N)^2 mask, and the Effect/Quality experts routed by timestep."""

from .attention import MASK_TYPES, branch_attention, make_attn_fn
from .experts import Expert, LoRA, check_tau, resolve_tau, route, select
from .forward import branch_forward, check_experts, expert_applied, merge_expert
from .lora import ReplicaLoRALinear, merge_lora

__all__ = [
    "MASK_TYPES", "branch_attention", "make_attn_fn", "Expert", "LoRA", "check_tau", "route", "select",
    "branch_forward", "check_experts", "expert_applied", "merge_expert", "resolve_tau",
    "ReplicaLoRALinear", "merge_lora",
]

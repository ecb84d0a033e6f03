"""The hybrid experts forward, registered with transformers' ExpertsInterface.

transformers' `@use_experts_implementation` decorator gives every MoE architecture one experts module
layout: stacked 3D weights (`gate_up_proj` or `up_proj`, `down_proj`, optional biases), flags for
transposed / interleaved / biased / gated layouts, and an `_apply_gate` hook for custom activations.
Everything here reads only what the decorator declares, so one implementation serves all of them.
"""

from __future__ import annotations

import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface, _grouped_linear, grouped_mm_experts_forward

EXPERTS_IMPLEMENTATION = "moe_chat_hybrid"


def is_experts_module(module: torch.nn.Module) -> bool:
    """True for modules decorated with `@use_experts_implementation`."""
    return all(hasattr(module, a) for a in ("has_gate", "has_bias", "is_transposed", "_is_expert_parallel"))


def expert_tensor_names(module: torch.nn.Module) -> list[str]:
    """Names of the stacked per-expert parameters, first dimension = expert."""
    names = ["gate_up_proj" if module.has_gate else "up_proj", "down_proj"]
    if module.has_bias:
        names += [n + "_bias" for n in names]
    return names


def expert_ffn(
    module: torch.nn.Module,
    x: torch.Tensor,
    group_ids: torch.Tensor,
    num_groups: int,
    tensors: dict[str, torch.Tensor],
) -> torch.Tensor:
    """Run rows of `x`, sorted by group, through the experts stored in `tensors` (grouped matmuls).

    `tensors` holds either a module's own stacked weights (groups = experts) or cache slots
    (groups = slots): the same code computes hits and misses, so the two give identical numbers.
    """
    counts = torch.bincount(group_ids, minlength=num_groups)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    first = "gate_up_proj" if module.has_gate else "up_proj"
    bias = tensors[first + "_bias"][group_ids] if module.has_bias else None
    h = _grouped_linear(x, tensors[first], offsets, bias=bias, is_transposed=module.is_transposed)
    h = module._apply_gate(h) if module.has_gate else module.act_fn(h)
    bias = tensors["down_proj_bias"][group_ids] if module.has_bias else None
    return _grouped_linear(h, tensors["down_proj"], offsets, bias=bias, is_transposed=module.is_transposed)


def hybrid_experts_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    runtime = getattr(self, "_moe_runtime", None)
    if runtime is None:  # a module the engine did not tag (e.g. a model built outside load_model)
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    return runtime.experts_forward(self, hidden_states, top_k_index, top_k_weights)


def register() -> None:
    if EXPERTS_IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ExpertsInterface.register(EXPERTS_IMPLEMENTATION, hybrid_experts_forward)


register()

"""The engine's experts implementation, registered with transformers' ExpertsInterface.

transformers' `@use_experts_implementation` decorator gives every MoE architecture one experts module
layout: stacked 3D weights (`gate_up_proj` or `up_proj`, `down_proj`, optional biases), flags for
transposed / interleaved / biased / gated layouts, and an `_apply_gate` hook for custom activations.
The engine reads only what the decorator declares, so one implementation serves all of them.
"""

from __future__ import annotations

import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface, grouped_mm_experts_forward

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


def expert_format(module: torch.nn.Module) -> str:
    """"source", "int8" or "int4": how the module's experts are held (see `quantize`)."""
    return getattr(module, "_moe_format", "source")


def expert_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The stacked per-expert tensors the engine computes with, first dimension = expert: the module's
    own parameters, or once quantized their codes and scales (`NAME.q`, `NAME.scale`) and biases."""
    quantized = getattr(module, "_moe_tensors", None)
    return quantized if quantized is not None else {n: getattr(module, n) for n in expert_tensor_names(module)}


def main_experts(named: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Module]:
    """The experts modules the engine runs: those of the shape most of them share (ties: the larger).
    Ernie-4.5-VL has smaller vision experts beside the text ones; text never routes to those, so they
    are left to transformers' own forward instead of refusing the model."""
    groups: dict[tuple, dict[str, torch.nn.Module]] = {}
    for name, module in named.items():
        shape = tuple((n, tuple(t.shape)) for n, t in expert_tensors(module).items())
        groups.setdefault(shape, {})[name] = module
    size = lambda shape: sum(torch.Size(s).numel() for _, s in shape)  # noqa: E731
    return groups[max(groups, key=lambda shape: (len(groups[shape]), size(shape)))] if groups else {}


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

"""The hybrid experts forward, registered with transformers' ExpertsInterface.

transformers' `@use_experts_implementation` decorator gives every MoE architecture one experts module
layout: stacked 3D weights (`gate_up_proj` or `up_proj`, `down_proj`, optional biases), flags for
transposed / interleaved / biased / gated layouts, and an `_apply_gate` hook for custom activations.
Everything here reads only what the decorator declares, so one implementation serves all of them.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
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


# torch >= 2.11 has a CPU grouped_mm kernel that needs no alignment: call it directly, skipping the
# per-call capability checks of transformers' wrapper (they cost more than a small expert's matmul).
_DIRECT_CPU_GROUPED_MM = hasattr(F, "grouped_mm") and tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 11)


def _grouped_linear_fast(x, weight, offsets, bias, is_transposed: bool) -> torch.Tensor:
    if x.device.type == "cpu" and _DIRECT_CPU_GROUPED_MM:
        out = F.grouped_mm(x.to(weight.dtype), weight if is_transposed else weight.transpose(-2, -1), offs=offsets)
        return out if bias is None else out.add_(bias)
    return _grouped_linear(x, weight, offsets, bias=bias, is_transposed=is_transposed)


def expert_ffn(module: torch.nn.Module, x: torch.Tensor, groups: np.ndarray, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Run the rows of `x` through the experts stored in `tensors`; `groups` (sorted) says which.

    `tensors` holds either a module's own stacked weights (groups = experts) or cache slots
    (groups = slots): the same code computes hits and misses, so the two give identical numbers.
    """
    first = "gate_up_proj" if module.has_gate else "up_proj"
    w1, w2 = tensors[first], tensors["down_proj"]
    counts = np.bincount(groups, minlength=w1.shape[0])
    offsets = torch.from_numpy(np.cumsum(counts, dtype=np.int32)).to(w1.device)
    rows = torch.from_numpy(groups).to(w1.device) if module.has_bias else None
    h = _grouped_linear_fast(x, w1, offsets, tensors[first + "_bias"][rows] if rows is not None else None,
                             module.is_transposed)
    h = module._apply_gate(h) if module.has_gate else module.act_fn(h)
    return _grouped_linear_fast(h, w2, offsets, tensors["down_proj_bias"][rows] if rows is not None else None,
                                module.is_transposed)


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

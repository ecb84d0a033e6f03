"""The hybrid experts forward, registered with transformers' ExpertsInterface.

transformers' `@use_experts_implementation` decorator gives every MoE architecture one experts module
layout: stacked 3D weights (`gate_up_proj` or `up_proj`, `down_proj`, optional biases), flags for
transposed / interleaved / biased / gated layouts, and an `_apply_gate` hook for custom activations.
Everything here reads only what the decorator declares, so one implementation serves all of them.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers.activations import SiLUActivation
from transformers.integrations import moe as hf_moe
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface, _grouped_linear, grouped_mm_experts_forward

from .cpu_split import SplitRunner, chunks, cuts

DECODE_ROWS = 16  # up to this many (token, expert) rows a layer's CPU work is a decode step's

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


class ExpertWeights:
    """One layer's stacked expert tensors (the module's own, or cache slots), ready for the matmuls.

    On the CPU each expert's matrices are kept as views in the orientation `x @ w` wants, so the hot
    path does no per-call reshaping; making them costs nothing (views) and happens once per tensor set.
    """

    def __init__(self, module: torch.nn.Module, tensors: dict[str, torch.Tensor]):
        first = "gate_up_proj" if module.has_gate else "up_proj"
        self.w1, self.w2 = tensors[first], tensors["down_proj"]
        self.b1 = tensors.get(first + "_bias") if module.has_bias else None
        self.b2 = tensors.get("down_proj_bias") if module.has_bias else None
        self.is_transposed = module.is_transposed
        self.cpu = self.w1.device.type == "cpu"
        # transformers' default gate with SiLU and no biases (Mixtral, Qwen-MoE, OLMoE, DeepSeek...)
        default_gate = getattr(hf_moe, "_default_apply_gate", None)  # private: absent, numpy is not used
        self.swiglu = (module.has_gate and not module.has_bias and default_gate is not None
                       and getattr(type(module), "_apply_gate", None) is default_gate
                       and isinstance(getattr(module, "act_fn", None), (SiLUActivation, torch.nn.SiLU)))
        self.numpy_able = self.cpu and self.swiglu and self.w1.dtype == torch.float32
        self.numpy = False  # computed with numpy instead of torch (see `use_numpy`)
        if self.cpu:  # [in, out] per expert
            self.mats1 = list(self.w1.unbind(0) if self.is_transposed else self.w1.transpose(1, 2).unbind(0))
            self.mats2 = list(self.w2.unbind(0) if self.is_transposed else self.w2.transpose(1, 2).unbind(0))

    def use_numpy(self, on: bool) -> None:
        """Compute SwiGLU experts on the CPU with numpy alone: its BLAS (OpenBLAS in its wheels) streams
        one-row products of column-major matrices faster than torch's MKL on some CPUs (AMD Zen 4: 27
        against 19 GB/s per core), and the gate and weighted sum in numpy keep the split's threads off
        each other's GIL (29 against 24 GB/s on two cores). The runtime measures both and picks.
        numpy arrays share the tensors' memory, so this costs no copy."""
        numpy = on and self.numpy_able
        if numpy != self.numpy:
            convert = (lambda m: m.numpy()) if numpy else torch.from_numpy
            self.mats1 = [convert(m) for m in self.mats1]
            self.mats2 = [convert(m) for m in self.mats2]
            self.numpy = numpy


def _group_runs(groups: np.ndarray) -> tuple[list[int], list[int]]:
    """(group, row count) of each run of equal values, in order."""
    if len(groups) <= DECODE_ROWS:  # plain Python beats numpy's per-call cost
        ids: list[int] = []
        sizes: list[int] = []
        for g in groups.tolist():
            if ids and ids[-1] == g:
                sizes[-1] += 1
            else:
                ids.append(g)
                sizes.append(1)
        return ids, sizes
    starts = np.flatnonzero(groups[1:] != groups[:-1]) + 1
    bounds = [0, *starts.tolist(), len(groups)]
    return groups[bounds[:-1]].tolist(), np.diff(bounds).tolist()


def _per_group(parts: list[torch.Tensor], mats: list[torch.Tensor], ids: list[int]) -> torch.Tensor:
    """One matmul per group present. The CPU grouped_mm kernel loops over every expert, used or not,
    which for a decode token costs more than the matmuls themselves."""
    out = [torch.mm(x, mats[g]) for x, g in zip(parts, ids)]
    return out[0] if len(out) == 1 else torch.cat(out)


def _np_rows(x: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    """Each group's rows of `x`; a single row is every group's (a decode token)."""
    if x.shape[0] == 1:
        return [x] * len(sizes)
    bounds = np.cumsum([0, *sizes]).tolist()
    return [x[a:b] for a, b in zip(bounds, bounds[1:])]


def _np_swiglu(x: np.ndarray, ids: list[int], sizes: list[int], weights: ExpertWeights) -> np.ndarray:
    """silu(gate) * up of each group's rows, for the down projections."""
    h = [rows @ weights.mats1[g] for rows, g in zip(_np_rows(x, sizes), ids)]
    h = h[0] if len(h) == 1 else np.concatenate(h)
    half = h.shape[1] // 2
    gate, up = h[:, :half], h[:, half:]
    with np.errstate(over="ignore"):  # exp(-gate) overflows to inf for very negative gates: silu -> -0
        return gate / (1.0 + np.exp(-gate)) * up


def _cpu_ffn(module: torch.nn.Module, x: torch.Tensor, ids: list[int], sizes: list[int], groups: np.ndarray,
             weights: ExpertWeights) -> torch.Tensor:
    if weights.numpy:
        a = _np_swiglu(x.numpy(), ids, sizes, weights)
        y = [rows @ weights.mats2[g] for rows, g in zip(_np_rows(a, sizes), ids)]
        return torch.from_numpy(y[0] if len(y) == 1 else np.concatenate(y))
    h = _per_group([x] * len(ids) if x.shape[0] == 1 else x.split(sizes), weights.mats1, ids)
    h = h if weights.b1 is None else h.add_(weights.b1[torch.from_numpy(groups)])
    h = module._apply_gate(h) if module.has_gate else module.act_fn(h)
    y = _per_group(h.split(sizes), weights.mats2, ids)
    return y if weights.b2 is None else y.add_(weights.b2[torch.from_numpy(groups)])


def expert_ffn(module: torch.nn.Module, x: torch.Tensor, groups: np.ndarray, weights: ExpertWeights,
               split: SplitRunner | None = None) -> torch.Tensor:
    """Run the rows of `x` through the experts in `weights`; `groups` says which, one per row.

    `weights` holds either a module's own stacked tensors (groups = experts) or cache slots (groups =
    slots): the same code computes hits and misses, so the two give identical numbers. Rows of one
    group must be contiguous (on the fast device: sorted by group). A single row of `x` is shared by
    every group (a decode token). On the CPU, `split` spreads a decode step's experts over its cores.
    """
    if weights.cpu:
        ids, sizes = _group_runs(groups)
        x = x.to(weights.w1.dtype)
        if split is None or len(ids) < 2 or len(groups) > DECODE_ROWS:
            return _cpu_ffn(module, x, ids, sizes, groups, weights)
        bounds = cuts(len(ids), split.ways)  # in runs of groups; rows follow
        rows = np.cumsum([0, *sizes]).tolist()
        parts = [(ids[a:b], sizes[a:b], groups[rows[a]:rows[b]]) for a, b in zip(bounds, bounds[1:])]
        xs = [x] * len(parts) if x.shape[0] == 1 else x.split([len(p[2]) for p in parts])
        return torch.cat(split.run(lambda i: _cpu_ffn(module, xs[i], *parts[i], weights), range(len(parts))))
    if x.shape[0] == 1:
        x = x.expand(len(groups), -1)
    counts = np.bincount(groups, minlength=weights.w1.shape[0])
    offsets = torch.from_numpy(np.cumsum(counts, dtype=np.int32)).to(weights.w1.device)
    rows = torch.from_numpy(groups).to(weights.w1.device) if weights.b1 is not None else None
    h = _grouped_linear(x, weights.w1, offsets, bias=None if rows is None else weights.b1[rows],
                        is_transposed=weights.is_transposed)
    h = module._apply_gate(h) if module.has_gate else module.act_fn(h)
    return _grouped_linear(h, weights.w2, offsets, bias=None if rows is None else weights.b2[rows],
                           is_transposed=weights.is_transposed)


def _weighted_sum(module: torch.nn.Module, x: torch.Tensor, experts: list[int], gates: list[float],
                  weights: ExpertWeights) -> torch.Tensor:
    if weights.numpy:
        rows = _np_swiglu(x.numpy(), experts, [1] * len(experts), weights)
        out = rows[:1] @ weights.mats2[experts[0]]
        out *= gates[0]
        for i in range(1, len(experts)):
            y = rows[i:i + 1] @ weights.mats2[experts[i]]
            y *= gates[i]
            out += y
        return torch.from_numpy(out)
    h = _per_group([x] * len(experts), weights.mats1, experts)
    rows = (module._apply_gate(h) if module.has_gate else module.act_fn(h)).split(1)
    out = torch.mm(rows[0], weights.mats2[experts[0]]).mul_(gates[0])
    for row, e, g in zip(rows[1:], experts[1:], gates[1:]):
        out.addmm_(row, weights.mats2[e], alpha=g)
    return out


def expert_ffn_combined(module: torch.nn.Module, x: torch.Tensor, experts: list[int], gates: list[float],
                        weights: ExpertWeights, split: SplitRunner | None = None) -> torch.Tensor:
    """sum_i gates[i] * expert_i(x) for one token `x` [1, hidden] on the CPU: the decode step.

    The routing weights ride on the down projections' matmuls (`alpha` of addmm), so the per-expert
    outputs are never stacked, scaled and summed: three fewer kernels per layer, each of which costs
    about as much as the bookkeeping of the whole layer. With `split`, each core sums a share of the experts.
    For unbiased experts without post-expert norm.
    """
    if split is None or len(experts) < 2:
        return _weighted_sum(module, x, experts, gates, weights)
    parts = list(zip(chunks(experts, split.ways), chunks(gates, split.ways)))
    out, *rest = split.run(lambda part: _weighted_sum(module, x, *part, weights), parts)
    for partial in rest:
        out.add_(partial)
    return out


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

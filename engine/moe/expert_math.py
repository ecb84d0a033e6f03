"""The experts' arithmetic: rows of activations through stacked expert weights, one dispatcher, one
implementation per backend.

Backends: on the fast device (CUDA, or forced slots' tensors) transformers' grouped matmul; on the CPU
`torch` (one matmul per expert used), `torch-mv` (matrix-vector products, for weights held out-in) or
`numpy` (its BLAS, gate and weighted sum, for SwiGLU experts).
`ExpertWeights.backend` says which one a set of weights uses; `expert_ffn` and `expert_ffn_combined`
dispatch on it, so hits and misses of one format run the same code and give identical numbers.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers.activations import SiLUActivation
from transformers.integrations import moe as hf_moe
from transformers.integrations.moe import _grouped_linear

from .cpu_split import SplitRunner, chunks, cuts
from .quantize import ACTIVATIONS, qmatmul

SPLIT_MAX_ROWS = 16  # up to this many (token, expert) rows, a layer's CPU work is split over the cores


class ExpertWeights:
    """One layer's stacked expert tensors (the module's own, or cache slots), ready for the matmuls.

    On the CPU each expert's matrices are kept as views in the form the backend wants (`x @ w` for
    source weights, (codes, scales) for int8/int4), so the hot path does no per-call reshaping; making
    them costs nothing (views) and happens once per tensor set.
    """

    def __init__(self, module: torch.nn.Module, tensors: dict[str, torch.Tensor]):
        first = "gate_up_proj" if module.has_gate else "up_proj"
        self.format = "source" if first in tensors else ("int4" if tensors[first + ".q"].dtype == torch.uint8 else "int8")
        self.b1 = tensors.get(first + "_bias") if module.has_bias else None
        self.b2 = tensors.get("down_proj_bias") if module.has_bias else None
        self.is_transposed = module.is_transposed
        # transformers' default gate with SiLU and no biases (Mixtral, Qwen-MoE, OLMoE, DeepSeek...)
        default_gate = getattr(hf_moe, "_default_apply_gate", None)  # private: absent, numpy is not used
        self.swiglu = (module.has_gate and not module.has_bias and default_gate is not None
                       and getattr(type(module), "_apply_gate", None) is default_gate
                       and isinstance(getattr(module, "act_fn", None), (SiLUActivation, torch.nn.SiLU)))
        if self.format == "source":
            self.w1, self.w2 = tensors[first], tensors["down_proj"]
        else:  # codes [experts, out, in(/2)] and their scales
            self.w1, self.w2 = tensors[first + ".q"], tensors["down_proj.q"]
            self.s1, self.s2 = tensors[first + ".scale"], tensors["down_proj.scale"]
        self.cpu = self.w1.device.type == "cpu"
        self.out_in = False
        self.dtype = self.w1.dtype if self.format == "source" else torch.float32  # what the CPU math runs in
        self.backend = self.cpu_backends()[0] if self.cpu else "device"
        if not self.cpu:
            return
        if self.format == "source":  # B [in, out] per expert
            self.mats1 = list(self.w1.unbind(0) if self.is_transposed else self.w1.transpose(1, 2).unbind(0))
            self.mats2 = list(self.w2.unbind(0) if self.is_transposed else self.w2.transpose(1, 2).unbind(0))
            self.out_in = bool(self.mats1) and self.mats1[0].T.is_contiguous() and self.mats2[0].T.is_contiguous()
        else:
            self.mats1 = list(zip(self.w1.unbind(0), self.s1.unbind(0)))
            self.mats2 = list(zip(self.w2.unbind(0), self.s2.unbind(0)))

    def cpu_backends(self) -> list[str]:
        """The CPU backends these weights can run on, the default first."""
        if not self.cpu:
            return []
        if self.format != "source":
            return [f"{self.format}-{act}" for act in ACTIVATIONS]
        torch_backends = ["torch", "torch-mv"] if self.out_in else ["torch"]
        return torch_backends + (["numpy"] if self.swiglu and self.w1.dtype == torch.float32 else [])

    def use_backend(self, name: str) -> None:
        """Switch the CPU backend (numpy arrays share the tensors' memory: no copy)."""
        if name not in self.cpu_backends():
            name = self.cpu_backends()[0] if self.cpu else "device"
        if self.format == "source" and (name == "numpy") != (self.backend == "numpy"):
            convert = (lambda m: m.numpy()) if name == "numpy" else torch.from_numpy
            self.mats1 = [convert(m) for m in self.mats1]
            self.mats2 = [convert(m) for m in self.mats2]
        self.backend = name

    def matrices(self) -> list[list[int]]:
        """[out, in] of each of one expert's two matrices."""
        if self.format == "source":
            shapes = [list(w.shape[1:]) for w in (self.w1, self.w2)]
            return [s[::-1] for s in shapes] if self.is_transposed else shapes
        per_code = 2 if self.format == "int4" else 1
        return [[w.shape[1], w.shape[2] * per_code] for w in (self.w1, self.w2)]

    def probe_matrix(self) -> torch.Tensor:
        """A float [out, in] matrix of expert 0's first shape, for the calibrations that time one-row
        products (quantized weights: a random stand-in of that shape; only its size matters there)."""
        if self.format == "source":
            return self.w1[0].transpose(0, 1) if self.is_transposed else self.w1[0]
        out_features = self.w1.shape[1]
        return torch.randn(out_features, self.w1.shape[2] * (2 if self.format == "int4" else 1))

    def expert_flops(self) -> float:
        """Multiply-adds times two of one token through one expert."""
        if self.format == "source":
            return 2.0 * (self.w1[0].numel() + self.w2[0].numel())
        per_code = 2 if self.format == "int4" else 1
        return 2.0 * per_code * (self.w1[0].numel() + self.w2[0].numel())


def group_runs(groups: np.ndarray) -> tuple[list[int], list[int]]:
    """(group, row count) of each run of equal values, in order."""
    if len(groups) <= SPLIT_MAX_ROWS:  # plain Python beats numpy's per-call cost
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


# -- CPU backends: the same two operations, each in its own library -------------------------------
class TorchCpu:
    """One torch matmul per expert used: the CPU grouped_mm kernel loops over every expert of the
    layer, used or not, which for a decode token costs more than the matmuls themselves."""

    @staticmethod
    def _per_group(parts: list[torch.Tensor], mats: list[torch.Tensor], ids: list[int]) -> torch.Tensor:
        out = [torch.mm(x, mats[g]) for x, g in zip(parts, ids)]
        return out[0] if len(out) == 1 else torch.cat(out)

    def ffn(self, module, x: torch.Tensor, ids: list[int], sizes: list[int], groups: np.ndarray,
            w: ExpertWeights) -> torch.Tensor:
        h = self._per_group([x] * len(ids) if x.shape[0] == 1 else x.split(sizes), w.mats1, ids)
        h = h if w.b1 is None else h.add_(w.b1[torch.from_numpy(groups)])
        h = module._apply_gate(h) if module.has_gate else module.act_fn(h)
        y = self._per_group(h.split(sizes), w.mats2, ids)
        return y if w.b2 is None else y.add_(w.b2[torch.from_numpy(groups)])

    def weighted_sum(self, module, x: torch.Tensor, experts: list[int], gates: list[float],
                     w: ExpertWeights) -> torch.Tensor:
        h = self._per_group([x] * len(experts), w.mats1, experts)
        rows = (module._apply_gate(h) if module.has_gate else module.act_fn(h)).split(1)
        out = torch.mm(rows[0], w.mats2[experts[0]]).mul_(gates[0])
        for row, e, g in zip(rows[1:], experts[1:], gates[1:]):  # the gate rides on addmm's alpha
            out.addmm_(row, w.mats2[e], alpha=g)
        return out


class TorchMvCpu(TorchCpu):
    """One token times each expert matrix as torch.mv, for weights held out-in (as checkpoints ship
    them): in bfloat16 it streams 3-4x faster than a one-row mm on this project's Intel machine
    (measured at load, see `cpu_layout`); rows of a prompt still go through mm."""

    @staticmethod
    def _per_group(parts: list[torch.Tensor], mats: list[torch.Tensor], ids: list[int]) -> torch.Tensor:
        out = [torch.mv(mats[g].T, x[0]).unsqueeze(0) if x.shape[0] == 1 else torch.mm(x, mats[g])
               for x, g in zip(parts, ids)]
        return out[0] if len(out) == 1 else torch.cat(out)

    def weighted_sum(self, module, x: torch.Tensor, experts: list[int], gates: list[float],
                     w: ExpertWeights) -> torch.Tensor:
        h = self._per_group([x] * len(experts), w.mats1, experts)
        rows = module._apply_gate(h) if module.has_gate else module.act_fn(h)
        out = torch.mv(w.mats2[experts[0]].T, rows[0]).mul_(gates[0])
        for row, e, g in zip(rows[1:], experts[1:], gates[1:]):
            out.addmv_(w.mats2[e].T, row, alpha=g)
        return out.unsqueeze(0)


class NumpyCpu:
    """SwiGLU experts in numpy alone: its BLAS (OpenBLAS in its wheels) streams one-row products of
    column-major matrices faster than torch's MKL on some CPUs (AMD Zen 4: 27 against 19 GB/s per
    core), and the gate and weighted sum in numpy keep the split's threads off each other's GIL.
    The runtime measures both backends at load and picks."""

    @staticmethod
    def _rows(x: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
        if x.shape[0] == 1:  # a single row is every group's (a decode token)
            return [x] * len(sizes)
        bounds = np.cumsum([0, *sizes]).tolist()
        return [x[a:b] for a, b in zip(bounds, bounds[1:])]

    @classmethod
    def swiglu(cls, x: np.ndarray, ids: list[int], sizes: list[int], w: ExpertWeights) -> np.ndarray:
        """silu(gate) * up of each group's rows, for the down projections."""
        h = [rows @ w.mats1[g] for rows, g in zip(cls._rows(x, sizes), ids)]
        h = h[0] if len(h) == 1 else np.concatenate(h)
        half = h.shape[1] // 2
        gate, up = h[:, :half], h[:, half:]
        with np.errstate(over="ignore"):  # exp(-gate) overflows to inf for very negative gates: silu -> -0
            return gate / (1.0 + np.exp(-gate)) * up

    def ffn(self, module, x: torch.Tensor, ids: list[int], sizes: list[int], groups: np.ndarray,
            w: ExpertWeights) -> torch.Tensor:
        a = self.swiglu(x.numpy(), ids, sizes, w)
        y = [rows @ w.mats2[g] for rows, g in zip(self._rows(a, sizes), ids)]
        return torch.from_numpy(y[0] if len(y) == 1 else np.concatenate(y))

    def weighted_sum(self, module, x: torch.Tensor, experts: list[int], gates: list[float],
                     w: ExpertWeights) -> torch.Tensor:
        rows = self.swiglu(x.numpy(), experts, [1] * len(experts), w)
        out = rows[:1] @ w.mats2[experts[0]]
        out *= gates[0]
        for i in range(1, len(experts)):
            y = rows[i:i + 1] @ w.mats2[experts[i]]
            y *= gates[i]
            out += y
        return torch.from_numpy(out)


class QuantCpu(TorchCpu):
    """int8 / int4 experts on torch's weight-only kernels, activations in bfloat16 or float32 (which runs
    faster differs by CPU: measured at load). The arithmetic around them is `TorchCpu`'s."""

    def __init__(self, fmt: str, act: str):
        self.fmt, self.act = fmt, ACTIVATIONS[act]

    def _per_group(self, parts: list[torch.Tensor], mats: list, ids: list[int]) -> torch.Tensor:
        out = [qmatmul(x, *mats[g], self.fmt, self.act) for x, g in zip(parts, ids)]
        return out[0] if len(out) == 1 else torch.cat(out)

    def weighted_sum(self, module, x: torch.Tensor, experts: list[int], gates: list[float],
                     w: ExpertWeights) -> torch.Tensor:
        h = self._per_group([x] * len(experts), w.mats1, experts)
        rows = (module._apply_gate(h) if module.has_gate else module.act_fn(h)).split(1)
        out = qmatmul(rows[0], *w.mats2[experts[0]], self.fmt, self.act).mul_(gates[0])
        for row, e, g in zip(rows[1:], experts[1:], gates[1:]):
            out.add_(qmatmul(row, *w.mats2[e], self.fmt, self.act), alpha=g)
        return out


CPU_BACKENDS = {"torch": TorchCpu(), "torch-mv": TorchMvCpu(), "numpy": NumpyCpu(),
                **{f"{fmt}-{act}": QuantCpu(fmt, act) for fmt in ("int8", "int4") for act in ACTIVATIONS}}


def _device_ffn(module, x: torch.Tensor, groups: np.ndarray, w: ExpertWeights) -> torch.Tensor:
    """transformers' grouped matmul over the stacked weights (rows sorted by group); int8 slots are
    dequantized first, only those the rows use."""
    if x.shape[0] == 1:
        x = x.expand(len(groups), -1)
    w1, w2, transposed = w.w1, w.w2, w.is_transposed
    rows = torch.from_numpy(groups).to(w1.device) if w.b1 is not None else None
    if w.format != "source":
        used, groups = np.unique(groups, return_inverse=True)
        index = torch.from_numpy(used).to(w1.device)
        w1 = w1[index].to(x.dtype) * w.s1[index].to(x.dtype)[..., None]
        w2 = w2[index].to(x.dtype) * w.s2[index].to(x.dtype)[..., None]
        transposed = False  # codes are [out, in]
    counts = np.bincount(groups, minlength=w1.shape[0])
    offsets = torch.from_numpy(np.cumsum(counts, dtype=np.int32)).to(w1.device)
    h = _grouped_linear(x, w1, offsets, bias=None if rows is None else w.b1[rows], is_transposed=transposed)
    h = module._apply_gate(h) if module.has_gate else module.act_fn(h)
    return _grouped_linear(h, w2, offsets, bias=None if rows is None else w.b2[rows], is_transposed=transposed)


# -- the dispatcher -----------------------------------------------------------------------------------
def expert_ffn(module: torch.nn.Module, x: torch.Tensor, groups: np.ndarray, weights: ExpertWeights,
               split: SplitRunner | None = None) -> torch.Tensor:
    """Run the rows of `x` through the experts in `weights`; `groups` says which, one per row.

    `weights` holds either a module's own stacked tensors (groups = experts) or cache slots (groups =
    slots): the same code computes hits and misses, so the two give identical numbers. Rows of one
    group must be contiguous (on the fast device: sorted by group). A single row of `x` is shared by
    every group (a decode token). On the CPU, `split` spreads a decode step's experts over its cores.
    """
    if not weights.cpu:
        return _device_ffn(module, x, groups, weights)
    backend = CPU_BACKENDS[weights.backend]
    ids, sizes = group_runs(groups)
    x = x.to(weights.dtype)
    if split is None or len(ids) < 2 or len(groups) > SPLIT_MAX_ROWS:
        return backend.ffn(module, x, ids, sizes, groups, weights)
    bounds = cuts(len(ids), split.ways)  # in runs of groups; rows follow
    rows = np.cumsum([0, *sizes]).tolist()
    parts = [(ids[a:b], sizes[a:b], groups[rows[a]:rows[b]]) for a, b in zip(bounds, bounds[1:])]
    xs = [x] * len(parts) if x.shape[0] == 1 else x.split([len(p[2]) for p in parts])
    return torch.cat(split.run(lambda i: backend.ffn(module, xs[i], *parts[i], weights), range(len(parts))))


def expert_ffn_combined(module: torch.nn.Module, x: torch.Tensor, experts: list[int], gates: list[float],
                        weights: ExpertWeights, split: SplitRunner | None = None) -> torch.Tensor:
    """sum_i gates[i] * expert_i(x) for one token `x` [1, hidden] on the CPU: the decode step.

    The routing weights ride on the down projections, so the per-expert outputs are never stacked,
    scaled and summed: three fewer kernels per layer, each of which costs about as much as the
    bookkeeping of the whole layer. With `split`, each core sums a share of the experts.
    For unbiased experts without post-expert norm.
    """
    backend = CPU_BACKENDS[weights.backend]
    if split is None or len(experts) < 2:
        return backend.weighted_sum(module, x, experts, gates, weights)
    parts = list(zip(chunks(experts, split.ways), chunks(gates, split.ways)))
    out, *rest = split.run(lambda part: backend.weighted_sum(module, x, *part, weights), parts)
    for partial in rest:
        out.add_(partial)
    return out


def combine(module: torch.nn.Module, out: torch.Tensor, top_k_weights: torch.Tensor,
            dtype: torch.dtype) -> torch.Tensor:
    """The routing weights' sum over each token's expert outputs `out` [tokens * top_k, hidden], in
    the pairs' order (after the post-expert norm of the architectures that have one)."""
    if module.has_post_expert_norm:
        out = module.post_expert_norm(out)
    out = out * top_k_weights.reshape(-1, 1)
    return out.view(*top_k_weights.shape, -1).sum(dim=1).to(dtype)

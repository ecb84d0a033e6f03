"""Weight-only int8 and int4 for experts and dense linear layers, on torch's own CPU kernels.

int8: symmetric, one scale per output channel (`torch._weight_int8pack_mm`).
int4: asymmetric, one scale and zero per group of input channels (`torch._weight_int4pack_mm_for_cpu`,
whose packed layout comes from `torch._convert_weight_to_int4pack_for_cpu`); w = (code - 8) * s + z.
Scales are stored in bfloat16 and the codes computed from the rounded scales, so the kernels in either
activation dtype compute exactly `dequantize(...)`'s weights.
"""

from __future__ import annotations

import os
import time

import torch

from .kernel_choices import remembered

FORMATS = ("source", "int8", "int4")
CHOICES = (*FORMATS, "auto")
SCALE_DTYPE = torch.bfloat16
INT4_GROUP_SIZES = (128, 64, 32)  # the largest that divides the input channels is used
ACTIVATIONS = {"bf16": torch.bfloat16, "fp32": torch.float32}


def check_format(name: str, choices: tuple[str, ...] = CHOICES) -> str:
    if name not in choices:
        raise ValueError(f"unknown weight format {name!r}; choose one of {', '.join(choices)}")
    return name


def int4_group_size(out_features: int, in_features: int) -> int | None:
    """The int4 group size for a [out, in] matrix, or None where the kernel cannot take it."""
    if out_features % 16:
        return None
    return next((g for g in INT4_GROUP_SIZES if in_features % g == 0), None)


def quantize(w: torch.Tensor, fmt: str, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales) of one [out, in] matrix in `fmt` ("int8" or "int4")."""
    w = w.detach().float()
    if fmt == "int8":
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).to(SCALE_DTYPE)
        q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
        return q, scale
    n, k = w.shape
    gs = group_size or int4_group_size(n, k)
    g = w.view(n, k // gs, gs)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    s = ((hi - lo) / 15).clamp(min=1e-12).to(SCALE_DTYPE).float()
    z = (lo + 8 * s).to(SCALE_DTYPE).float()
    codes = torch.round((g - z[..., None]) / s[..., None] + 8).clamp(0, 15).to(torch.int32).view(n, k)
    packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
    scale_zeros = torch.stack([s, z], dim=-1).transpose(0, 1).contiguous().to(SCALE_DTYPE)  # [k/gs, n, 2]
    return packed, scale_zeros


def qmatmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, fmt: str, act: torch.dtype) -> torch.Tensor:
    """x [m, in] @ dequantize(q, scale).T, computed with activations in `act`, returned as float32."""
    x = x.to(act)
    if scale.dtype != act:
        scale = scale.to(act)
    if fmt == "int8":
        y = torch._weight_int8pack_mm(x, q, scale)
    else:
        y = torch._weight_int4pack_mm_for_cpu(x, q, x.shape[1] // scale.shape[0], scale)  # scale: [in/gs, out, 2]
    return y if y.dtype == torch.float32 else y.float()


def dequantize(q: torch.Tensor, scale: torch.Tensor, fmt: str) -> torch.Tensor:
    """The float32 [out, in] matrix the kernels compute with (for tests and the GPU path)."""
    if fmt == "int8":
        return q.float() * scale.float()[:, None]
    eye = torch.eye(q.shape[1] * 2)  # packed: two codes a byte
    return qmatmul(eye, q, scale, "int4", torch.float32).T.contiguous()  # one term per output: exact


def quantized_bytes(out_features: int, in_features: int, fmt: str, source_element_size: int) -> int:
    """Bytes of one [out, in] matrix held in `fmt`."""
    if fmt == "source":
        return out_features * in_features * source_element_size
    if fmt == "int8":
        return out_features * in_features + out_features * 2
    gs = int4_group_size(out_features, in_features) or 32
    return out_features * in_features // 2 + in_features // gs * out_features * 4


def fastest_activation(q: torch.Tensor, scale: torch.Tensor, fmt: str, repeats: int = 5) -> str:
    """"bf16" or "fp32": which activation dtype runs a one-row product of this matrix faster here, each
    at its better thread count (one, or all: which one a decode step gets is measured later, and idle
    threads spinning on a busy core would make a kernel look 10x slower than it is)."""
    x = torch.randn(1, q.shape[1] * (2 if fmt == "int4" else 1))
    threads = torch.get_num_threads()
    best = {name: float("inf") for name in ACTIVATIONS}
    try:
        for count in sorted({1, threads}):
            torch.set_num_threads(count)
            for name, act in ACTIVATIONS.items():
                qmatmul(x, q, scale, fmt, act)
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    qmatmul(x, q, scale, fmt, act)
                    best[name] = min(best[name], time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return min(best, key=best.get)


class QuantLinear(torch.nn.Module):
    """An nn.Linear held in int8 or int4; the bias stays at the checkpoint's precision."""

    def __init__(self, linear: torch.nn.Linear, fmt: str, act: str = "bf16"):
        super().__init__()
        self.in_features, self.out_features, self.fmt, self.act = linear.in_features, linear.out_features, fmt, act
        q, scale = quantize(linear.weight, fmt)
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = qmatmul(x.reshape(-1, self.in_features), self.q, self.scale, self.fmt, ACTIVATIONS[self.act])
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt}, act={self.act}"


def quantize_stack(module: torch.nn.Module, name: str, stack: torch.Tensor, fmt: str) -> None:
    """Quantize one stacked expert parameter [experts, ...] into `module._moe_tensors`, one expert at a
    time: `NAME.q` [experts, out, in(/2)] and `NAME.scale`, read through `interface.expert_tensors`.
    The parameter itself is left on the meta device, keeping its shape for anything that asks."""
    mats = stack.detach().transpose(1, 2) if module.is_transposed else stack.detach()  # [E, out, in]
    if fmt == "int4" and int4_group_size(mats.shape[1], mats.shape[2]) is None:
        raise ValueError(f"int4 needs expert matrices with output channels divisible by 16 and input channels "
                         f"by 32 ({name} is {mats.shape[1]}x{mats.shape[2]}); use int8")
    parts = [quantize(m, fmt) for m in mats]
    tensors = module.__dict__.setdefault("_moe_tensors", {})
    tensors[name + ".q"] = torch.stack([q for q, _ in parts])
    tensors[name + ".scale"] = torch.stack([s for _, s in parts])
    module._moe_format = fmt


def quantize_experts(module: torch.nn.Module, fmt: str) -> None:
    """Hold an experts module's matrices in `fmt` (those not quantized while reading) and its biases
    next to them at the source precision."""
    from .interface import expert_tensor_names

    tensors = module.__dict__.setdefault("_moe_tensors", {})
    for name in expert_tensor_names(module):
        stack = getattr(module, name)
        if name.endswith("_bias"):
            tensors[name] = stack.detach()
        elif name + ".q" not in tensors:
            quantize_stack(module, name, stack, fmt)
            setattr(module, name, meta_like(stack))
    module._moe_format = fmt


def meta_like(t: torch.Tensor) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.empty(t.shape, dtype=t.dtype, device="meta"), requires_grad=False)


def dense_linears(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.Linear]]:
    """(parent, name, layer) of the nn.Linear layers a dense format applies to: all but the routers
    (`*gate`, `*router`: tiny, and their rounding would move tokens to other experts)."""
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if isinstance(child, torch.nn.Linear) and not name.endswith(("gate", "router"))]


def quantize_dense(model: torch.nn.Module, fmt: str) -> int:
    """Replace the dense linear layers by `QuantLinear`s in `fmt`, one at a time; the activation dtype
    is the faster one on the first layer (measured once per machine and shape, unless
    MOE_CHAT_CPU_MATMUL pins it). Returns how many."""
    pinned = os.environ.get("MOE_CHAT_CPU_MATMUL", "")  # e.g. int8-bf16: as for the experts
    act = pinned.removeprefix(fmt + "-") if pinned.removeprefix(fmt + "-") in ACTIVATIONS else None
    replaced = 0
    for parent, name, linear in dense_linears(model):
        if fmt == "int4" and int4_group_size(linear.out_features, linear.in_features) is None:
            continue  # a layer the int4 kernel cannot take stays at the source precision
        quant = QuantLinear(linear, fmt)
        if act is None:
            shape = {"format": fmt, "matrix": [linear.out_features, linear.in_features]}
            act = remembered("dense", shape, lambda: {"act": fastest_activation(quant.q, quant.scale, fmt)})[0]["act"]
        quant.act = act
        setattr(parent, name, quant)
        replaced += 1
    return replaced

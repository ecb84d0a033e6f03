"""When is copying an expert to the fast device cheaper than computing it on the CPU?

An expert is a few matmuls over a fixed block of weights. For a handful of tokens the CPU is bound by
reading those weights once; for a large prefill batch it is bound by arithmetic, and copying the
weights over PCIe once and running them on the GPU wins. Both sides are modelled as
max(bytes / bandwidth, flops / throughput), calibrated at start-up on this machine.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch


@dataclass
class DeviceProfile:
    name: str
    h2d_bytes_per_s: float  # host -> device copy bandwidth (pinned memory)
    mem_bytes_per_s: float  # device memory bandwidth as seen by an expert matmul
    flops_per_s: float  # device matmul throughput in the model's dtype
    memory_bytes: int


# Named profiles let the benchmark model a GPU this machine does not have. Numbers are effective
# (about 70-80% of the data-sheet peaks), fp16/bf16 dense matmul.
DEVICE_PROFILES = {
    "rtx3060-12gb": DeviceProfile("RTX 3060 12 GB, PCIe 4.0 x16", 20e9, 300e9, 40e12, 12 * 2**30),
    "rtx4090-24gb": DeviceProfile("RTX 4090 24 GB, PCIe 4.0 x16", 22e9, 800e9, 140e12, 24 * 2**30),
    "a100-40gb": DeviceProfile("A100 40 GB, PCIe 4.0 x16", 22e9, 1300e9, 220e12, 40 * 2**30),
}


@dataclass
class CostModel:
    cpu_bytes_per_s: float
    cpu_flops_per_s: float
    device: DeviceProfile | None  # None: the fast device is the CPU itself

    def cpu_seconds(self, expert_bytes: int, tokens: int, flops_per_token: float) -> float:
        return max(expert_bytes / self.cpu_bytes_per_s, tokens * flops_per_token / self.cpu_flops_per_s)

    def device_seconds(self, expert_bytes: int, tokens: int, flops_per_token: float) -> float:
        d = self.device
        if d is None:
            return self.cpu_seconds(expert_bytes, tokens, flops_per_token)
        return max(expert_bytes / d.mem_bytes_per_s, tokens * flops_per_token / d.flops_per_s)

    def copy_seconds(self, expert_bytes: int) -> float:
        return 0.0 if self.device is None else expert_bytes / self.device.h2d_bytes_per_s

    def should_fetch(self, expert_bytes: int, tokens: int, flops_per_token: float) -> bool:
        """Copy now and run on the device, rather than run on the CPU?"""
        if self.device is None:
            return False
        fetch = self.copy_seconds(expert_bytes) + self.device_seconds(expert_bytes, tokens, flops_per_token)
        return fetch < self.cpu_seconds(expert_bytes, tokens, flops_per_token)

    def to_dict(self) -> dict:
        return asdict(self)


def _best_time(fn, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def calibrate_cpu(weight: torch.Tensor) -> tuple[float, float]:
    """(bytes/s for one token, flops/s for a 64-token batch) of one real expert matrix on the CPU."""
    w = weight.detach()
    if w.dim() != 2:
        w = w.reshape(w.shape[0], -1)
    one = torch.randn(1, w.shape[-1], dtype=w.dtype)
    batch = torch.randn(64, w.shape[-1], dtype=w.dtype)
    t1 = _best_time(lambda: one @ w.T)
    t64 = _best_time(lambda: batch @ w.T)
    nbytes = w.numel() * w.element_size()
    return nbytes / max(t1, 1e-9), 2 * 64 * w.numel() / max(t64, 1e-9)


def calibrate_cuda(weight: torch.Tensor, device: torch.device) -> DeviceProfile:
    """Measure host->device bandwidth and device matmul speed on a real expert matrix."""
    w = weight.detach()
    if w.dim() != 2:
        w = w.reshape(w.shape[0], -1)
    host = w.pin_memory() if not w.is_pinned() else w
    dev = torch.empty_like(host, device=device)
    t_copy = _best_time(lambda: dev.copy_(host, non_blocking=True))
    one = torch.randn(1, w.shape[-1], dtype=w.dtype, device=device)
    batch = torch.randn(256, w.shape[-1], dtype=w.dtype, device=device)
    t1 = _best_time(lambda: one @ dev.T)
    t256 = _best_time(lambda: batch @ dev.T)
    nbytes = w.numel() * w.element_size()
    total = torch.cuda.get_device_properties(device).total_memory
    return DeviceProfile(torch.cuda.get_device_name(device), nbytes / t_copy, nbytes / t1,
                         2 * 256 * w.numel() / t256, total)

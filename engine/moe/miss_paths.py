"""What happens to a (token, expert) pair whose expert is not in the fast device's cache.

`cpu` is the hybrid engine's answer: compute it on the CPU from the CPU copy. `offload` is the seed
paper's baseline: copy the expert over, use it for this step only, drop it. The seed suite selects one
with `HybridRuntime.set_miss_path`; both see the same routing, cache and counters.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from .cpu_experts import CpuExperts
from .expert_math import ExpertWeights, expert_ffn
from .interface import expert_tensors
from .telemetry import Telemetry


def gather_rows(hidden_states: torch.Tensor, pairs: np.ndarray, top_k: int) -> torch.Tensor:
    """The token rows of (token, expert) `pairs` (flat indices token * top_k + k)."""
    return hidden_states[torch.from_numpy(pairs // top_k).to(hidden_states.device)]


class CpuMisses:
    name = "cpu"

    def __init__(self, cpu: CpuExperts, telemetry: Telemetry):
        self.cpu, self.telemetry = cpu, telemetry

    def start(self, hidden_states: torch.Tensor, pairs: np.ndarray, top_k: int) -> torch.Tensor:
        """Before the hits are queued: the missed rows go to the CPU now, since a copy queued after the
        hits would wait for them, and the GPU could not compute hits while the CPU computes misses."""
        return gather_rows(hidden_states, pairs, top_k).to("cpu")

    def finish(self, started: torch.Tensor, module: torch.nn.Module, hidden_states: torch.Tensor,
               pairs: np.ndarray, experts: np.ndarray, layer: int) -> torch.Tensor:
        t = time.perf_counter()
        rows = self.cpu.ffn(module, started, experts, layer).to(hidden_states.device, non_blocking=True)
        self.telemetry.times["cpu_time_s"][layer] += time.perf_counter() - t
        return rows


class OffloadMisses:
    name = "offload"

    def __init__(self, device: torch.device, expert_bytes: int, telemetry: Telemetry):
        self.device, self.expert_bytes, self.telemetry = device, expert_bytes, telemetry

    def start(self, hidden_states: torch.Tensor, pairs: np.ndarray, top_k: int) -> int:
        return top_k

    def finish(self, top_k: int, module: torch.nn.Module, hidden_states: torch.Tensor, pairs: np.ndarray,
               experts: np.ndarray, layer: int) -> torch.Tensor:
        t = time.perf_counter()
        used = np.unique(experts)
        index = torch.from_numpy(used)
        scratch = ExpertWeights(module, {n: t[index].to(self.device) for n, t in expert_tensors(module).items()})
        rows = expert_ffn(module, gather_rows(hidden_states, pairs, top_k), np.searchsorted(used, experts), scratch)
        self.telemetry.counts["bytes_copied"][layer] += len(used) * self.expert_bytes
        self.telemetry.times["enqueue_time_s"][layer] += time.perf_counter() - t
        return rows

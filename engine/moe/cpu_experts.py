"""The CPU miss path: the CPU copy of every MoE layer's experts and how the CPU computes them.

Two choices are made here by measuring this machine at load, never by a winner from another one:
whether a decode step's experts are split over the cores (MKL runs a one-token matmul on one core
whatever the thread count, so the others would idle), and which CPU backend computes them (torch or
numpy, see `expert_math`).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

import numpy as np
import torch

from .cost_model import one_row_thread_speedup
from .cpu_split import SplitRunner, split_linears
from .expert_math import CPU_BACKENDS, ExpertWeights, expert_ffn, expert_ffn_combined
from .interface import expert_tensors

MAX_SPLIT_WAYS = 8  # past about 8 cores a desktop's memory bandwidth is spent; more ways only add hand-overs


class CpuExperts:
    """Every layer's CPU expert weights (`weights[layer]`), the split runner and the chosen backend."""

    def __init__(self, model: torch.nn.Module, modules: list[torch.nn.Module], simulated_cache: bool):
        self.modules = modules
        self.weights = [ExpertWeights(m, expert_tensors(m)) for m in modules]
        first = modules[0]
        w = self.weights[0].probe_matrix()
        self.threads = torch.get_num_threads()
        # big matrices on many cores may be better left to MKL's own threads: measured, not assumed
        self.split: SplitRunner | None = None
        if self.threads > 1 and one_row_thread_speedup(w) < 1.3:
            self.split = SplitRunner(workers=min(self.threads, MAX_SPLIT_WAYS) - 1)
        # with everything on the CPU, a decode step's large one-row matmuls split over the cores as well
        self.split_linears = split_linears(model, self.split) if self.split is not None and simulated_cache else []
        self.format = self.weights[0].format
        self.backend = self.weights[0].backend
        choices = self.weights[0].cpu_backends()
        pinned = os.environ.get("MOE_CHAT_CPU_MATMUL", "auto")
        if len(choices) > 1:
            self.use_backend(pinned if pinned in choices else self._fastest_backend(choices))
        # decode on the CPU with unbiased float32 source experts: the fused weighted sum of
        # `expert_ffn_combined`. Not for quantized ones: their bfloat16 activations would turn its other
        # summation order into other tokens than forced slots give, and the cache must never change them.
        self.fused_decode = (simulated_cache and not first.has_bias and not first.has_post_expert_norm
                             and self.format == "source" and self.weights[0].dtype == torch.float32)

    def use_backend(self, name: str) -> None:
        """Which backend computes the CPU experts ("torch" or "numpy" for source weights, "int8-bf16",
        "int8-fp32", "int4-bf16", "int4-fp32" for quantized ones; see `expert_math`)."""
        if name not in CPU_BACKENDS:
            choices = self.weights[0].cpu_backends()
            raise ValueError(f"unknown CPU matmul backend {name!r}; choose {' or '.join(sorted(choices))}")
        for w in self.weights:  # one these weights cannot run on leaves them on their default
            w.use_backend(name)
        self.backend = self.weights[0].backend

    def _fastest_backend(self, choices: list[str]) -> str:
        """Time a decode step's CPU experts with each backend, as decode runs them (split, one intra-op
        thread), over up to 64 MiB of experts so that they come from memory, not cache; pick the fastest
        (the default, first, unless another is 5% faster)."""
        num_experts = len(self.weights[0].mats1)
        top_k = min(4, num_experts)
        expert_bytes = self.weights[0].w1[0].nbytes + self.weights[0].w2[0].nbytes
        groups = [(m, w, list(range(e, e + top_k))) for m, w in zip(self.modules, self.weights)
                  for e in range(0, num_experts - top_k + 1, top_k)]
        groups = groups[:max(1, 64 * 2**20 // (top_k * expert_bytes))]
        x = torch.randn(1, self.weights[0].probe_matrix().shape[1])
        gates = [1.0 / top_k] * top_k
        def seconds(backend: str, part: list) -> float:
            self.use_backend(backend)
            t = time.perf_counter()
            for m, w, experts in part:
                expert_ffn_combined(m, x, experts, gates, w, self.split)
            return time.perf_counter() - t

        with self.decode_threads():
            # a first look at a few groups drops the backends that are far behind (a kernel's slow
            # fallback can be 10x off), so that loading does not spend seconds timing them
            first = {name: min(seconds(name, groups[:4]) for _ in range(2)) for name in choices}
            best = {name: float("inf") for name in choices if first[name] < 2 * min(first.values())}
            for _ in range(3):
                for backend in best:
                    best[backend] = min(best[backend], seconds(backend, groups))
        default = choices[0] if choices[0] in best else min(best, key=best.get)
        fastest = min(best, key=best.get)
        return fastest if best[fastest] < 0.95 * best[default] else default

    # -- threads -----------------------------------------------------------------------------------
    def begin_step(self, tokens: int) -> None:
        """A decode step's matmuls are one-token and run on one core whatever the thread count, while
        idle OpenMP workers would spin on the core the split wants: one intra-op thread, split experts."""
        if self.split is not None and tokens == 1:
            torch.set_num_threads(1)

    def end_step(self) -> None:
        if self.split is not None:
            torch.set_num_threads(self.threads)

    @contextlib.contextmanager
    def decode_threads(self) -> Iterator[None]:
        """Threads as a decode step has them (for measurements outside a model forward)."""
        self.begin_step(1)
        try:
            yield
        finally:
            self.end_step()

    @contextlib.contextmanager
    def one_core(self) -> Iterator[None]:
        """No split and one intra-op thread: for measurements of the per-layer cost on a single core."""
        split, self.split = self.split, None
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            self.split = split
            torch.set_num_threads(threads)

    # -- compute ------------------------------------------------------------------------------------
    def ffn(self, module: torch.nn.Module, x: torch.Tensor, groups: np.ndarray, layer: int) -> torch.Tensor:
        """Rows of `x` through the layer's CPU experts `groups` (see `expert_ffn`)."""
        return expert_ffn(module, x, groups, self.weights[layer], self.split)

    def weighted_sum(self, module: torch.nn.Module, x: torch.Tensor, experts: list[int], gates: list[float],
                     layer: int) -> torch.Tensor:
        """A decode token's gated sum over its experts (see `expert_ffn_combined`)."""
        return expert_ffn_combined(module, x, experts, gates, self.weights[layer], self.split)

    def close(self) -> None:
        for linear in self.split_linears:
            del linear.forward  # back to nn.Linear.forward
        self.split_linears = []
        if self.split is not None:
            self.split.close()

"""The CPU miss path: the CPU copy of every MoE layer's experts and how the CPU computes them.

Three choices are made here by measuring this machine at load, never by a winner from another one:
whether a decode step's experts are split over the cores (where MKL runs a one-token matmul on one
core whatever the thread count, the others would idle), how many intra-op threads a decode step that
is not split runs with (all, or one: idle OpenMP workers spin on a core that something else wants,
which made one-row products 5x slower on a loaded 2-core machine), and which CPU backend computes
them (torch or numpy, or the int8/int4 kernels' activation dtype, see `expert_math`). They are
remembered per machine and weight shape (`kernel_choices`), so later loads skip the measurement.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

import numpy as np
import torch

from .cpu_split import SplitRunner, one_row_linear, one_row_linears
from .expert_math import CPU_BACKENDS, ExpertWeights, combine, expert_ffn, expert_ffn_combined
from .interface import expert_tensors
from .kernel_choices import bytes_past_cache, remembered

MAX_SPLIT_WAYS = 8  # past about 8 cores a desktop's memory bandwidth is spent; more ways only add hand-overs


def _dense_linears(model: torch.nn.Module, max_bytes: int = 32 * 2**20) -> list[torch.nn.Linear]:
    """The model's CPU linear layers, in order, up to `max_bytes` of weights."""
    out, total = [], 0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and m.weight.device.type == "cpu" and not m.weight.is_meta:
            total += m.weight.nbytes
            if total > max_bytes:
                break
            out.append(m)
    return out


def shares(items: list, n: int) -> list[list]:
    """`items` cut into `n` contiguous runs (some empty when there are fewer items)."""
    return [items[len(items) * i // n:len(items) * (i + 1) // n] for i in range(n)]


def describe(backend: str, split: bool, threads: int) -> str:
    """How `us_per_step` names a candidate: "torch split", "numpy", "torch 1 thread"."""
    return backend + (" split" if split else " 1 thread" if threads == 1 else "")


class CpuExperts:
    """Every layer's CPU expert weights (`weights[layer]`), the split runner and the chosen backend."""

    def __init__(self, model: torch.nn.Module, modules: list[torch.nn.Module], simulated_cache: bool):
        self.modules = modules
        self.weights = [ExpertWeights(m, expert_tensors(m)) for m in modules]
        first = modules[0]
        self.threads = torch.get_num_threads()
        # decode on the CPU with unbiased float32 source experts: the fused weighted sum of
        # `expert_ffn_combined`. Not for quantized ones: their bfloat16 activations would turn its other
        # summation order into other tokens than forced slots give, and the cache must never change them.
        self.fused_decode = (simulated_cache and not first.has_bias and not first.has_post_expert_norm
                             and self.weights[0].format == "source" and self.weights[0].dtype == torch.float32)
        self.format = self.weights[0].format
        self.backend = self.weights[0].backend
        choices = self.weights[0].cpu_backends()
        pinned = os.environ.get("MOE_CHAT_CPU_MATMUL", "auto")
        choices = [pinned] if pinned in choices else choices
        ways = min(self.threads, MAX_SPLIT_WAYS)
        self.split: SplitRunner | None = None
        self.choice = {"backend": choices[0] if choices else self.backend, "split": False, "threads": self.threads}
        self.remembered = False
        self._dense = _dense_linears(model) if simulated_cache else []  # timed with the experts
        if choices and (len(choices) > 1 or ways > 1):
            shape = {"format": self.format, "dtype": str(self.weights[0].w1.dtype).removeprefix("torch."),
                     "matrices": self.weights[0].matrices(), "experts": len(self.weights[0].mats1),
                     "candidates": choices, "fused": self.fused_decode}
            self.choice, self.remembered = remembered("cpu-experts", shape, lambda: self._measure(choices, ways))
        if self.choice["split"]:
            self.split = SplitRunner(workers=ways - 1)
        # threads of a decode step: one beside a split (its workers are the other cores), else measured
        self.decode_threads_count = 1 if self.split is not None else self.choice.get("threads", self.threads)
        if self.choice["backend"] != self.backend:
            self.use_backend(self.choice["backend"])
        # with everything on the CPU, a decode step's large one-row matmuls split over the cores as well
        self.one_row_linears = one_row_linears(model, self.split if simulated_cache else None)

    def use_backend(self, name: str) -> None:
        """Which backend computes the CPU experts ("torch", "torch-mv" or "numpy" for source weights, "int8-bf16",
        "int8-fp32", "int4-bf16", "int4-fp32" for quantized ones; see `expert_math`)."""
        if name not in CPU_BACKENDS:
            choices = self.weights[0].cpu_backends()
            raise ValueError(f"unknown CPU matmul backend {name!r}; choose {' or '.join(sorted(choices))}")
        for w in self.weights:  # one these weights cannot run on leaves them on their default
            w.use_backend(name)
        self.backend = self.weights[0].backend

    def _measure(self, choices: list[str], ways: int) -> dict:
        """Time a decode step's CPU experts with each backend: split over `ways` cores (the hand-off
        to the split's threads is part of what is timed), or not split with all intra-op threads or
        one, as decode runs them, over twice the last-level cache's bytes of experts (or all the
        model has) so that they come from memory as a decode step's do, each layer's followed by its
        share of the dense layers' one-row products (up to 32 MiB of them) under the same threads.
        Each candidate is timed after an untimed call under its own threads (the first call after a
        change of thread count pays for waking them). Timed over 64 MiB, which a large L3 (480 MiB
        on one of this project's Xeons) holds, one core looked faster than two, and decode ran at
        0.66x of the two-thread choice. The default (first backend, split) is kept unless another is
        5% faster."""
        num_experts = len(self.weights[0].mats1)
        top_k = min(4, num_experts)
        expert_bytes = self.weights[0].w1[0].nbytes + self.weights[0].w2[0].nbytes
        groups = [(m, w, list(range(e, e + top_k))) for m, w in zip(self.modules, self.weights)
                  for e in range(0, num_experts - top_k + 1, top_k)]
        groups = groups[:max(1, bytes_past_cache() // (top_k * expert_bytes))]
        x = torch.randn(1, self.weights[0].probe_matrix().shape[1]).to(self.weights[0].dtype)
        gates = [1.0 / top_k] * top_k
        rows = np.arange(top_k)
        runner = SplitRunner(workers=ways - 1) if ways > 1 else None
        layouts = [(True, 1), (False, self.threads), (False, 1)] if runner else [(False, 1)]
        rows_in = [torch.zeros(1, m.in_features, dtype=m.weight.dtype) for m in self._dense]
        dense = {split: list(zip([one_row_linear(m, runner if split else None) for m in self._dense], rows_in))
                 for split in (False, True)}

        def seconds(candidate: tuple[str, bool, int], part: list) -> float:
            backend, split, self.decode_threads_count = candidate
            self.split = runner if split else None
            self.use_backend(backend)
            with self.decode_threads():
                t = time.perf_counter()
                # as a decode step computes them: each layer's experts, then its share of the dense
                # layers under the same threads (spinning ones cost 5-10x there when a core is busy)
                for (m, w, experts), linears in zip(part, shares(dense[split], len(part))):
                    if self.fused_decode:
                        expert_ffn_combined(m, x, experts, gates, w, self.split)
                    else:
                        expert_ffn(m, x, rows + experts[0], w, self.split)
                    for linear, row in linears:
                        linear(row)
                return time.perf_counter() - t

        def timed(candidates: list[tuple[str, bool, int]], part: list, best: dict) -> None:
            for c in candidates:
                seconds(c, part[:2])  # untimed: wakes the threads this candidate runs with
                best[c] = min(best.get(c, float("inf")), seconds(c, part))

        try:
            # a first look at a few groups drops the candidates that are far behind (a kernel's slow
            # fallback can be 10x off), so that loading does not spend seconds timing them
            first: dict = {}
            for _ in range(2):
                timed([(b, split, threads) for b in choices for split, threads in layouts], groups[:4], first)
            best: dict = {}
            for _ in range(3):
                timed([c for c in first if first[c] < 2 * min(first.values())], groups, best)
        finally:
            self.split = None
            if runner is not None:
                runner.close()
        default = (choices[0], *layouts[0])
        default = default if default in best else min(best, key=best.get)
        fastest = min(best, key=best.get)
        backend, split, threads = fastest if best[fastest] < 0.95 * best[default] else default
        per_step = {describe(*c): round(t / len(groups) * 1e6, 1) for c, t in best.items()}
        return {"backend": backend, "split": split, "threads": threads, "us_per_step": per_step}

    # -- threads -----------------------------------------------------------------------------------
    def begin_step(self, tokens: int) -> None:
        """A decode step's matmuls are one-token and run on one core whatever the thread count, while
        idle OpenMP workers would spin on the core the split wants: one intra-op thread beside a split,
        else the measured count."""
        if tokens == 1 and self.decode_threads_count != self.threads:
            torch.set_num_threads(self.decode_threads_count)

    def end_step(self) -> None:
        if torch.get_num_threads() != self.threads:
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

    def decode_token(self, module: torch.nn.Module, x: torch.Tensor, experts: np.ndarray,
                     top_k_weights: torch.Tensor, layer: int) -> torch.Tensor:
        """One decode token's whole expert arithmetic, for a cache that only simulates (every expert
        runs here): fused into the down projections where `fused_decode` allows (see
        `expert_ffn_combined`), else the experts' rows and their weighted sum."""
        if self.fused_decode and x.dtype == top_k_weights.dtype == torch.float32:
            return expert_ffn_combined(module, x, experts.tolist(), top_k_weights.view(-1).tolist(),
                                       self.weights[layer], self.split)
        return combine(module, self.ffn(module, x, experts, layer), top_k_weights, x.dtype)

    def close(self) -> None:
        for linear in self.one_row_linears:
            del linear.forward  # back to nn.Linear.forward
        self.one_row_linears = []
        if self.split is not None:
            self.split.close()

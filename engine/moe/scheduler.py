"""One MoE layer's step, as named stages: route, split (hit / CPU miss / fetch), experts, combine, admit.

The router's (token, expert) pairs are looked up in the cache; hits run on the fast device from cache
slots, misses on the miss path (the CPU, or the offload baseline), and in a prefill the cost model may
fetch an expert now because a copy beats the CPU. Afterwards the cache admits what the policy wants.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..cache.expert_cache import Admission, ExpertCache
from .cost_model import CostModel
from .cpu_experts import CpuExperts
from .expert_math import combine, expert_ffn
from .miss_paths import CpuMisses, gather_rows
from .slots import SlotStore
from .telemetry import Telemetry


@dataclass
class RoutingEvent:
    """What an observer sees of one MoE layer's step; the tensors are live: copy what you keep."""
    step: int
    layer: int
    module: torch.nn.Module
    hidden_states: torch.Tensor
    top_k_index: torch.Tensor
    top_k_weights: torch.Tensor
    experts: np.ndarray  # top_k_index as a numpy array [tokens, top_k]


Observer = Callable[[RoutingEvent], None]


@functools.cache
def _arange(n: int) -> np.ndarray:
    a = np.arange(n)
    a.setflags(write=False)  # shared between calls
    return a


@functools.cache
def _ones(n: int) -> np.ndarray:
    a = np.ones(n, dtype=np.int64)
    a.setflags(write=False)
    return a


class LayerScheduler:
    def __init__(self, cache: ExpertCache, cpu: CpuExperts, slots: SlotStore | None, cost: CostModel,
                 telemetry: Telemetry, expert_bytes: int, flops_per_token: float, admissions_per_layer: int | None):
        self.cache, self.cpu, self.slots, self.cost, self.telemetry = cache, cpu, slots, cost, telemetry
        self.expert_bytes = expert_bytes
        self.flops_per_token = flops_per_token
        self.admissions_per_layer = admissions_per_layer
        self.usage = np.zeros((cache.num_layers, cache.num_experts), dtype=np.int64)  # tokens per expert
        self.miss_path = CpuMisses(cpu, telemetry)
        self.policy_seconds = 0.0  # time in the policy and the cache's decisions (`auto` weighs it)
        self.router_hint: Callable[[int, torch.Tensor, int], np.ndarray | None] | None = None  # set by the runtime
        self.observers: list[Observer] = []

    def forward(self, module: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor, step: int) -> torch.Tensor:
        layer = module._moe_layer
        tokens, top_k = top_k_index.shape
        if self.slots is not None and self.slots.in_flight:  # prefetches for this layer may have landed
            self.land_copies(wait=False)
        # route
        ids_np = top_k_index.reshape(-1).cpu().numpy()
        if self.observers:
            event = RoutingEvent(step, layer, module, hidden_states, top_k_index, top_k_weights,
                                 ids_np.reshape(tokens, top_k))
            for observe in self.observers:
                observe(event)
        if tokens == 1:  # decode: top-k experts are distinct, no need to count them
            experts, inverse, counts = ids_np, _arange(top_k), _ones(top_k)
        else:
            experts, inverse, counts = np.unique(ids_np, return_inverse=True, return_counts=True)
        # split
        slots = self.cache.lookup(layer, experts)  # fancy indexing: a copy
        t0 = time.perf_counter()
        self.cache.policy.record(layer, experts, counts, step)
        spent = time.perf_counter() - t0
        self.usage[layer, experts] += counts
        missed = slots < 0
        fetched = None
        if self.slots is not None and tokens > 1 and missed.any():
            fetched = self._fetch_now(layer, experts, counts, slots, missed, step)
            missed &= ~fetched
        # experts and combine
        if tokens == 1 and self.slots is None:  # a simulated cache's decode token: all on the CPU
            t0 = time.perf_counter()
            final = self.cpu.decode_token(module, hidden_states, ids_np, top_k_weights, layer)
            self.telemetry.times["cpu_time_s"][layer] += time.perf_counter() - t0
        else:
            out = self._pair_outputs(module, hidden_states, ids_np, slots[inverse], layer)
            final = combine(module, out, top_k_weights, hidden_states.dtype)
        # count and admit
        n_miss = int(np.count_nonzero(missed)) if tokens == 1 else int(counts[missed].sum())
        n_fetch = int(counts[fetched].sum()) if fetched is not None else 0
        tel = self.telemetry.counts
        tel["hits"][layer] += ids_np.size - n_miss - n_fetch
        tel["misses"][layer] += n_miss
        tel["fetches"][layer] += n_fetch
        # demand admissions, then the policy's prefetch for the next layer (or the next token's first)
        limit = self.admissions_per_layer or top_k
        background = self.slots is not None and self.slots.copies_in_background
        t0 = time.perf_counter()
        policy = self.cache.policy
        if tokens == 1 and policy.wants_hints and self.router_hint is not None:  # for the next layer's prefetch
            hint = self.router_hint(layer + 1, hidden_states, top_k)
            if hint is not None:
                policy.hint(layer + 1, hint[0])
        admitted = self.cache.after_access(layer, experts, missed, step, limit, reserve=background)
        self.policy_seconds += spent + time.perf_counter() - t0
        if admitted:
            if self.slots is not None:
                self.slots.copy_in_background(admitted)
            self.count_admissions(admitted)
        return final

    def land_copies(self, wait: bool) -> None:
        """Admissions whose background copy has landed become hits."""
        for a in self.slots.land(wait):
            self.cache.commit(a.layer, a.expert, a.slot)

    def _fetch_now(self, layer, experts, counts, slots, missed, step) -> np.ndarray:
        """Prefill: copy experts with enough tokens to make a copy cheaper than the CPU, then use them."""
        want = np.array([
            bool(m) and self.cost.should_fetch(self.expert_bytes, int(c), self.flops_per_token)
            for m, c in zip(missed, counts)
        ])
        fetched = np.zeros_like(missed)
        if not want.any():
            return fetched
        admitted = self.cache.admit(layer, experts[want], step, limit=int(want.sum()))
        self.slots.copy_in_stream_order(admitted)
        self.count_admissions(admitted)
        index = {e: i for i, e in enumerate(experts.tolist())}
        for a in admitted:
            slots[index[a.expert]] = a.slot
            fetched[index[a.expert]] = True
        return fetched

    def count_admissions(self, admitted: list[Admission]) -> None:
        counts = self.telemetry.counts
        for a in admitted:  # a prefetch belongs to the layer it was copied for
            counts["evictions"][a.layer] += a.evicted is not None
            counts["bytes_copied"][a.layer] += self.expert_bytes

    def _pair_outputs(self, module, hidden_states, ids_np: np.ndarray, pair_slots: np.ndarray,
                      layer: int) -> torch.Tensor:
        """Per (token, expert) pair outputs, before routing weights, in the original pair order."""
        top_k = ids_np.size // hidden_states.shape[0]
        times = self.telemetry.times
        t0 = time.perf_counter()
        if self.slots is None:  # simulated cache, a prefill: every pair runs from the CPU weights
            order = np.argsort(ids_np, kind="stable")
            rows = self.cpu.ffn(module, gather_rows(hidden_states, order, top_k), ids_np[order], layer)
            rows = rows[torch.from_numpy(np.argsort(order))]
            times["cpu_time_s"][layer] += time.perf_counter() - t0
            return rows

        hit = pair_slots >= 0
        hits = np.nonzero(hit)[0]
        hits = hits[np.argsort(pair_slots[hits], kind="stable")]
        misses = np.nonzero(~hit)[0]
        misses = misses[np.argsort(ids_np[misses], kind="stable")]
        started = self.miss_path.start(hidden_states, misses, top_k) if misses.size else None
        parts = []
        if hits.size:  # queued first: on CUDA the GPU runs them while the CPU works on the misses
            x = gather_rows(hidden_states, hits, top_k)
            parts.append(expert_ffn(module, x, pair_slots[hits], self.slots.weights, self.cpu.split))
        times["enqueue_time_s"][layer] += time.perf_counter() - t0
        if misses.size:
            parts.append(self.miss_path.finish(started, module, hidden_states, misses, ids_np[misses], layer))
        out = torch.cat(parts) if len(parts) > 1 else parts[0]
        back = torch.from_numpy(np.argsort(np.concatenate([hits, misses]))).to(hidden_states.device)
        return out[back]

"""Counters and timers cheap enough to leave on: plain Python lists bumped once per layer and step
(a numpy element update costs ten times more, and the hot path makes several per layer)."""

from __future__ import annotations

import os
import sys
import time

import psutil

COUNTERS = ("hits", "misses", "fetches", "evictions", "bytes_copied")
# cpu_time_s: the CPU computing experts; enqueue_time_s: the host queuing fast-device expert work (not
# the device's own time, which runs asynchronously under CUDA)
TIMERS = ("cpu_time_s", "enqueue_time_s")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since it started."""
    if sys.platform == "win32":
        return int(psutil.Process().memory_info().peak_wset)
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def rss_bytes() -> int:
    return int(psutil.Process(os.getpid()).memory_info().rss)


def process_memory() -> dict:
    rss = rss_bytes()
    return {"rss_bytes": rss, "peak_rss_bytes": max(rss, peak_rss_bytes())}


def cuda_memory(device) -> tuple[int, int, int]:
    """(allocated, peak allocated, total) bytes of a CUDA device."""
    import torch

    return (torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device),
            torch.cuda.get_device_properties(device).total_memory)


class Telemetry:
    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.reset()

    def reset(self) -> None:
        self.counts = {k: [0] * self.num_layers for k in COUNTERS}
        self.times = {k: [0.0] * self.num_layers for k in TIMERS}
        self.steps = 0
        # (tokens, seconds) of the most recent forward of each kind; rates are shown per latest step
        self.prefill = [0, 0.0]
        self.decode = [0, 0.0]
        self.decode_recent: list[float] = []
        self._step_start = 0.0
        self._step_tokens = 0

    def begin_step(self, tokens: int) -> None:
        self.steps += 1
        self._step_tokens = tokens
        self._step_start = time.perf_counter()

    def end_step(self) -> None:
        dt = time.perf_counter() - self._step_start
        if self._step_tokens > 1:
            self.prefill = [self._step_tokens, dt]
        elif self._step_tokens == 1:
            self.decode_recent.append(dt)
            del self.decode_recent[:-16]

    def prefill_tokens_per_s(self) -> float:
        tokens, dt = self.prefill
        return tokens / dt if dt > 0 else 0.0

    def decode_tokens_per_s(self) -> float:
        r = self.decode_recent
        return len(r) / sum(r) if r and sum(r) > 0 else 0.0

    def per_layer(self) -> list[dict]:
        rows = []
        for i in range(self.num_layers):
            row = {"layer": i}
            row.update({k: int(v[i]) for k, v in self.counts.items()})
            row.update({k: float(v[i]) for k, v in self.times.items()})
            rows.append(row)
        return rows

    def totals(self) -> dict:
        hits, misses, fetches = (sum(self.counts[k]) for k in ("hits", "misses", "fetches"))
        accesses = hits + misses + fetches
        return {
            "steps": self.steps,
            "hits": hits,
            "misses": misses,
            "fetches": fetches,
            "hit_rate": hits / accesses if accesses else 0.0,
            "cpu_share": misses / accesses if accesses else 0.0,
            "prefill_tokens_per_s": self.prefill_tokens_per_s(),
            "decode_tokens_per_s": self.decode_tokens_per_s(),
        }

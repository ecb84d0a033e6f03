"""Checks that hit work on the GPU and miss work on the CPU run at the same time; builds the synthetic model.

One MoE layer's experts forward runs with the cache frozen: one token routed to two uncached experts
(CPU work) and 32,768 tokens routed to two cached ones (GPU work), alone and in one call, timed; the
call with both is profiled, and the GPU's kernel time spent while the CPU computed the misses is
the overlap. Prints one JSON object; exit status 1 if under half the kernel time overlapped.
Usage: python tests/gpu/overlap.py [MODEL_DIR]  (built there if missing)
"""

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

from engine import load_model

OUT_TRACE = Path(os.environ.get("OUT", "out")) / "overlap-trace.json"
HIT_TOKENS = 32768
# 8 layers x 32 experts x 3 x 2048 x 1024 x 2 bytes = 3.2 GB of bf16 experts: any budget below 1 overflows
CONFIG = dict(vocab_size=32000, hidden_size=2048, intermediate_size=4096, moe_intermediate_size=1024,
              num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4, head_dim=128,
              num_experts=32, num_experts_per_tok=4, decoder_sparse_step=1, max_position_embeddings=4096)


def synthetic(path: Path) -> Path:
    if not (path / "config.json").exists():
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(Qwen3MoeConfig(**CONFIG), dtype=torch.bfloat16)
        model.save_pretrained(path)
        del model
        torch.cuda.empty_cache()
    return path


def _inputs(rt, routes: list[list[int]]):
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(len(routes), rt.model.config.get_text_config().hidden_size, device="cuda",
                    dtype=torch.bfloat16, generator=g)
    idx = torch.tensor(routes, device="cuda")
    return h, idx, torch.full(idx.shape, 0.5, device="cuda", dtype=torch.bfloat16)


def timed(rt, module, routes: list[list[int]], repeats: int = 15) -> float:
    """Best wall time of one experts forward with one token per route."""
    args = _inputs(rt, routes)
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        rt.experts_forward(module, *args)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def _length(intervals) -> float:
    return sum(b - a for a, b in intervals)


def _intersection(xs, ys) -> float:
    return sum(max(0.0, min(b, d) - max(a, c)) for a, b in xs for c, d in ys)


def busy_together(rt, module, routes: list[list[int]], repeats: int = 5) -> dict:
    """Profiled: GPU kernel time, CPU expert matmul time, and how much of them ran at the same time (µs)."""
    from torch.profiler import ProfilerActivity, profile

    args = _inputs(rt, routes)
    rt.experts_forward(module, *args)  # warm
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            rt.experts_forward(module, *args)
            torch.cuda.synchronize()
    trace = OUT_TRACE
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text())["traceEvents"]
    kernels = _union([(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "kernel"])
    cpu_mm = _union([(e["ts"], e["ts"] + e["dur"]) for e in events
                     if e.get("cat") == "cpu_op" and e.get("name") in ("aten::mm", "aten::addmm")])
    return {"gpu_kernels_us": _length(kernels), "cpu_matmuls_us": _length(cpu_mm),
            "together_us": _intersection(kernels, cpu_mm)}


def main() -> None:
    path = synthetic(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/moe-synthetic"))
    loaded = load_model(path, device="cuda", budget=0.5, policy="lru", profile=None)
    rt = loaded.runtime
    rt.cache.after_access = lambda *a, **k: []  # freeze the cache while timing
    rt.scheduler.cost.should_fetch = lambda *a, **k: False  # misses stay on the CPU, whatever their token count
    if int((rt.cache.slot_of[0] >= 0).sum()) < 2:
        rt.slots.copy_in_stream_order(rt.cache.preload(np.ones((rt.num_layers, rt.num_experts))))
    cached = np.flatnonzero(rt.cache.slot_of[0] >= 0).tolist()
    missing = np.flatnonzero(rt.cache.slot_of[0] < 0).tolist()
    module = rt.modules[0]
    miss_route, hit_route = missing[:2], cached[:2]

    # one token on two uncached experts (CPU) and HIT_TOKENS on two cached ones (GPU), alone and together
    cpu = timed(rt, module, [miss_route])
    gpu = timed(rt, module, [hit_route] * HIT_TOKENS)
    both = timed(rt, module, [miss_route] + [hit_route] * HIT_TOKENS)
    busy = busy_together(rt, module, [miss_route] + [hit_route] * HIT_TOKENS)
    # the share of the GPU's kernel time spent while the CPU computed the misses: 1 is full overlap
    overlap = busy["together_us"] / max(1e-9, min(busy["gpu_kernels_us"], busy["cpu_matmuls_us"]))
    result = {"cpu_misses_s": cpu, "gpu_hit_tokens": HIT_TOKENS, "gpu_hits_s": gpu, "both_s": both,
              "serial_s": cpu + gpu, **busy, "overlap": overlap, "overlapped": overlap >= 0.5,
              "miss_path_threads": rt.cpu.threads, "split_ways": rt.cpu.split.ways if rt.cpu.split else 1}
    print(json.dumps(result))
    sys.exit(0 if result["overlapped"] else 1)


if __name__ == "__main__":
    main()

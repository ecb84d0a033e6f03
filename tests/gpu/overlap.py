"""Checks that hit work on the GPU and miss work on the CPU overlap, and builds the synthetic model.

Times one MoE layer's experts forward for a decode token routed to cached experts only, to
uncached experts only, and to both; with overlap, both together take about the longer of the two,
not their sum. Prints one JSON object.
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

OUT = Path(os.environ.get("OUT", "out"))
# 16 layers x 32 experts x 3 x 2048 x 1024 x 2 bytes = 6.4 GB of bf16 experts: a 0.25 budget holds a quarter
CONFIG = dict(vocab_size=32000, hidden_size=2048, intermediate_size=4096, moe_intermediate_size=1024,
              num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4, head_dim=128,
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


def time_layer(rt, module, ids: list[int], repeats: int = 20) -> float:
    h = torch.randn(1, module.gate_up_proj.shape[-1], device="cuda", dtype=torch.bfloat16)
    idx = torch.tensor([ids], device="cuda")
    w = torch.full((1, len(ids)), 1.0 / len(ids), device="cuda", dtype=torch.bfloat16)
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        rt.experts_forward(module, h, idx, w)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    path = synthetic(OUT / "synthetic")
    loaded = load_model(path, device="cuda", budget=0.5, policy="static", profile=None)
    rt = loaded.runtime
    module = rt.modules[0]
    rt.admissions_per_layer = 0  # keep the cache as it is while timing
    cached = [e for e in range(rt.num_experts) if rt.cache.slot_of[0, e] >= 0]
    if len(cached) < 4:
        rt._copy_in(rt.cache.preload(np.ones((rt.num_layers, rt.num_experts))), sync=True)
        cached = [e for e in range(rt.num_experts) if rt.cache.slot_of[0, e] >= 0]
    missing = [e for e in range(rt.num_experts) if rt.cache.slot_of[0, e] < 0]
    hits = time_layer(rt, module, cached[:4])
    misses = time_layer(rt, module, missing[:4])
    both = time_layer(rt, module, cached[:2] + missing[:2])
    half_hits, half_misses = time_layer(rt, module, cached[:2]), time_layer(rt, module, missing[:2])
    serial = half_hits + half_misses
    result = {"hits_4_s": hits, "misses_4_s": misses, "hits_2_s": half_hits, "misses_2_s": half_misses,
              "mixed_2_2_s": both, "serial_estimate_s": serial,
              "overlap": (serial - both) / min(half_hits, half_misses) if min(half_hits, half_misses) > 0 else 0.0}
    result["overlapped"] = both < serial * 0.9
    print(json.dumps(result))
    sys.exit(0 if result["overlapped"] else 1)


if __name__ == "__main__":
    main()

"""GPU decode with every expert cached, against stock transformers wholly on the GPU, same process.

With all experts in the cache the engine does the stock model's math on the GPU; what it costs more per
token is its host-side work per MoE layer (routing copies, bookkeeping, synchronisations). Prints one
JSON object: tokens/s of each, their ratio, and that cost per MoE layer and decode step.
Usage: python tests/gpu/decode_overhead.py MODEL_DIR [DEVICE]
"""

import json
import sys

import torch
from transformers import AutoModelForCausalLM

from engine import Session, load_model
from engine.tools.bench import decode_rate
from engine.model.loader import LoadedModel, inspect_model


def stock_session(path: str, device: torch.device, implementation: str) -> Session:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, experts_implementation=implementation)
    model.to(device).eval().requires_grad_(False)
    return Session(LoadedModel(model=model, tokenizer=None, info=inspect_model(path), runtime=None, device=device))


def main() -> None:
    path, device = sys.argv[1], torch.device(sys.argv[2] if len(sys.argv) > 2 else "cuda")
    engine = load_model(path, device=device.type, budget=1.0, policy="lru", profile=None, force_slots=True)
    sessions = {"engine": Session(engine)}
    sessions.update({f"transformers[{impl}]": stock_session(path, device, impl) for impl in ("grouped_mm", "eager")})
    prompt = list(range(1, 33))
    best, tokens = {name: 0.0 for name in sessions}, {}
    for r in range(4):  # round 0 warms up (and fills the cache)
        for name, session in sessions.items():
            rate, tokens[name] = decode_rate(session, prompt, 48)
            if r:
                best[name] = max(best[name], rate)
    stock = max(v for k, v in best.items() if k != "engine")
    layers = engine.runtime.num_layers
    print(json.dumps({
        "decode_tokens_per_s": best,
        "ratio_vs_best_stock": best["engine"] / stock,
        "extra_us_per_moe_layer_step": (1 / best["engine"] - 1 / stock) / layers * 1e6,
        "hit_rate": engine.runtime.snapshot()["hit_rate"],
        "same_tokens_as_grouped_mm": tokens["engine"] == tokens["transformers[grouped_mm]"],
    }))


if __name__ == "__main__":
    main()

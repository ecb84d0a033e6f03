"""Peak resident memory of a model's first load, against the model it leaves in memory.

    python -m engine.tools.load_memory [--model P] [--experts int8] [--dense source] [--again] [--json]

Without `--model` a synthetic Qwen3-MoE checkpoint (bfloat16, 16 layers of 64 experts, about 800 MiB
of experts) is built with transformers' own classes into a temporary folder. Each load runs in a fresh
subprocess with an empty data folder (`$MOE_CHAT_DATA`), so it is a first load: read, quantize, save
the copy (`--no-copy`: keep the experts in RAM and save none). `$MOE_CHAT_AVAILABLE_RAM` is passed on,
so a load whose experts page in from the disk can be measured too. It reports the process's resident
memory before loading (torch and transformers imported), its peak during the load (VmHWM), after
it, and the bytes of the loaded model (parameters, buffers and quantized experts, wherever they live),
with the ratio the loading goal names: (peak - before) / model bytes. `--again` loads a second time,
from the saved copy. `--trace` prints the resident memory at each progress message, to see which stage
holds the peak.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SYNTHETIC = dict(  # Qwen3-MoE's layout, small: 16 layers x 64 experts of 2x256x512 + 512x256 in bfloat16
    vocab_size=4096, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256,
    num_hidden_layers=16, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
    num_experts=64, num_experts_per_tok=4, decoder_sparse_step=1, max_position_embeddings=2048,
)


def peak_rss() -> int:
    """This process's peak resident bytes: Linux's VmHWM (of this program's own memory; ru_maxrss also
    counts the parent's memory the process had when forked), else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def synthetic_model(out_dir: str | Path, dtype: str = "bfloat16", **overrides) -> Path:
    """A random Qwen3-MoE checkpoint saved with `save_pretrained` (no tokenizer: loads need none)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    torch.manual_seed(0)
    config = Qwen3MoeConfig(**{**SYNTHETIC, **overrides})
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(out_dir)
    return Path(out_dir)


def model_bytes(loaded) -> dict:
    """Bytes of the loaded model: dense parameters and buffers, and the experts as held (quantized or not)."""
    seen: set[int] = set()
    dense = experts = 0
    for module in loaded.model.modules():
        for t in list(module._parameters.values()) + list(module._buffers.values()):
            if t is None or t.is_meta or id(t) in seen:
                continue
            seen.add(id(t))
            dense += t.nbytes
        for t in getattr(module, "_moe_tensors", {}).values():
            if id(t) not in seen:
                seen.add(id(t))
                experts += t.nbytes
    if loaded.runtime is not None and loaded.experts == "source":  # the experts are parameters then
        experts = int(loaded.runtime.expert_bytes_total)
        dense -= experts
    return {"dense_bytes": int(dense), "expert_bytes": int(experts), "total_bytes": int(dense + experts)}


def _child(args) -> dict:
    import resource

    import psutil
    importlib.import_module("torch")  # before the baseline is taken
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..model.loader import load_model

    AutoModelForCausalLM._model_mapping[type(AutoConfig.from_pretrained(args.child))]  # the modeling module
    proc = psutil.Process()
    before = proc.memory_info().rss
    trace = []
    peak_seen = [before]
    stop = threading.Event()

    def sample():  # the peak counter is the truth; this only says when the peak happened
        while not stop.wait(0.02):
            peak_seen[0] = max(peak_seen[0], proc.memory_info().rss)

    def progress(fraction, message):
        if args.trace:
            trace.append((round(fraction, 3), message, proc.memory_info().rss, peak_seen[0]))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t = time.perf_counter()
    loaded = load_model(args.child, device="cpu", budget=0, profile=None, experts=args.experts, dense=args.dense,
                        save_copy=not args.no_copy, progress=progress)
    seconds = time.perf_counter() - t
    stop.set()
    sampler.join()
    peak = peak_rss()
    after = proc.memory_info().rss
    sizes = model_bytes(loaded)
    out = {"experts": loaded.experts, "dense": loaded.dense, "seconds": round(seconds, 2),
           "rss_before_bytes": before, "peak_rss_bytes": peak, "rss_after_bytes": after, **sizes,
           "peak_over_model": round((peak - before) / max(1, sizes["total_bytes"]), 3),
           "after_over_model": round((after - before) / max(1, sizes["total_bytes"]), 3),
           "experts_paged": bool(getattr(loaded, "experts_paged", False))}
    if args.trace:
        out["trace"] = [{"at": f, "stage": m, "rss_bytes": r, "peak_so_far_bytes": p} for f, m, r, p in trace]
    return out


def measure(model: str | Path, experts: str, dense: str = "source", data_dir: str | Path | None = None,
            trace: bool = False, no_copy: bool = False) -> dict:
    """One load in a fresh process (a first load when `data_dir` holds no copy of this model yet)."""
    env = dict(os.environ)
    if data_dir is not None:
        env["MOE_CHAT_DATA"] = str(data_dir)
    cmd = [sys.executable, "-m", "engine.tools.load_memory", "--child", str(model), "--experts", experts,
           "--dense", dense] + (["--trace"] if trace else []) + (["--no-copy"] if no_copy else [])
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the measuring load failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _mib(n: int) -> str:
    return f"{n / 2**20:8.1f} MiB"


def report(row: dict, label: str) -> str:
    lines = [f"{label}: experts {row['experts']}, dense {row['dense']}, {row['seconds']} s"
             + (" (experts paged from the saved copy)" if row.get("experts_paged") else ""),
             f"  model in memory {_mib(row['total_bytes'])} (experts {_mib(row['expert_bytes'])}, "
             f"dense {_mib(row['dense_bytes'])})",
             f"  RSS before {_mib(row['rss_before_bytes'])}  peak {_mib(row['peak_rss_bytes'])}  "
             f"after {_mib(row['rss_after_bytes'])}",
             f"  (peak - before) / model = {row['peak_over_model']:.2f}x   "
             f"(after - before) / model = {row['after_over_model']:.2f}x"]
    for t in row.get("trace", []):
        lines.append(f"    {t['at']:5.2f} {_mib(t['rss_bytes'])} (peak so far {_mib(t['peak_so_far_bytes'])})  "
                     f"{t['stage']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.tools.load_memory", description=__doc__.split("\n")[0])
    p.add_argument("--model", help="a model folder (default: build a synthetic Qwen3-MoE one)")
    p.add_argument("--experts", default="int8")
    p.add_argument("--dense", default="source")
    p.add_argument("--dtype", default="bfloat16", help="the synthetic model's dtype")
    p.add_argument("--layers", type=int, default=SYNTHETIC["num_hidden_layers"], help="the synthetic model's layers")
    p.add_argument("--again", action="store_true", help="also load a second time, from the saved copy")
    p.add_argument("--trace", action="store_true", help="resident memory at each progress message")
    p.add_argument("--no-copy", action="store_true", help="keep the quantized experts in RAM, save no copy")
    p.add_argument("--json", action="store_true")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            model = synthetic_model(Path(tmp) / "model", args.dtype, num_hidden_layers=args.layers)
        data = Path(tmp) / "data"
        rows = {"first": measure(model, args.experts, args.dense, data, args.trace, args.no_copy)}
        if args.again:
            rows["again"] = measure(model, args.experts, args.dense, data, args.trace, args.no_copy)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        for label, row in rows.items():
            print(report(row, f"{label} load"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

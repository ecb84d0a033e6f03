"""The seed paper's comparison in one command: all-CPU, offload, CPU-GPU without cache, hybrid.

With a CUDA GPU every row is measured. Without one, the CPU row is measured and the GPU rows are
modelled: the CPU numbers (dense time and time per expert per token) come from the measured run,
the GPU numbers from a named device profile, and the hit/miss counts per layer from real runs of the
engine's logical cache at that budget, so only the device's speed is assumed. Modelled rows say so.

Model of one decode token, per MoE layer (GPU rows):
    offload   copy each routed expert over the bus, then run it on the GPU
    cpu-gpu   run every routed expert on the CPU (measured time per expert), plus two activation hops
    hybrid    max(GPU time of the hits, CPU time of the misses) plus the hops; admissions are copied on
              a side stream and only cost time when they outgrow the token they overlap with
plus the dense weights read once at the GPU's memory bandwidth and a fixed launch cost per layer.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..moe.cost_model import DEVICE_PROFILES, DeviceProfile
from ..model.loader import load_model
from ..model.session import GenerationParams, Session

PROMPT_LEN = 24
LAUNCH_S_PER_LAYER = 60e-6  # kernel launches and syncs of one decoder layer on a GPU, decode step
HOP_S = 15e-6  # one small activation transfer across PCIe (latency-bound)
SWEEP = (0.0, 0.125, 0.25, 0.5, 1.0)


@dataclass
class Row:
    config: str
    policy: str
    budget_fraction: float
    peak_fast_device_bytes: int
    ms_per_token: float
    tokens_per_s: float
    hit_rate: float
    modelled: bool


@dataclass
class DecodeRun:
    seconds_per_token: float
    hits: np.ndarray  # per layer, per decode token
    misses: np.ndarray
    copied_bytes: float  # per decode token
    cpu_expert_s: float  # measured CPU time of one expert for one token
    peak_fast_device_bytes: int

    @property
    def hit_rate(self) -> float:
        total = self.hits.sum() + self.misses.sum()
        return float(self.hits.sum() / total) if total else 0.0


def _prompts(vocab: int, count: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (PROMPT_LEN,), generator=g).tolist() for _ in range(count)]


def decode_run(loaded, prompts: list[list[int]], new_tokens: int) -> DecodeRun:
    """Decode-phase time and per-layer hits/misses of `prompts`, the cache carried across prompts."""
    rt = loaded.runtime
    session = Session(loaded)
    session.eos_ids = set()
    seconds = tokens = 0.0
    hits = np.zeros(rt.num_layers)
    misses = np.zeros(rt.num_layers)
    copied = cpu_s = 0.0
    for i, prompt in enumerate(prompts):
        session.reset()
        # sampled with a fixed seed: greedy decoding of a random synthetic model falls into repeating one
        # token, whose fixed routing would make every cache look perfect
        params = GenerationParams(max_new_tokens=new_tokens, temperature=1.0, top_k=0, top_p=1.0,
                                  repetition_penalty=1.0, seed=i)
        it = session.generate(prompt, params)
        next(it)  # the prefill and the first token are not part of the decode phase
        before = rt.snapshot()["per_layer"]
        t = time.perf_counter()
        n = sum(1 for _ in it)
        seconds += time.perf_counter() - t
        tokens += n
        after = rt.snapshot()["per_layer"]
        for i, (a, b) in enumerate(zip(before, after)):
            hits[i] += b["hits"] - a["hits"]
            misses[i] += b["misses"] - a["misses"] + b["fetches"] - a["fetches"]
            copied += b["bytes_copied"] - a["bytes_copied"]
            cpu_s += b["cpu_time_s"] - a["cpu_time_s"]
    snap = rt.snapshot()
    return DecodeRun(seconds / tokens, hits / tokens, misses / tokens, copied / tokens,
                     cpu_s / max(1.0, misses.sum() + hits.sum()) if rt.simulated_cache else cpu_s / max(1.0, misses.sum()),
                     snap["peak_fast_device_bytes"])


def model_gpu_token(kind: str, run: DecodeRun, cpu: DecodeRun, dense_bytes: int, expert_bytes: int,
                    device: DeviceProfile) -> float:
    """Seconds per decode token of a GPU configuration (see the module docstring)."""
    layers = len(run.hits)
    dense = dense_bytes / device.mem_bytes_per_s + layers * LAUNCH_S_PER_LAYER
    gpu_expert = expert_bytes / device.mem_bytes_per_s
    copy = expert_bytes / device.h2d_bytes_per_s
    routed = run.hits + run.misses
    if kind == "offload":
        per_layer = routed * (copy + gpu_expert)
    elif kind == "cpu-gpu":
        per_layer = routed * cpu.cpu_expert_s + 2 * HOP_S
    else:
        per_layer = np.maximum(run.hits * gpu_expert, run.misses * cpu.cpu_expert_s) + 2 * HOP_S
    token = dense + float(per_layer.sum())
    if kind == "hybrid":
        token = max(token, run.copied_bytes / device.h2d_bytes_per_s)
    return token


def run_seed_suite(model: str | None, *, budget: float = 0.25, policies: tuple[str, ...] = ("lru", "predictive"),
                   device_profile: str = "rtx3060-12gb", new_tokens: int = 24, prompt_count: int = 3,
                   sweep: tuple[float, ...] = SWEEP, log=print) -> dict:
    from .bench import synthetic_model

    tmp = None
    if model is None:
        tmp = tempfile.TemporaryDirectory()
        log("building a synthetic model (8 layers, 32 experts, top-4, hidden 512)…")
        model = str(synthetic_model(tmp.name))
    cuda = torch.cuda.is_available()
    device = DEVICE_PROFILES[device_profile]

    log("all on the CPU…")
    cpu_loaded = load_model(model, device="cpu", budget=0, profile=None)
    info = cpu_loaded.info
    prompts = _prompts(cpu_loaded.model.config.get_text_config().vocab_size, prompt_count)
    cpu = decode_run(cpu_loaded, prompts, new_tokens)
    rows = [Row("cpu", "-", 0.0, 0, cpu.seconds_per_token * 1e3, 1 / cpu.seconds_per_token, 0.0, False)]

    def gpu_row(kind: str, policy: str, fraction: float, loaded) -> Row:
        run = decode_run(loaded, prompts, new_tokens)
        if cuda:
            seconds, peak = run.seconds_per_token, run.peak_fast_device_bytes
        else:
            seconds = model_gpu_token(kind, run, cpu, info.dense_bytes, info.expert_bytes, device)
            scratch = info.expert_bytes * info.top_k if kind == "offload" else 0
            peak = info.dense_bytes + int(fraction * info.expert_bytes_total) + scratch
        return Row(kind, policy, fraction, int(peak), seconds * 1e3, 1 / seconds, run.hit_rate, not cuda)

    gpu_loaded = load_model(model, device="cuda", budget=0, profile=None) if cuda else None

    def engine(fraction: float, policy: str = "lru"):
        """The GPU model, or without a GPU the CPU model's logical cache (the same decisions), reset cold."""
        loaded = gpu_loaded or cpu_loaded
        rt = loaded.runtime
        rt.set_policy(policy)
        rt.set_budget(0)
        rt.set_budget(min(fraction, rt.max_budget_bytes / rt.expert_bytes_total))
        rt.reset_stats()
        return loaded

    log("offload (no cache)…")
    offload = engine(0.0)
    offload.runtime.set_miss_path("offload")
    rows.append(gpu_row("offload", "-", 0.0, offload))
    offload.runtime.set_miss_path("cpu")
    log("CPU-GPU without cache…")
    rows.append(gpu_row("cpu-gpu", "-", 0.0, engine(0.0)))
    sweep_rows = []
    for policy in policies:
        for fraction in sorted(set(sweep) | {budget}):
            log(f"hybrid, {policy}, budget {fraction:g}…")
            row = gpu_row("hybrid", policy, fraction, engine(fraction, policy))
            sweep_rows.append(row)
            if fraction == budget:
                rows.append(row)
    if tmp is not None:
        tmp.cleanup()
    return {
        "model": info.name,
        "device": torch.cuda.get_device_name() if cuda else f"modelled: {device.name}",
        "budget_fraction": budget,
        "new_tokens": new_tokens,
        "prompts": prompt_count,
        "rows": [asdict(r) for r in rows],
        "sweep": [asdict(r) for r in sweep_rows],
    }


def format_table(result: dict) -> str:
    head = f"{'config':<9} {'policy':<8} {'budget':>6} {'peak fast MiB':>13} {'ms/token':>9} {'tok/s':>8} {'hit rate':>8}"
    lines = [f"{result['model']} on {result['device']}", head, "-" * len(head)]
    for r in result["rows"]:
        mark = " (modelled)" if r["modelled"] else ""
        lines.append(f"{r['config']:<9} {r['policy']:<8} {r['budget_fraction']:>6.3g} "
                     f"{r['peak_fast_device_bytes'] / 2**20:>13.1f} {r['ms_per_token']:>9.2f} "
                     f"{r['tokens_per_s']:>8.1f} {r['hit_rate']:>8.1%}{mark}")
    return "\n".join(lines)


def save_chart(result: dict, path: str) -> bool:
    """tokens/s and hit rate against the budget; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for policy in sorted({r["policy"] for r in result["sweep"]}):
        pts = [r for r in result["sweep"] if r["policy"] == policy]
        x = [r["budget_fraction"] for r in pts]
        ax1.plot(x, [r["tokens_per_s"] for r in pts], marker="o", label=f"hybrid, {policy}")
        ax2.plot(x, [r["hit_rate"] for r in pts], marker="o", label=policy)
    for r in result["rows"]:
        if r["config"] != "hybrid":
            ax1.axhline(r["tokens_per_s"], linestyle="--", linewidth=1, color="grey")
            ax1.annotate(r["config"], (0, r["tokens_per_s"]), fontsize=8, va="bottom")
    modelled = " (GPU rows modelled)" if any(r["modelled"] for r in result["rows"]) else ""
    ax1.set(xlabel="cache budget (fraction of expert bytes)", ylabel="decode tokens/s",
            title=f"{result['model']}: {result['device']}{modelled}")
    ax2.set(xlabel="cache budget (fraction of expert bytes)", ylabel="hit rate", ylim=(0, 1), title="cache hit rate")
    ax1.legend()
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True

"""Replay a routing trace under a cache policy and budget, and compare it with the offline optimum.

The replay drives exactly the live engine's code: an `ExpertCache` with a policy from `policies.py`,
and per row (one step) and MoE layer the runtime's sequence lookup -> policy.record -> policy.hint (the
next layer's router hint, where the trace recorded one and the policy takes hints) -> cache.after_access
(admit the misses, limit=top_k, if the policy admits on demand; then prefetch the next layer of the
same row, or after the last layer, layer 0 of the next row). So the hit rate it
reports is the one the engine would get, assuming every copy lands before the access it is for (on CUDA
a copy still in flight is a miss: a demand admission has a whole step to land, a prefetch one layer).
Prefetches are copies like any other: they count in `admissions` and `bytes_fetched`.

The optimum is Belady's rule with bypass: a miss may run on the CPU without being admitted, so after each
access the best cache keeps, out of what it held plus what was just requested, the experts whose next
use comes soonest. That greedy choice is optimal for hit count (the classic exchange argument; the
tests check it against brute force), per layer for `per_layer` and over all layers for `pooled`.
It is the optimum of demand caching only: a prefetching policy (`predictive`) copies experts in before
they are requested, which no demand cache can do, so it is not bounded by this number and may beat it
(a gap "closed" above 1). Its price is in the copies column: compare bytes fetched, not hit rate alone
(its `copy_cap` keeps them at or below LRU's: a shadow LRU in the cache sets the allowance).
With --skip-prefill the prefill rows are still replayed (they warm the cache, as in the engine) but not
counted, and a next use in an uncounted row counts as never.

The throughput model (with a device profile) treats every counted row as one decode step of a batch of
one: per layer, hits read their weights once from device memory and misses read theirs once from CPU
memory, both sides in parallel; admissions copy whole experts over PCIe:
    compute = dense_bytes / device bandwidth
              + sum over layers of max(hits * B / device bandwidth, misses * B / CPU bandwidth)
    copies  = admissions * B / PCIe bandwidth
    step    = compute + copies          (default: copies in series, the pessimistic bound)
            = max(compute, copies)      (--overlap-copies: the side stream fully hidden)
where B is one expert's bytes. The truth lies between: the engine copies on a side stream, but the copies
share host memory bandwidth with the CPU experts. The CPU bandwidth is a flag (or measured here).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..cache.expert_cache import ExpertCache
from ..cache.policies import make_policy
from ..moe.cost_model import DEVICE_PROFILES
from .trace import Trace

DEFAULT_EXPERT_BYTES = 4 * 2**20  # when neither the trace nor --expert-bytes says
DEFAULT_CPU_BYTES_PER_S = 20e9  # effective read bandwidth of a desktop CPU's expert matmuls (dual-channel DDR)


@dataclass
class Replay:
    hits: np.ndarray  # [rows, layers] (token, expert) pairs served from the cache
    accesses: np.ndarray  # [rows, layers] pairs routed
    admissions: np.ndarray  # [rows, layers] experts copied in
    evictions: np.ndarray  # [rows, layers]
    counted: np.ndarray  # [rows] bool: rows that count towards the totals


def counted_rows(trace: Trace, skip_prefill: bool) -> np.ndarray:
    return ~trace.prefill_mask() if skip_prefill else np.ones(len(trace), dtype=bool)


def _row_experts(row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct experts of one (row, layer) and how many of the row's pairs each serves."""
    ids = row[row >= 0]
    if ids.size <= 1:
        return ids.astype(np.int64), np.ones(ids.size, dtype=np.int64)
    experts, counts = np.unique(ids, return_counts=True)
    return experts.astype(np.int64), counts


def _routed(trace: Trace) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """`_row_experts` of every (row, layer), computed once per trace array (replays reuse it)."""
    cached = getattr(trace, "_routed", None)
    if cached is not None and cached[0] is trace.experts:
        return cached[1]
    routed = [[_row_experts(r) for r in row] for row in trace.experts]
    trace._routed = (trace.experts, routed)
    return routed


def replay(trace: Trace, policy: str, capacity: int, scope: str = "per_layer", *,
           skip_prefill: bool = False, profile: np.ndarray | None = None) -> Replay:
    """Run the trace through the live engine's cache and policy; every row is one step.

    Prefill rows are always replayed (they warm the cache, as in the engine); `skip_prefill` only
    leaves them out of the counts. A `profile` is used as the engine uses one: preloaded, and the
    static policy's scores.
    """
    rows, layers, top_k = trace.experts.shape
    routed = _routed(trace)
    pol = make_policy(policy, layers, trace.num_experts, profile)
    cache = ExpertCache(layers, trace.num_experts, pol, capacity, scope)
    if profile is not None:
        cache.preload(np.asarray(profile, dtype=np.float64))
    shape = (rows, layers)
    out = Replay(np.zeros(shape, np.int64), np.zeros(shape, np.int64), np.zeros(shape, np.int64),
                 np.zeros(shape, np.int64), counted_rows(trace, skip_prefill))
    hints = trace.hints if pol.wants_hints else None
    for t in range(rows):
        step = t + 1  # the engine counts forwards from 1
        for layer in range(layers):
            experts, counts = routed[t][layer]
            hit = cache.lookup(layer, experts) >= 0
            if experts.size:
                pol.record(layer, experts, counts, step)
                out.accesses[t, layer] = counts.sum()
                out.hits[t, layer] = counts[hit].sum()
            if hints is not None and layer + 1 < layers and (hints[t, layer + 1] >= 0).any():
                pol.hint(layer + 1, hints[t, layer + 1][hints[t, layer + 1] >= 0])
            done = cache.after_access(layer, experts, ~hit, step, limit=top_k)
            out.admissions[t, layer] = len(done)
            out.evictions[t, layer] = sum(a.evicted is not None for a in done)
    return out


def next_use(trace: Trace, counted: np.ndarray) -> np.ndarray:
    """[rows, layers, top_k]: the next row that routes to the same (layer, expert), inf if none.

    A next use in an uncounted row is reported as inf too: keeping an expert for it gains nothing,
    since the expert can be admitted again at that very access.
    """
    e = trace.experts
    rows, layers, _ = e.shape
    t = np.broadcast_to(np.arange(rows)[:, None, None], e.shape).ravel()
    key = (np.arange(layers)[None, :, None] * trace.num_experts + e).ravel()
    idx = np.flatnonzero(e.ravel() >= 0)
    idx = idx[np.lexsort((t[idx], key[idx]))]  # by (layer, expert), then row
    k, r = key[idx], t[idx]
    # runs of equal (key, row): a repeated id inside one row shares its run's next use
    new_run = np.r_[True, (k[1:] != k[:-1]) | (r[1:] != r[:-1])]
    run = np.cumsum(new_run) - 1
    run_key, run_row = k[new_run], r[new_run]
    run_next = np.full(len(run_key), np.inf)
    same = run_key[1:] == run_key[:-1]
    run_next[:-1][same] = run_row[1:][same]
    finite = np.isfinite(run_next)
    run_next[finite] = np.where(counted[run_next[finite].astype(np.int64)], run_next[finite], np.inf)
    out = np.full(e.size, np.inf)
    out[idx] = run_next[run]
    return out.reshape(e.shape)


def optimal_hits(trace: Trace, capacity: int, scope: str = "per_layer", *,
                 skip_prefill: bool = False) -> np.ndarray:
    """Hits per layer of the offline optimum (Belady with bypass) at the same budget and scope."""
    rows, layers, _ = trace.experts.shape
    E = trace.num_experts
    counted = counted_rows(trace, skip_prefill)
    nxt = next_use(trace, counted)
    sizing = ExpertCache(layers, E, make_policy("lru", layers, E), capacity, scope)  # the cache's own rule
    caps = [sizing.layer_capacity(layer) for layer in range(layers)]
    pooled = scope == "pooled"
    key = np.full((layers, E), np.inf)  # next use of each cached expert; inf: not cached
    hits = np.zeros(layers, dtype=np.int64)
    for t in range(rows):
        for layer in range(layers):
            ids = trace.experts[t, layer]
            ok = ids >= 0
            if not ok.any():
                continue
            ids, nx = ids[ok], nxt[t, layer][ok]
            if counted[t]:
                hits[layer] += int(np.isfinite(key[layer, ids]).sum())
            key[layer, ids] = nx  # every requested expert is a candidate to keep, cached or not
            scope_keys = key if pooled else key[layer]
            cap = int(caps[layer])
            finite = np.isfinite(scope_keys)
            if int(finite.sum()) > cap:
                flat = scope_keys.reshape(-1)
                drop = np.argpartition(flat, cap)[cap:]  # the latest next uses leave (or are bypassed)
                flat[drop] = np.inf
    return hits


def model_throughput(rep: Replay, device_profile: str, expert_bytes: int,
                     cpu_bytes_per_s: float = DEFAULT_CPU_BYTES_PER_S, dense_bytes: int = 0,
                     overlap_copies: bool = False) -> float:
    """Modelled decode tokens/s over the counted rows (see the module docstring)."""
    try:
        dev = DEVICE_PROFILES[device_profile]
    except KeyError:
        raise ValueError(f"unknown device profile {device_profile!r}; choose one of: {', '.join(DEVICE_PROFILES)}") from None
    c = rep.counted
    hits, misses, copies = rep.hits[c], (rep.accesses - rep.hits)[c], rep.admissions[c]
    compute = np.maximum(hits * expert_bytes / dev.mem_bytes_per_s, misses * expert_bytes / cpu_bytes_per_s)
    compute = compute.sum(axis=1) + dense_bytes / dev.mem_bytes_per_s  # per step
    pcie = (copies * expert_bytes / dev.h2d_bytes_per_s).sum(axis=1)
    total = (np.maximum(compute, pcie) if overlap_copies else compute + pcie).sum()
    return float(c.sum() / total) if total > 0 else 0.0


def calibrate_cpu_bytes_per_s(expert_bytes: int) -> float:
    """This machine's one-token read bandwidth on a bf16 matrix the size of a third of one expert."""
    import torch

    from ..moe.cost_model import calibrate_cpu

    cols = 1024
    rows = max(1, expert_bytes // 2 // 3 // cols)
    return calibrate_cpu(torch.randn(rows, cols, dtype=torch.bfloat16))[0]


def simulate(trace: Trace, policy: str, *, slots_per_layer: int | None = None, total_slots: int | None = None,
             skip_prefill: bool = False, profile: np.ndarray | None = None, device_profile: str | None = None,
             expert_bytes: int | None = None, cpu_bytes_per_s: float = DEFAULT_CPU_BYTES_PER_S,
             dense_bytes: int = 0, overlap_copies: bool = False) -> dict:
    """One policy at one budget: the JSON object of `python -m engine simulate`."""
    if (slots_per_layer is None) == (total_slots is None):
        raise ValueError("give exactly one of slots_per_layer (per-layer scope) or total_slots (pooled scope)")
    layers, E = trace.num_layers, trace.num_experts
    if slots_per_layer is not None:
        scope, capacity = "per_layer", max(0, min(slots_per_layer, E)) * layers
    else:
        scope, capacity = "pooled", max(0, min(total_slots, layers * E))
    rep = replay(trace, policy, capacity, scope, skip_prefill=skip_prefill, profile=profile)
    opt = optimal_hits(trace, capacity, scope, skip_prefill=skip_prefill)
    c = rep.counted
    hits, accesses = int(rep.hits[c].sum()), int(rep.accesses[c].sum())
    eb = int(expert_bytes or trace.expert_bytes or DEFAULT_EXPERT_BYTES)
    rate = lambda h, a: h / a if a else 0.0
    result = {
        "policy": policy,
        "scope": scope,
        "capacity": capacity,
        "slots_per_layer": slots_per_layer,
        "total_slots": capacity,
        "model": trace.model,
        "rows": len(trace),
        "counted_rows": int(c.sum()),
        "moe_layers": layers,
        "num_experts": E,
        "top_k": trace.top_k,
        "skip_prefill": skip_prefill,
        "hit_rate": rate(hits, accesses),
        "hits": hits,
        "misses": accesses - hits,
        "accesses": accesses,
        "admissions": int(rep.admissions[c].sum()),
        "evictions": int(rep.evictions[c].sum()),
        "expert_bytes": eb,
        "bytes_fetched": int(rep.admissions[c].sum()) * eb,
        "optimal_hit_rate": rate(int(opt.sum()), accesses),
        "optimal_hits": int(opt.sum()),
        "per_layer": [
            {"layer": i, "hits": int(rep.hits[c, i].sum()), "accesses": int(rep.accesses[c, i].sum()),
             "optimal_hits": int(opt[i])}
            for i in range(layers)
        ],
    }
    if device_profile:
        result["device_profile"] = device_profile
        result["cpu_bytes_per_s"] = cpu_bytes_per_s
        result["dense_bytes"] = dense_bytes
        result["copies"] = "overlapped" if overlap_copies else "serial"
        result["modelled_tokens_per_s"] = model_throughput(rep, device_profile, eb, cpu_bytes_per_s, dense_bytes,
                                                           overlap_copies)
    return result


def compare(traces: dict[str, Trace], policies: list[str], fractions=(0.25, 0.5),
            scopes=("per_layer", "pooled"), skip_prefill: bool = False) -> list[dict]:
    """Hit rates of every policy, LRU and the optimum, per trace, budget and scope.

    The static policy gets a leave-one-out profile: the summed usage of the other traces of the same
    shape (the same model), never of the trace being replayed; with no such trace it has no profile.
    """
    rows = []
    for name, tr in traces.items():
        others = [o.usage() for n, o in traces.items()
                  if n != name and (o.num_layers, o.num_experts) == (tr.num_layers, tr.num_experts)]
        profile = np.sum(others, axis=0).astype(np.float64) if others else None
        for scope in scopes:
            for f in fractions:
                per_layer = max(1, round(f * tr.num_experts))
                capacity = per_layer * tr.num_layers
                opt = optimal_hits(tr, capacity, scope, skip_prefill=skip_prefill).sum()
                row = {"trace": name, "scope": scope, "fraction": f, "slots_per_layer": per_layer}
                for p in policies:
                    rep = replay(tr, p, capacity, scope, skip_prefill=skip_prefill,
                                 profile=profile if p == "static" else None)
                    c = rep.counted
                    row[p] = rep.hits[c].sum() / max(1, rep.accesses[c].sum())
                    row[f"{p} copies"] = rep.admissions[c].sum() / max(1, c.sum() * tr.num_layers)
                    row["accesses"] = int(rep.accesses[c].sum())
                row["optimum"] = opt / max(1, row["accesses"])
                rows.append(row)
    return rows


def _print_table(rows: list[dict], policies: list[str], best_of: list[str]) -> None:
    """Hit rates; `closed`: share of the LRU-to-optimum gap the best policy closes (`pred.`: predictive);
    `copies`: experts copied per layer and step, best policy / LRU."""
    head = f"{'trace':<34}{'scope':<10}{'budget':>7}" + "".join(f"{p:>11}" for p in policies)
    print(head + f"{'best':>11}{'optimum':>9}{'closed':>8}{'pred.':>7}{'copies best/lru':>17}")
    for r in rows:
        best = max(best_of, key=lambda p: r[p])
        gap = r["optimum"] - r["lru"]
        closed = (r[best] - r["lru"]) / gap if gap > 0 else 1.0
        pred = (r["predictive"] - r["lru"]) / gap if gap > 0 and "predictive" in r else float("nan")
        copies = f"{r[best + ' copies']:.2f}/{r['lru copies']:.2f}" if "lru" in r else ""
        print(f"{r['trace'][:33]:<34}{r['scope']:<10}{r['slots_per_layer']:>4}/L " +
              "".join(f"{r[p]:>11.3f}" for p in policies) +
              f"{best:>11}{r['optimum']:>9.3f}{closed:>8.2f}{pred:>7.2f}{copies:>17}")


if __name__ == "__main__":  # python -m engine.tools.simulator TRACE.npz ... [--skip-prefill] [--synthetic fine,mixtral,qwen]
    import sys
    from pathlib import Path

    from ..cache.policies import AUTO, POLICIES
    from .synthetic_trace import synthetic_traces
    from .trace import load_trace

    argv, args, synthetic = sys.argv[1:], [], ""
    policies = [p for p in POLICIES if p != AUTO]  # auto replays as predictive: the simulator models a real cache
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--synthetic") or a.startswith("--policies"):
            value = a.split("=", 1)[1] if "=" in a else argv[i + 1]
            i += 0 if "=" in a else 1
            if a.startswith("--synthetic"):
                synthetic = value
            else:
                policies = [p for p in value.split(",") if p]
        elif not a.startswith("--"):
            args.append(a)
        i += 1
    traces = {Path(a).stem: load_trace(a) for a in args}
    if synthetic:
        traces.update(synthetic_traces(synthetic))
    names = ["lru"] + [p for p in policies if p != "lru"]
    table = compare(traces, names, skip_prefill="--skip-prefill" in argv)
    _print_table(table, names, [p for p in names if p != "lru"])

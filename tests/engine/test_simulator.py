"""The trace simulator: hand-checked replays, the offline optimum against brute force, the CLI's JSON."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from engine.tools.cli import main
from engine.moe.cost_model import DEVICE_PROFILES
from engine.cache.policies import POLICIES, POLICY_CLASSES
from engine.tools.simulator import (
    Replay,
    _print_table,
    compare,
    model_throughput,
    next_use,
    optimal_hits,
    replay,
    simulate,
)
from engine.tools.synthetic_trace import synthetic_trace
from engine.tools.trace import Trace, save_trace


def trace_of(rows: list[list[list[int]]], num_experts: int, prefill: int = 0) -> Trace:
    """rows[t][layer] = experts of that token in that layer."""
    return Trace(np.array(rows, dtype=np.int32), num_experts, prefill_tokens=prefill)


ABC = trace_of([[[e]] for e in [0, 1, 2] * 3], 4)  # one layer, top-1: A B C A B C A B C


def test_cyclic_trace_by_hand():
    # LRU with two slots never holds the next of three experts in a cycle; the optimum keeps A and B and
    # lets C run on the CPU: hits at rows 3, 4, 6, 7.
    assert replay(ABC, "lru", 2).hits.sum() == 0
    assert optimal_hits(ABC, 2).tolist() == [4]
    assert optimal_hits(ABC, 3).tolist() == [6]  # everything fits after the first cycle
    assert optimal_hits(ABC, 0).tolist() == [0]


def test_alternating_pairs_by_hand():
    # top-2 from 4 experts, two slots: {0,1} {2,3} {0,1} ... LRU swaps both every step (0 hits);
    # LFU refuses the equally frequent newcomers and keeps {0,1} (hits at rows 2 and 4); so does the optimum.
    t = trace_of([[[0, 1]], [[2, 3]]] * 3, 4)
    assert replay(t, "lru", 2).hits.sum() == 0
    assert replay(t, "lfu", 2).hits.sum() == 4
    assert optimal_hits(t, 2).sum() == 4


def test_skip_prefill_counts_decode_rows_only():
    t = Trace(ABC.experts, 4, prefill_tokens=2)
    rep = replay(t, "lru", 2, skip_prefill=True)
    assert rep.accesses[rep.counted].sum() == 7 and rep.counted.tolist() == [False] * 2 + [True] * 7
    assert optimal_hits(t, 2, skip_prefill=True).tolist() == [4]
    # a next use that is not counted is worth nothing: the expert can be admitted again right then
    two = Trace(np.array([[[0]], [[0]]]), 2, prefill_tokens=0)
    assert np.isinf(next_use(two, np.array([True, False]))[0, 0, 0])
    assert next_use(two, np.array([True, True]))[0, 0, 0] == 1


def test_missing_records_are_not_accesses():
    t = trace_of([[[0, -1], [-1, -1]], [[0, 1], [2, -1]]], 3)
    rep = replay(t, "lru", 4)
    assert rep.accesses.sum() == 4 and rep.hits.sum() == 1
    assert optimal_hits(t, 4).sum() == 1


def brute_force_optimum(t: Trace, capacity: int, pooled: bool) -> int:
    """Best hit count over every admission/eviction schedule (tiny traces only)."""
    def fits(state):
        if pooled:
            return len(state) <= capacity
        return all(sum(1 for (l, _) in state if l == layer) <= capacity for layer in range(t.num_layers))

    best = {frozenset(): 0}
    for row in t.experts:
        for layer, ids in enumerate(row):
            req = {(layer, int(e)) for e in ids if e >= 0}
            nxt: dict[frozenset, int] = {}
            for state, hits in best.items():
                gained = hits + sum(1 for e in ids if e >= 0 and (layer, int(e)) in state)
                pool = sorted(state | req)
                for n in range(len(pool) + 1):
                    for keep in itertools.combinations(pool, n):
                        k = frozenset(keep)
                        if fits(k) and nxt.get(k, -1) < gained:
                            nxt[k] = gained
            best = nxt
    return max(best.values())


@pytest.mark.parametrize("seed", range(4))
def test_optimum_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    one_layer = Trace(rng.integers(0, 4, size=(9, 1, 1)).astype(np.int32), 4)
    assert optimal_hits(one_layer, 2).sum() == brute_force_optimum(one_layer, 2, pooled=False)
    two = np.stack([rng.choice(3, size=2, replace=False) for _ in range(14)]).reshape(7, 2, 2)
    two_layers = Trace(two.astype(np.int32), 3)
    assert optimal_hits(two_layers, 2, "per_layer").sum() == brute_force_optimum(two_layers, 1, pooled=False)
    assert optimal_hits(two_layers, 3, "pooled").sum() == brute_force_optimum(two_layers, 3, pooled=True)


def random_trace(seed: int, rows=60, layers=3, experts=8, top_k=2) -> Trace:
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(experts, 0.5), size=layers)
    e = np.stack([[rng.choice(experts, top_k, replace=False, p=p[l]) for l in range(layers)] for _ in range(rows)])
    e[rng.random(e.shape) < 0.05] = -1
    return Trace(e.astype(np.int32), experts, prefill_tokens=10)


@pytest.mark.parametrize("seed", range(3))
def test_optimum_beats_every_demand_policy(seed):
    # a prefetching policy copies experts in before they are requested: not bounded by this optimum
    t = random_trace(seed)
    demand = [name for name, cls in POLICY_CLASSES.items() if cls.prefetch_limit == 0]
    assert {"lru", "lfu", "decay", "static"} <= set(demand)
    for scope, capacity, skip in itertools.product(["per_layer", "pooled"], [3, 6, 12], [False, True]):
        opt = optimal_hits(t, capacity, scope, skip_prefill=skip).sum()
        for name in demand:
            rep = replay(t, name, capacity, scope, skip_prefill=skip, profile=t.usage(slice(0, 10)))
            assert rep.hits[rep.counted].sum() <= opt, (name, scope, capacity, skip)


def test_throughput_model_by_hand():
    dev = DEVICE_PROFILES["rtx4090-24gb"]
    one = np.array([[1]])
    rep = Replay(hits=one, accesses=2 * one, admissions=one, evictions=0 * one, counted=np.array([True]))
    b = 1e6
    step = max(b / dev.mem_bytes_per_s, b / 10e9) + b / dev.h2d_bytes_per_s
    assert model_throughput(rep, "rtx4090-24gb", int(b), 10e9) == pytest.approx(1 / step)
    hidden = max(b / dev.mem_bytes_per_s, b / 10e9, b / dev.h2d_bytes_per_s)
    assert model_throughput(rep, "rtx4090-24gb", int(b), 10e9, overlap_copies=True) == pytest.approx(1 / hidden)
    with pytest.raises(ValueError, match="choose one of"):
        model_throughput(rep, "nope", int(b))


def test_simulate_result_and_budgets():
    t = random_trace(0)
    r = simulate(t, "predictive", total_slots=5, device_profile="a100-40gb", expert_bytes=2**20)
    assert r["scope"] == "pooled" and r["capacity"] == 5
    assert 0 <= r["hit_rate"] <= r["optimal_hit_rate"] <= 1
    assert r["bytes_fetched"] == r["admissions"] * 2**20 and r["modelled_tokens_per_s"] > 0
    per = simulate(t, "lru", slots_per_layer=100)  # clipped to all experts: only first uses miss
    assert per["capacity"] == 3 * 8 and per["hit_rate"] == per["optimal_hit_rate"]
    with pytest.raises(ValueError):
        simulate(t, "lru")


def test_simulate_cli_json(tmp_path, capsys):
    path = save_trace(tmp_path / "t.npz", random_trace(1))
    assert main(["simulate", "--trace", str(path), "--policy", "lfu", "--slots-per-layer", "2",
                 "--device-profile", "rtx3060-12gb", "--expert-bytes", "1MiB", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    for key in ("policy", "hit_rate", "hits", "accesses", "bytes_fetched", "optimal_hit_rate",
                "modelled_tokens_per_s", "per_layer"):
        assert key in r
    assert r["policy"] == "lfu" and r["scope"] == "per_layer" and r["expert_bytes"] == 2**20
    assert r["hits"] <= r["accesses"] and len(r["per_layer"]) == 3
    # the static policy's profile from another trace (never the replayed one)
    other = save_trace(tmp_path / "other.npz", random_trace(2))
    assert main(["simulate", "--trace", str(path), "--policy", "static", "--total-slots", "6",
                 "--profile", str(other), "--skip-prefill", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["scope"] == "pooled" and r["skip_prefill"] and "modelled_tokens_per_s" not in r


def test_router_hints_sharpen_the_predictive_forecast():
    # the trace's hints are the routing itself (a perfect router hint): predictive prefetches what each
    # next layer uses; hints of -1 (none recorded) change nothing
    t = synthetic_trace("qwen", rows=160, seed=2, prompts=1, prefill=8)
    capacity = round(0.25 * t.num_experts) * t.num_layers
    plain = replay(t, "predictive", capacity).hits.sum()
    t.hints = np.full_like(t.experts, -1)
    assert replay(t, "predictive", capacity).hits.sum() == plain
    t.hints = t.experts.copy()
    t.hints[:, 0] = -1  # the first layer has no layer before it
    assert replay(t, "predictive", capacity).hits.sum() > 1.1 * plain
    assert replay(t, "lru", capacity).hits.sum() < plain  # LRU takes no hints


def test_policy_list(capsys):
    assert main(["simulate", "--policy", "list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(POLICIES)
    assert {"lru", "lfu", "decay", "static", "predictive"} <= set(POLICIES)


def test_compare_table_reports_copies(capsys):
    t = random_trace(3, rows=40)
    rows = compare({"t": t}, ["lru", "predictive"], fractions=(0.25,), scopes=("pooled",))
    r = rows[0]
    rep = replay(t, "lru", 2 * 3, "pooled")
    assert r["lru copies"] == pytest.approx(rep.admissions.sum() / (40 * 3))
    assert 0 <= r["predictive copies"] <= 8
    _print_table(rows, ["lru", "predictive"], ["predictive"])
    out = capsys.readouterr().out
    assert "copies best/lru" in out and f"{r['lru copies']:.2f}" in out

"""Layer-aware split of a pooled budget, admission against LRU's copies, and the synthetic trace generator."""

from __future__ import annotations

import numpy as np

from engine.cache.budget import LayerBudget
from engine.cache.expert_cache import ExpertCache
from engine.cache.policies import make_policy
from engine.tools.simulator import replay
from engine.tools.synthetic_trace import SHAPES, synthetic_trace
from engine.tools.trace import Trace


def two_layer_trace(rows: int = 60) -> Trace:
    # layer 0: every token uses expert 0 only; layer 1: tokens cycle over 6 experts (spread demand)
    e = np.full((rows, 2, 1), -1, dtype=np.int32)
    e[:, 0, 0] = 0
    e[:, 1, 0] = np.arange(rows) % 6
    return Trace(e, 8)


def test_split_moves_slots_to_the_spread_layer():
    t = two_layer_trace()
    b = LayerBudget(2, 8)
    for step, row in enumerate(t.experts, start=1):
        for layer in range(2):
            b.observe(layer, row[layer][row[layer] >= 0].astype(np.int64), step)
        quota = b.update(8)
    assert quota.sum() == 8
    assert quota[0] <= 2 and quota[1] >= 6  # the concentrated layer keeps what it needs, the rest moves


def test_split_without_evidence_is_equal():
    assert LayerBudget(4, 8).split(8).tolist() == [2, 2, 2, 2]


def test_layer_aware_pooled_cache_beats_an_equal_split_by_hand():
    t = two_layer_trace()
    equal = replay(t, "lru", 6, "per_layer")  # 3 slots each: layer 1's cycle of 6 never hits
    split = replay(t, "lru+split", 7, "pooled")
    assert equal.hits[:, 1].sum() == 0
    assert split.hits[:, 1].sum() > 0 and split.hits[:, 0].sum() >= len(t) - 1
    cache = ExpertCache(2, 8, make_policy("lru+split", 2, 8), 7, "pooled")
    assert cache.layer_aware and not ExpertCache(2, 8, make_policy("lru", 2, 8), 7, "pooled").layer_aware


def test_selective_admission_never_copies_more_than_lru():
    t = synthetic_trace("qwen", rows=120, seed=3)
    cap = t.num_layers * t.num_experts // 4
    for scope in ("per_layer", "pooled"):
        lru = replay(t, "lru", cap, scope).admissions.sum()
        for p in ("decay", "predictive", "predictive+split"):
            assert replay(t, p, cap, scope).admissions.sum() <= lru


def test_synthetic_traces_are_deterministic_and_shaped():
    for name, shape in SHAPES.items():
        a = synthetic_trace(name, rows=40, seed=1)
        assert a.experts.shape == (40, shape.num_layers, shape.top_k) and a.num_experts == shape.num_experts
        assert (a.experts >= 0).all() and (a.experts < shape.num_experts).all()
        assert all(len(set(r)) == shape.top_k for r in a.experts.reshape(-1, shape.top_k).tolist())
        assert np.array_equal(a.experts, synthetic_trace(name, rows=40, seed=1).experts)
        assert not np.array_equal(a.experts, synthetic_trace(name, rows=40, seed=2).experts)

"""Policies and the cache's admission / eviction / resize decisions, checked by hand on small cases."""

from __future__ import annotations

import numpy as np
import pytest

from engine.cache.expert_cache import ExpertCache
from engine.cache.policies import POLICIES, make_policy
from tiny_models import resident


def access(cache: ExpertCache, layer: int, experts: list[int], step: int, limit: int = 8) -> list[bool]:
    """One step of one layer as the runtime does it: look up, record, admit the misses, prefetch."""
    e = np.array(experts)
    hits = cache.lookup(layer, e) >= 0
    cache.policy.record(layer, e, np.ones(len(e)), step)
    cache.after_access(layer, e, ~hits, step, limit)
    return hits.tolist()


def test_lru_evicts_least_recent():
    cache = ExpertCache(1, 8, make_policy("lru", 1, 8), capacity=2)
    assert access(cache, 0, [1], 1) == [False]
    assert access(cache, 0, [2], 2) == [False]
    assert access(cache, 0, [1], 3) == [True]
    assert access(cache, 0, [3], 4) == [False]  # evicts 2, the least recently used
    assert sorted(resident(cache)) == [(0, 1), (0, 3)]
    assert access(cache, 0, [2], 5) == [False]  # evicts 1
    assert sorted(resident(cache)) == [(0, 2), (0, 3)]


def test_lfu_keeps_frequent_and_refuses_a_weaker_newcomer():
    cache = ExpertCache(1, 8, make_policy("lfu", 1, 8), capacity=1)
    for step in range(1, 4):
        access(cache, 0, [5], step)
    assert access(cache, 0, [6], 4) == [False]
    assert resident(cache) == [(0, 5)]  # 6 used once < 5 used three times: not admitted


def test_decay_forgets_old_popularity():
    policy = make_policy("decay", 1, 4)
    cache = ExpertCache(1, 4, policy, capacity=1)
    for step in range(1, 6):
        access(cache, 0, [0], step)
    for step in range(200, 206):
        access(cache, 0, [1], step)
    assert resident(cache) == [(0, 1)]


def test_static_keeps_profile_set():
    profile = np.array([[0, 9, 0, 7]], dtype=float)
    cache = ExpertCache(1, 4, make_policy("static", 1, 4, profile), capacity=2)
    cache.preload(profile)
    assert sorted(resident(cache)) == [(0, 1), (0, 3)]
    for step in range(1, 10):
        access(cache, 0, [0, 2], step)
    assert sorted(resident(cache)) == [(0, 1), (0, 3)]


def test_per_layer_scope_splits_slots_and_pooled_shares_them():
    per_layer = ExpertCache(2, 4, make_policy("lru", 2, 4), capacity=2, scope="per_layer")
    access(per_layer, 0, [0, 1], 1)
    assert per_layer.cached_count() == 1  # one slot per layer
    pooled = ExpertCache(2, 4, make_policy("lru", 2, 4), capacity=2, scope="pooled")
    access(pooled, 0, [0, 1], 1)
    assert pooled.cached_count() == 2
    access(pooled, 1, [3], 2)
    assert (1, 3) in resident(pooled) and pooled.cached_count() == 2


def test_admission_limit_and_reservation():
    cache = ExpertCache(1, 8, make_policy("lru", 1, 8), capacity=4)
    e = np.array([0, 1, 2])
    cache.policy.record(0, e, np.ones(3), 1)
    done = cache.admit(0, e, 1, limit=2, reserve=True)
    assert len(done) == 2 and cache.cached_count() == 0  # in flight: still misses
    for a in done:
        cache.commit(a.layer, a.expert, a.slot)
    assert cache.cached_count() == 2


def test_resize_keeps_the_best_and_renumbers_slots():
    policy = make_policy("lfu", 1, 8)
    cache = ExpertCache(1, 8, policy, capacity=4)
    for step, e in enumerate([0, 1, 1, 2, 2, 2, 3, 3, 3, 3], start=1):
        access(cache, 0, [e], step)
    assert cache.cached_count() == 4
    moves = cache.resize(2, step=11)
    assert sorted(resident(cache)) == [(0, 2), (0, 3)]
    assert sorted(new for _, new in moves) == [0, 1]
    cache.resize(6, step=12)
    assert sorted(resident(cache)) == [(0, 2), (0, 3)] and cache.capacity == 6


def test_capacity_never_exceeds_all_experts():
    cache = ExpertCache(2, 4, make_policy("lru", 2, 4), capacity=100)
    assert cache.capacity == 8


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="choose one of"):
        make_policy("nope", 1, 1)
    assert {"lru", "lfu", "decay", "static"} <= set(POLICIES)


def test_predictive_learns_a_cycle_that_defeats_lru():
    # A B C A B C ... with two slots: LRU always evicts the expert needed next (no hits at all). The
    # predictive policy sees that what follows a token routed like this one is the one used two steps
    # ago and prefetches it at the end of each step: more than the demand optimum's 2 hits in 3.
    caches = {name: ExpertCache(1, 6, make_policy(name, 1, 6), capacity=2) for name in ("lru", "predictive")}
    hits = {name: 0 for name in caches}
    for step in range(1, 61):
        for name, cache in caches.items():
            h = access(cache, 0, [(step - 1) % 3], step)[0]
            hits[name] += h and step > 30
    assert hits["lru"] == 0
    assert hits["predictive"] >= 25  # of 30 counted accesses; the optimum without prefetch gets 20


def test_predictive_scores_compare_across_layers_and_survive_prefill_steps():
    policy = make_policy("predictive", 2, 4)
    cache = ExpertCache(2, 4, policy, capacity=3, scope="pooled")
    cache.policy.record(0, np.array([0, 1, 2, 3]), np.array([5, 1, 1, 3]), 1)  # a prefill step: counts
    cache.admit(0, np.array([0, 1, 2, 3]), 1, limit=4)
    for step in range(2, 40):
        access(cache, 0, [step % 2], step)  # layer 0 alternates between two experts
        access(cache, 1, [3], step)  # layer 1 always uses one
    assert sorted(resident(cache)) == [(0, 0), (0, 1), (1, 3)]
    assert np.isfinite(policy.priority(40)).all() and policy.priority(40).shape == (2, 4)

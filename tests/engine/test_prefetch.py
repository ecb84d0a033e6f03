"""Prefetching: the cache's limits, in-flight copies, the predictive forecast, and the runtime's sequence."""

from __future__ import annotations

import numpy as np
import pytest

from engine.cache.expert_cache import ExpertCache
from engine.cache.policies import POLICY_CLASSES, Policy, make_policy
from engine.tools.simulator import _row_experts, optimal_hits, replay
from engine.tools.trace import Trace
from tiny_models import resident


class Fixed(Policy):
    """Fixed priorities and a fixed forecast: what the cache does with them is the test."""

    prefetch_limit = 2
    demand_admission = False

    def __init__(self, prio: np.ndarray, use: np.ndarray):
        super().__init__(*prio.shape)
        self.prio, self.use = prio.astype(float), use.astype(float)

    def priority(self, step):
        return self.prio

    def prefetch_scores(self, layer):
        return self.prio[layer], self.use[layer]


def test_policies_without_prefetch_only_admit_on_demand():
    for name, cls in POLICY_CLASSES.items():
        if name != "predictive":
            assert cls.prefetch_limit == 0 and cls.demand_admission
    cache = ExpertCache(2, 4, make_policy("lru", 2, 4), capacity=4)
    cache.policy.record(0, np.array([1, 2]), np.ones(2), 1)
    done = cache.after_access(0, np.array([1, 2]), np.array([True, True]), 1, limit=8)
    assert [(a.layer, a.expert) for a in done] == [(0, 1), (0, 2)]  # no prefetch of layer 1
    assert cache.prefetch(1, 1) == []


@pytest.mark.parametrize("scope", ["per_layer", "pooled"])
def test_prefetch_obeys_limit_capacity_and_expected_misses(scope):
    prio = np.array([[0.1, 0.9, 0.8, 0.7, 0.6, 0.5], [0.4, 0.3, 0.2, 0.1, 0.0, 0.0]])
    use = np.full((2, 6), 0.9)
    cache = ExpertCache(2, 6, Fixed(prio, use), capacity=4, scope=scope)
    done = cache.prefetch(0, step=1)
    assert [a.expert for a in done] == [1, 2]  # the limit: the best two
    done = cache.prefetch(0, step=2)
    cap = 2 if scope == "per_layer" else 4
    assert len(done) == (0 if scope == "per_layer" else 2)  # full layer, and nothing outranks 1 and 2
    assert int(cache.used[0]) <= cap and cache.cached_count() <= 4
    # a forecast that expects only 0.3 misses in the layer copies at most one expert
    cache.policy.use[1] = [0.1, 0.1, 0.1, 0, 0, 0]
    assert len(cache.prefetch(1, step=3)) <= 1
    cache.policy.use[1] = 0
    assert cache.prefetch(1, step=4) == []  # nothing expected: no copy


def test_prefetch_evicts_the_least_likely_and_never_an_in_flight_copy():
    prio = np.array([[0.5, 0.5, 0.0, 0.0]])
    cache = ExpertCache(1, 4, Fixed(prio, np.ones((1, 4))), capacity=2)
    first = cache.prefetch(0, step=1, reserve=True)  # experts 0 and 1, copies in flight
    assert sorted(a.expert for a in first) == [0, 1] and cache.cached_count() == 0
    cache.policy.prio[0] = [0.0, 0.1, 0.9, 0.8]  # 2 and 3 now forecast; 0 and 1 still in flight
    assert cache.prefetch(0, step=2) == []  # no room, and in-flight places are never victims
    cache.commit(0, 1, first[1].slot)
    cache.commit(0, 0, first[0].slot)
    done = cache.prefetch(0, step=3)
    assert [(a.expert, a.evicted) for a in done] == [(2, (0, 0)), (3, (0, 1))]


def test_prefetch_pooled_may_evict_another_layer():
    prio = np.array([[0.9, 0.8, 0.0], [0.1, 0.0, 0.0]])
    cache = ExpertCache(2, 3, Fixed(prio, np.ones((2, 3))), capacity=2, scope="pooled")
    cache.prefetch(1, step=1)  # layer 1 fills the pool first
    assert sorted(resident(cache)) == [(1, 0), (1, 1)]
    done = cache.prefetch(0, step=2)
    assert sorted(resident(cache)) == [(0, 0), (0, 1)] and all(a.evicted[0] == 1 for a in done)


def cross_layer_trace(rows: int = 200, layers: int = 4, seed: int = 0) -> Trace:
    """Each token is one of three kinds, drawn at random; its kind fixes its experts in every layer.

    No order over time to learn, and each kind alone fills a layer's slots: LRU can only keep the last
    token's set, but layer 0 of a token tells which set its other layers will need.
    """
    rng = np.random.default_rng(seed)
    sets = np.array([[[0, 1], [2, 3], [4, 5]][(kind + layer) % 3] for layer in range(layers) for kind in range(3)])
    sets = sets.reshape(layers, 3, 2)
    kinds = rng.integers(0, 3, rows)
    return Trace(sets[:, kinds].transpose(1, 0, 2).astype(np.int32), 6)


@pytest.mark.parametrize("scope", ["per_layer", "pooled"])
def test_prefetch_beats_lru_when_earlier_layers_predict_later_ones(scope):
    t = cross_layer_trace()
    capacity = 2 * t.num_layers
    rate = {p: replay(t, p, capacity, scope) for p in ("lru", "predictive")}
    hits = {p: r.hits[50:].sum() / r.accesses[50:].sum() for p, r in rate.items()}
    assert hits["lru"] < 0.45  # the same kind twice in a row, about a third of the time
    assert hits["predictive"] > 0.65  # layers 1..3 prefetched right after layer 0
    demand_optimum = optimal_hits(t, capacity, scope).sum() / rate["lru"].accesses.sum()
    assert hits["predictive"] > demand_optimum  # not bounded by the optimum of demand caching
    assert rate["predictive"].admissions.sum() < rate["lru"].admissions.sum()  # and fewer copies


@pytest.mark.parametrize("policy", ["lru", "predictive"])
@pytest.mark.parametrize("scope", ["per_layer", "pooled"])
def test_replay_follows_the_runtime_sequence(policy, scope):
    """The runtime's sequence, written out: replay must count exactly the same hits and copies."""
    t = cross_layer_trace(rows=60, layers=3, seed=1)
    e = t.experts.copy()
    e[5, 1] = -1  # a missing record
    t = Trace(e, 6, prefill_tokens=4)
    rows, layers, top_k = e.shape
    pol = make_policy(policy, layers, 6)
    cache = ExpertCache(layers, 6, pol, capacity=5, scope=scope)
    hits = copies = 0
    for row in range(rows):
        step = row + 1
        for layer in range(layers):
            experts, counts = _row_experts(e[row, layer])
            slots = cache.lookup(layer, experts)
            if experts.size:
                pol.record(layer, experts, counts, step)
            hits += int(counts[slots >= 0].sum())
            # demand admissions, then the prefetch of the next layer (after the last layer: layer 0), within
            # the copy cap: the scheduler's call
            copies += len(cache.after_access(layer, experts, slots < 0, step, limit=top_k))
    rep = replay(t, policy, 5, scope)
    assert (rep.hits.sum(), rep.admissions.sum()) == (hits, copies)


@pytest.mark.parametrize("layers,experts,top_k", [(1, 4, 1), (3, 4, 2), (2, 128, 8), (5, 16, 1)])
def test_predictive_prefetch_survives_odd_traces(layers, experts, top_k):
    rng = np.random.default_rng(layers * experts)
    e = np.stack([[rng.choice(experts, top_k, replace=False) for _ in range(layers)] for _ in range(40)])
    e[rng.random(e.shape) < 0.1] = -1
    e[7] = -1  # a row with nothing recorded
    t = Trace(e.astype(np.int32), experts, prefill_tokens=6)
    for scope in ("per_layer", "pooled"):
        for capacity in (1, layers * experts // 4, layers * experts):
            rep = replay(t, "predictive", capacity, scope)
            assert (rep.hits <= rep.accesses).all() and rep.admissions.max() <= top_k + 4
    # prefill steps (many tokens per row, with counts) through the policy and cache directly
    pol = make_policy("predictive", layers, experts)
    cache = ExpertCache(layers, experts, pol, capacity=layers * 2, scope="pooled")
    for step in range(1, 6):
        for layer in range(layers):
            ids = np.arange(min(experts, 3))
            pol.record(layer, ids, np.arange(1, len(ids) + 1) * step, step)
            cache.after_access(layer, ids, cache.lookup(layer, ids) < 0, step, limit=top_k)
            assert cache.cached_count() <= layers * 2
    assert np.isfinite(pol.priority(6)).all()


def test_predictive_scores_a_forecast_as_the_proximity_of_its_next_use():
    """Just before an access: use + (1 - use) * gamma * (the linear model's proximity), so an expert the
    forecast is sure of outranks every other, however recently those were used."""
    t = cross_layer_trace(rows=80, layers=3, seed=2)
    pol = make_policy("predictive", 3, 6)
    for row in range(60):
        for layer in range(3):
            experts, counts = _row_experts(t.experts[row, layer])
            pol.record(layer, experts, counts, row + 1)
    pol.record(0, *_row_experts(t.experts[60, 0]), 61)
    x = pol.xs[pol.last_t[1] % (pol.horizon + 1), 1].copy()  # layer 1's features, recorded a step ago
    scores, use = pol.prefetch_scores(1)
    x[1] = use
    assert np.allclose(scores, use + (1 - use) * pol.gamma * (pol.w @ x))
    assert np.array_equal(scores, pol.priority(61)[1])
    sure = use > 0.9  # layer 0 of this token fixes its two experts in layer 1
    assert sure.sum() == 2 and scores[sure].min() > scores[~sure].max()

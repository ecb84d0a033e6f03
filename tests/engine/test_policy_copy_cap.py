"""The copy cap (never more copies than a shadow LRU), its confidence rule, and predictive's forecast blend."""

from __future__ import annotations

import numpy as np
import pytest

from engine.cache.expert_cache import ExpertCache
from engine.cache.policies import LRU, Policy, make_policy
from engine.cache.shadow_lru import ShadowLRU
from engine.tools.simulator import replay
from engine.tools.synthetic_trace import synthetic_trace


class Greedy(Policy):
    """Always forecasts a new expert, surely needed: copies whenever the cache lets it."""

    prefetch_limit = 1
    demand_admission = False
    copy_cap = True

    def __init__(self, num_layers, num_experts, profile=None):
        super().__init__(num_layers, num_experts, profile)
        self.calls = 0
        self.prio = np.zeros((num_layers, num_experts))

    def priority(self, step):
        return self.prio

    def prefetch_scores(self, layer):
        self.calls += 1
        use = np.zeros(self.num_experts)
        use[self.calls % self.num_experts] = 1.0
        return use, use


def run(cache: ExpertCache, steps: list[list[int]], start: int = 1) -> list[int]:
    """Copies per step of a one-layer cache, as the runtime drives it."""
    copies = []
    for step, experts in enumerate(steps, start=start):
        e = np.array(experts)
        hit = cache.lookup(0, e) >= 0
        cache.policy.record(0, e, np.ones(len(e)), step)
        copies.append(len(cache.after_access(0, e, ~hit, step, limit=2)))
    return copies


def test_copy_cap_spends_exactly_what_the_shadow_lru_copies():
    steps = [[0], [0], [0], [1], [1], [2]]
    lru = run(ExpertCache(1, 4, make_policy("lru", 1, 4), capacity=1), steps)
    assert lru == [1, 0, 0, 1, 0, 1]  # by hand: a copy at each miss
    greedy = ExpertCache(1, 4, Greedy(1, 4), capacity=1)
    assert run(greedy, steps) == lru  # it wants a copy every step; it gets LRU's
    assert greedy.allowance == 0
    uncapped = Greedy(1, 4)
    uncapped.copy_cap = False
    assert run(ExpertCache(1, 4, uncapped, capacity=1), steps) == [1] * 6


@pytest.mark.parametrize("scope", ["per_layer", "pooled"])
@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_predictive_never_copies_more_than_lru(scope, fraction):
    t = synthetic_trace("qwen", rows=96, seed=1, prompts=2, prefill=8)
    capacity = round(fraction * t.num_experts) * t.num_layers
    lru, pred = replay(t, "lru", capacity, scope), replay(t, "predictive", capacity, scope)
    # at every step, not only in total: the allowance is never overdrawn
    assert (np.cumsum(pred.admissions.sum(axis=1)) <= np.cumsum(lru.admissions.sum(axis=1))).all()


class Fixed(Policy):
    prefetch_limit = 2
    demand_admission = False
    copy_cap = True
    prefetch_confidence = 0.5

    def __init__(self, use: np.ndarray):
        super().__init__(*use.shape)
        self.use = use

    def priority(self, step):
        return np.zeros((self.num_layers, self.num_experts))

    def prefetch_scores(self, layer):
        return self.use[layer], self.use[layer]


def test_scarce_copies_go_only_to_sure_forecasts():
    use = np.zeros((4, 4))
    use[0] = [0.2, 0.5, 0.0, 0.0]
    cache = ExpertCache(4, 4, Fixed(use), capacity=8)
    cache.allowance = 1  # a quarter of a copy per layer: the bar is 0.5 * (1 - 1/4) = 0.375
    assert [a.expert for a in cache.prefetch(0, step=1, limit=1)] == [1]
    cache.allowance = 4  # one per layer: no bar
    assert [a.expert for a in cache.prefetch(0, step=2, limit=1)] == [0]


def test_shadow_follows_a_resize():
    cache = ExpertCache(1, 4, Greedy(1, 4), capacity=1)
    run(cache, [[0], [1]])
    cache.resize(3, step=2)
    assert cache.shadow.capacity == 3
    assert run(cache, [[0], [1], [2]], start=3) == [1, 0, 1]  # the shadow held only 1: it copies 0, then 2


def test_predictive_blend_sharpens_a_sure_forecast():
    # layer 1 uses fixed partners of layer 0's two experts: every read of the forecast points at them, and
    # the fitted blend trusts them more than the prior blend does
    rng = np.random.default_rng(0)
    rows, E = 300, 8
    first = np.array([rng.choice(E, 2, replace=False) for _ in range(rows)])
    experts = np.stack([first, (first * 3 + 1) % E], axis=1).astype(np.int32)
    pol = make_policy("predictive", 2, E)
    cache = ExpertCache(2, E, pol, capacity=4)
    for step, row in enumerate(experts, start=1):
        for layer in range(2):
            e = np.unique(row[layer]).astype(np.int64)
            hit = cache.lookup(layer, e) >= 0
            pol.record(layer, e, np.ones(len(e)), step)
            cache.after_access(layer, e, ~hit, step, limit=2)
    partners = [(2 * 3 + 1) % E, (5 * 3 + 1) % E]
    pol.record(0, np.array([2, 5]), np.ones(2), rows + 1)
    fitted = pol.prefetch_scores(1)[1][partners].copy()
    pol.blend[:] = pol.blend_prior
    prior = pol.prefetch_scores(1)[1][partners]
    assert (fitted > 0.95).all() and (fitted > prior).all()


def test_shadow_starts_from_a_preloaded_cache():
    cache = ExpertCache(1, 4, Greedy(1, 4), capacity=2)
    cache.preload(np.array([[0.0, 2.0, 1.0, 0.0]]))  # experts 1 and 2 resident before any access
    assert run(cache, [[1], [2], [3]]) == [0, 0, 1]  # the shadow holds them too: no allowance until 3 misses


@pytest.mark.parametrize("scope", ["per_layer", "pooled"])
def test_shadow_counts_the_copies_the_lru_cache_makes(scope):
    # skewed random routing, preloaded residents, a second access of a layer in one step, and resizes
    # both ways: the counting shadow and the real cache with the LRU policy copy alike at every access
    rng = np.random.default_rng(3)
    L, E, k = 3, 10, 3
    held = np.zeros((L, E), dtype=bool)
    held[0, :2] = held[2, 5] = True
    real = ExpertCache(L, E, LRU(L, E), capacity=9, scope=scope)
    for layer, e in zip(*np.nonzero(held)):
        real._take(int(layer), int(e), None)
    shadow = ShadowLRU(L, E, 9, scope, held)
    copies = []
    for step in range(1, 120):
        if step % 40 == 0:
            real.resize(int(rng.integers(1, L * E)), step)
            shadow.resize(real.capacity)
        for layer in [0, 1, 2] + ([1] if step % 7 == 0 else []):
            experts = np.unique(rng.choice(E, k, p=np.linspace(1, 3, E) / np.linspace(1, 3, E).sum()))
            missed = real.lookup(layer, experts) < 0
            real.policy.record(layer, experts, np.ones(len(experts)), step)
            n = len(real.after_access(layer, experts, missed, step, limit=2))
            assert shadow.access(layer, experts, step, limit=2) == n, (step, layer)
            copies.append(n)
        assert (shadow.resident == (real.slot_of >= 0)).all()
    assert 0 < sum(copies) < 2 * len(copies)  # it did copy, and sometimes fewer than asked

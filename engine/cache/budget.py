"""Layer-aware budgets: split one pool of cache slots across MoE layers by their measured demand.

Layers differ: one routes most tokens to a handful of experts (a few slots catch nearly all of it),
another spreads them (every extra slot still pays). An equal split wastes the first layer's slots;
a plain pooled cache that evicts the globally weakest resident compares priorities that do not mean
the same in different layers (LRU's timestamps say nothing about how much a slot is worth to a layer).

`LayerBudget` measures each layer's utility curve online and splits the pool to maximise the total, the
utility-based partitioning of shared caches (Qureshi & Patt, MICRO 2006):
- every access of an expert records its LRU stack distance in its layer (how many distinct experts of the
  layer were used since its previous use); a slot budget of c catches the accesses at distance < c, so
  the histogram of distances is the layer's hits-versus-slots curve. Histograms decay (half-life
  `half_life` steps) so the split follows a change of text;
- every `period` steps the pool is split greedily by marginal gain (each layer's curve made
  non-increasing from the right, so a layer whose curve rises late still gets its slots), ties to the
  layer with fewer slots (no evidence: an equal split);
- hysteresis: the new split replaces the current one only when it catches more than `hysteresis` of
  the recent accesses more, so slots do not oscillate between layers of equal demand.

The cache enforces the split lazily (`ExpertCache`, pooled scope): an admission into a layer below its
quota evicts from a layer above its quota, one at or above its quota evicts within itself. No slot moves
just because the quota changed, so a new split costs no copies of its own.
"""

from __future__ import annotations

import numpy as np


class LayerBudget:
    half_life = 128.0  # steps: how fast the demand estimate forgets
    period = 4  # steps between re-splits
    hysteresis = 0.002  # share of the recent accesses a new split must gain to replace the current one
    warmup = 8  # steps of evidence before the first split (until then: equal shares)

    def __init__(self, num_layers: int, num_experts: int):
        self.num_layers, self.num_experts = num_layers, num_experts
        self.last = np.full((num_layers, num_experts), -1.0)  # step of each expert's last use
        self.hist = np.zeros((num_layers, num_experts + 1))  # decayed stack-distance counts; last: first use
        self.rate = 0.5 ** (1.0 / self.half_life)
        self.step: int | None = None
        self.steps = 0
        self.quota: np.ndarray | None = None  # slots per layer; None: not split yet
        self.capacity = -1
        self.split_at = -1  # the `steps` count of the last re-split

    def observe(self, layer: int, experts: np.ndarray, step: int) -> None:
        """`layer` used `experts` (unique ids) at `step`."""
        if step != self.step:
            if self.step is not None:
                self.hist *= self.rate ** max(1, step - self.step)
            self.step = step
            self.steps += 1
        if len(experts) == 0:
            return
        last = self.last[layer]
        prev = last[experts]
        seen = prev >= 0
        # distinct experts of the layer used since each expert's previous use (those used at the same
        # step count half: LRU breaks that tie either way)
        later = (last[None, :] > prev[:, None]).sum(axis=1)
        ties = (last[None, :] == prev[:, None]).sum(axis=1) - 1
        d = np.minimum(later + ties // 2, self.num_experts - 1)
        d = np.where(seen, d, self.num_experts)
        np.add.at(self.hist[layer], d, 1.0)
        last[experts] = step

    def curves(self) -> np.ndarray:
        """[layers, experts]: the decayed hits the c-th slot of each layer would add (c = 1..experts)."""
        return self.hist[:, :-1]

    def split(self, capacity: int) -> np.ndarray:
        """Slots per layer (summing to `capacity`, at most `num_experts` each) that maximise the hits."""
        L, E = self.num_layers, self.num_experts
        capacity = max(0, min(int(capacity), L * E))
        gain = np.maximum.accumulate(self.curves()[:, ::-1], axis=1)[:, ::-1]  # non-increasing in c
        # tie-break towards the layer with fewer slots: with no evidence, an equal split
        tiny = 1e-9 * (gain.max() + 1.0)
        g = gain - tiny * np.arange(E)[None, :]
        quota = np.zeros(L, dtype=np.int64)
        if capacity:
            top = np.argpartition(-g.reshape(-1), capacity - 1)[:capacity] if capacity < L * E else np.arange(L * E)
            quota = np.bincount(top // E, minlength=L).astype(np.int64)
        return quota

    def value(self, quota: np.ndarray) -> float:
        """Decayed hits a split catches (LRU within each layer)."""
        csum = np.concatenate([np.zeros((self.num_layers, 1)), np.cumsum(self.curves(), axis=1)], axis=1)
        return float(csum[np.arange(self.num_layers), np.clip(quota, 0, self.num_experts)].sum())

    def equal(self, capacity: int) -> np.ndarray:
        base, extra = divmod(capacity, self.num_layers)
        return np.minimum(self.num_experts, base + (np.arange(self.num_layers) < extra)).astype(np.int64)

    def update(self, capacity: int) -> np.ndarray:
        """The quota to enforce now (re-split every `period` steps, with hysteresis)."""
        if self.quota is None or capacity != self.capacity:
            self.quota, self.capacity = self.equal(capacity), capacity
        if self.steps >= self.warmup and self.steps % self.period == 0 and self.split_at != self.steps:
            self.split_at = self.steps
            new = self.split(capacity)
            total = self.hist.sum()
            if total > 0 and self.value(new) - self.value(self.quota) > self.hysteresis * total:
                self.quota = new
        return self.quota

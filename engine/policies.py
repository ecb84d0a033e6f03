"""Cache policies: which (layer, expert) pairs deserve a place on the fast device.

One small interface serves the live engine and the simulator alike. A policy only keeps scores: it is
told of every access (`record`) and asked for a priority matrix (`priority`); the cache evicts the
resident with the lowest priority and admits a missed expert only when it outranks that victim.
Priorities are numpy arrays of shape [layers, experts] so the cache never loops over experts in Python.
"""

from __future__ import annotations

import numpy as np


class Policy:
    name = ""
    description = ""

    def __init__(self, num_layers: int, num_experts: int, profile: np.ndarray | None = None):
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.profile = None if profile is None else np.asarray(profile, dtype=np.float64)

    def record(self, layer: int, experts: np.ndarray, counts: np.ndarray, step: int) -> None:
        """Experts of `layer` used at `step` (unique ids), with how many tokens each served."""

    def priority(self, step: int) -> np.ndarray:
        """Higher means keep. Shape [layers, experts]."""
        raise NotImplementedError


class LRU(Policy):
    name = "lru"
    description = "least recently used (the seed paper)"

    def __init__(self, num_layers, num_experts, profile=None):
        super().__init__(num_layers, num_experts, profile)
        self.last = np.full((num_layers, num_experts), -1.0)

    def record(self, layer, experts, counts, step):
        self.last[layer, experts] = step

    def priority(self, step):
        return self.last


class LFU(Policy):
    name = "lfu"
    description = "least frequently used (token counts since load)"

    def __init__(self, num_layers, num_experts, profile=None):
        super().__init__(num_layers, num_experts, profile)
        self.count = np.zeros((num_layers, num_experts))

    def record(self, layer, experts, counts, step):
        self.count[layer, experts] += counts

    def priority(self, step):
        return self.count


class Decay(Policy):
    name = "decay"
    description = "exponentially decayed frequency (half-life 32 steps)"
    half_life = 32.0

    def __init__(self, num_layers, num_experts, profile=None):
        super().__init__(num_layers, num_experts, profile)
        self.value = np.zeros((num_layers, num_experts))
        self.stamp = np.zeros((num_layers, num_experts))
        self.rate = 0.5 ** (1.0 / self.half_life)

    def record(self, layer, experts, counts, step):
        v = self.value[layer, experts] * self.rate ** (step - self.stamp[layer, experts])
        self.value[layer, experts] = v + counts
        self.stamp[layer, experts] = step

    def priority(self, step):
        return self.value * self.rate ** (step - self.stamp)


class Static(Policy):
    name = "static"
    description = "fixed set from a profile (python -m engine profile); no profile: first come, never evicted"

    def priority(self, step):
        if self.profile is None:
            return np.zeros((self.num_layers, self.num_experts))
        return self.profile


POLICY_CLASSES: dict[str, type[Policy]] = {p.name: p for p in (LRU, LFU, Decay, Static)}
POLICIES: dict[str, str] = {name: cls.description for name, cls in POLICY_CLASSES.items()}


def make_policy(name: str, num_layers: int, num_experts: int, profile: np.ndarray | None = None) -> Policy:
    try:
        cls = POLICY_CLASSES[name]
    except KeyError:
        raise ValueError(f"unknown cache policy {name!r}; choose one of: {', '.join(POLICY_CLASSES)}") from None
    return cls(num_layers, num_experts, profile)

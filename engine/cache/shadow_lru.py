"""How many copies an LRU cache of the same size and scope would make: the allowance of a `copy_cap` policy.

It decides exactly as `ExpertCache` with the `LRU` policy does (a missed expert enters while there is
room, else evicts the least recently used resident of its scope, lowest index first among equals, and
never one used at this step), but it only counts: no slots, no admissions, no policy object. The tests
hold the two to the same copies.
"""

from __future__ import annotations

import numpy as np


class ShadowLRU:
    def __init__(self, num_layers: int, num_experts: int, capacity: int, scope: str, held: np.ndarray):
        self.num_layers, self.num_experts, self.scope = num_layers, num_experts, scope
        self.resident = np.array(held, dtype=bool)  # [layers, experts], what the real cache held at the start
        self.last = np.full((num_layers, num_experts), -1.0)  # LRU's priority: the step of the last use
        self.hits = 0  # accessed experts found resident, since creation
        self.resize(capacity)

    def resize(self, capacity: int) -> None:
        """Drop the least recently used down to the new size (as `ExpertCache.resize`)."""
        self.capacity = max(0, min(int(capacity), self.num_layers * self.num_experts))
        base, extra = divmod(self.capacity, self.num_layers)  # per layer: the equal share
        self.layer_capacity = np.minimum(self.num_experts, base + (np.arange(self.num_layers) < extra))
        scopes = (zip(self.resident, self.last, self.layer_capacity) if self.scope == "per_layer"
                  else [(self.resident.reshape(-1), self.last.reshape(-1), self.capacity)])
        for resident, last, cap in scopes:
            excess = int(resident.sum()) - int(cap)
            if excess > 0:
                resident[np.argsort(np.where(resident, last, np.inf), kind="stable")[:excess]] = False

    def access(self, layer: int, experts: np.ndarray, step: int, limit: int) -> int:
        """Record an access of `layer` (distinct experts) and return the copies LRU makes for it."""
        missed = experts[~self.resident[layer, experts]]
        self.hits += len(experts) - len(missed)
        self.last[layer, experts] = step
        want = min(len(missed), limit) if self.capacity else 0
        if want <= 0:
            return 0
        if self.scope == "per_layer":
            resident, last = self.resident[layer], self.last[layer]
            room = int(self.layer_capacity[layer]) - int(np.count_nonzero(resident))
        else:
            resident, last = self.resident.reshape(-1), self.last.reshape(-1)
            room = self.capacity - int(np.count_nonzero(resident))
        copies = min(want, max(0, room))
        if copies < want:
            masked = np.where(resident, last, np.inf)
            while copies < want:
                victim = int(np.argmin(masked))
                if masked[victim] >= step:  # everything left was used at this step
                    break
                masked[victim] = np.inf
                resident[victim] = False
                copies += 1
        self.resident[layer, missed[:copies]] = True
        return copies

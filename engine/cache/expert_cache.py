"""Which (layer, expert) sits in which fast-device slot: bookkeeping only, no tensors.

The runtime owns the slot tensors; this class decides. Keeping the two apart lets the simulator replay
traces through exactly the same admission and eviction logic as the live engine.

Scope `per_layer` gives every MoE layer an equal share of the slots (the seed paper's setting);
`pooled` lets layers compete for one pool, so hot layers can hold more experts than cold ones. In the
pooled scope a policy with `layer_budget` (or `split=True`) has the pool split across layers by their
measured demand (`budget.LayerBudget`): an admission into a layer below its quota evicts from a layer
above its quota, otherwise within its own layer. Without it the globally weakest resident leaves.

A policy with `copy_cap` never copies more than LRU would: a shadow LRU cache of the same size and
scope replays the same accesses, each of its copies adds one to an allowance, and the policy's
admissions and prefetches (through `after_access`) spend it. Copies cost PCIe time and host
bandwidth, so a policy should win hits by choosing better, not by copying more.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .budget import LayerBudget
from .policies import Policy
from .shadow_lru import ShadowLRU


@dataclass
class Admission:
    layer: int
    expert: int
    slot: int
    evicted: tuple[int, int] | None  # (layer, expert) that left the slot, if any


class ExpertCache:
    def __init__(self, num_layers: int, num_experts: int, policy: Policy, capacity: int = 0,
                 scope: str = "per_layer", split: bool | None = None):
        if scope not in ("per_layer", "pooled"):
            raise ValueError(f"cache scope must be 'per_layer' or 'pooled', not {scope!r}")
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.policy = policy
        self.scope = scope
        self.slot_of = np.full((num_layers, num_experts), -1, dtype=np.int64)  # -1: not resident
        self.reserved = np.zeros((num_layers, num_experts), dtype=bool)  # admitted, copy still in flight
        self.key_of_slot: list[tuple[int, int] | None] = []
        self.free: list[int] = []  # slot numbers not holding anything, lowest last
        self.used = np.zeros(num_layers, dtype=np.int64)  # occupied places (resident or in flight) per layer
        self.capacity = 0
        self.split = split  # None: as the policy says (`policy.layer_budget`)
        self.budget: LayerBudget | None = None
        self.quota: np.ndarray | None = None  # slots per layer while a demand-driven split is on
        self.shadow: ShadowLRU | None = None  # the LRU cache whose copies bound a `copy_cap` policy's
        self.allowance = 0  # copies the shadow made and this cache has not
        self.hits = 0  # accessed experts found resident (each once per access), to compare with the shadow's
        self.resize(capacity, step=0)

    def use_policy(self, policy: Policy) -> None:
        """A newly chosen policy keeps the residents; a copy cap counts afresh from them (a shadow kept
        through another policy's decisions would hold what this cache no longer does)."""
        self.policy = policy
        self.shadow = None
        self.allowance = 0

    @property
    def layer_aware(self) -> bool:
        """Whether the pooled budget is split across layers by measured demand."""
        if self.scope != "pooled":
            return False
        return bool(getattr(self.policy, "layer_budget", False) if self.split is None else self.split)

    def observe(self, layer: int, experts: np.ndarray, step: int) -> None:
        """Feed the demand measurement of the layer-aware split (after_access does it)."""
        if not self.layer_aware:
            self.quota = None
            return
        if self.budget is None:
            self.budget = LayerBudget(self.num_layers, self.num_experts)
        self.budget.observe(layer, np.asarray(experts, dtype=np.int64), step)
        self.quota = self.budget.update(self.capacity)

    # -- queries -------------------------------------------------------------------------------
    def lookup(self, layer: int, experts: np.ndarray) -> np.ndarray:
        """Slot of each expert, -1 for a miss (an admission still in flight is a miss too)."""
        return self.slot_of[layer, experts]

    def layer_capacity(self, layer: int) -> int:
        """Slots `layer` may fill: its equal share (per_layer), or the whole pool (pooled: the quota of
        a layer-aware split only decides whom an admission evicts, never leaves a slot empty)."""
        if self.scope == "pooled":
            return self.capacity
        base, extra = divmod(self.capacity, self.num_layers)
        return min(self.num_experts, base + (1 if layer < extra else 0))

    def cached_count(self) -> int:
        return int((self.slot_of >= 0).sum())

    # -- decisions -----------------------------------------------------------------------------
    def _resident_priorities(self, layer: int, prio: np.ndarray) -> np.ndarray:
        """Flat priorities of the residents that may be evicted for `layer` (inf elsewhere, and for
        in-flight admissions): the row of the layer, or every layer when pooled."""
        if self.scope == "per_layer":
            return np.where(self.slot_of[layer] >= 0, prio[layer], np.inf)
        resident = self.slot_of >= 0
        if self.quota is not None:
            if self.used[layer] >= self.quota[layer]:  # at its share: make room within the layer
                rows = np.zeros(self.num_layers, dtype=bool)
                rows[layer] = True
            else:  # below its share: take from a layer above its own
                rows = self.used > self.quota
            if rows.any():
                resident = resident & rows[:, None]
        return np.where(resident, prio, np.inf).reshape(-1)

    def _victim(self, layer: int, masked: np.ndarray) -> tuple[tuple[int, int], int] | None:
        """The weakest resident in `masked` as ((layer, expert), flat index), or None."""
        i = int(np.argmin(masked))
        if not np.isfinite(masked[i]):
            return None
        return ((layer, i) if self.scope == "per_layer" else divmod(i, self.num_experts)), i

    def _has_room(self, layer: int) -> bool:
        used = self.used[layer] if self.scope == "per_layer" else self.used.sum()
        return bool(self.free) and used < self.layer_capacity(layer)

    def _take(self, layer: int, expert: int, slot: int | None, reserve: bool = False) -> int:
        if slot is None:
            slot = self.free.pop()
        self.key_of_slot[slot] = (layer, expert)
        self.used[layer] += 1
        if reserve:
            self.reserved[layer, expert] = True
        else:
            self.slot_of[layer, expert] = slot
        return slot

    def admit(self, layer: int, experts: np.ndarray, step: int, limit: int,
              reserve: bool = False) -> list[Admission]:
        """Try to place missed experts (best first); at most `limit` of them.

        An expert enters when there is room in its scope, or when it outranks the scope's weakest
        resident by more than the policy's `admission_margin`; that resident is then evicted. With
        `reserve` the place is held but the expert only counts as cached once `commit` is called (its
        copy has landed).
        """
        if limit <= 0 or self.capacity == 0 or len(experts) == 0:
            return []
        return self._place(layer, np.asarray(experts), self.policy.priority(step), limit, reserve)

    def prefetch(self, layer: int, step: int, reserve: bool = False, limit: int | None = None) -> list[Admission]:
        """Copy in, ahead of `layer`'s next access, the experts the policy forecasts it will need.

        At most `policy.prefetch_limit`, and no more than the forecast's expected misses (its use
        probabilities summed over non-resident experts, rounded up): a prefetch costs a copy, so it
        should not copy more than demand admission would. The candidates enter best first by `admit`'s
        rules, with the layer's row of the priorities replaced by the forecast's scores, so the victim
        in the layer is the expert least likely to be needed next (pooled: or the weakest of any layer).
        `limit`, if given, lowers the policy's cap further. A candidate's use must reach
        `policy.prefetch_confidence` times `_scarcity()`: when copies are scarce they go to the surest
        forecasts, not to the first layer asking.
        """
        if self.policy.prefetch_limit <= 0 or self.capacity == 0:
            return []
        forecast = self.policy.prefetch_scores(layer)  # also when `limit` is 0: it re-scores the layer
        limit = self.policy.prefetch_limit if limit is None else min(limit, self.policy.prefetch_limit)
        if forecast is None or limit <= 0:
            return []
        scores, use = forecast
        candidates = (use > 0) & (self.slot_of[layer] < 0) & ~self.reserved[layer]
        if self.policy.prefetch_confidence:
            candidates &= use >= self.policy.prefetch_confidence * self._scarcity()
        candidates = np.flatnonzero(candidates)
        limit = min(limit, int(np.ceil(use[candidates].sum() - 1e-6)))
        if limit <= 0:
            return []
        prio = self.policy.priority(step).copy()
        prio[layer] = scores
        return self._place(layer, candidates, prio, limit, reserve)

    def after_access(self, layer: int, experts: np.ndarray, missed: np.ndarray, step: int, limit: int,
                     reserve: bool = False) -> list[Admission]:
        """The cache's part of one MoE layer's step, after `lookup` and `policy.record`.

        Admits the missed experts (at most `limit`) if the policy admits on demand, then prefetches
        for the next access: the next layer of the same token, or after the last layer, layer 0 of
        the next token. Returns every admission (the runtime copies them all, the simulator counts them).
        With the policy's `copy_cap`, both together spend no more than the shadow LRU's allowance.
        """
        done: list[Admission] = []
        missed = np.asarray(missed, dtype=bool)
        self.hits += len(missed) - int(np.count_nonzero(missed))
        self.observe(layer, experts, step)
        allowed = None
        if self.policy.copy_cap:
            allowed = self.allowance = self.allowance + self._shadow_copies(layer, experts, step, limit)
        if self.policy.demand_admission and missed.any():
            done += self.admit(layer, experts[missed], step, limit if allowed is None else min(limit, allowed),
                               reserve)
        done += self.prefetch((layer + 1) % self.num_layers, step, reserve,
                              None if allowed is None else allowed - len(done))
        if allowed is not None:
            self.allowance -= len(done)
        return done

    def _shadow_copies(self, layer: int, experts: np.ndarray, step: int, limit: int) -> int:
        """Copies the shadow LRU makes for this access. Created on first use, holding what this cache
        holds (a preloaded profile, or a previous policy's choice): it counts copies from here on."""
        if self.shadow is None:
            self.shadow = ShadowLRU(self.num_layers, self.num_experts, self.capacity, self.scope, self.slot_of >= 0)
        return self.shadow.access(layer, np.asarray(experts, dtype=np.int64), step, limit)

    def _scarcity(self) -> float:
        """How dear a copy is, 0..1: 1 without a `copy_cap`; under one, 1 with no allowance left, falling
        to 0 at one spare copy per layer. It scales the prefetch confidence bar, so that bar rations
        copies only while LRU's budget binds."""
        if not self.policy.copy_cap:
            return 1.0
        return max(0.0, 1.0 - self.allowance / self.num_layers)

    def _place(self, layer: int, experts: np.ndarray, prio: np.ndarray, limit: int,
               reserve: bool) -> list[Admission]:
        """Admit `experts` of `layer` best first by `prio` (room, or the weakest resident plus margin)."""
        order = experts[np.argsort(-prio[layer, experts], kind="stable")] if len(experts) > 1 else experts
        done: list[Admission] = []
        masked = None  # computed on the first eviction; a newcomer never becomes a later victim (it outranks)
        for e in order.tolist():
            if len(done) >= limit:
                break
            if self.slot_of[layer, e] >= 0 or self.reserved[layer, e]:
                continue
            evicted = slot = None
            if not self._has_room(layer):
                if masked is None:
                    masked = self._resident_priorities(layer, prio)
                found = self._victim(layer, masked)
                if found is None or prio[layer, e] <= masked[found[1]] + self.policy.admission_margin:
                    break  # the rest rank lower still
                evicted, flat = found
                masked[flat] = np.inf
                if self.quota is not None:
                    masked = None  # the eviction may change which layers are above their share
                slot = int(self.slot_of[evicted])
                self.slot_of[evicted] = -1
                self.used[evicted[0]] -= 1
            slot = self._take(layer, e, slot, reserve)
            done.append(Admission(layer, e, slot, evicted))
        return done

    def commit(self, layer: int, expert: int, slot: int) -> None:
        """An in-flight admission has landed: from now on it is a hit."""
        self.reserved[layer, expert] = False
        if self.key_of_slot[slot] == (layer, expert):
            self.slot_of[layer, expert] = slot

    def preload(self, scores: np.ndarray) -> list[Admission]:
        """Fill empty places with the highest-scoring experts (warm start from a profile)."""
        done: list[Admission] = []
        order = np.argsort(-scores, axis=None, kind="stable")
        for flat in order.tolist():
            layer, e = divmod(flat, self.num_experts)
            if scores[layer, e] <= 0:
                break
            if self.slot_of[layer, e] < 0 and self._has_room(layer):
                done.append(Admission(layer, e, self._take(layer, e, None), None))
        return done

    def resize(self, capacity: int, step: int) -> list[tuple[int, int]]:
        """Change the number of slots; evict the weakest first. Returns (old slot, new slot) moves.

        Slots are renumbered densely so the runtime can shrink its tensors and free memory.
        In-flight admissions are dropped: the caller waits for copies before resizing.
        """
        capacity = max(0, min(int(capacity), self.num_layers * self.num_experts))
        if self.shadow is not None:
            self.shadow.resize(capacity)
        self.reserved[:] = False
        self.capacity = capacity
        prio = self.policy.priority(step)
        keep = self.slot_of >= 0
        for layer in range(self.num_layers) if self.scope == "per_layer" else [None]:
            rows = keep[layer] if layer is not None else keep
            cap = self.layer_capacity(layer) if layer is not None else capacity
            excess = int(rows.sum()) - cap
            if excess > 0:
                p = np.where(rows, prio[layer] if layer is not None else prio, np.inf)
                drop = np.argsort(p, axis=None, kind="stable")[:excess]
                idx = np.unravel_index(drop, p.shape)
                if layer is not None:
                    keep[layer, idx[0]] = False
                else:
                    keep[idx] = False
        moves = []
        new_slot_of = np.full_like(self.slot_of, -1)
        self.key_of_slot = [None] * capacity
        for new, (layer, e) in enumerate(zip(*np.nonzero(keep))):
            moves.append((int(self.slot_of[layer, e]), new))
            new_slot_of[layer, e] = new
            self.key_of_slot[new] = (int(layer), int(e))
        self.slot_of = new_slot_of
        self.used = (new_slot_of >= 0).sum(axis=1)
        self.free = list(range(capacity - 1, len(moves) - 1, -1))
        return moves

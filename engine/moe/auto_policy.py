"""`auto` with real slots: keep the predictive policy only while its extra hits save more than it costs.

Predictive's copy cap already runs a shadow LRU cache of the same size over the same accesses
(`ShadowLRU`), so what LRU would have hit is known at every access. Each hit predictive adds saves
one expert product on the CPU, less its cost on the fast device (the cost model, measured at load);
its bookkeeping, router hint included, is timed in the scheduler (all of it: LRU's own share, about
12 µs per layer and step here, is counted against it, which errs towards LRU). Every `window` steps
the two are compared, and when the time saved falls short of the time spent, the runtime turns to
LRU for the rest of the load (or until a policy is chosen again). On this project's 2-core Xeon
predictive costs 60-200 µs more than LRU per layer and step, while a CPU expert product of a
fine-grained model in bf16 takes 0.15-0.5 ms: it pays where it adds a hit in every few layers, not
where LRU already hits almost everything (half of a 256-expert layer's experts cached).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class AutoVerdict:
    saving_per_hit_s: float  # CPU product minus fast-device product of one expert, one token
    window: int = 128  # steps between verdicts
    steps: int = 0
    mark: tuple[int, int, float] | None = None  # (cache hits, LRU hits, policy seconds) at the window's start
    last: dict = field(default_factory=dict)  # the last window's numbers, for the snapshot
    turned: bool = False  # LRU took over

    def step(self, cache_hits: int, lru_hits: int, policy_s: float) -> bool:
        """Count one step (cumulative counters); True when LRU should take over."""
        now = (cache_hits, lru_hits, policy_s)
        if self.mark is None:
            self.mark = now
            return False
        self.steps += 1
        if self.steps % self.window:
            return False
        extra = (cache_hits - self.mark[0]) - (lru_hits - self.mark[1])
        saved, spent = extra * self.saving_per_hit_s, policy_s - self.mark[2]
        self.last = {"steps": self.window, "extra_hits": extra, "saved_s": saved, "spent_s": spent}
        self.mark = now
        self.turned = saved < spent
        return self.turned

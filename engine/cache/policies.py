"""Cache policies: which (layer, expert) pairs deserve a place on the fast device.

One small interface serves the live engine and the simulator alike. A policy only keeps scores: it is
told of every access (`record`) and asked for a priority matrix (`priority`); the cache evicts the
resident with the lowest priority and admits a missed expert only when it outranks that victim.
Priorities are numpy arrays of shape [layers, experts] so the cache never loops over experts in Python.

A policy may also prefetch: asked for `prefetch_scores(layer)` just before `layer`'s next access, it
forecasts which experts that access will need, and the cache copies in up to `prefetch_limit` of them
(`ExpertCache.prefetch`). Copies issued one layer ahead overlap with the current layer's compute.
"""

from __future__ import annotations

import numpy as np


class Policy:
    name = ""
    description = ""
    admission_margin = 0.0  # a newcomer must outrank the evicted expert by more than this (damps copy churn)
    prefetch_limit = 0  # experts per layer and step that `ExpertCache.prefetch` may copy in ahead of use
    demand_admission = True  # admit missed experts after an access (off: only prefetching copies)
    layer_budget = False  # pooled scope: split the pool across layers by measured demand (budget.py)
    copy_cap = False  # never copy more than a shadow LRU cache of the same size would (expert_cache.py)
    prefetch_confidence = 0.0  # under copy_cap: the forecast use a prefetch needs while copies are scarce
    wants_hints = False  # told by `hint` which experts the next layer's router picks a layer early

    def __init__(self, num_layers: int, num_experts: int, profile: np.ndarray | None = None):
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.profile = None if profile is None else np.asarray(profile, dtype=np.float64)

    def record(self, layer: int, experts: np.ndarray, counts: np.ndarray, step: int) -> None:
        """Experts of `layer` used at `step` (unique ids), with how many tokens each served."""

    def priority(self, step: int) -> np.ndarray:
        """Higher means keep. Shape [layers, experts]."""
        raise NotImplementedError

    def hint(self, layer: int, experts: np.ndarray) -> None:
        """The experts `layer`'s coming access is forecast to use from the hidden state: its router
        applied to the layer before's input (`moe/router_hint.py`; recorded in traces as `hints`)."""

    def prefetch_scores(self, layer: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(scores, use) for the upcoming access of `layer`, or None when there is nothing to go on.

        `scores` [experts], on the scale of `priority`, rank the candidates and pick the layer's victims;
        `use` [experts] is the forecast probability that each expert is needed, so that the cache copies
        no more than the expected misses. Called after the previous layer's access (for layer 0: after
        the last layer of the step), so the current token's routing so far can inform it.
        """
        return None


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


class Predictive(Policy):
    """Ranks experts by how soon they are predicted to be used again: Belady's rule, made online.

    Evidence, all from routing already seen:
    - context: earlier tokens whose routing resembled the current token's (the same experts in the layers
      up to this one) were followed by certain experts; what followed them one to four steps later is a
      forecast (strong on repetitive text: code, arithmetic, quoting the prompt);
    - recency: used at this step, and a fast moving average;
    - frequency: a slow moving average and the share of steps since load.
    A linear model over these features predicts the proximity of each expert's next use,
    gamma ** (steps until the next use - 1) (0 beyond `horizon` steps). It is refitted every step by
    least squares with forgetting on the outcomes of the features seen `horizon` steps ago, so the blend
    adapts to the model and the text without hand tuning (context on repetitive text, frequency on
    stationary routing, recency on sticky routing). Weights are shared by all layers, so scores compare
    across layers for the pooled scope. Cost per layer and step: one [window, experts] product for the
    similarity and one [lookahead, window] x [window, experts] for the forecast.

    It prefetches rather than admitting on demand: within one token, the routing of layers 0..l-1
    predicts layer l's far better than any history of layer l alone (on granite-3.0-1b-a400m, 0.74-0.84
    of the top-8 found, against about half for frequency), and the similarity above already holds it.
    So just before each layer's access the layer is re-scored with that forecast (`prefetch_scores`)
    and the cache copies in what it expects to miss, a layer ahead of use. The forecast blends the
    similar tokens' vote with two reads of the co-occurrence with the layer before (the mean over this
    token's experts there, and the strongest single one), by weights fitted per layer on the access
    that follows each forecast (least squares with forgetting, shrunk to `blend_prior`): which read
    predicts best differs by model (diffuse affinity favours the mean, one-to-one expert chains the
    maximum). A fifth read, where the engine or the trace gives one, is the router hint (`hint`: the
    layer's router applied to the layer before's input): on the demo model the forecast's top-k then
    holds 0.67 of the experts used, not 0.58. Its copies are capped at what LRU would copy (`copy_cap`).
    """

    name = "predictive"
    description = "learned forecast of each expert's next use (context, recency, frequency), prefetched a layer ahead"
    window = 256  # past steps kept for context matching
    sharpness = 20.0  # softmax temperature over routing similarity (similarity is in 0..1)
    layer_memory = 0.5  # weight of a layer's match per layer further down (1: all layers so far equal)
    pair_weight = 0.5  # prior share of the layer-to-layer forecast (co-occurrence with the layer before) in a prefetch
    pair_prior = 2.0  # pseudo-observations of the layer's overall frequency behind each co-occurrence row
    # forecast blend: bias, similar tokens' vote, co-occurrence mean, co-occurrence max, router hint (learnt
    # from nothing: a model's hint is as good as its residual stream is steady)
    blend_prior = np.array([0.0, 1 - pair_weight, pair_weight, 0.0, 0.0])
    blend_memory = 0.995  # forgetting of the blend's fit, per forecast
    blend_ridge = 20.0  # the prior weighs as much as this many experts' outcomes
    lookahead = 4  # steps after a similar token that vote for the forecast
    vote_decay = 0.5
    gamma = 0.7  # proximity of the next use: gamma ** (steps - 1)
    horizon = 8  # steps of outcome before a sample enters the fit
    memory = 0.99  # forgetting of the fit, per step
    # bias, next-step vote, lookahead vote, used now, fast average, slow average, share since load
    prior = np.array([0.05, 0.2, 0.4, 0.1, 0.0, 0.2, 0.2])
    admission_margin = 0.05  # in proximity units: about a fifth fewer copies for a hit rate within 0.002
    prefetch_limit = 4  # copies per layer ahead of use; the expected misses usually bind first
    demand_admission = False  # a miss is forecast, and prefetched, at the next access if it matters
    copy_cap = True  # at half the experts an uncapped forecast copies a fifth more than LRU
    wants_hints = True
    prefetch_confidence = 0.3  # Qwen1.5-MoE-shaped routing at half the experts: a tenth more of the gap closed

    def __init__(self, num_layers, num_experts, profile=None):
        super().__init__(num_layers, num_experts, profile)
        L, E, W, H = num_layers, num_experts, self.window, self.lookahead
        # ring of past steps' routing, per layer, stored [layer, expert, row]: the similarity reads the
        # current experts' rows (contiguous), the votes one pass over the layer
        self.hist = np.zeros((L, E, W), dtype=np.float32)
        self.row_of = np.full(W, -1, dtype=np.int64)  # the step number each ring row holds
        self.sim = np.zeros(W, dtype=np.float32)  # similarity of each ring row to the current step so far
        self.t = -1  # steps seen
        self.cur_step: int | None = None
        self.layers_now = 0  # layers recorded in the current step
        self.k = 1  # experts per token (largest seen)
        # fast average, slow average, count since load, per layer: one update per record
        self.stats = np.zeros((L, 3, E))
        self.keep = np.array([[0.5], [0.95], [1.0]])
        self.gain = np.array([[0.5], [0.05], [1.0]])
        self.seen = np.zeros(L)
        self.lags = np.arange(1, H + 1)
        self.vote_weights = self.vote_decay ** (self.lags - 1)
        self.succ = (np.arange(W)[None, :] - self.lags[:, None]) % W  # ring row d steps before each row
        R = self.horizon + 1
        self.xs = np.zeros((R, L, len(self.prior), E))  # features of recent steps
        self.us = np.zeros((R, L, E))  # use of recent steps
        self.A = np.zeros((len(self.prior), len(self.prior)))
        self.b = np.zeros(len(self.prior))
        self.w = self.prior.astype(np.float64).copy()
        self.ridge = 0.5 * L  # the prior weighs as much as half a step of data
        self.score = np.zeros((L, E))
        self.recorded = np.zeros(L, dtype=bool)  # layers recorded in the current step
        self.last_t = np.full(L, -1)  # the step each layer was last recorded in
        self.near: np.ndarray | None = None  # ring rows weighted by similarity to the current token so far
        if self.pair_weight:
            # co-occurrence of layer l-1's experts with layer l's in one token: pair[l][e', e], counts
            self.pair = np.zeros((L, E, E), dtype=np.float32)
            self.pair_n = np.zeros((L, E))  # tokens in which e' was used at layer l-1, per l
            self.freq = np.zeros((L, E))  # tokens per expert, and tokens, per layer
            self.tokens = np.zeros(L)
            self.now_ids: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * L  # this step's routing
            n = len(self.blend_prior)
            self.blend_A = np.zeros((L, n, n))
            self.blend_b = np.zeros((L, n))
            self.blend = np.tile(self.blend_prior, (L, 1))  # per layer: weights of the forecast's reads
            self.pending: list[np.ndarray | None] = [None] * L  # the reads behind a layer's open forecast
            self.hints: list[np.ndarray | None] = [None] * L  # the router hint for each layer's coming access
        self.after: np.ndarray | None = None  # ring rows weighted by their predecessor's similarity

    def _new_step(self) -> None:
        """The previous step is complete: learn from it, then open a ring row for the new one."""
        t, R = self.t, self.horizon + 1
        if t >= self.horizon:
            y, unused = np.zeros((self.num_layers, self.num_experts)), np.ones((self.num_layers, self.num_experts))
            for d in range(self.horizon):  # proximity of the first use after step t - horizon
                used = self.us[(t - self.horizon + 1 + d) % R]
                y += self.gamma ** d * used * unused
                unused *= 1 - used
            y = y.reshape(-1)
            X = self.xs[(t - self.horizon) % R].transpose(0, 2, 1).reshape(-1, len(self.prior))
            self.A = self.memory * self.A + X.T @ X / self.num_experts
            self.b = self.memory * self.b + X.T @ y / self.num_experts
            self.w = np.linalg.solve(self.A + self.ridge * np.eye(len(self.w)), self.b + self.ridge * self.prior)
        if self.pair_weight and t >= 0:  # every layer's forecast blend, in one batched solve
            n = len(self.blend_prior)
            self.blend = np.linalg.solve(self.blend_A + self.blend_ridge * np.eye(n),
                                         (self.blend_b + self.blend_ridge * self.blend_prior)[..., None])[..., 0]
        self.t = t = t + 1
        r = t % self.window
        self.hist[:, :, r] = 0
        self.row_of[r] = t
        self.sim[:] = 0
        self.norm = 0.0
        self.layers_now = 0
        self.recorded[:] = False
        age = t - self.row_of  # 0: this step; >= 1: earlier; rows never written hold -1
        self.past = ((age >= 1) & (self.row_of >= 0)).astype(np.float32)
        self.any_past = bool(self.past.any())
        self.succ_ok = (age >= self.lags[:, None])[np.arange(len(self.lags))[:, None], self.succ] * self.past[self.succ]
        self.past_idx = np.flatnonzero(self.past)
        self.xs[t % R] = 0
        self.us[t % R] = 0

    def _context(self, layer: int, experts: np.ndarray, vals: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(next-step forecast, discounted forecast over `lookahead` steps) from similar earlier tokens."""
        h = self.hist[layer]
        if self.layer_memory != 1.0:
            self.sim *= np.float32(self.layer_memory)
            self.norm = self.norm * self.layer_memory + self.k
        else:
            self.norm = self.layers_now * self.k
        if len(experts):  # the current routing is sparse: only its experts' columns add to the similarity
            self.sim += vals.astype(np.float32) @ h[experts]
        if not self.any_past:
            return u, u
        sim = self.sim * np.float32(self.sharpness / self.norm)
        w = np.exp(sim - sim[self.past_idx].max())
        w *= self.past
        wd = w[self.succ]  # [lag, row]: the weight of the row `lag` steps before this one
        wd *= self.succ_ok
        self.near, self.after = w, wd[0]  # kept for prefetch_scores
        sums = wd.sum(axis=1)
        ok = sums > 0
        if not ok.any():
            return u, u
        rows = wd[ok] / sums[ok, None]
        c = self.vote_weights[ok]
        # one [2, window] x [window, experts] product: the first lag's vote and the discounted mix of all
        votes = h @ np.vstack((rows[0], (c / c.sum()).astype(np.float32) @ rows)).T  # [experts, 2]
        return votes[:, 0], votes[:, 1]

    def record(self, layer, experts, counts, step):
        if step != self.cur_step:
            self.cur_step = step
            self._new_step()
        experts = np.asarray(experts, dtype=np.int64)
        R = self.t % (self.horizon + 1)
        r = self.t % self.window
        u = self.us[R, layer]  # zeroed when the step opened: written sparsely, in place
        if self.recorded[layer]:  # a second record of the layer in one step replaces the first
            u[:] = 0
            self.hist[layer, :, r] = 0
        vals = np.zeros(0)
        if len(experts):
            counts = np.asarray(counts, dtype=np.float64)
            cmax = counts.max()
            vals = counts / cmax  # a prefill step: relative to its busiest expert
            if cmax <= 1:
                self.k = max(self.k, len(experts))
            u[experts] = vals
            self.hist[layer, experts, r] = vals
        self.layers_now += 1
        v1, vh = self._context(layer, experts, vals, u)
        stats = self.stats[layer]
        stats *= self.keep
        if len(experts):
            stats[:, experts] += self.gain * vals
        self.seen[layer] += 1
        x = self.xs[R, layer]  # [feature, expert]
        x[0] = 1.0
        x[1], x[2], x[3] = v1, vh, u
        x[4:6] = stats[:2]
        np.multiply(stats[2], 1.0 / self.seen[layer], out=x[6])
        np.dot(self.w, x, out=self.score[layer])
        if self.pair_weight and self.pending[layer] is not None:
            self._score_blend(layer, u > 0)
        if self.pair_weight:
            self.hints[layer] = None  # spent on this access
        if self.pair_weight and len(experts):
            if layer and self.recorded[layer - 1] and len(self.now_ids[layer - 1]):
                prev = self.now_ids[layer - 1]
                self.pair[layer].reshape(-1)[(prev[:, None] * self.num_experts + experts).reshape(-1)] += 1.0
                self.pair_n[layer, prev] += 1.0
            self.freq[layer, experts] += 1.0
            self.tokens[layer] += 1.0
            self.now_ids[layer] = experts
        self.recorded[layer] = True
        self.last_t[layer] = self.t

    def _score_blend(self, layer: int, used: np.ndarray) -> None:
        """Add the access `layer`'s last forecast was for to the blend's fit (solved once per step)."""
        F, self.pending[layer] = self.pending[layer], None
        m = self.blend_memory
        self.blend_A[layer] = m * self.blend_A[layer] + F @ F.T
        self.blend_b[layer] = m * self.blend_b[layer] + F @ used

    def priority(self, step):
        return self.score

    def hint(self, layer, experts):
        if self.pair_weight:
            self.hints[layer] = np.asarray(experts, dtype=np.int64)

    def prefetch_scores(self, layer):
        """Re-score `layer` just before its access, with the sharpest forecast of that access.

        Not yet accessed in this step: earlier tokens similar to this one (by the routing of its layers
        so far) vote with their own routing at `layer`. Already accessed (the next access is the next
        step's): the tokens that followed tokens similar to this whole one vote. The forecast replaces
        the next-step vote among the layer's features, and the score is the proximity of the next use
        that follows from it: 1 for use at this access, else the linear model's proximity one step
        later, use + (1 - use) * gamma * (w . x). The learned weights were fitted to the blunter
        next-step vote, and alone they let recently used residents outrank a forecast that is sure (on
        Mixtral-shaped routing at a quarter of the experts, 0.94 of the LRU-to-optimum gap closed
        without this, 1.11 with it). Scores stay on the proximity scale, so they compare across
        layers. Cost: one [window] softmax and one [window] x [window, experts] product.
        """
        last = self.last_t[layer]
        w = self.after if self.recorded[layer] else self.near
        if w is None or last < 0 or self.t - last > self.horizon:
            return None
        total = w.sum()
        if total <= 0:
            return None
        x = self.xs[last % (self.horizon + 1), layer]
        use = self.hist[layer] @ w
        use /= total
        if self.pair_weight and not self.recorded[layer] and layer and self.recorded[layer - 1]:
            prev = self.now_ids[layer - 1]
            if len(prev) and self.tokens[layer]:
                # P(e at layer | e' at layer - 1), shrunk to the layer's frequency, for each e' of this token
                f = self.freq[layer] / self.tokens[layer]
                cond = (self.pair[layer][prev] + self.pair_prior * f) / (self.pair_n[layer, prev, None] + self.pair_prior)
                F = np.zeros((len(self.blend_prior), self.num_experts))
                F[0], F[1] = 1.0, use
                if self.hints[layer] is not None:
                    F[4, self.hints[layer]] = 1.0
                np.add.reduce(cond, axis=0, out=F[2])
                F[2] /= len(prev)  # the mean, without np.mean's overhead
                np.maximum.reduce(cond, axis=0, out=F[3])
                self.pending[layer] = F  # scored against this access in `record`
                use = self.blend[layer] @ F
                np.minimum(np.maximum(use, 0.0, out=use), 1.0, out=use)
        x[1] = use
        score = self.score[layer]
        np.dot(self.w, x, out=score)
        score *= (1.0 - use) * self.gamma
        score += use
        return score, use


POLICY_CLASSES: dict[str, type[Policy]] = {p.name: p for p in (LRU, LFU, Decay, Static, Predictive)}
AUTO = "auto"  # the default
POLICIES: dict[str, str] = {
    AUTO: "predictive where experts are cached on a GPU, while its extra hits save more time than it costs "
          "(else lru); lru where the cache is only simulated (CPU only)",
    **{name: cls.description for name, cls in POLICY_CLASSES.items()},
}


def resolve_policy(name: str, simulated: bool = False) -> str:
    """The policy `auto` starts as. With real slots, predictive: on the recorded and synthetic traces it
    wins more hits than LRU with no more copies (the runtime turns to LRU where those hits save less
    time than predictive costs, `moe/auto_policy.py`; the simulator replays it as predictive). Without
    (no GPU), every expert is computed on the CPU whatever the cache holds: the policy only feeds the
    hit-rate display, so the cheapest one runs."""
    base, plus, suffix = name.partition("+")
    if base != AUTO:
        return name
    return ("lru" if simulated else "predictive") + plus + suffix


def make_policy(name: str, num_layers: int, num_experts: int, profile: np.ndarray | None = None,
                simulated: bool = False) -> Policy:
    """A policy by name; `NAME+split` is NAME with the layer-aware split of a pooled budget turned on;
    `auto` as `resolve_policy` says for a cache that is `simulated` or not."""
    name = resolve_policy(name, simulated)
    base, _, suffix = name.partition("+")
    try:
        if suffix not in ("", "split"):
            raise KeyError(name)
        cls = POLICY_CLASSES[base]
    except KeyError:
        raise ValueError(f"unknown cache policy {name!r}; choose one of: {', '.join(POLICY_CLASSES)} "
                         f"(add +split for a layer-aware pooled budget)") from None
    policy = cls(num_layers, num_experts, profile)
    if suffix == "split":
        policy.layer_budget = True
        policy.name = name
    return policy

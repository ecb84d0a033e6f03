"""Synthetic routing traces shaped like real MoE models, for the simulator when no real trace is at hand.

Real routing has structure a cache can use, and the generator reproduces each kind (all deterministic by
`seed`, numpy only, a second or so for the largest shape):
- per-layer skew that varies across layers: some layers route most tokens to a few experts, others
  spread them (on fine-grained models, per-layer LRU hit rates from 0.4 to 0.9 at a quarter of the
  experts), so an equal split of the cache wastes slots;
- token identity: a vocabulary with Zipf frequencies, where a repeated token routes much as it did last
  time (strongest in early layers);
- topic and temporal locality: a context state that drifts slowly (an AR(1) process) inside a prompt and
  jumps at a prompt boundary, pulling each layer towards a topic's experts;
- cross-layer correlation: one token's latent state drifts with depth, so layer l's routing predicts
  layer l+1's better than layer l+10's.

Each (token, layer) routes to the top-k of logits = scale_l * (popularity_l + state_{t,l} . W_l) + noise.
`SHAPES` holds the model shapes (fine: 256 experts top-8, 40 layers, like Qwen3.5-MoE/DeepSeek-V3;
mixtral: 8 top-2, 32 layers; qwen: Qwen1.5-MoE's 60 top-4, 24 layers) and the knobs tuned so that LRU
and the offline optimum land near what those models' real traces show (fine, at a quarter of the
experts: LRU about 0.8, optimum about 0.9).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .trace import Trace, validate


@dataclass(frozen=True)
class Shape:
    num_experts: int
    top_k: int
    num_layers: int
    scale: tuple[float, float] = (1.0, 3.0)  # logit scale range across layers: low spreads, high concentrates
    popularity: float = 1.0  # spread of each layer's static expert popularity
    token: float = 0.8  # weight of the token's identity in its state (early layers; decays with depth)
    context: float = 0.8  # weight of the slowly drifting context (topic) state
    persistence: float = 0.97  # AR(1) coefficient of the context state, per token
    depth: float = 0.9  # correlation of a token's own state between adjacent layers
    drift: float = 0.5  # weight of the token's own state (what carries routing from layer to layer)
    coupling: float = 0.0  # correlation of each expert's router with its partner's in the previous layer
    carry: float = 0.0  # correlation of a token's logits with its partners' logits in the previous layer
    noise: float = 0.6  # per (token, layer, expert) noise, in units of the scaled logits
    latent: int = 16  # dimension of the states
    vocab: int = 2000
    zipf: float = 1.1


SHAPES: dict[str, Shape] = {
    "fine": Shape(256, 8, 40, scale=(0.15, 2.5), popularity=1.0, token=0.8, context=1.0, noise=1.2, carry=0.9),
    "mixtral": Shape(8, 2, 32, scale=(0.5, 1.5), popularity=0.4, token=0.8, context=0.6, noise=0.8, carry=0.8),
    "qwen": Shape(60, 4, 24, scale=(0.4, 1.8), popularity=0.8, token=0.8, context=0.8, noise=1.0, carry=0.9),
}


def synthetic_trace(shape: str | Shape = "fine", rows: int = 768, seed: int = 0, prompts: int = 3,
                    prefill: int = 32, **overrides) -> Trace:
    """A Trace of `rows` tokens over `prompts` prompts (each starting with `prefill` prompt rows).

    `shape` is a name in SHAPES or a Shape; keyword `overrides` replace its fields. The same arguments
    always give the same trace.
    """
    name = shape if isinstance(shape, str) else "custom"
    if isinstance(shape, str):
        try:
            shape = SHAPES[shape]
        except KeyError:
            raise ValueError(f"unknown synthetic shape {shape!r}; choose one of: {', '.join(SHAPES)}") from None
    if overrides:
        shape = replace(shape, **overrides)
    s = shape
    L, E, K, D = s.num_layers, s.num_experts, s.top_k, s.latent
    rng = np.random.default_rng(seed)
    f32 = np.float32

    # per layer: routing projection, static popularity, and a logit scale (skew) that varies with depth
    W = rng.standard_normal((L, D, E))
    pop = rng.standard_normal((L, E))
    fresh = np.sqrt(1 - s.coupling ** 2)
    for layer in range(1, L):  # each expert's router (and popularity) resembles a partner's in the layer before
        partner = rng.permutation(E)
        W[layer] = s.coupling * W[layer - 1][:, partner] + fresh * W[layer]
        pop[layer] = s.coupling * pop[layer - 1][partner] + fresh * pop[layer]
    W = (W / np.sqrt(D)).astype(f32)
    pop = (s.popularity * pop).astype(f32)
    lo, hi = s.scale
    scale = np.exp(rng.uniform(np.log(lo), np.log(hi), L)).astype(f32)

    # prompts: boundaries, and each prompt's topic (the context state's mean)
    prompts = max(1, min(prompts, rows))
    starts = np.linspace(0, rows, prompts + 1).astype(np.int64)[:-1]
    topic = np.zeros((rows, D), f32)
    bounds = list(starts) + [rows]
    for i in range(prompts):
        topic[bounds[i]:bounds[i + 1]] = rng.standard_normal(D)

    # context: AR(1) around the topic, reset at each prompt start
    eps = rng.standard_normal((rows, D)).astype(f32)
    ctx = np.empty((rows, D), f32)
    a, b = s.persistence, np.sqrt(1 - s.persistence ** 2)
    for t in range(rows):
        ctx[t] = eps[t] if t in starts else a * ctx[t - 1] + b * eps[t]
    ctx = (ctx + topic) / np.sqrt(2.0)

    # tokens: Zipf over a vocabulary, each with a fixed embedding
    ranks = np.arange(1, s.vocab + 1)
    p = ranks ** -s.zipf
    tokens = rng.choice(s.vocab, size=rows, p=p / p.sum())
    emb = rng.standard_normal((s.vocab, D)).astype(f32)[tokens]

    # depth: a token-specific state that drifts from layer to layer; token identity fades with depth
    c = s.depth
    drift = np.empty((rows, L, D), f32)
    z = rng.standard_normal((rows, L, D)).astype(f32)
    drift[:, 0] = z[:, 0]
    for layer in range(1, L):
        drift[:, layer] = c * drift[:, layer - 1] + np.sqrt(1 - c * c) * z[:, layer]
    fade = np.linspace(1.0, 0.4, L, dtype=f32)[None, :, None]
    state = (s.token * fade * emb[:, None] + s.context * ctx[:, None] + s.drift * drift)
    state /= np.sqrt(s.token ** 2 * fade ** 2 + s.context ** 2 + s.drift ** 2)

    logits = np.einsum("tld,lde->tle", state, W, optimize=True) + pop[None]
    logits *= scale[None, :, None]
    logits += s.noise * rng.standard_normal(logits.shape).astype(f32)
    if s.carry:  # the residual stream: part of each layer's routing is the previous layer's, re-labelled
        keep, fresh = f32(s.carry), f32(np.sqrt(1 - s.carry ** 2))
        for layer in range(1, L):
            logits[:, layer] = keep * logits[:, layer - 1][:, rng.permutation(E)] + fresh * logits[:, layer]
    experts = np.argpartition(-logits, K - 1, axis=2)[:, :, :K]
    # order each row's experts by logit, as a router's top-k does
    order = np.argsort(-np.take_along_axis(logits, experts, axis=2), axis=2)
    experts = np.take_along_axis(experts, order, axis=2).astype(np.int32)

    pre = min(prefill, min(np.diff(bounds))) if prefill else 0
    prompt_rows = np.array([(int(st), pre) for st in starts], dtype=np.int64)
    return validate(Trace(experts=experts, num_experts=E, prefill_tokens=pre,
                          model=f"synthetic-{name}-{E}x{K}-{L}L-seed{seed}",
                          prompt_rows=prompt_rows if prompts > 1 else None))


def synthetic_traces(names: list[str] | str = ("fine", "mixtral", "qwen"), rows: int = 768,
                     seeds: tuple[int, ...] = (0,)) -> dict[str, Trace]:
    """{name: trace} for the simulator's table: `synthetic-<shape>-s<seed>`."""
    if isinstance(names, str):
        names = [n for n in names.split(",") if n]
    return {f"synthetic-{n}-s{seed}": synthetic_trace(n, rows=rows, seed=seed) for n in names for seed in seeds}

"""Next-token choice from logits: greedy, temperature, top-k, top-p, repetition penalty, seeded."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class GenerationParams:
    max_new_tokens: int = 512
    greedy: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 40
    repetition_penalty: float = 1.1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """The CTRL penalty as transformers applies it: shrink the scores of tokens already in the text."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    scores = logits.gather(0, seen)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.scatter(0, seen, scores)


def choose_token(logits: torch.Tensor, params: GenerationParams, seen: torch.Tensor,
                 generator: torch.Generator | None) -> int:
    """`logits`: [vocab] float on the CPU; `seen`: ids of prompt and reply so far."""
    logits = apply_repetition_penalty(logits.float(), seen, params.repetition_penalty)
    if params.greedy or params.temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if 0 < params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0 < params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) > params.top_p  # keep the token crossing top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))

"""How the next token is chosen from the logits: greedy, or sampled with temperature, top-k and top-p."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings of one generation call.

    ``temperature`` 0 is greedy (argmax; top-k/top-p are then irrelevant).
    ``top_k`` 0 keeps the whole vocabulary; ``top_p`` 1 disables nucleus
    filtering.  ``seed`` seeds the sampling generator, which every
    tensor-parallel rank holds identically, so a seed reproduces a
    completion at any layout.
    """

    max_new_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.max_new_tokens >= 1, f"max_new_tokens={self.max_new_tokens} must be at least 1"),
            (self.temperature >= 0.0, f"temperature={self.temperature} must be >= 0 (0 is greedy)"),
            (self.top_k >= 0, f"top_k={self.top_k} must be >= 0 (0 keeps every token)"),
            (0.0 < self.top_p <= 1.0, f"top_p={self.top_p} must be in (0, 1]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def choose_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    """Next token of every row of ``logits`` ``(batch, vocab)`` (fp32), as int64 ``(batch,)``."""
    if params.greedy:
        return logits.argmax(dim=-1)
    scores = logits / params.temperature
    if 0 < params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        scores = _nucleus(scores, params.top_p)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _nucleus(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches ``top_p`` (at least one)."""
    ordered, order = torch.sort(scores, dim=-1, descending=True)
    cumulative = torch.softmax(ordered, dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative - torch.softmax(ordered, dim=-1) >= top_p  # mass before this token already enough
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return scores.masked_fill(drop, float("-inf"))

"""Sampling as small pure functions over one row of logits (V,).

Order, as in Hugging Face's logits processors: repetition penalty, temperature, top-k, top-p,
then a draw from the request's own `torch.Generator`. Temperature 0 means greedy (argmax).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None  # keep the k most likely characters
    top_p: float | None = None  # keep the smallest set whose probability reaches p
    repetition_penalty: float = 1.0  # > 1 discourages characters already in the text (CTRL)
    seed: int | None = None  # None: a random seed, reported back so the text can be reproduced
    min_p: float | None = None  # keep characters at least this fraction as likely as the most likely
    typical_p: float | None = None  # locally typical sampling (Meister et al.), as TGI's typical_p
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from characters already generated
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per occurrence in the generated text
    logit_bias: tuple[tuple[int, float], ...] = ()  # (character id, added to its logit), OpenAI's

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError("top_k must be >= 1")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ValueError("min_p must be in [0, 1]")
        if self.typical_p is not None and not 0 < self.typical_p <= 1:
            raise ValueError("typical_p must be in (0, 1]")


def make_generator(seed: int | None) -> tuple[torch.Generator, int]:
    """A CPU generator of its own for one request, and the seed it was started from."""
    if seed is None:
        seed = random.randrange(2**63)
    return torch.Generator().manual_seed(seed), seed


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor | None, penalty: float) -> torch.Tensor:
    """Divide positive and multiply negative logits of the characters marked in `seen` (V,) bool
    (which only a penalty other than 1 needs)."""
    if penalty == 1.0 or seen is None:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def apply_top_k(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    if k is None or k >= logits.size(-1):
        return logits
    kth_largest = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float | None) -> torch.Tensor:
    """Keep the smallest set of most likely characters whose probabilities sum to at least p."""
    if p is None or p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    # A character is kept when the mass before it has not yet reached p; the first always is.
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = mass_before >= p
    # Said again, not left to the comparison: a p below float32's smallest number rounds to 0 and
    # would drop the first too, leaving nothing to sample from.
    drop_sorted[0] = False
    drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_token(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None,
                 generator: torch.Generator) -> int:
    """Pick the next token id from one row of logits (V,), a float32 CPU tensor."""
    logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.temperature == 0:
        return int(torch.argmax(logits))
    logits = apply_top_p(apply_top_k(logits / params.temperature, params.top_k), params.top_p)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def is_plain_greedy(params: SamplingParams) -> bool:
    """Argmax of the raw logits: what rows with these settings can share with each other."""
    return params.temperature == 0 and params.repetition_penalty == 1.0


def greedy_tokens(logits: torch.Tensor) -> list[int]:
    """The argmax of each row of logits (R, V), in one call for the whole batch."""
    return logits.argmax(dim=-1).tolist()

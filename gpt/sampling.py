"""Sampling, batched over rows: small pure functions over logits (R, V) with per-row parameters, and
a draw from counter-based noise.

Order, as in Hugging Face's logits processors: logit bias, repetition penalty, presence and
frequency penalties, temperature, typical-p, then top-k, top-p and min-p on the sorted row. The
most likely character always survives the filters, so no row is ever left without one. Temperature
0 means greedy (argmax of the penalised logits).

The draw needs no generator state: each row's uniform number is a hash of (seed, position)
(splitmix64), and the token is where it falls in the row's cumulative distribution. A seed
therefore gives the same text alone or in any batch, on any device, and a step can be run again
with the same result.
"""

from __future__ import annotations

import random
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass
from functools import cached_property, lru_cache
from itertools import chain
from typing import Protocol

import torch

from gpt.tensors import float_tensor, long_tensor


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

    @cached_property
    def row_settings(self) -> tuple[float, float, float, float, float]:
        """Temperature, top-k, top-p, min-p and typical-p as the batched sampler's columns, with
        the off values that change nothing (k = 2**24, any p past 1 taken as 2, min-p 0)."""
        return (self.temperature or 1.0, float(self.top_k or 2**24),
                self.top_p if self.uses_top_p else 2.0, self.min_p or 0.0,
                self.typical_p if self.uses_typical_p else 2.0)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_top_p(self) -> bool:
        return (self.top_p or 1.0) < 1.0

    @property
    def uses_typical_p(self) -> bool:
        return (self.typical_p or 1.0) < 1.0

    @property
    def filters(self) -> bool:
        """Whether the sorted-row filters (top-k, top-p, min-p) change anything."""
        return self.top_k is not None or self.uses_top_p or bool(self.min_p)

    @property
    def counts_generated(self) -> bool:
        """Whether the presence or frequency penalty needs counts of the generated characters."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0


def new_seed(seed: int | None) -> int:
    """The seed a request samples from: its own, or a random one to report back."""
    return random.randrange(2**63) if seed is None else seed


# --- Counter-based noise ------------------------------------------------------------------------

MASK64 = 2**64 - 1
GOLDEN_GAMMA = 0x9E3779B97F4A7C15


def splitmix64(x: int) -> int:
    """splitmix64's finaliser (Steele, Lea and Flood 2014) on an unsigned 64-bit integer: every output
    bit depends on every input bit. Plain Python integers: exact, and the same on every machine."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


@lru_cache(maxsize=4096)
def seed_key(seed: int) -> int:
    """A seed's own stream key, computed once per seed."""
    return splitmix64((seed + GOLDEN_GAMMA) & MASK64)


def uniform(key: int, position: int) -> float:
    """A uniform number in (0, 1): a function of a row's seed key and position alone. A dozen integer
    operations per row on the host cost less than a dozen tensor calls for a whole batch."""
    return ((splitmix64((key + position * GOLDEN_GAMMA) & MASK64) >> 11) + 0.5) * 2.0**-53


# --- Logits processors over (R, V), each row with its own setting --------------------------------

def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """Divide positive and multiply negative logits of the characters marked in `seen` (R, V) bool by
    each row's penalty (R, 1) (CTRL's rule, as Hugging Face applies it)."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def apply_presence_frequency(logits: torch.Tensor, counts: torch.Tensor, presence: torch.Tensor,
                             frequency: torch.Tensor) -> torch.Tensor:
    """OpenAI's penalties: subtract `presence` (R, 1) from every character generated at least once
    and `frequency` (R, 1) times the number of times it was generated (counts (R, V))."""
    return logits - presence * (counts > 0) - frequency * counts


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Divide each row by its temperature (R, 1)."""
    return logits / temperature


def finite(logits: torch.Tensor) -> torch.Tensor:
    """Infinities from overflow (a tiny temperature, an extreme penalty) as float32's largest finite
    numbers, so that no row turns into NaN and the most likely character stays the most likely."""
    return torch.nan_to_num(logits)


def typical_mask(logits: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Locally typical sampling (Meister et al. 2022): True for the characters to drop. Characters are
    taken in order of how close their surprise is to the row's entropy until they hold `mass` (R, 1)
    of the probability; the most likely character is kept too. A mass of 1 or more keeps them all."""
    log_probs = torch.log_softmax(logits, dim=-1)
    probs = log_probs.exp()
    entropy = -(probs * log_probs).nan_to_num().sum(dim=-1, keepdim=True)
    distance = (-log_probs - entropy).abs()
    order = torch.argsort(distance, dim=-1)
    mass_before = probs.gather(-1, order).cumsum(dim=-1) - probs.gather(-1, order)
    drop = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, mass_before >= mass)
    most_likely = logits.argmax(dim=-1, keepdim=True)
    return drop.scatter(-1, most_likely, False)


def sorted_filters_mask(sorted_logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None,
                        min_p: torch.Tensor | None) -> torch.Tensor:
    """True for the sorted entries (R, V, most likely first) that top-k (R, 1) long, top-p (R, 1)
    and min-p (R, 1) drop; None for a filter no row uses. Off values: k >= V, p >= 1 (taken as 2,
    beyond any rounding of the sum), min_p = 0. The first entry is always kept."""
    drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if top_k is not None:
        drop |= torch.arange(sorted_logits.size(-1), device=sorted_logits.device) >= top_k
    if top_p is not None or min_p is not None:
        probs = torch.softmax(sorted_logits, dim=-1)
        if top_p is not None:
            drop |= probs.cumsum(dim=-1) - probs >= top_p  # the mass before each entry
        if min_p is not None:
            drop |= probs < min_p * probs[:, :1]
    drop[:, 0] = False
    return drop


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One index per row (R,), index i with probability probs[i] (rows need not sum to 1): where the
    row's uniform u (R,) falls in its cumulative sum. Entries of probability 0 are never picked."""
    cumulative = probs.double().cumsum(dim=-1)
    picked = torch.searchsorted(cumulative, u[:, None] * cumulative[:, -1:], right=True)
    return picked[:, 0].clamp_(max=probs.size(-1) - 1)


# --- One step for a batch of rows ----------------------------------------------------------------

class RowState(Protocol):
    """What a row's sampling needs besides its logits: its settings and seed, how many tokens it has
    sampled (the noise counter), and the history its penalties read (None where they need none)."""

    params: SamplingParams
    seed: int
    position: int
    seen: torch.Tensor | None  # (V,) bool: characters of the prompt and the text so far
    counts: torch.Tensor | None  # (V,) float32: times each character was generated
    bias: torch.Tensor | None  # (V,) float32: the logit bias, dense


@dataclass
class Row:
    """A RowState of plain values, for a row sampled outside a Sequence."""

    params: SamplingParams
    seed: int = 0
    position: int = 0
    seen: torch.Tensor | None = None
    counts: torch.Tensor | None = None
    bias: torch.Tensor | None = None


@dataclass
class Sampled:
    """A step's draws, as Python values: each row's token, its raw log-probability, and (when some
    row asked for them) every row's most likely alternatives."""

    tokens: list[int]
    logprobs: list[float]
    top: list[list[tuple[int, float]]] | None  # None when no row asked for alternatives


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return float_tensor(values, device).float()[:, None]


def sample_rows(logits: torch.Tensor, rows: SequenceOf[RowState], top_n: int = 0) -> Sampled:
    """Each row's next token from its logits (R, V), all rows in one set of tensor ops; `top_n`
    alternatives (0..5) with their log-probabilities for every row. Never raises on finite logits."""
    logits = logits.float()
    device = logits.device
    log_probs = torch.log_softmax(logits, dim=-1)  # the raw distribution, which logprobs report
    params = [row.params for row in rows]

    x = logits
    biased = [i for i, row in enumerate(rows) if row.bias is not None]
    if biased:
        x = x.index_add(0, long_tensor(biased, device),
                        torch.stack([rows[i].bias for i in biased]).to(device))
    penalized = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    if penalized:
        index = long_tensor(penalized, device)
        x = x.index_copy(0, index, apply_repetition_penalty(
            x[index], torch.stack([rows[i].seen for i in penalized]).to(device),
            _column([params[i].repetition_penalty for i in penalized], device)))
    counted = [i for i, p in enumerate(params) if p.counts_generated]
    if counted:
        index = long_tensor(counted, device)
        x = x.index_copy(0, index, apply_presence_frequency(
            x[index], torch.stack([rows[i].counts for i in counted]).to(device),
            _column([params[i].presence_penalty for i in counted], device),
            _column([params[i].frequency_penalty for i in counted], device)))
    overflow_possible = bool(biased or penalized or counted)

    sampling = [i for i, p in enumerate(params) if not p.greedy]
    everyone = len(sampling) == len(rows)
    if not everyone:  # the greedy rows' answer; sampled rows are replaced below
        tokens = (finite(x) if overflow_possible else x).argmax(dim=-1)
    if sampling:
        index = None if everyone else long_tensor(sampling, device)
        chosen = [params[i] for i in sampling]
        settings = float_tensor(chain.from_iterable(p.row_settings for p in chosen), device)
        temperature, top_k, top_p, min_p, typical_p = settings.float().view(-1, 5).split(1, dim=-1)
        u = float_tensor([uniform(seed_key(rows[i].seed), rows[i].position) for i in sampling], device)
        y = x if everyone else x[index]
        if any(p.temperature != 1.0 for p in chosen):
            y = apply_temperature(y, temperature)
            overflow_possible = overflow_possible or min(p.temperature for p in chosen) < 0.01
        if overflow_possible:
            y = finite(y)
        if any(p.uses_typical_p for p in chosen):
            y = y.masked_fill(typical_mask(y, typical_p), float("-inf"))
        if any(p.filters for p in chosen):
            sorted_y, order = torch.sort(y, dim=-1, descending=True)
            drop = sorted_filters_mask(sorted_y, top_k.long() if any(p.top_k for p in chosen) else None,
                                       top_p if any(p.uses_top_p for p in chosen) else None,
                                       min_p if any(p.min_p for p in chosen) else None)
            # Drawn in vocabulary order, as unfiltered rows are: a row's draw must not depend on
            # what the other rows of its batch ask for.
            y = y.masked_fill(torch.empty_like(drop).scatter_(-1, order, drop), float("-inf"))
        picked = draw(torch.softmax(y, dim=-1), u)
        tokens = picked if everyone else tokens.index_copy(0, index, picked)

    chosen_logprobs = log_probs.gather(-1, tokens[:, None])[:, 0]
    top = most_likely(log_probs, top_n) if top_n else None
    return Sampled(tokens.tolist(), chosen_logprobs.tolist(), top)


def most_likely(log_probs: torch.Tensor, n: int) -> list[list[tuple[int, float]]]:
    """The n most likely (token, log-probability) of each row of log_probs (R, V), best first."""
    values, ids = torch.topk(log_probs, min(n, log_probs.size(-1)), dim=-1)
    return [list(zip(row_ids, row_values, strict=True))
            for row_ids, row_values in zip(ids.tolist(), values.tolist(), strict=True)]


def dense_bias(logit_bias: tuple[tuple[int, float], ...], vocab_size: int) -> torch.Tensor | None:
    """A logit bias as a (V,) float32 tensor to add to a row, or None when there is none."""
    if not logit_bias:
        return None
    bias = torch.zeros(vocab_size)
    for token, value in logit_bias:
        if not 0 <= token < vocab_size:
            raise ValueError(f"logit_bias: token id {token} is not in the vocabulary (0..{vocab_size - 1})")
        bias[token] = value
    return bias

"""Scoring a text: each character's log-probability given the ones before it.

A text longer than the context is read in windows that slide by half a context; each window scores
only the characters the previous one did not, so every character is scored exactly once, with at
least half a context before it (except at the very start). Training's held-out loss uses the same
windows.
"""

from __future__ import annotations

import torch

from gpt.model import GPT
from gpt.sampling import most_likely


def sliding_windows(length: int, block_size: int) -> list[tuple[int, int, int]]:
    """Windows over a text of `length` tokens: (begin, end, n_scored), inputs ids[begin:end] predict
    ids[begin + 1:end + 1], of which the last n_scored are new. Together they score ids[1:] once."""
    stride = max(1, block_size // 2)
    windows, scored_to = [], 0
    for begin in range(0, length - 1, stride):
        end = min(begin + block_size, length - 1)
        windows.append((begin, end, end - scored_to))
        scored_to = end
        if end == length - 1:
            break
    return windows


@torch.inference_mode()
def score(model: GPT, ids: list[int], top_n: int = 0
          ) -> list[tuple[int, float, list[tuple[int, float]]]]:
    """(token, log-probability, the top_n most likely (token, log-probability)) for ids[1:], each
    given the tokens before it, in one forward per window."""
    if len(ids) < 2:
        return []
    device = next(model.parameters()).device
    tokens = torch.tensor(ids, device=device)
    windows = sliding_windows(len(ids), model.config.block_size)
    scored: list[tuple[int, float, list[tuple[int, float]]]] = []
    for begin, end, n_scored in windows:  # usually one; a long text's are scored one after another
        logits, _ = model(tokens[begin:end][None])
        log_probs = torch.log_softmax(logits[0, -n_scored:].float(), dim=-1)
        targets = tokens[end - n_scored + 1:end + 1]
        chosen = log_probs.gather(-1, targets[:, None])[:, 0].tolist()
        top = most_likely(log_probs, top_n) if top_n else [[] for _ in chosen]
        scored += zip(targets.tolist(), chosen, top, strict=True)
    return scored

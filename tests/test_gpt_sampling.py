"""Sampling functions, each on its own."""

import pytest
import torch

from gpt.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    greedy_tokens,
    is_plain_greedy,
    make_generator,
    sample_token,
)

NOTHING_SEEN = torch.zeros(5, dtype=torch.bool)


def test_temperature_zero_is_argmax():
    logits = torch.tensor([0.1, 2.0, -1.0, 1.9, 0.0])
    generator, _ = make_generator(0)
    assert sample_token(logits, SamplingParams(temperature=0), NOTHING_SEEN, generator) == 1


def test_batched_greedy_is_each_rows_argmax():
    torch.manual_seed(0)
    logits = torch.randn(6, 65)
    generator, _ = make_generator(0)
    assert greedy_tokens(logits) == [sample_token(row, SamplingParams(temperature=0), None, generator)
                                     for row in logits]
    # A repetition penalty changes the logits first: such rows are not shared greedy rows.
    assert is_plain_greedy(SamplingParams(temperature=0))
    assert not is_plain_greedy(SamplingParams(temperature=0, repetition_penalty=1.3))
    assert not is_plain_greedy(SamplingParams(temperature=0.7))


def test_top_k_one_equals_greedy():
    torch.manual_seed(0)
    for _ in range(20):
        logits = torch.randn(5)
        generator, _ = make_generator(None)
        picked = sample_token(logits, SamplingParams(temperature=1.5, top_k=1), NOTHING_SEEN, generator)
        assert picked == int(torch.argmax(logits))


def test_top_k_keeps_the_k_largest():
    kept = apply_top_k(torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0]), 3)
    assert torch.isfinite(kept).tolist() == [False, True, True, True, False]


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3, 0.0])
    logits = torch.log(probs)
    # 0.5 alone does not reach 0.7; 0.5 + 0.3 does, so two are kept.
    assert torch.isfinite(apply_top_p(logits, 0.7)).tolist() == [False, True, False, True, False]
    # Exactly reaching p needs no more characters.
    assert torch.isfinite(apply_top_p(logits, 0.8)).tolist() == [False, True, False, True, False]
    assert torch.isfinite(apply_top_p(logits, 0.81)).tolist() == [False, True, True, True, False]
    # The most likely character is always kept.
    assert torch.isfinite(apply_top_p(logits, 0.01)).tolist() == [False, True, False, False, False]


@pytest.mark.parametrize("p", [5e-324, 1e-46, 1e-300])
def test_a_top_p_that_rounds_to_zero_in_float32_still_keeps_the_most_likely_character(p):
    logits = torch.log(torch.tensor([0.05, 0.5, 0.15, 0.3]))
    assert torch.isfinite(apply_top_p(logits, p)).tolist() == [False, True, False, False]
    params = SamplingParams(temperature=1.0, top_p=p)
    assert sample_token(logits, params, None, torch.Generator().manual_seed(0)) == 1


def test_repetition_penalty_lowers_seen_characters_only():
    logits = torch.tensor([2.0, -2.0, 2.0, -2.0, 1.0])
    seen = torch.tensor([True, True, False, False, False])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [1.0, -4.0, 2.0, -2.0, 1.0]


def test_same_seed_same_draws():
    logits = torch.zeros(5)
    draws = []
    for _ in range(2):
        generator, seed = make_generator(42)
        draws.append([sample_token(logits, SamplingParams(), NOTHING_SEEN, generator) for _ in range(30)])
        assert seed == 42
    assert draws[0] == draws[1]
    assert len(set(draws[0])) > 1


def test_sampling_follows_the_distribution():
    """2,000 draws from p = (0.7, 0.2, 0.1, 0, 0): each frequency within 0.05 of p. With a fixed
    seed this is deterministic; for a random seed the chance of a false failure is below 1e-6."""
    logits = torch.log(torch.tensor([0.7, 0.2, 0.1, 0.0, 0.0]))
    generator, _ = make_generator(3)
    counts = torch.bincount(torch.tensor([sample_token(logits, SamplingParams(), NOTHING_SEEN, generator)
                                          for _ in range(2000)]), minlength=5)
    assert torch.allclose(counts / 2000, torch.tensor([0.7, 0.2, 0.1, 0.0, 0.0]), atol=0.05)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5),
                                 dict(repetition_penalty=0)])
def test_invalid_params_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)

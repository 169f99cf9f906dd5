"""The batched sampler: each processor on its own, the counter-based noise, and whole steps."""

import math

import numpy as np
import pytest
import torch

from gpt.sampling import (
    BatchSettings,
    Row,
    SamplingParams,
    apply_filters,
    apply_presence_frequency,
    apply_repetition_penalty,
    apply_temperature,
    dense_bias,
    draw,
    finite,
    kept_threshold,
    sample_rows,
    splitmix64,
    stream_keys,
    typical_mask,
    uniforms,
)


def kept(sorted_logits: torch.Tensor, threshold: torch.Tensor) -> list[list[bool]]:
    return (sorted_logits >= threshold).tolist()


def test_splitmix64_gives_the_reference_stream():
    # SplitMix64 from state 0 (Steele, Lea and Flood; Vigna's reference code): its first three outputs.
    states = np.arange(1, 4, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    assert splitmix64(states).tolist() == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]


def test_uniforms_are_in_the_open_interval_and_look_uniform():
    # Neighbouring seeds at one position, and one seed along its positions: both look uniform.
    for u in (torch.from_numpy(uniforms(stream_keys(range(100_000)), [0] * 100_000)),
              torch.from_numpy(uniforms(stream_keys([7]), np.arange(100_000)))):
        assert 0 < u.min() and u.max() < 1
        assert abs(u.mean().item() - 0.5) < 0.005
        assert abs(u.var().item() - 1 / 12) < 0.002
        assert abs(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1]) < 0.01
        assert torch.histc(u.float(), bins=10, min=0, max=1).sub(10_000).abs().max() < 500
    # Seeds past int64, negative seeds and the largest positions stay in range.
    extremes = uniforms(stream_keys([2**64 - 1, -5, 2**70]), [2**40, 0, 1])
    assert ((0 < extremes) & (extremes < 1)).all()


def test_the_noise_table_gives_each_row_its_own_uniform_at_its_own_position():
    rows = [Row(SamplingParams(seed=s), seed=s, position=p) for s, p in ((3, 0), (4, 17), (5, 200))]
    batch = BatchSettings(rows, torch.device("cpu"), 65)
    for step in (0, 1, 63, 64, 65, 7):  # within the table, past its end, and back before its start
        positions = [row.position + step for row in rows]
        expected = uniforms(stream_keys([3, 4, 5]), positions)
        assert batch.noise(positions).tolist() == expected.tolist()
    # Rows out of step with each other get their own uniforms all the same.
    assert batch.noise([1, 0, 5]).tolist() == uniforms(stream_keys([3, 4, 5]), [1, 0, 5]).tolist()


def test_draw_picks_by_the_cumulative_distribution_and_never_a_zero():
    logits = torch.log(torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]])).expand(5, 5)
    u = torch.tensor([1e-12, 0.49, 0.5, 0.51, 1 - 1e-16], dtype=torch.float64)
    assert draw(logits, u).tolist() == [1, 1, 1, 3, 3]  # 0.5 is where the first entry's mass ends
    # Logits are relative: adding a constant changes nothing.
    assert draw(logits + 7, u).tolist() == [1, 1, 1, 3, 3]
    # The largest uniform there is never runs past the last entry, even with the last entries at 0.
    assert draw(logits, torch.full((5,), 1 - 2.0**-54, dtype=torch.float64)).tolist() == [3] * 5


def test_temperature_zero_is_argmax_of_each_row():
    torch.manual_seed(0)
    logits = torch.randn(6, 65)
    sampled = sample_rows(logits, [Row(SamplingParams(temperature=0), seed=i) for i in range(6)])
    assert sampled.tokens == logits.argmax(-1).tolist()


def test_top_k_one_equals_greedy():
    torch.manual_seed(0)
    logits = torch.randn(20, 5)
    rows = [Row(SamplingParams(temperature=1.5, top_k=1), seed=i) for i in range(20)]
    assert sample_rows(logits, rows).tokens == logits.argmax(-1).tolist()


def column(*values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)[:, None]


def test_top_k_keeps_the_k_largest_per_row():
    sorted_logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]] * 2)
    top_k = column(2, 4, dtype=torch.long)  # k - 1: k = 3 and k = 5
    threshold = kept_threshold(sorted_logits, top_k, column(2.0, 2.0), column(-math.inf, -math.inf))
    assert kept(sorted_logits, threshold) == [[True, True, True, False, False], [True] * 5]
    # Filters no row uses are left out, with the same result.
    assert torch.equal(kept_threshold(sorted_logits, top_k, None, None), threshold)
    assert all(all(row) for row in kept(sorted_logits, kept_threshold(sorted_logits, None, None, None)))
    # topk's partial sort (the largest k) and a whole sort give the same filtered logits.
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0], [2.0, 1.0, 5.0, 3.0, 4.0]])
    partial = apply_filters(logits, top_k, None, None, largest=5)
    assert torch.equal(partial, apply_filters(logits, top_k, None, None))
    top_2 = apply_filters(logits, column(1, 1, dtype=torch.long), None, None, largest=2)
    assert torch.equal(top_2.isfinite(), logits >= 4)
    # Every row keeping the same k (kthvalue's selection) gives what a whole sort gives, ties included.
    torch.manual_seed(0)
    logits = torch.randn(50, 65).mul(2).round()  # many ties
    for k in (1, 2, 7, 40, 64):
        same_k = torch.full((50, 1), k - 1)
        assert torch.equal(apply_filters(logits, same_k, None, None, largest=k, shared_k=True),
                           apply_filters(logits, same_k, None, None))


def test_top_k_keeps_characters_tied_with_the_kth():
    sorted_logits = torch.tensor([[3.0, 2.0, 2.0, 1.0]])
    assert kept(sorted_logits, kept_threshold(sorted_logits, column(1, dtype=torch.long), None, None)) == \
        [[True, True, True, False]]


def test_top_p_keeps_the_smallest_set_reaching_p():
    sorted_logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0]]))

    def top_p(p: float) -> list[bool]:
        return kept(sorted_logits, kept_threshold(sorted_logits, column(4, dtype=torch.long), column(p),
                                                  column(-math.inf)))[0]

    # 0.5 alone does not reach 0.7; 0.5 + 0.3 does, so two are kept.
    assert top_p(0.7)[:3] == [True, True, False]
    assert top_p(0.81)[:4] == [True] * 3 + [False]
    # The most likely character is always kept, even for a p that rounds to 0 in float32.
    for p in (0.01, 5e-324, 0.0):
        assert top_p(p) == [True] + [False] * 4


def test_min_p_keeps_characters_at_least_that_fraction_of_the_most_likely():
    sorted_logits = torch.log(torch.tensor([[0.5, 0.3, 0.1, 0.06, 0.04]]))
    top_k = column(4, dtype=torch.long)
    threshold = kept_threshold(sorted_logits, top_k, column(2.0), column(math.log(0.15)))
    assert kept(sorted_logits, threshold) == [[True, True, True, False, False]]  # at least 0.075
    threshold = kept_threshold(sorted_logits, column(4, dtype=torch.long), column(2.0), column(0.0))
    assert kept(sorted_logits, threshold) == [[True, False, False, False, False]]


def test_typical_p_keeps_the_characters_closest_to_the_entropy():
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    logits = torch.log(probs)
    entropy = -(probs * logits).sum()
    distance = (-logits[0] - entropy).abs()
    order = distance.argsort().tolist()
    drop = typical_mask(logits, column(probs[0, order[0]].item() + 0.01))
    # The most typical character, then the next one to reach the mass, and the most likely.
    expected = {order[0], order[1], 0}
    assert {i for i in range(4) if not drop[0, i]} == expected
    assert not typical_mask(logits, column(2.0)).any()


def test_repetition_penalty_lowers_seen_characters_only():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False, False, False]])
    assert apply_repetition_penalty(logits, seen, column(2.0)).tolist() == [[1.0, -4.0, 2.0, -2.0, 1.0]]


def test_presence_and_frequency_penalties_follow_openais_formula():
    logits = torch.zeros(1, 4)
    counts = torch.tensor([[0.0, 1.0, 3.0, 0.0]])
    got = apply_presence_frequency(logits, counts, column(0.5), column(0.25))
    assert got.tolist() == [[0.0, -0.75, -1.25, 0.0]]


def test_logit_bias_is_added_before_sampling_and_can_force_a_character():
    bias = dense_bias(((3, 100.0), (0, -100.0)), 5)
    assert bias.tolist() == [-100.0, 0.0, 0.0, 100.0, 0.0]
    logits = torch.tensor([[5.0, 1.0, 0.0, 0.0, 0.0]])
    for seed in range(20):
        assert sample_rows(logits, [Row(SamplingParams(temperature=1.0), seed=seed, bias=bias)]).tokens == [3]
    with pytest.raises(ValueError, match="not in the vocabulary"):
        dense_bias(((5, 1.0),), 5)


def test_extreme_temperatures_never_make_nan():
    logits = torch.tensor([[1e4, -1e4, 3.0]])
    assert torch.isfinite(finite(apply_temperature(logits, column(1e-30)))).all()


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1e-30), SamplingParams(temperature=100.0, top_p=5e-324),
    SamplingParams(repetition_penalty=1e30, temperature=1e-20), SamplingParams(repetition_penalty=1e-30),
    SamplingParams(top_k=10**9, top_p=1e-45, min_p=1.0), SamplingParams(typical_p=1e-40, temperature=1e-6),
    SamplingParams(presence_penalty=1e38, frequency_penalty=1e38, temperature=0.001),
])
def test_hostile_settings_still_sample_a_valid_token(params):
    torch.manual_seed(0)
    logits = torch.randn(3, 65) * 30
    seen = torch.ones(65, dtype=torch.bool)
    counts = torch.full((65,), 2.0)
    sampled = sample_rows(logits, [Row(params, seed=s, seen=seen, counts=counts) for s in range(3)])
    assert all(0 <= token < 65 for token in sampled.tokens)
    assert all(math.isfinite(lp) for lp in sampled.logprobs)


def test_same_seed_same_token_alone_or_in_any_batch():
    torch.manual_seed(0)
    logits = torch.randn(8, 65)
    settings = [SamplingParams(), SamplingParams(temperature=0.8, top_k=20), SamplingParams(top_p=0.9),
                SamplingParams(temperature=0), SamplingParams(min_p=0.05, temperature=1.3),
                SamplingParams(typical_p=0.8), SamplingParams(repetition_penalty=1.3, seed=3),
                SamplingParams(presence_penalty=1.0, frequency_penalty=0.5)]
    seen, counts = torch.rand(65) > 0.5, torch.randint(0, 3, (65,)).float()
    rows = [Row(p, seed=100 + i, position=i, seen=seen, counts=counts) for i, p in enumerate(settings)]
    together = sample_rows(logits, rows, top_n=3)
    for i in range(8):
        alone = sample_rows(logits[i:i + 1], [rows[i]], top_n=3)
        assert alone.tokens[0] == together.tokens[i]
        assert alone.logprobs[0] == pytest.approx(together.logprobs[i], abs=1e-6)


def test_a_batch_kept_over_many_steps_draws_what_each_row_draws_alone():
    # The same rows for 150 steps (past two noise tables), their settings built once, against each
    # row sampled alone for as many steps; one row leaves after 100 steps and the batch is built anew.
    torch.manual_seed(0)
    logits = torch.randn(150, 4, 65)
    # A greedy row's top-k (ignored) beside sampled rows without it.
    settings = [SamplingParams(temperature=0.8, top_p=0.95), SamplingParams(top_p=0.9),
                SamplingParams(temperature=0, top_k=5), SamplingParams(min_p=0.1, temperature=1.2)]

    def run(members: list[int]) -> dict[int, list[int]]:
        rows = {i: Row(settings[i], seed=40 + i, position=3 * i) for i in members}
        drawn: dict[int, list[int]] = {i: [] for i in members}
        batches = []
        for step in range(150):
            if step == 100:
                rows.pop(0, None)
            order = list(rows)
            if not order:
                break
            tokens = sample_rows(logits[step, order], [rows[i] for i in order]).tokens
            batches.append(BatchSettings._last)
            for i, token in zip(order, tokens, strict=True):
                drawn[i].append(token)
                rows[i].position += 1
        if len(members) > 1:
            assert all(batch is batches[0] for batch in batches[:100]) and batches[100] is not batches[99]
        return drawn

    together = run([0, 1, 2, 3])
    for i in range(4):
        assert run([i])[i] == together[i]


def test_sampling_follows_the_distribution():
    """4,000 draws (one per position) from p = (0.7, 0.2, 0.1, 0, 0): each frequency within 0.03."""
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1, 0.0, 0.0]])).expand(4000, 5)
    rows = [Row(SamplingParams(), seed=3, position=i) for i in range(4000)]
    counts = torch.bincount(torch.tensor(sample_rows(logits, rows).tokens), minlength=5)
    assert torch.allclose(counts / 4000, torch.tensor([0.7, 0.2, 0.1, 0.0, 0.0]), atol=0.03)


def test_filtered_draws_follow_the_renormalised_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]])).expand(4000, 4)
    rows = [Row(SamplingParams(top_k=2), seed=9, position=i) for i in range(4000)]
    counts = torch.bincount(torch.tensor(sample_rows(logits, rows).tokens), minlength=4)
    assert torch.allclose(counts / 4000, torch.tensor([2 / 3, 1 / 3, 0.0, 0.0]), atol=0.03)


def test_logprobs_are_the_raw_distributions_with_the_top_alternatives():
    torch.manual_seed(1)
    logits = torch.randn(2, 65)
    rows = [Row(SamplingParams(temperature=0.5, top_k=3), seed=1), Row(SamplingParams(temperature=0), seed=2)]
    sampled = sample_rows(logits, rows, top_n=5)
    raw = torch.log_softmax(logits, -1)
    for i, token in enumerate(sampled.tokens):
        assert sampled.logprobs[i] == pytest.approx(raw[i, token].item(), abs=1e-6)
        ids = [t for t, _ in sampled.top[i]]
        assert ids == raw[i].topk(5).indices.tolist()
        assert [lp for _, lp in sampled.top[i]] == pytest.approx(raw[i].topk(5).values.tolist(), abs=1e-6)
    assert sample_rows(logits, rows).top is None


def test_rows_that_want_no_logprobs_draw_the_same_tokens_without_them():
    torch.manual_seed(2)
    logits = torch.randn(3, 65)
    settings = [SamplingParams(temperature=0.8, top_k=20), SamplingParams(temperature=0),
                SamplingParams(top_p=0.9)]

    def rows(scored: list[bool]) -> list[Row]:
        return [Row(params, seed=5 + i, position=7, scored=wanted)
                for i, (params, wanted) in enumerate(zip(settings, scored, strict=True))]

    everyone = sample_rows(logits, rows([True] * 3))
    nobody = sample_rows(logits, rows([False] * 3))
    one = sample_rows(logits, rows([False, True, False]))
    assert nobody.tokens == one.tokens == everyone.tokens
    assert nobody.logprobs == [0.0] * 3  # no row of the step is scored: none are computed
    assert one.logprobs == pytest.approx(everyone.logprobs, abs=1e-6)
    assert all(lp < 0 for lp in everyone.logprobs)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5),
                                 dict(repetition_penalty=0), dict(min_p=1.5), dict(typical_p=0.0)])
def test_invalid_params_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)

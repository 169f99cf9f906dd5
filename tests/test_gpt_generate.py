"""Generation through the cache against the no-cache oracle; seeds, stop strings, context overflow."""

import contextlib
import sys

import pytest
import torch

from gpt import GPT, KVCache, SamplingParams, Sequence, advance, generate, generate_reference, start
from gpt.generate import StopMatcher, decode_step

GREEDY = SamplingParams(temperature=0)


def run(model: GPT, tokenizer, prompt: str, n: int, params: SamplingParams = GREEDY, stop=()):
    chunks = list(generate(model, tokenizer.encode(prompt), tokenizer.decode, n, params, stop))
    return "".join(c.text for c in chunks), chunks[-1].finish_reason


def test_greedy_through_the_cache_equals_the_reference_for_200_characters(tiny_model, tokenizer):
    # The tiny context is 64, so 200 characters also cross the context limit several times.
    prompt = "BRUTUS.\nNo, Cassius"
    text, reason = run(tiny_model, tokenizer, prompt, 200)
    reference = generate_reference(tiny_model, tokenizer.encode(prompt), tokenizer.decode, 200, GREEDY)
    assert text == tokenizer.decode(reference.generated_ids)
    assert len(text) == 200 and reason == "length"


def test_sampled_text_through_the_cache_equals_the_reference(tiny_model, tokenizer):
    params = SamplingParams(temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.2, seed=7)
    text, _ = run(tiny_model, tokenizer, "CAESAR.", 150, params)
    reference = generate_reference(tiny_model, tokenizer.encode("CAESAR."), tokenizer.decode, 150, params)
    assert text == tokenizer.decode(reference.generated_ids)


def test_same_seed_same_text_alone_and_inside_a_batch_of_8(tiny_model, tokenizer):
    params = SamplingParams(temperature=1.0, top_k=40, seed=1234)
    alone, _ = run(tiny_model, tokenizer, "Friends, Romans", 80, params)

    cache = KVCache(tiny_model.config, max_batch=8)
    seqs, texts = [], []
    others = {2: SamplingParams(temperature=0), 3: SamplingParams(temperature=0, repetition_penalty=1.3),
              6: SamplingParams(temperature=0)}  # greedy rows share one argmax; the penalized one does not
    for row in range(8):
        # Row 5 is ours; the others have other prompts, seeds and settings.
        prompt, p = ("Friends, Romans", params) if row == 5 else \
            ("x" * (row + 1), others.get(row, SamplingParams(seed=row)))
        seqs.append(Sequence(tokenizer.encode(prompt), 80, p, tokenizer.decode, 65, 64))
        texts.append(start(tiny_model, cache, seqs[-1], row))
    while seqs[5].finish_reason is None:
        for i, chunk in enumerate(advance(tiny_model, cache, seqs)):
            texts[i] += chunk
    assert texts[5] == alone
    for row in others:
        assert texts[row] == run(tiny_model, tokenizer, "x" * (row + 1), 80, others[row])[0]
    assert len({t for t in texts}) > 1


def test_different_seeds_give_different_text(tiny_model, tokenizer):
    a, _ = run(tiny_model, tokenizer, "A", 60, SamplingParams(seed=1))
    b, _ = run(tiny_model, tokenizer, "A", 60, SamplingParams(seed=2))
    assert a != b


def test_three_contexts_of_generation_stay_on_the_vocabulary(tiny_model, tokenizer):
    n = 3 * tiny_model.config.block_size
    text, reason = run(tiny_model, tokenizer, "Lend me your ears", n, SamplingParams(seed=3))
    assert len(text) == n and reason == "length"
    assert set(text) <= set(tokenizer.chars)


def test_long_prompt_keeps_its_last_part(tiny_model, tokenizer):
    prompt = tokenizer.encode("Beware the ides of March. " * 10)
    seq = Sequence(prompt, 5, GREEDY, tokenizer.decode, 65, 64)
    assert seq.prompt_truncated and seq.context() == prompt[-48:]
    text, _ = run(tiny_model, tokenizer, "Beware the ides of March. " * 10, 5)
    short, _ = run(tiny_model, tokenizer, tokenizer.decode(prompt[-48:]), 5)
    assert text == short


def test_empty_prompt_starts_from_a_newline(tiny_model, tokenizer):
    assert tokenizer.chars[0] == "\n"
    text, _ = run(tiny_model, tokenizer, "", 30)
    newline, _ = run(tiny_model, tokenizer, "\n", 30)
    assert text == newline and len(text) == 30


def test_zero_new_tokens_finishes_at_once(tiny_model, tokenizer):
    assert run(tiny_model, tokenizer, "abc", 0) == ("", "length")


def test_stop_string_ends_generation_and_is_not_output(tiny_model, tokenizer):
    full, _ = run(tiny_model, tokenizer, "CASSIUS.", 120, SamplingParams(seed=5))
    stop = full[40:43]
    text, reason = run(tiny_model, tokenizer, "CASSIUS.", 120, SamplingParams(seed=5), stop=[stop, "@@"])
    assert reason == "stop"
    assert text == full[:full.index(stop)]


def test_stop_matcher_holds_back_partial_matches():
    matcher = StopMatcher(["END", "xy"])
    assert matcher.push("a") == ("a", False)
    assert matcher.push("E") == ("", False)
    assert matcher.push("N") == ("", False)
    assert matcher.push("o") == ("ENo", False)
    assert matcher.push("x") == ("", False)
    assert matcher.push("y") == ("", True)
    assert StopMatcher(["ab"]).push("zzab") == ("zz", True)
    held = StopMatcher(["abc"])
    held.push("ab")
    assert held.flush() == "ab"


def test_at_most_four_stop_strings():
    import pytest
    with pytest.raises(ValueError, match="at most 4"):
        StopMatcher(["a", "b", "c", "d", "e"])


def test_freeing_a_row_when_the_consumer_stops_early(tiny_model, tokenizer):
    cache = KVCache(tiny_model.config, max_batch=1)
    stream = generate(tiny_model, tokenizer.encode("A"), tokenizer.decode, 50, cache=cache)
    next(stream)
    assert cache.lengths[0] > 0
    stream.close()
    assert cache.lengths[0] == 0


def test_the_cached_path_is_the_same_in_bfloat16_shapes(tokenizer):
    """Dtype is a load-time choice: the same code path runs a bfloat16 model and cache."""
    from tests.conftest import tiny_config
    torch.manual_seed(0)
    model = GPT(tiny_config()).to(torch.bfloat16).eval()
    text = "".join(c.text for c in generate(model, tokenizer.encode("A"), tokenizer.decode, 20, GREEDY))
    assert len(text) == 20


def test_static_decoder_matches_the_dynamic_path(tiny_model, tokenizer):
    """The fixed-shape step that CUDA graphs capture gives the same text; traced here by dynamo with
    the eager backend (the CPU has no CUDA graphs), which also proves it compiles as one graph."""
    from gpt.generate import compile_static_decode
    prompt = tokenizer.encode("Et tu, Brute?")
    dynamic = "".join(c.text for c in generate(tiny_model, prompt, tokenizer.decode, 100, GREEDY))
    cache = KVCache(tiny_model.config, max_batch=3)
    compile_static_decode(tiny_model, cache, backend="eager")
    static = "".join(c.text for c in generate(tiny_model, prompt, tokenizer.decode, 100, GREEDY,
                                               cache=cache, row=1))
    assert static == dynamic


def test_compiled_cpu_decode_matches_the_dynamic_path(tiny_model, tokenizer, monkeypatch):
    """compile_decode on the CPU: inductor's graphs of the step give the eager path's logits for rows
    at different positions and for one row, and the same text as rows join, leave and slide their
    window: the graph of one row, that of up to COMPILED_CPU_MAX_ROWS (here 2) rows with the
    weights frozen and packed, and that of more rows (the steps of 3), on MKL's products. Those three graphs
    serve every step, the ones that attend over the whole cache included."""
    from torch._dynamo.utils import counters

    from gpt.generate import compile_decode
    monkeypatch.setattr(sys.modules["gpt.generate"], "COMPILED_CPU_MAX_ROWS", 2)
    graphs_before = counters["stats"]["unique_graphs"]
    prompts = [tokenizer.encode(p) for p in ("Et tu, Brute?", "CASSIUS.", "Beware the ides of March")]
    caches = {name: KVCache(tiny_model.config, max_batch=4) for name in ("eager", "compiled")}
    compile_decode(tiny_model, caches["compiled"])
    logits: dict[str, list[torch.Tensor]] = {name: [] for name in caches}
    texts: dict[str, list[list[int]]] = {}
    for name, cache in caches.items():
        seqs = [Sequence(p, 100, GREEDY, tokenizer.decode, 65, tiny_model.config.block_size) for p in prompts]
        for seq, row in zip(seqs, (2, 0, 3), strict=True):
            start(tiny_model, cache, seq, row)
        for rows in ([2, 0, 3], [0, 3], [3]):
            # The compiled step enters inference mode itself, so that no graph is an autograd graph
            # (CompiledRowsStep.run says why); the eager one is called as the engine calls it.
            with torch.inference_mode() if name == "eager" else contextlib.nullcontext():
                step_logits = decode_step(tiny_model, cache, rows, [1] * len(rows))
            assert not step_logits.requires_grad
            logits[name].append(step_logits)
        for row in (2, 0, 3):
            cache.free(row)
        seqs = [Sequence(p, 100, GREEDY, tokenizer.decode, 65, tiny_model.config.block_size) for p in prompts]
        start(tiny_model, cache, seqs[0], 1)
        for _ in range(10):
            advance(tiny_model, cache, seqs[:1])
        start(tiny_model, cache, seqs[1], 0)
        start(tiny_model, cache, seqs[2], 3)
        for step in range(80):  # past the tiny context of 64: rows slide and are prefilled again
            advance(tiny_model, cache, seqs if step < 40 else seqs[1:])  # the first leaves at 40
        texts[name] = [seq.generated_ids for seq in seqs]
    for eager, compiled in zip(logits["eager"], logits["compiled"], strict=True):
        torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    assert texts["compiled"] == texts["eager"]
    assert [len(ids) for ids in texts["eager"]] == [51, 81, 81]
    # Measuring the boundary runs both graphs at 2 and 4 rows: no new graph, and no length moves.
    step = caches["compiled"].compiled_step
    lengths = list(caches["compiled"].lengths)
    assert step.choose_boundary(4, position=20) == step.max_few_rows in (1, 2, 4)
    assert caches["compiled"].lengths == lengths
    assert counters["stats"]["unique_graphs"] - graphs_before == 3


def test_the_boundary_sits_below_the_first_row_count_where_the_many_rows_graph_wins():
    from gpt.generate import boundary_from_times
    times = {2: (1.0, 2.0), 4: (2.0, 2.5), 8: (4.0, 3.0), 16: (8.0, 5.0)}  # (few, many) by rows
    assert boundary_from_times(times, default=24) == 4
    assert boundary_from_times({2: (1.0, 0.5), 4: (2.0, 1.0)}, default=24) == 1  # only one row: few
    assert boundary_from_times({2: (1.0, 2.0), 32: (3.0, 4.0)}, default=24) == 32  # never: the largest
    assert boundary_from_times({}, default=24) == 24


@pytest.mark.parametrize("dtype, cache_dtype",
                         [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float16)],
                         ids=["bfloat16", "float32 with a float16 cache"])
def test_compiled_cpu_decode_in_a_narrower_dtype_matches_the_eager_step(tokenizer, monkeypatch, dtype,
                                                                         cache_dtype):
    """A bfloat16 model's step runs the many-rows graph alone, on oneDNN's bfloat16 products, a single
    row sent twice (one graph); a float32 model over a float16 cache keeps float32's boundary (here 2:
    the 3-row step runs the many-rows graph, the one-row step the packed-GEMM template; two graphs),
    as the boundary is about the products' dtype, not the cache's, and its graphs read the float16
    keys and values as the eager step does. Each gives the eager step's logits to its precision."""
    from torch._dynamo.utils import counters

    from gpt.generate import compile_decode
    from tests.conftest import tiny_config
    monkeypatch.setattr(sys.modules["gpt.generate"], "COMPILED_CPU_MAX_ROWS", 2)
    torch.manual_seed(1234)
    model = GPT(tiny_config(tokenizer.vocab_size)).to(dtype).eval()
    graphs_before = counters["stats"]["unique_graphs"]
    prompts = [tokenizer.encode(p) for p in ("Et tu, Brute?", "CASSIUS.", "Beware the ides of March")]
    logits = {}
    for name in ("eager", "compiled"):
        cache = KVCache(model.config, max_batch=3, dtype=cache_dtype)
        if name == "compiled":
            compile_decode(model, cache)
            assert cache.compiled_step.max_few_rows == (2 if dtype == torch.float32 else 0)
        for row, prompt in enumerate(prompts):
            start(model, cache, Sequence(prompt, 10, GREEDY, tokenizer.decode, 65, 64), row)
        with torch.inference_mode():
            logits[name] = [decode_step(model, cache, rows, [1] * len(rows)) for rows in ([0, 1, 2], [1])]
    assert counters["stats"]["unique_graphs"] - graphs_before == (2 if dtype == torch.float32 else 1)
    for eager, compiled in zip(logits["eager"], logits["compiled"], strict=True):
        assert compiled.dtype == dtype and compiled.shape == eager.shape
        # bfloat16's rounding moves these logits (std about 0.15) by up to 0.004 between the two; with
        # float32 products over the same float16 keys and values, only the order of the sums differs.
        tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(compiled.float(), eager.float(), atol=tolerance, rtol=tolerance)


def test_a_bfloat16_row_gets_the_same_logits_alone_and_in_a_batch():
    """The compiled bfloat16 step on the CPU gives a row the same logits, to the bit, whether it steps
    alone or among 16 rows: here the shipped caesar-small in bfloat16, each row fed a line of the play.
    While a single row ran the packed-GEMM template's graph and 16 rows oneDNN's, which round
    differently in bfloat16, this row's logits parted at the 31st step, and sampled texts of the same
    seed alone and in a batch of 40 differed for 6 seeds out of 10 (docs/benchmarks.md)."""
    from gpt import load_checkpoint
    from gpt.generate import compile_decode
    from tests.conftest import REPO
    checkpoint = load_checkpoint(REPO / "checkpoints" / "caesar-small", dtype=torch.bfloat16)
    model, tokenizer = checkpoint.model, checkpoint.tokenizer
    lines = ["BRUTUS.\nI know not, gentle friend, what you would have me do; but let us",
             "CASSIUS.\nWhy, man, he doth bestride the narrow world like a Colossus, and we",
             "ANTONY.\nFriends, Romans, countrymen, lend me your ears; I come to bury Caesar",
             "CAESAR.\nThe ides of March are come. Cowards die many times before their deaths"]
    rows = 16
    texts = [tokenizer.encode(lines[row % 4]) for row in range(rows)]
    caches = {size: KVCache(model.config, max_batch=rows, dtype=torch.bfloat16)
              for size in ("alone", "batch")}
    for cache in caches.values():
        compile_decode(model, cache)
        for row, text in enumerate(texts):
            start(model, cache, Sequence(text[:8], 1, GREEDY, tokenizer.decode, tokenizer.vocab_size,
                                         model.config.block_size), row)
    with torch.inference_mode():
        for position in range(8, 60):
            alone = decode_step(model, caches["alone"], [1], [texts[1][position]])
            batch = decode_step(model, caches["batch"], list(range(rows)), [text[position] for text in texts])
            assert torch.equal(alone[0], batch[1]), f"position {position}"


def test_the_compiled_cpu_step_refuses_a_position_past_the_cache(tiny_model):
    """The eager path's error, raised before the graph runs, and no length moves."""
    from gpt.generate import compile_decode
    cache = KVCache(tiny_model.config, max_batch=2, max_len=8)
    compile_decode(tiny_model, cache)
    cache.lengths = [3, 8]
    with torch.inference_mode(), pytest.raises(ValueError, match="position 8 is past the cache length 8"):
        decode_step(tiny_model, cache, [0, 1], [1, 1])
    assert cache.lengths == [3, 8]

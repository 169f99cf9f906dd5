"""The model: parameter count, GPT-2 names, causality, and the cached path against a full forward."""

import math

import pytest
import torch

from gpt import GPT, PRESETS, GPTConfig, KVCache, decode_step, prefill
from tests.conftest import tiny_config


def test_seed_preset_has_the_seed_parameter_count():
    with torch.device("meta"):
        model = GPT(GPTConfig(**{**PRESETS["seed"].to_dict(), "vocab_size": 65}))
    assert model.num_parameters() == 85_942_272


def test_parameter_names_follow_gpt2():
    names = set(GPT(tiny_config()).state_dict())
    for expected in ["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight",
                     "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias",
                     "transformer.h.0.attn.c_proj.weight", "transformer.h.1.ln_2.bias",
                     "transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_proj.bias",
                     "transformer.ln_f.weight", "lm_head.weight"]:
        assert expected in names
    assert "lm_head.bias" not in names


@pytest.mark.parametrize("shape", [(1, 1, 512), (8, 1, 512), (1, 40, 512), (3, 50, 512)])
def test_the_few_row_cpu_routes_equal_nn_linear(shape):
    """gpt.model.Linear takes its own routes for few rows at inference through a weight that
    streams from memory (1.25 MiB here); they must give F.linear's result."""
    from gpt.model import Linear
    layer = Linear(512, 640)
    x = torch.randn(shape)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("in_features", "rows", "route"), [
    (512, 1, "blocked_linear"), (512, 8, "weight_first_linear"), (512, 65, None),
    (64, 1, None), (64, 8, None)])  # 64 x 640 floats: 160 KiB, in cache
def test_few_rows_through_a_streamed_weight_take_the_cpu_routes(monkeypatch, in_features, rows, route):
    import gpt.model
    taken = []
    for name in ("blocked_linear", "weight_first_linear"):
        original = getattr(gpt.model, name)
        monkeypatch.setattr(gpt.model, name,
                            lambda *args, name=name, original=original: taken.append(name) or original(*args))
    layer = gpt.model.Linear(in_features, 640)
    with torch.no_grad():
        layer(torch.randn(rows, 1, in_features))
    assert taken == ([route] if route else [])


@pytest.mark.parametrize("blocks", [1, 2, 3, 4])
def test_the_blocked_one_row_route_equals_nn_linear(blocks):
    """One row at inference goes through a batched product over blocks of the weight's rows (one
    per thread); any block count must give F.linear's result."""
    from gpt.model import blocked_linear
    layer = torch.nn.Linear(64, 192)
    x = torch.randn(1, 1, 64)
    with torch.no_grad():
        expected = torch.nn.functional.linear(x, layer.weight, layer.bias)
        torch.testing.assert_close(blocked_linear(x, layer.weight, layer.bias, blocks), expected,
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(blocked_linear(x, layer.weight, None, blocks),
                                   expected - layer.bias, atol=1e-5, rtol=1e-5)


def test_blocks_divide_the_output_rows():
    from gpt.model import blocks_for
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        assert [blocks_for(torch.empty(n, 768)) for n in (2304, 3072, 510, 347)] == [4, 4, 3, 1]
    finally:
        torch.set_num_threads(saved)


def test_initial_loss_is_about_uniform(tiny_model):
    idx = torch.randint(0, 65, (4, 32))
    _, loss = tiny_model(idx, targets=idx)
    assert abs(loss.item() - math.log(65)) < 0.3


def test_changing_a_future_token_leaves_past_logits_alone(tiny_model):
    idx = torch.randint(0, 65, (1, 20))
    changed = idx.clone()
    changed[0, 15] = (changed[0, 15] + 1) % 65
    a, _ = tiny_model(idx)
    b, _ = tiny_model(changed)
    torch.testing.assert_close(a[:, :15], b[:, :15])
    assert not torch.allclose(a[:, 15:], b[:, 15:])


def test_rejects_sequences_longer_than_the_context(tiny_model):
    with pytest.raises(ValueError, match="exceeds the context"):
        tiny_model(torch.zeros(1, 65, dtype=torch.long))


def full_logits(model: GPT, ids: list[int]) -> torch.Tensor:
    logits, _ = model(torch.tensor([ids]))
    return logits[0]


def test_prefill_then_decode_equals_a_full_forward(tiny_model):
    ids = torch.randint(0, 65, (40,)).tolist()
    cache = KVCache(tiny_model.config, max_batch=2)
    with torch.no_grad():
        logits = [prefill(tiny_model, cache, 1, ids[:10])]
        for token in ids[10:]:
            logits.append(decode_step(tiny_model, cache, [1], [token])[0])
        expected = full_logits(tiny_model, ids)
    torch.testing.assert_close(torch.stack(logits), expected[9:], atol=1e-5, rtol=0)


def test_one_decode_step_advances_rows_at_different_positions(tiny_model):
    """Rows of different lengths, in a scattered order, one batched step: each matches its own
    full forward; then a freed row is reused by a new sequence without disturbing the others."""
    torch.manual_seed(0)
    texts = {0: torch.randint(0, 65, (30,)).tolist(), 2: torch.randint(0, 65, (7,)).tolist(),
             3: torch.randint(0, 65, (18,)).tolist()}
    cache = KVCache(tiny_model.config, max_batch=4)
    with torch.no_grad():
        for row, ids in texts.items():
            prefill(tiny_model, cache, row, ids[:-3])
        for step in (3, 2, 1):
            rows = [3, 0, 2]  # not in order and not consecutive: the gather path
            batch = decode_step(tiny_model, cache, rows, [texts[r][-step] for r in rows])
            for row, row_logits in zip(rows, batch, strict=True):
                n = len(texts[row]) - step + 1
                torch.testing.assert_close(row_logits, full_logits(tiny_model, texts[row][:n])[-1],
                                           atol=1e-5, rtol=0)
        # Row 2 finishes; a new, longer sequence takes it over.
        cache.free(2)
        reused = torch.randint(0, 65, (25,)).tolist()
        prefill(tiny_model, cache, 2, reused[:-1])
        batch = decode_step(tiny_model, cache, [0, 2, 3], [5, reused[-1], 6])  # consecutive: the view path
        torch.testing.assert_close(batch[1], full_logits(tiny_model, reused)[-1], atol=1e-5, rtol=0)
        torch.testing.assert_close(batch[0], full_logits(tiny_model, texts[0] + [5])[-1], atol=1e-5, rtol=0)
        torch.testing.assert_close(batch[2], full_logits(tiny_model, texts[3] + [6])[-1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("rows", [[1, 2, 3], [0, 3]])
def test_rows_at_the_same_position_need_no_mask(tiny_model, rows):
    """Rows that all sit at one position skip the mask (and, when consecutive, write the cache
    through a slice); each still matches its own full forward."""
    from gpt.model import CacheRows
    torch.manual_seed(1)
    texts = {row: torch.randint(0, 65, (12,)).tolist() for row in rows}
    cache = KVCache(tiny_model.config, max_batch=4)
    assert CacheRows.build(rows, [11] * len(rows), 1, torch.device("cpu")).mask is None
    with torch.no_grad():
        for row in rows:
            prefill(tiny_model, cache, row, texts[row][:-2])
        for step in (2, 1):
            batch = decode_step(tiny_model, cache, rows, [texts[r][-step] for r in rows])
            for row, row_logits in zip(rows, batch, strict=True):
                expected = full_logits(tiny_model, texts[row][:len(texts[row]) - step + 1])[-1]
                torch.testing.assert_close(row_logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("rows", [[0, 1, 2], [3, 0, 2]])
def test_prompts_of_different_lengths_prefill_together(tiny_model, rows):
    """One padded forward for several prompts: each row's last logits, and the decode steps after
    it, match that row's own full forward (the padding past a short prompt is never attended to)."""
    from gpt.generate import prefill_rows
    torch.manual_seed(2)
    texts = [torch.randint(0, 65, (n,)).tolist() for n in (9, 30, 17)]
    cache = KVCache(tiny_model.config, max_batch=4)
    with torch.no_grad():
        first = prefill_rows(tiny_model, cache, rows, [t[:-2] for t in texts])
        for row_logits, text in zip(first, texts, strict=True):
            torch.testing.assert_close(row_logits, full_logits(tiny_model, text[:-2])[-1], atol=1e-5, rtol=0)
        assert [cache.lengths[r] for r in rows] == [len(t) - 2 for t in texts]
        for step in (2, 1):
            batch = decode_step(tiny_model, cache, rows, [t[-step] for t in texts])
            for row_logits, text in zip(batch, texts, strict=True):
                expected = full_logits(tiny_model, text[:len(text) - step + 1])[-1]
                torch.testing.assert_close(row_logits, expected, atol=1e-5, rtol=0)


def test_a_float16_cache_of_a_float32_model_gives_its_logits_to_float16_precision(tiny_model):
    """Keys and values stored in float16 and read back in float32 (KVCache's dtype), through every way a
    step reaches the cache: a padded prefill of different lengths (mask, SDPA), steps of scattered rows
    at different positions (the gather and the mask) and of consecutive rows at one position (the view)."""
    from gpt.generate import prefill_rows
    torch.manual_seed(3)
    texts = [torch.randint(0, 65, (n,)).tolist() for n in (9, 30, 17)]
    caches = {dtype: KVCache(tiny_model.config, max_batch=4, dtype=dtype)
              for dtype in (torch.float32, torch.float16)}
    nbytes = {dtype: sum(t.nbytes for t in cache.k + cache.v) for dtype, cache in caches.items()}
    assert nbytes[torch.float16] * 2 == nbytes[torch.float32]
    logits = {}
    with torch.no_grad():
        for dtype, cache in caches.items():
            steps = [prefill_rows(tiny_model, cache, [3, 0, 2], [t[:-3] for t in texts])]
            steps += [decode_step(tiny_model, cache, [3, 0, 2], [t[-step] for t in texts]) for step in (3, 2)]
            prefill_rows(tiny_model, cache, [1], [texts[1][:-1]])  # row 1 to where row 0 is now
            steps.append(decode_step(tiny_model, cache, [0, 1], [5, 5]))
            logits[dtype] = torch.cat(steps)
    assert all(t.dtype == torch.float16 for t in caches[torch.float16].k + caches[torch.float16].v)
    # float16 keeps 11 significant bits: these logits (std about 0.3) move by a few thousandths at most.
    torch.testing.assert_close(logits[torch.float16], logits[torch.float32], atol=5e-3, rtol=0)
    assert not torch.equal(logits[torch.float16], logits[torch.float32])


def test_padding_groups_keep_the_waste_bounded():
    from gpt.generate import padding_groups
    assert padding_groups([10, 11, 10, 12]) == [[0, 2, 1, 3]]
    groups = padding_groups([1000, 5, 6, 900, 5])
    assert sorted(i for g in groups for i in g) == [0, 1, 2, 3, 4]
    assert [1, 4, 2] in groups and [3, 0] in groups
    lengths = [3, 50, 7, 64, 1, 20, 22, 19]
    for group in padding_groups(lengths):
        padded = max(lengths[i] for i in group) * len(group)
        assert padded <= 1.25 * sum(lengths[i] for i in group)
    assert padding_groups([100] * 5, max_tokens=250) == [[0, 1], [2, 3], [4]]


def test_cache_is_written_in_place(tiny_model):
    cache = KVCache(tiny_model.config, max_batch=2)
    buffers = [t.data_ptr() for t in cache.k + cache.v]
    with torch.no_grad():
        prefill(tiny_model, cache, 0, [1, 2, 3])
        decode_step(tiny_model, cache, [0], [4])
    assert [t.data_ptr() for t in cache.k + cache.v] == buffers
    assert cache.lengths == [4, 0]


def test_writing_past_the_cache_is_an_error(tiny_model):
    cache = KVCache(tiny_model.config, max_batch=1)
    with torch.no_grad(), pytest.raises(ValueError, match="past the cache length"):
        prefill(tiny_model, cache, 0, [1] * 65)

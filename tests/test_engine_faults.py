"""One request's failure is its own: a fault injected at each stage of the engine (building the
sequence, prefill, sampling, decode, accepting a token) for one request ends that request alone,
and every other request in the same steps gets exactly the text it gets alone; in the engine's own
thread and in the default two-process server. A model step that fails for every row fails that
step's rows, and the engine goes on serving."""

from __future__ import annotations

import asyncio
import importlib
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from gpt import GPT, CharTokenizer, SamplingParams, generate
from service.engine import Failed, Finished, GenerationRequest
from tests import fault_injection
from tests.conftest import MakeEngine
from tests.server_utils import running_server
from tests.test_engine import outcome, run

generate_module = importlib.import_module("gpt.generate")  # the module (gpt.generate is also a function)

GOOD = [("CAESAR:", SamplingParams(temperature=0.9, top_k=30, seed=7)),
        ("BRUTUS:", SamplingParams(temperature=0)),
        ("Rome, ", SamplingParams(top_p=0.8, seed=11)),
        ("O", SamplingParams(temperature=1.2, repetition_penalty=1.3, seed=5))]
NEW = 30


def good_requests(tokenizer: CharTokenizer) -> list[GenerationRequest]:
    return [GenerationRequest(tokenizer.encode(prompt), NEW, params) for prompt, params in GOOD]


def alone(model: GPT, tokenizer: CharTokenizer, request: GenerationRequest) -> str:
    return "".join(chunk.text for chunk in generate(model, request.prompt_ids, tokenizer.decode,
                                                    request.max_new_tokens, request.params))


@pytest.mark.parametrize("stage", fault_injection.STAGES)
def test_a_fault_at_any_stage_ends_only_its_request(stage: str, make_engine: MakeEngine, tiny_model: GPT,
                                                    tokenizer: CharTokenizer, monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    requests = good_requests(tokenizer)
    expected = [alone(tiny_model, tokenizer, r) for r in requests]
    for name in ("prefill_rows", "sample_rows", "decode_step"):  # undone after the test
        monkeypatch.setattr(generate_module, name, getattr(generate_module, name))
    for name in ("__init__", "accept"):
        monkeypatch.setattr(generate_module.Sequence, name, getattr(generate_module.Sequence, name))
    fault_injection.install()
    engine = make_engine(max_batch_size=6)
    culprit_prompt = tokenizer.encode(f"A {fault_injection.marker(stage)} B")
    culprit = GenerationRequest(culprit_prompt, NEW, SamplingParams(seed=1))

    async def together() -> list[tuple[str, Finished | Failed]]:
        # Submitted in one go, so that all five are admitted, prefilled and decoded together.
        handles = [engine.submit(r) for r in [*requests[:2], culprit, *requests[2:]]]
        return await asyncio.gather(*(outcome(h) for h in handles))

    with caplog.at_level(logging.ERROR, "service.engine"):
        results = run(together())
    (culprit_text, culprit_end), good = results[2], results[:2] + results[3:]
    assert isinstance(culprit_end, Failed) and culprit_end.error_type == "generation"
    assert culprit_end.message == "generation failed: InjectedFault"
    if stage in ("decode", "accept"):  # it got some text out before the fault struck
        assert len(culprit_text) >= fault_injection.AFTER_TOKENS - 1
    assert [text for text, _ in good] == expected
    assert all(isinstance(end, Finished) and end.generated_tokens == NEW for _, end in good)
    assert "InjectedFault" in caplog.text
    # The engine goes on: the rows are free and a new request is served.
    async def after() -> str:
        return (await outcome(engine.submit(requests[0])))[0]

    assert run(after()) == expected[0]
    assert engine.ready and engine.running_rows == 0


def test_a_model_step_that_fails_for_every_row_fails_that_steps_rows_and_the_engine_goes_on(
        make_engine: MakeEngine, tiny_model: GPT, tokenizer: CharTokenizer,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    engine = make_engine(max_batch_size=2)
    real_decode, calls = generate_module.decode_step, {"n": 0, "failing": False}

    def decode_step(*args: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:  # this step, and each row's retry alone: "out of memory"
            calls["failing"] = True
        if calls["failing"] and calls["n"] <= 5:
            raise RuntimeError("injected model fault")
        return real_decode(*args)

    monkeypatch.setattr(generate_module, "decode_step", decode_step)
    requests = good_requests(tokenizer)

    async def scenario() -> list[tuple[str, Finished | Failed]]:
        batch = [engine.submit(GenerationRequest(r.prompt_ids, 1000, r.params)) for r in requests[:2]]
        queued = engine.submit(requests[2])  # no row yet: not in the failing step
        return await asyncio.gather(*(outcome(h) for h in [*batch, queued]))

    with caplog.at_level(logging.ERROR, "service.engine"):
        (text_a, end_a), (text_b, end_b), (text_c, end_c) = run(scenario())
    assert isinstance(end_a, Failed) and isinstance(end_b, Failed) and end_a.error_type == "generation"
    assert len(text_a) == len(text_b) == 3  # the first token, then two good steps
    assert isinstance(end_c, Finished) and text_c == alone(tiny_model, tokenizer, requests[2])
    assert "failed for each of its 2 rows alone too" in caplog.text
    assert engine.ready and engine.running_rows == 0


def test_in_the_two_process_server_a_fault_at_any_stage_ends_only_its_request(tiny_checkpoint: Path,
                                                                              tmp_path: Path) -> None:
    bodies = [{"inputs": prompt, "parameters": {"max_new_tokens": NEW, "temperature": p.temperature,
                                                **({"seed": p.seed} if p.seed is not None else {}),
                                                **({"top_k": p.top_k} if p.top_k else {}),
                                                **({"top_p": p.top_p} if p.top_p else {}),
                                                "repetition_penalty": p.repetition_penalty}}
              for prompt, p in GOOD]
    env = fault_injection.server_env(tmp_path)
    with running_server(tiny_checkpoint, "--max-batch-size", "6", env=env) as server:
        url = f"{server.base_url}/generate"

        def post(body: dict[str, Any]) -> httpx.Response:
            return httpx.post(url, json=body, timeout=60)

        expected = [post(body).json()["generated_text"] for body in bodies]
        for stage in fault_injection.STAGES:
            culprit = {"inputs": f"A {fault_injection.marker(stage)} B",
                       "parameters": {"max_new_tokens": NEW, "seed": 1}}
            with ThreadPoolExecutor(len(bodies) + 1) as pool:
                answers = list(pool.map(post, [culprit, *bodies]))
            assert answers[0].status_code == 500, stage
            assert answers[0].json()["error"] == "generation failed: InjectedFault", stage
            assert [a.status_code for a in answers[1:]] == [200] * len(bodies), stage
            assert [a.json()["generated_text"] for a in answers[1:]] == expected, stage
        assert httpx.get(f"{server.base_url}/ready").status_code == 200

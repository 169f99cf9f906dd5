"""The API layer of issue 19 against a FakeEngine (no model, fast): the new sampling settings reach the
engine as asked, TGI's greedy default, refusals (options not supported, numbers float32 cannot honour,
stream_options without a stream) in the same words on both APIs, guidellm's request body, continuous
usage stats, and a request of several rows: admitted together or not at all, one failure or refusal
ending all of its rows. The same behaviours against the real engine: tests/test_api_samples.py and
tests/test_api_logprobs.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from gpt import CharTokenizer
from service.engine import Admitted, Failed, GenerationRequest, QueueFull, RequestHandle
from service.schemas import FLOAT32_TINY, NOT_SUPPORTED
from tests.server_utils import FakeEngine, MakeClient, app_clients

MODEL = "caesar-test"
TEXT = FakeEngine.__dataclass_fields__["text"].default


@dataclass
class RowsEngine(FakeEngine):
    """A FakeEngine that refuses the submission numbered `refuse_at` (0-based, counted over the
    engine's life) with QueueFull, and fails the row numbered `fail_row` at its first character;
    it keeps every handle it gave out."""

    refuse_at: int | None = None
    fail_row: int | None = None
    handles: list[RequestHandle] = field(default_factory=list)
    submitted: int = 0

    def submit(self, request: GenerationRequest) -> RequestHandle:
        number = self.submitted
        self.submitted += 1
        if number == self.refuse_at:
            raise QueueFull()
        handle = super().submit(request)
        self.handles.append(handle)
        if number == self.fail_row:
            handle.fail_now = True
        return handle

    async def _play(self, request: GenerationRequest, handle: RequestHandle) -> None:
        if getattr(handle, "fail_now", False):  # admitted, then it fails before its first character
            handle.events.put_nowait(Admitted(0.0))
            await asyncio.sleep(self.step_s * 3)
            handle.events.put_nowait(Failed("generation", "generation failed: RuntimeError"))
            return
        await super()._play(request, handle)




@pytest.fixture
def make_client(tokenizer: CharTokenizer, tmp_path: Path) -> Iterator[MakeClient]:
    yield from app_clients(RowsEngine, tokenizer, tmp_path / MODEL)


def sse_data(body: str) -> list[str]:
    return [line.removeprefix("data:").strip() for line in body.splitlines() if line.startswith("data:")]


def completion(client: TestClient, **body: object):
    return client.post("/v1/completions", json={"model": MODEL, **body})


def generate(client: TestClient, inputs: str = "a", **parameters: object):
    return client.post("/generate", json={"inputs": inputs, "parameters": parameters})


# --- The new sampling settings reach the engine ----------------------------------------------------

def test_openai_sampling_settings_reach_the_engine(make_client: MakeClient, tokenizer: CharTokenizer) -> None:
    client = make_client()
    response = completion(client, prompt="a", max_tokens=5, min_p=0.05, presence_penalty=0.5,
                          frequency_penalty=-1.5, logit_bias={"5": -100, "12": 3.5}, top_k=10**30,
                          min_tokens=3, ignore_eos=True, repetition_penalty=1.2, temperature=0.7, top_p=0.9)
    assert response.status_code == 200, response.text
    (request,) = client.engine.requests
    p = request.params
    assert (p.min_p, p.presence_penalty, p.frequency_penalty) == (0.05, 0.5, -1.5)
    assert p.logit_bias == ((5, -100.0), (12, 3.5))
    assert p.top_k == tokenizer.vocab_size  # more than the vocabulary is all of it
    assert (p.repetition_penalty, p.temperature, p.top_p) == (1.2, 0.7, 0.9)
    assert request.min_tokens == 3 and request.logprobs is None and request.prompt_logprobs is None


def test_tgi_sampling_settings_reach_the_engine(make_client: MakeClient) -> None:
    client = make_client()
    assert generate(client, typical_p=0.5, frequency_penalty=1.0, do_sample=True).status_code == 200
    p = client.engine.requests[0].params
    assert (p.typical_p, p.frequency_penalty, p.temperature) == (0.5, 1.0, 1.0)


@pytest.mark.parametrize(("parameters", "temperature"), [
    ({}, 0.0),  # TGI decodes greedily unless sampling is asked for
    ({"seed": 3}, 0.0),
    ({"repetition_penalty": 1.3, "frequency_penalty": 0.5}, 0.0),
    ({"do_sample": False}, 0.0),
    ({"do_sample": True}, 1.0),
    ({"top_k": 5}, 1.0),
    ({"top_p": 0.9}, 1.0),
    ({"typical_p": 0.9}, 1.0),
    ({"temperature": 0.6}, 0.6),
    ({"do_sample": False, "temperature": 0.7}, 0.7),
])
def test_tgi_greedy_default(make_client: MakeClient, parameters: dict, temperature: float) -> None:
    client = make_client()
    assert generate(client, **parameters).status_code == 200
    assert client.engine.requests[0].params.temperature == temperature
    # OpenAI's default is to sample at temperature 1.
    assert completion(client, prompt="a").status_code == 200
    assert client.engine.requests[1].params.temperature == 1.0


def test_logprobs_are_asked_of_the_engine_only_when_needed(make_client: MakeClient) -> None:
    client = make_client()
    generate(client)
    generate(client, details=True)
    generate(client, details=True, top_n_tokens=3, decoder_input_details=True)
    client.post("/generate_stream", json={"inputs": "a"})
    completion(client, prompt="a")
    completion(client, prompt="a", logprobs=2)
    completion(client, prompt="a", logprobs=0, echo=True)
    asked = [(r.logprobs, r.prompt_logprobs) for r in client.engine.requests]
    assert asked == [(None, None), (0, None), (3, 0), (0, None), (None, None), (2, None), (0, 0)]


# --- Refusals --------------------------------------------------------------------------------------

def test_float32_tiny_is_torchs() -> None:
    assert torch.finfo(torch.float32).tiny == FLOAT32_TINY


@pytest.mark.parametrize("value", [5e-324, 1e-40, FLOAT32_TINY / 2])
@pytest.mark.parametrize(("api", "field"), [
    ("tgi", "top_p"), ("tgi", "typical_p"), ("tgi", "frequency_penalty"),
    ("openai", "top_p"), ("openai", "min_p"), ("openai", "presence_penalty"),
    ("openai", "frequency_penalty"), ("openai", "logit_bias"),
])
def test_numbers_float32_cannot_honour_are_refused_naming_them(make_client: MakeClient, api: str, field: str,
                                                               value: float) -> None:
    """Issue 15: top_p = 5e-324 rounded to 0 in float32 and failed inside the engine; every number
    below float32's smallest normal one is refused at the edge, on both APIs, naming the field."""
    client = make_client()
    if api == "tgi":
        response = generate(client, **{field: value})
        assert response.status_code == 422
        message = response.json()["error"]
        assert f"parameters.{field}" in message
    else:
        setting = {"7": value} if field == "logit_bias" else value
        response = completion(client, prompt="a", **{field: setting})
        assert response.status_code == 400
        message = response.json()["error"]["message"]
        assert response.json()["error"]["param"].startswith(field)
    assert "float32" in message and field in message
    assert client.engine.requests == []
    # The smallest normal number itself is honoured.
    smallest = {"7": FLOAT32_TINY} if field == "logit_bias" else FLOAT32_TINY
    accepted = generate(client, **{field: smallest}) if api == "tgi" else \
        completion(client, prompt="a", **{field: smallest})
    assert accepted.status_code == 200, accepted.text


def test_unsupported_options_are_refused_in_the_same_words_on_both_apis(make_client: MakeClient) -> None:
    client = make_client()
    refusals = [generate(client, watermark=True), generate(client, grammar={"type": "json", "value": {}}),
                generate(client, adapter_id="lora"), completion(client, prompt="a", suffix="z")]
    messages = []
    for response in refusals:
        assert response.status_code in (400, 422), response.text
        body = response.json()
        messages.append(body["error"]["message"] if isinstance(body["error"], dict) else body["error"])
    assert all(NOT_SUPPORTED in message for message in messages), messages
    assert [m.split(":")[0] for m in messages] == ["parameters.watermark", "parameters.grammar",
                                                   "parameters.adapter_id", "suffix"]
    # Their off values pass, as clients send them.
    assert generate(client, watermark=False, grammar=None, adapter_id=None).status_code == 200
    assert completion(client, prompt="a", suffix=None).status_code == 200


def test_stream_options_need_a_stream(make_client: MakeClient) -> None:
    client = make_client()
    response = completion(client, prompt="a", stream_options={"include_usage": True})
    assert response.status_code == 400 and response.json()["error"]["param"] == "stream_options"
    assert completion(client, prompt="a", stream=False, stream_options=None).status_code == 200


def test_tgi_refuses_what_tgi_refuses_with_streaming(make_client: MakeClient) -> None:
    client = make_client()
    for parameters in ({"best_of": 2, "do_sample": True}, {"decoder_input_details": True, "details": True}):
        response = client.post("/generate_stream", json={"inputs": "a", "parameters": parameters})
        assert response.status_code == 422
        assert next(iter(parameters)) in response.json()["error"]
    assert client.engine.requests == []


def test_unknown_logit_bias_ids_are_named(make_client: MakeClient, tokenizer: CharTokenizer) -> None:
    client = make_client()
    response = completion(client, prompt="a", logit_bias={"3": 1, str(tokenizer.vocab_size): 1})
    assert response.status_code == 400
    assert f"id {tokenizer.vocab_size}" in response.json()["error"]["message"]
    assert completion(client, prompt="a", logit_bias={}).status_code == 200


# --- Clients' request bodies -------------------------------------------------------------------------

GUIDELLM_BODY = {"model": MODEL, "stream": True,
                 "stream_options": {"include_usage": True, "continuous_usage_stats": True},
                 "max_tokens": 128, "ignore_eos": True, "prompt": "JULIUS CAESAR"}


def test_guidellms_request_body_gets_a_normal_stream(make_client: MakeClient) -> None:
    """guidellm 0.8.1's openai_http backend sends exactly this body (issue 19)."""
    client = make_client(text="x" * 200)
    response = client.post("/v1/completions", json=GUIDELLM_BODY)
    assert response.status_code == 200, response.text
    data = sse_data(response.text)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    text_chunks = [c for c in chunks if c["choices"]]
    assert "".join(c["choices"][0]["text"] for c in text_chunks) == "x" * 128
    assert text_chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {
        "prompt_tokens": 13, "completion_tokens": 128, "total_tokens": 141}


def test_continuous_usage_stats_put_usage_in_every_chunk(make_client: MakeClient) -> None:
    client = make_client()
    response = completion(client, prompt="ab", max_tokens=6, stream=True, n=2,
                          stream_options={"include_usage": True, "continuous_usage_stats": True})
    chunks = [json.loads(d) for d in sse_data(response.text)[:-1]]
    for index in (0, 1):
        mine = [c for c in chunks if c["choices"] and c["choices"][0]["index"] == index]
        assert [c["usage"]["completion_tokens"] for c in mine] == [1, 2, 3, 4, 5, 6]
        assert all(c["usage"]["prompt_tokens"] == 2 for c in mine)
    assert chunks[-1]["usage"] == {"prompt_tokens": 2, "completion_tokens": 12, "total_tokens": 14}
    # Without continuous_usage_stats, only the last chunk has usage.
    plain = completion(client, prompt="ab", max_tokens=6, stream=True, stream_options={"include_usage": True})
    plain_chunks = [json.loads(d) for d in sse_data(plain.text)[:-1]]
    assert [c["usage"] is not None for c in plain_chunks] == [False] * 6 + [True]


# --- Several rows per request ----------------------------------------------------------------------

def test_samples_of_a_seeded_request_use_seed_plus_i(make_client: MakeClient) -> None:
    client = make_client()
    assert completion(client, prompt=["a", "b"], n=3, seed=5).status_code == 200
    assert [r.params.seed for r in client.engine.requests] == [5, 6, 7, 5, 6, 7]
    assert completion(client, prompt="a", n=2, best_of=3, seed=2**64 - 2).status_code == 200
    assert [r.params.seed for r in client.engine.requests[6:]] == [2**64 - 2, 2**64 - 1, 0]
    assert generate(client, best_of=2, do_sample=True, seed=9).status_code == 200
    assert [r.params.seed for r in client.engine.requests[9:]] == [9, 10]
    assert completion(client, prompt="a", n=2).status_code == 200
    assert [r.params.seed for r in client.engine.requests[11:]] == [None, None]  # random, each its own


def test_a_list_of_prompts_gives_choices_ordered_by_index(make_client: MakeClient,
                                                          tokenizer: CharTokenizer) -> None:
    client = make_client()
    body = completion(client, prompt=["ab", "c", ""], n=2, max_tokens=4, echo=True).json()
    assert [c["index"] for c in body["choices"]] == list(range(6))
    assert [c["text"] for c in body["choices"]] == [p + TEXT[:4] for p in ("ab", "ab", "c", "c", "", "")]
    prompts = [tokenizer.encode(p) for p in ("ab", "ab", "c", "c", "", "")]
    assert [r.prompt_ids for r in client.engine.requests] == prompts
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 24, "total_tokens": 27}


def test_a_stream_of_several_choices_interleaves_them(make_client: MakeClient) -> None:
    client = make_client(step_s=0.001)
    response = completion(client, prompt=["ab", "c"], n=2, max_tokens=5, stream=True, echo=True,
                          stream_options={"include_usage": True})
    chunks = [json.loads(d) for d in sse_data(response.text)[:-1]]
    indices = [c["choices"][0]["index"] for c in chunks if c["choices"]]
    assert sorted(set(indices)) == [0, 1, 2, 3]
    assert indices != sorted(indices)  # interleaved as they came, not one choice after another
    for index, prompt in enumerate(["ab", "ab", "c", "c"]):
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == index]
        assert "".join(c["text"] for c in mine) == prompt + TEXT[:5]
        assert [c["finish_reason"] for c in mine][-1] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 20


def test_rows_over_the_servers_capacity_are_refused(make_client: MakeClient) -> None:
    client = make_client(settings={"max_batch_size": 2, "max_queue": 2})
    response = completion(client, prompt=["a", "b"], n=2, best_of=3)
    assert response.status_code == 400 and "6 rows" in response.json()["error"]["message"]
    assert generate(client, best_of=5, do_sample=True).status_code == 422
    assert client.engine.requests == []
    assert completion(client, prompt=["a", "b"], n=2).status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_a_refused_row_cancels_the_rows_already_queued(make_client: MakeClient, stream: bool) -> None:
    """All or nothing: the third row of four is refused, so the client gets 429 and the two queued
    before it are cancelled."""
    client = make_client(refuse_at=2, step_s=0.01)
    response = completion(client, prompt="a", n=4, stream=stream)
    assert response.status_code == 429 and "retry-after" in response.headers
    assert len(client.engine.handles) == 2 and all(h.cancelled for h in client.engine.handles)
    tgi = make_client(refuse_at=1, step_s=0.01)
    assert generate(tgi, best_of=2, do_sample=True).status_code == 429
    assert all(h.cancelled for h in tgi.engine.handles)


def test_a_failed_row_ends_every_row_of_its_request(make_client: MakeClient) -> None:
    client = make_client(fail_row=1, step_s=0.01, text="x" * 1000)
    response = completion(client, prompt="a", n=3, max_tokens=1000)
    assert response.status_code == 500
    assert all(h.cancelled for i, h in enumerate(client.engine.handles) if i != 1)
    streamed = make_client(fail_row=2, step_s=0.01, text="x" * 1000)
    response = completion(streamed, prompt=["a", "b"], n=2, max_tokens=1000, stream=True)
    data = sse_data(response.text)
    assert data[-1] == "[DONE]" and json.loads(data[-2])["error"]["type"] == "server_error"
    assert all(h.cancelled for i, h in enumerate(streamed.engine.handles) if i != 2)
    tgi = make_client(fail_row=0, step_s=0.01, text="x" * 1000)
    assert generate(tgi, best_of=3, do_sample=True, max_new_tokens=1000).status_code == 500
    assert all(h.cancelled for h in tgi.engine.handles[1:])


def test_a_queue_timeout_of_one_row_refuses_the_stream_before_it_starts(make_client: MakeClient) -> None:
    client = make_client(queue_failure=Failed("queue_timeout", "no free row within 30 s"))
    response = completion(client, prompt="a", n=2, stream=True)
    assert response.status_code == 503 and response.json()["error"]["code"] == "queue_timeout"
    assert all(h.cancelled for h in client.engine.handles)

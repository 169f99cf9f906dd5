"""Several samples per request (issue 19) against the real engine, in `python -m service` on the tiny
random checkpoint: OpenAI's n, best_of and lists of prompts, TGI's best_of, seeds (sample i uses
seed + i), choices ordered by index and interleaved in streams, admission all or nothing, a client
leaving cancels every row; the new sampling settings where their effect is exact; guidellm's body;
the official clients."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from huggingface_hub import InferenceClient

from service.schemas import FLOAT32_TINY
from tests.server_utils import ServerProcess, metric_value, running_server

pytestmark = pytest.mark.slow

MODEL = "tiny"
ROWS = 6  # the server's batch; its queue holds 2 more
LONG = 100_000


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path) -> Iterator[ServerProcess]:
    with running_server(tiny_checkpoint, "--max-batch-size", str(ROWS), "--max-queue", "2",
                        "--max-new-tokens", str(LONG)) as process:
        yield process


def post(server: ServerProcess, path: str, body: dict, status: int = 200) -> dict:
    response = httpx.post(server.base_url + path, json=body, timeout=60)
    assert response.status_code == status, response.text
    return response.json()


def complete(server: ServerProcess, **body: object) -> dict:
    return post(server, "/v1/completions", {"model": MODEL, **body})


def stream_chunks(server: ServerProcess, body: dict) -> list[dict]:
    with httpx.stream("POST", server.base_url + "/v1/completions", json={"model": MODEL, **body},
                      timeout=60) as response:
        assert response.status_code == 200, response.read()
        data = [line.removeprefix("data:").strip() for line in response.iter_lines()
                if line.startswith("data:")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def running_rows(server: ServerProcess) -> float:
    return metric_value(httpx.get(server.base_url + "/metrics").text, "caesar_running_rows")


def wait_for_rows(server: ServerProcess, expected: float, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while (rows := running_rows(server)) != expected:
        assert time.monotonic() < deadline, f"caesar_running_rows stayed {rows}, expected {expected}"
        time.sleep(0.05)


def texts(body: dict) -> list[str]:
    assert [c["index"] for c in body["choices"]] == list(range(len(body["choices"])))
    return [c["text"] for c in body["choices"]]


# --- n, best_of, lists of prompts --------------------------------------------------------------------

def test_n_samples_are_the_requests_of_seed_plus_i(server: ServerProcess) -> None:
    options = {"max_tokens": 20, "temperature": 1.0}
    together = texts(complete(server, prompt="CAESAR:", n=3, seed=40, **options))
    alone = [complete(server, prompt="CAESAR:", seed=40 + i, **options)["choices"][0]["text"]
             for i in range(3)]
    assert together == alone and len(set(together)) == 3


def test_a_list_of_prompts_gives_prompt_index_times_n_plus_i(server: ServerProcess) -> None:
    prompts = ["BRUTUS:", "CASSIUS:", ""]
    body = complete(server, prompt=prompts, n=2, seed=7, max_tokens=12, echo=True)
    got = texts(body)
    for p, prompt in enumerate(prompts):
        for i in range(2):
            alone = complete(server, prompt=prompt, seed=7 + i, max_tokens=12)["choices"][0]["text"]
            assert got[p * 2 + i] == prompt + alone
    assert body["usage"] == {"prompt_tokens": 15, "completion_tokens": 72, "total_tokens": 87}


def test_best_of_answers_the_n_most_likely(server: ServerProcess) -> None:
    options = {"prompt": "ANTONY:", "max_tokens": 15, "seed": 100}
    body = complete(server, n=2, best_of=5, **options)
    # Each candidate alone (sample j has seed 100 + j), with its cumulative log-probability.
    candidates = []
    for j in range(5):
        choice = complete(server, **{**options, "seed": 100 + j}, logprobs=0)["choices"][0]
        candidates.append((sum(choice["logprobs"]["token_logprobs"]), choice["text"]))
    best = [text for _, text in sorted(candidates, key=lambda c: -c[0])[:2]]
    assert texts(body) == best
    assert body["usage"]["completion_tokens"] == 5 * 15  # every candidate was generated


def test_a_stream_of_several_choices(server: ServerProcess) -> None:
    # Long enough that the four requests overlap however far apart a busy machine submits them: with
    # 30 characters, the tiny model finished the first before the HTTP process, sharing two cores with
    # another test worker, had submitted the next.
    body = {"prompt": ["BRUTUS:", "CASCA:"], "n": 2, "seed": 9, "max_tokens": 200, "logprobs": 1}
    answer = complete(server, **body)
    chunks = stream_chunks(server, {**body, "stream": True, "stream_options": {"include_usage": True}})
    indices = [c["choices"][0]["index"] for c in chunks if c["choices"]]
    assert indices != sorted(indices), "the choices should come interleaved, as they are generated"
    for choice in answer["choices"]:
        mine = [c["choices"][0] for c in chunks
                if c["choices"] and c["choices"][0]["index"] == choice["index"]]
        assert "".join(c["text"] for c in mine) == choice["text"]
        assert mine[-1]["finish_reason"] == choice["finish_reason"] == "length"
        assert sum((c["logprobs"]["token_logprobs"] for c in mine), []) == \
            pytest.approx(choice["logprobs"]["token_logprobs"], abs=1e-6)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == answer["usage"]


def test_tgi_best_of_with_best_of_sequences(server: ServerProcess) -> None:
    parameters = {"max_new_tokens": 15, "best_of": 3, "do_sample": True, "seed": 21, "details": True}
    body = post(server, "/generate", {"inputs": "CINNA:", "parameters": parameters})
    details = body["details"]
    sequences = details["best_of_sequences"]
    assert len(sequences) == 2
    everyone = [(body["generated_text"], details)] + [(s["generated_text"], s) for s in sequences]
    assert {d["seed"] for _, d in everyone} == {21, 22, 23}
    # TGI's rule: the answer has the highest mean log-probability per generated token.
    means = [sum(t["logprob"] for t in d["tokens"]) / len(d["tokens"]) for _, d in everyone]
    assert means[0] == max(means)
    for text, d in everyone:
        assert "".join(t["text"] for t in d["tokens"]) == text and d["generated_tokens"] == 15
    # Without details (no per-token log-probabilities asked for), the same answer.
    plain = {**parameters, "details": False}
    assert post(server, "/generate", {"inputs": "CINNA:", "parameters": plain})["generated_text"] == \
        body["generated_text"]
    assert post(server, "/generate", {"inputs": "CINNA:", "parameters": {"best_of": 2}}, status=422)


# --- Admission and cancellation ----------------------------------------------------------------------

def test_admission_is_all_or_nothing(server: ServerProcess) -> None:
    assert "10 rows" in complete_refused(server, 400, prompt=["a", "b"], best_of=5)
    body = {"inputs": "a", "parameters": {"max_new_tokens": LONG}}
    with httpx.Client(base_url=server.base_url, timeout=30) as client, \
            client.stream("POST", "/generate_stream", json=body) as first, \
            client.stream("POST", "/generate_stream", json=body) as second:
        assert first.status_code == second.status_code == 200
        wait_for_rows(server, 2)
        # 2 running + 7 asked > 6 rows + 2 queued: refused whole, and nothing of it stays behind.
        refused = client.post("/v1/completions",
                              json={"model": MODEL, "prompt": "a", "n": 7, "max_tokens": 5})
        assert refused.status_code == 429 and "retry-after" in refused.headers
        time.sleep(0.3)
        assert running_rows(server) == 2
        # What fits is served at once: 2 running + 6 = the 6 rows and the 2 queue places.
        assert len(texts(complete(server, prompt="a", n=6, max_tokens=3))) == 6
    wait_for_rows(server, 0)


def complete_refused(server: ServerProcess, status: int, **body: object) -> str:
    return post(server, "/v1/completions", {"model": MODEL, **body}, status=status)["error"]["message"]


def test_a_client_leaving_cancels_every_row(server: ServerProcess) -> None:
    body = {"model": MODEL, "prompt": ["a", "b"], "n": 2, "max_tokens": LONG, "stream": True}
    with httpx.Client(base_url=server.base_url, timeout=30) as client, \
            client.stream("POST", "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        next(lines)
        wait_for_rows(server, 4)
    wait_for_rows(server, 0)
    # Not streamed: a client that gives up cancels all of its rows too.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base_url + "/generate", timeout=httpx.Timeout(30, read=0.5), json={
            "inputs": "a", "parameters": {"max_new_tokens": LONG, "best_of": 3, "do_sample": True}})
    wait_for_rows(server, 0)


# --- Sampling settings, where their effect is exact --------------------------------------------------

def test_settings_that_leave_only_the_most_likely_character_decode_greedily(server: ServerProcess) -> None:
    greedy = complete(server, prompt="BRUTUS:", max_tokens=30, temperature=0)["choices"][0]["text"]
    for setting in ({"min_p": 1.0}, {"top_p": FLOAT32_TINY}, {"top_k": 1}):
        sampled = complete(server, prompt="BRUTUS:", max_tokens=30, temperature=1.5, seed=3, **setting)
        assert sampled["choices"][0]["text"] == greedy, setting
    # TGI's typical_p at its smallest keeps the most typical character and the most likely one.
    tgi = post(server, "/generate", {"inputs": "BRUTUS:", "parameters": {
        "max_new_tokens": 30, "typical_p": FLOAT32_TINY, "seed": 1, "details": True}})
    assert tgi["details"]["generated_tokens"] == 30


def test_logit_bias_and_penalties_change_what_is_sampled(server: ServerProcess) -> None:
    ids = {t["text"]: t["id"] for t in post(server, "/tokenize", {"inputs": "xz"})}
    forced = complete(server, prompt="a", max_tokens=10, temperature=0, logit_bias={str(ids["x"]): 100})
    assert forced["choices"][0]["text"] == "x" * 10
    # A frequency penalty of 2 on top of a bias of 5: after a few x's, another character wins.
    penalized = complete(server, prompt="a", max_tokens=10, temperature=0, logit_bias={str(ids["x"]): 5},
                         frequency_penalty=2.0)["choices"][0]["text"]
    assert penalized.startswith("x") and penalized != "x" * 10
    vocab = httpx.get(server.base_url + "/info").json()["model"]["vocab"]
    banned = complete(server, prompt="a", max_tokens=50, temperature=1.0, seed=1,
                      logit_bias={str(i): -100 for i in range(10)})["choices"][0]["text"]
    assert len(banned) == 50 and not set(banned) & set(vocab[:10])


def test_tiny_numbers_are_refused_over_the_wire(server: ServerProcess) -> None:
    """Issue 15's first case: top_p = 5e-324 answered 500; it is a 4xx naming top_p, on both APIs."""
    native = httpx.post(server.base_url + "/generate", json={"inputs": "", "parameters": {"top_p": 5e-324}})
    assert native.status_code == 422 and "parameters.top_p" in native.json()["error"]
    v1 = httpx.post(server.base_url + "/v1/completions", json={"model": MODEL, "prompt": "", "top_p": 5e-324})
    assert v1.status_code == 400 and v1.json()["error"]["param"] == "top_p"


def test_min_tokens_holds_off_a_stop_string(server: ServerProcess) -> None:
    text = complete(server, prompt="a", max_tokens=40, temperature=0)["choices"][0]["text"]
    stop = text[3]
    cut = complete(server, prompt="a", max_tokens=40, temperature=0, stop=stop)["choices"][0]
    assert cut["text"] == text[:text.index(stop)] and cut["finish_reason"] == "stop"
    held = complete(server, prompt="a", max_tokens=40, temperature=0, stop=stop, min_tokens=20)["choices"][0]
    # No stop before the 20th character; after it, the first occurrence ends generation.
    length = len(held["text"])
    assert length >= 19 and held["text"] == text[:length]
    if held["finish_reason"] == "stop":
        assert text[length] == stop and stop not in text[20:length]
    else:
        assert stop not in text[20:] and length == 40


# --- Clients -----------------------------------------------------------------------------------------

def test_guidellms_request_body(server: ServerProcess) -> None:
    """The exact body guidellm 0.8.1's openai_http backend sends (it failed every request with 400)."""
    chunks = stream_chunks(server, {"stream": True, "stream_options": {"include_usage": True,
                                                                       "continuous_usage_stats": True},
                                    "max_tokens": 128, "ignore_eos": True, "prompt": "JULIUS CAESAR"})
    text_chunks = [c for c in chunks if c["choices"]]
    assert len("".join(c["choices"][0]["text"] for c in text_chunks)) == 128
    assert text_chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["usage"]["prompt_tokens"] == 13 for c in chunks)
    assert [c["usage"]["completion_tokens"] for c in text_chunks] == list(range(1, 129))
    assert chunks[-1]["usage"] == {"prompt_tokens": 13, "completion_tokens": 128, "total_tokens": 141}


def test_openai_client_with_several_samples(server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
    completion = client.completions.create(model=MODEL, prompt=["BRUTUS:", "CASCA:"], n=2, best_of=3,
                                           max_tokens=10, seed=4, logprobs=1)
    assert [c.index for c in completion.choices] == [0, 1, 2, 3]
    assert all(len(c.logprobs.tokens) == 10 for c in completion.choices)
    stream = client.completions.create(model=MODEL, prompt="BRUTUS:", n=3, max_tokens=10, seed=4, stream=True)
    by_index: dict[int, str] = {}
    for chunk in stream:
        for choice in chunk.choices:
            by_index[choice.index] = by_index.get(choice.index, "") + choice.text
    plain = client.completions.create(model=MODEL, prompt="BRUTUS:", n=3, max_tokens=10, seed=4)
    assert by_index == {c.index: c.text for c in plain.choices}
    with pytest.raises(openai.BadRequestError, match="best_of"):
        client.completions.create(model=MODEL, prompt="a", n=2, best_of=3, stream=True)


def test_huggingface_client_best_of(server: ServerProcess) -> None:
    client = InferenceClient(base_url=server.base_url)
    answer = client.text_generation("CINNA:", max_new_tokens=10, best_of=2, do_sample=True, seed=8,
                                    details=True)
    assert len(answer.details.best_of_sequences) == 1
    assert answer.details.best_of_sequences[0].generated_tokens == 10

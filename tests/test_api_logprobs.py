"""Log-probabilities and scoring (issue 19) against the real engine: `python -m service` serving the
shipped checkpoint, its answers checked against Hugging Face transformers' GPT2LMHeadModel on the
same weights (bench/convert_hf.py) to within 2e-3, for generated characters and for a prompt
scored with sliding windows; and read by the official `openai` and `huggingface_hub` clients.

The values are of the model's raw distribution (before temperature, penalties, logit bias and the
filters), as vLLM reports them: a request that samples at temperature 0.8 with top-k still gets
the model's own log-probabilities."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import httpx
import openai
import pytest
import torch
from huggingface_hub import InferenceClient

from gpt import load_checkpoint
from service.settings import DEFAULT_CHECKPOINT
from tests.server_utils import ServerProcess, running_server

pytest.importorskip("transformers", reason="transformers (the bench extra) is needed for the reference")
from bench.convert_hf import to_hf  # noqa: E402

pytestmark = pytest.mark.slow

TOLERANCE = 2e-3  # nats, between our served values and transformers' on the same weights
MODEL = "caesar"
PROMPT = "BRUTUS.\nRomans, countrymen, and lovers!"


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with running_server(DEFAULT_CHECKPOINT, "--max-batch-size", "8") as process:
        yield process


class Reference:
    """The shipped weights in transformers, and the shipped vocabulary."""

    def __init__(self) -> None:
        checkpoint = load_checkpoint(DEFAULT_CHECKPOINT)
        self.tokenizer = checkpoint.tokenizer
        self.block_size = checkpoint.model.config.block_size
        self.hf = to_hf(checkpoint.model.float())

    @torch.inference_mode()
    def rows(self, ids: list[int]) -> torch.Tensor:
        """Log-probabilities (len(ids), V) of the next character after each prefix of `ids`, all
        within one context."""
        assert len(ids) <= self.block_size
        logits = self.hf(torch.tensor([ids])).logits[0].float()
        return torch.log_softmax(logits, dim=-1)

    @torch.inference_mode()
    def scores(self, ids: list[int]) -> dict[int, torch.Tensor]:
        """For each character k >= 1 of `ids`, the log-probabilities of what may stand there given
        the characters before it: windows of a context slide by half a context, each scoring the
        characters the previous one did not (training.evaluate's rule), so every character is
        scored once, with at least half a context before it past the start."""
        stride, scored_to, out = max(1, self.block_size // 2), 0, {}
        for begin in range(0, len(ids) - 1, stride):
            end = min(begin + self.block_size, len(ids) - 1)
            rows = self.rows(ids[begin:end])
            for k in range(scored_to + 1, end + 1):
                out[k] = rows[k - 1 - begin]
            scored_to = end
            if end == len(ids) - 1:
                break
        return out

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)


@pytest.fixture(scope="module")
def reference() -> Reference:
    return Reference()


def post(server: ServerProcess, path: str, body: dict) -> dict:
    response = httpx.post(server.base_url + path, json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def stream_events(server: ServerProcess, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", server.base_url + path, json=body, timeout=60) as response:
        assert response.status_code == 200, response.read()
        data = [line.removeprefix("data:").strip() for line in response.iter_lines()
                if line.startswith("data:")]
    return [json.loads(d) for d in data if d != "[DONE]"]


def generated_reference(reference: Reference, prompt: str, generated_ids: list[int]) -> torch.Tensor:
    """Rows of log-probabilities for each generated character, given the prompt and those before it."""
    ids = reference.encode(prompt) + generated_ids
    return reference.rows(ids[:-1])[len(reference.encode(prompt)) - 1:]


# --- Generated characters ----------------------------------------------------------------------------

def test_tgi_logprobs_of_sampled_characters_are_the_raw_distributions(server: ServerProcess,
                                                                     reference: Reference) -> None:
    body = post(server, "/generate", {"inputs": PROMPT, "parameters": {
        "max_new_tokens": 40, "temperature": 0.8, "top_k": 10, "seed": 7, "details": True,
        "top_n_tokens": 5}})
    details = body["details"]
    tokens = details["tokens"]
    assert len(tokens) == details["generated_tokens"] == 40
    assert "".join(t["text"] for t in tokens) == body["generated_text"]
    rows = generated_reference(reference, PROMPT, [t["id"] for t in tokens])
    for i, token in enumerate(tokens):
        assert token["logprob"] == pytest.approx(float(rows[i, token["id"]]), abs=TOLERANCE), i
        top = details["top_tokens"][i]
        assert len(top) == 5
        expected = torch.topk(rows[i], 5)
        assert [t["id"] for t in top] == expected.indices.tolist()
        assert [t["logprob"] for t in top] == pytest.approx(expected.values.tolist(), abs=TOLERANCE)
        assert [t["text"] for t in top] == [reference.tokenizer.chars[t["id"]] for t in top]
    assert body["usage"]["completion_tokens"] == 40


def test_openai_logprobs_match_transformers_and_stream_as_they_answer(server: ServerProcess,
                                                                      reference: Reference) -> None:
    request = {"model": MODEL, "prompt": PROMPT, "max_tokens": 30, "temperature": 1.0, "seed": 3,
               "logprobs": 3}
    choice = post(server, "/v1/completions", request)["choices"][0]
    logprobs = choice["logprobs"]
    assert "".join(logprobs["tokens"]) == choice["text"] and len(choice["text"]) == 30
    assert logprobs["text_offset"] == list(range(30))
    rows = generated_reference(reference, PROMPT, reference.encode(choice["text"]))
    for i, (char, logprob, top) in enumerate(zip(logprobs["tokens"], logprobs["token_logprobs"],
                                                 logprobs["top_logprobs"], strict=True)):
        token_id = reference.tokenizer.stoi[char]
        assert logprob == pytest.approx(float(rows[i, token_id]), abs=TOLERANCE)
        best = torch.topk(rows[i], 3).indices.tolist()
        # The 3 most likely and the one chosen (OpenAI: up to logprobs + 1 entries).
        assert set(top) == {reference.tokenizer.chars[j] for j in best} | {char}
        assert top[char] == pytest.approx(logprob, abs=1e-6)
    # The same request streamed: the same characters and values, one chunk per character.
    chunks = stream_events(server, "/v1/completions", {**request, "stream": True})
    streamed = [c["choices"][0] for c in chunks if c["choices"]]
    assert "".join(c["text"] for c in streamed) == choice["text"]
    assert sum((c["logprobs"]["tokens"] for c in streamed), []) == logprobs["tokens"]
    assert sum((c["logprobs"]["token_logprobs"] for c in streamed), []) == \
        pytest.approx(logprobs["token_logprobs"], abs=1e-6)
    assert sum((c["logprobs"]["text_offset"] for c in streamed), []) == logprobs["text_offset"]


def test_tgi_stream_events_carry_logprobs_and_top_tokens(server: ServerProcess) -> None:
    parameters = {"max_new_tokens": 25, "seed": 11, "do_sample": True, "top_n_tokens": 2, "details": True}
    answer = post(server, "/generate", {"inputs": PROMPT, "parameters": parameters})
    events = stream_events(server, "/generate_stream", {"inputs": PROMPT, "parameters": parameters})
    assert len(events) == 25
    assert "".join(e["token"]["text"] for e in events) == answer["generated_text"]
    assert events[-1]["generated_text"] == answer["generated_text"]
    assert [e["token"]["logprob"] for e in events] == \
        pytest.approx([t["logprob"] for t in answer["details"]["tokens"]], abs=1e-6)
    assert [[t["id"] for t in e["top_tokens"]] for e in events] == \
        [[t["id"] for t in top] for top in answer["details"]["top_tokens"]]
    # Without top_n_tokens the events have no top_tokens, but their logprob is always there.
    plain = stream_events(server, "/generate_stream", {"inputs": PROMPT, "parameters": {"max_new_tokens": 5}})
    assert all("top_tokens" not in e for e in plain[:-1]) and plain[-1]["top_tokens"] is None
    assert all(isinstance(e["token"]["logprob"], float) for e in plain)


def test_a_stop_strings_characters_are_counted_and_reported(server: ServerProcess) -> None:
    """One entry of details.tokens per generated character, the stop string's included (they count in
    generated_tokens but are not output), in JSON, in a stream and in OpenAI's logprobs."""
    greedy = post(server, "/generate", {"inputs": PROMPT,
                                        "parameters": {"max_new_tokens": 80, "details": True}})
    text = greedy["generated_text"]
    # A two-character stop string that first occurs some way into the greedy text.
    at, stop = next((i, text[i:i + 2]) for i in range(10, 70) if text.find(text[i:i + 2]) == i)
    body = post(server, "/generate", {"inputs": PROMPT, "parameters": {
        "max_new_tokens": 80, "details": True, "stop": [stop]}})
    details = body["details"]
    assert body["generated_text"] == text[:at] and details["finish_reason"] == "stop_sequence"
    assert details["generated_tokens"] == len(details["tokens"]) == at + 2
    assert "".join(t["text"] for t in details["tokens"]) == text[:at + 2]
    assert [t["logprob"] for t in details["tokens"]] == \
        pytest.approx([t["logprob"] for t in greedy["details"]["tokens"][:at + 2]], abs=1e-5)
    events = stream_events(server, "/generate_stream", {"inputs": PROMPT, "parameters": {
        "max_new_tokens": 80, "stop": [stop]}})
    assert len(events) == at + 2 == events[-1]["details"]["generated_tokens"]
    assert "".join(e["token"]["text"] for e in events) == text[:at] == events[-1]["generated_text"]
    assert [e["token"]["id"] for e in events] == [t["id"] for t in details["tokens"]]
    choice = post(server, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 80,
                                              "temperature": 0, "stop": stop, "logprobs": 0})["choices"][0]
    assert choice["text"] == text[:at] and choice["finish_reason"] == "stop"
    assert "".join(choice["logprobs"]["tokens"]) == text[:at + 2]


def test_logprobs_are_of_the_raw_distribution_under_a_logit_bias(server: ServerProcess,
                                                                  reference: Reference) -> None:
    e = str(reference.tokenizer.stoi["e"])
    choice = post(server, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 8,
                                              "temperature": 0, "logit_bias": {e: 100},
                                              "logprobs": 0})["choices"][0]
    assert choice["text"] == "e" * 8  # the bias decides what is sampled...
    rows = generated_reference(reference, PROMPT, reference.encode(choice["text"]))
    # ...but the log-probabilities reported are the model's own, not those of the biased distribution.
    assert choice["logprobs"]["token_logprobs"] == \
        pytest.approx([float(rows[i, int(e)]) for i in range(8)], abs=TOLERANCE)
    assert all(lp < -0.01 for lp in choice["logprobs"]["token_logprobs"])


# --- Scoring a text ----------------------------------------------------------------------------------

def test_scoring_a_text_longer_than_the_context(server: ServerProcess, reference: Reference,
                                                corpus_text: str) -> None:
    text = corpus_text[5000:5300]  # 300 characters: three windows of the 128-character context
    ids = reference.encode(text)
    expected = reference.scores(ids)
    choice = post(server, "/v1/completions", {"model": MODEL, "prompt": text, "max_tokens": 0, "echo": True,
                                              "logprobs": 1})["choices"][0]
    logprobs = choice["logprobs"]
    assert choice["text"] == text and choice["finish_reason"] == "length"
    assert logprobs["tokens"] == list(text) and logprobs["text_offset"] == list(range(300))
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    served = logprobs["token_logprobs"][1:]
    assert served == pytest.approx([float(expected[k][ids[k]]) for k in range(1, 300)], abs=TOLERANCE)
    for k in range(1, 300):
        best = reference.tokenizer.chars[int(expected[k].argmax())]
        assert best in logprobs["top_logprobs"][k] and text[k] in logprobs["top_logprobs"][k]
    # TGI's decoder_input_details scores the same text the same way.
    details = post(server, "/generate", {"inputs": text, "parameters": {
        "max_new_tokens": 0, "details": True, "decoder_input_details": True}})["details"]
    prefill = details["prefill"]
    assert [p["text"] for p in prefill] == list(text) and prefill[0]["logprob"] is None
    assert [p["logprob"] for p in prefill[1:]] == pytest.approx(served, abs=1e-5)
    assert details["generated_tokens"] == 0 and details["tokens"] == []
    bits_per_char = -sum(served) / len(served) / math.log(2)
    assert 0.5 < bits_per_char < 4  # the play's own text is not news to the shipped model


def test_echo_with_a_completion_puts_the_prompt_first(server: ServerProcess, reference: Reference) -> None:
    request = {"model": MODEL, "prompt": PROMPT, "max_tokens": 12, "seed": 5, "echo": True, "logprobs": 2}
    choice = post(server, "/v1/completions", request)["choices"][0]
    generated = choice["text"][len(PROMPT):]
    assert choice["text"].startswith(PROMPT) and len(generated) == 12
    logprobs = choice["logprobs"]
    assert logprobs["tokens"] == list(choice["text"])
    assert logprobs["text_offset"] == list(range(len(choice["text"])))
    ids = reference.encode(choice["text"])
    rows = reference.rows(ids[:-1])
    assert logprobs["token_logprobs"][0] is None
    expected = [float(rows[k - 1, ids[k]]) for k in range(1, len(ids))]
    assert logprobs["token_logprobs"][1:] == pytest.approx(expected, abs=TOLERANCE)
    # Streamed, the prompt comes first (with its scores), then the completion, as in JSON.
    chunks = [c["choices"][0] for c in stream_events(server, "/v1/completions", {**request, "stream": True})
              if c["choices"]]
    assert chunks[0]["text"] == PROMPT and chunks[0]["logprobs"]["token_logprobs"][0] is None
    assert "".join(c["text"] for c in chunks) == choice["text"]
    assert sum((c["logprobs"]["text_offset"] for c in chunks), []) == logprobs["text_offset"]
    assert sum((c["logprobs"]["token_logprobs"] for c in chunks), [])[1:] == \
        pytest.approx(logprobs["token_logprobs"][1:], abs=1e-5)


# --- The official clients ----------------------------------------------------------------------------

def test_huggingface_inference_client_reads_details(server: ServerProcess) -> None:
    client = InferenceClient(base_url=server.base_url)
    answer = client.text_generation(PROMPT, max_new_tokens=20, details=True, decoder_input_details=True,
                                    top_n_tokens=3, do_sample=True, seed=4)
    details = answer.details
    assert len(details.tokens) == details.generated_tokens == 20
    assert all(isinstance(t.logprob, float) and t.logprob <= 0 for t in details.tokens)
    total = sum(t.logprob for t in details.tokens)  # what TGI client code does (it raised TypeError)
    assert math.isfinite(total)
    assert len(details.prefill) == len(PROMPT) and details.prefill[0].logprob is None
    assert all(isinstance(p.logprob, float) for p in details.prefill[1:])
    assert [len(top) for top in details.top_tokens] == [3] * 20
    events = list(client.text_generation(PROMPT, max_new_tokens=20, details=True, top_n_tokens=3,
                                         do_sample=True, seed=4, stream=True))
    assert "".join(e.token.text for e in events) == answer.generated_text
    assert [e.token.logprob for e in events] == pytest.approx([t.logprob for t in details.tokens], abs=1e-6)
    assert all(len(e.top_tokens) == 3 for e in events)
    # TGI's greedy default: no sampling setting, the same text every time.
    first = client.text_generation(PROMPT, max_new_tokens=15)
    assert client.text_generation(PROMPT, max_new_tokens=15) == first


def test_openai_client_reads_logprobs_and_echo(server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
    completion = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, logprobs=2, echo=True,
                                           seed=1)
    logprobs = completion.choices[0].logprobs
    assert logprobs.tokens == list(completion.choices[0].text)
    assert logprobs.token_logprobs[0] is None
    assert all(isinstance(x, float) for x in logprobs.token_logprobs[1:])
    assert all(2 <= len(top) <= 3 for top in logprobs.top_logprobs[1:])
    scored = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0, logprobs=0, echo=True)
    assert scored.choices[0].text == PROMPT
    assert scored.choices[0].logprobs.token_logprobs[1:] == \
        pytest.approx(logprobs.token_logprobs[1:len(PROMPT)], abs=1e-5)
    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, logprobs=1, seed=1,
                                       stream=True)
    streamed = [c.choices[0] for c in stream if c.choices]
    assert "".join(c.text for c in streamed) == completion.choices[0].text[len(PROMPT):]
    assert [x for c in streamed for x in c.logprobs.token_logprobs] == \
        pytest.approx(logprobs.token_logprobs[len(PROMPT):], abs=1e-6)

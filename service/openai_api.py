"""The OpenAI-compatible routes: /v1/completions (stream or not) and /v1/models, faithful enough for
the official `openai` client, with vLLM's extensions. finish_reason is `stop` or `length`; streams
end with `data: [DONE]`.

Several completions per request (`n`, `best_of`, a list of prompts) are one engine row each (see
service/generation.py): choice `index` is prompt index x n + i, JSON choices are ordered by it, and
a stream interleaves the choices' chunks as they come. `logprobs` are of the model's raw
distribution (before temperature and the filters), as vLLM reports them; with `echo` they begin with
the prompt's, the first null.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from fastapi.responses import Response

from service import errors, schemas
from service.engine import Finished, GenerationRequest, RequestHandle, TextChunk, TokenLogprob
from service.errors import APIError
from service.generation import (
    Outcome,
    Sampling,
    Service,
    ServiceDep,
    nth_sample,
    prompt_scores,
    sampling_params,
    total_usage,
    usage_counts,
)
from service.native import finite, log_fields, stream_steps
from service.sse import sse_response

router = APIRouter(prefix="/v1", tags=["OpenAI"])

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
ERROR_RESPONSES = {status: {"model": schemas.OpenAIErrorResponse}
                   for status in (400, 401, 404, 413, 429, 500, 503)}
COMPLETION_RESPONSES = {
    **ERROR_RESPONSES,
    200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
          "description": "JSON, or with `stream: true` Server-Sent Events of Completion chunks, then [DONE]"},
}
FINISH_REASONS = {"length": "length", "stop": "stop"}


def model_card(service: Service) -> schemas.ModelCard:
    context = service.engine.model_card()["context"]
    return schemas.ModelCard(id=service.settings.served_model_name, created=service.created,
                             max_model_len=context)


def check_model(service: Service, model: str) -> None:
    if model != service.settings.served_model_name:
        raise APIError(404, f"model {model[:100]!r} does not exist; this server serves "
                            f"{service.settings.served_model_name!r}", "not_found", code="model_not_found",
                       param="model")


@dataclass
class Plan:
    """A completion request as engine rows: `rows[p * best_of + j]` is sample j of prompt p; a
    stream that echoes the prompt with logprobs adds one scoring row per prompt after them."""

    body: schemas.CompletionRequest
    prompts: list[str]
    prompt_ids: list[list[int]]
    n: int
    best_of: int
    rows: list[GenerationRequest] = field(default_factory=list)
    scoring_rows: bool = False

    @property
    def scores_prompt(self) -> bool:
        return bool(self.body.echo) and self.body.logprobs is not None

    def choice(self, row: int) -> tuple[int, int]:
        """(prompt index, choice index) of a sample row (streams: best_of == n)."""
        prompt = row // self.best_of
        return prompt, prompt * self.n + row % self.best_of


def plan(service: Service, body: schemas.CompletionRequest) -> Plan:
    check_model(service, body.model)
    if body.stream_options is not None and not body.stream:
        raise errors.invalid("stream_options: only with stream: true", param="stream_options")
    n = body.n or 1
    best_of = body.best_of if body.best_of is not None else n
    if best_of < n:
        raise errors.invalid(f"best_of ({best_of}) must be at least n ({n})", param="best_of")
    if body.stream and best_of > n:
        raise errors.invalid("best_of: cannot be streamed unless it equals n (the best are known only "
                             "at the end)", param="best_of")
    prompts = body.prompts
    prompt_ids = [service.encode(prompt, "prompt") for prompt in prompts]
    max_tokens = body.max_tokens if body.max_tokens is not None else \
        min(DEFAULT_MAX_TOKENS, service.settings.max_new_tokens)
    service.check_max_new_tokens(max_tokens, "max_tokens")
    if body.min_tokens is not None and body.min_tokens > max_tokens:
        raise errors.invalid(f"min_tokens ({body.min_tokens}) must be at most max_tokens ({max_tokens})",
                             param="min_tokens")
    result = Plan(body, prompts, prompt_ids, n, best_of)
    result.scoring_rows = bool(body.stream) and result.scores_prompt
    rows = len(prompts) * (best_of + int(result.scoring_rows))
    service.check_rows(rows, "this request (prompts x best_of)", "best_of" if best_of > 1 else "prompt")

    stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    settings = Sampling(body.temperature, body.top_k, body.top_p, body.repetition_penalty, body.seed,
                        min_p=body.min_p, presence_penalty=body.presence_penalty,
                        frequency_penalty=body.frequency_penalty,
                        logit_bias=service.logit_bias(body.logit_bias, "logit_bias"))
    params = sampling_params(settings, service.engine.tokenizer.vocab_size)
    # Tokens one by one are needed for logprobs, and to count them for continuous usage stats.
    logprobs = body.logprobs
    if logprobs is None and continuous_usage(body):
        logprobs = 0
    for ids in prompt_ids:
        for sample in range(best_of):
            scored = result.scores_prompt and not result.scoring_rows and sample == 0
            request = GenerationRequest(ids, max_tokens, params, tuple(stop), min_tokens=body.min_tokens or 0,
                                        logprobs=logprobs, prompt_logprobs=body.logprobs if scored else None,
                                        ranked=best_of > n, final_only=not body.stream)
            result.rows.append(nth_sample(request, sample))
    if result.scoring_rows:
        result.rows += [GenerationRequest(ids, 0, params, prompt_logprobs=body.logprobs)
                        for ids in prompt_ids]
    return result


def continuous_usage(body: schemas.CompletionRequest) -> bool:
    options = body.stream_options
    return bool(body.stream and options and options.include_usage and options.continuous_usage_stats)


# --- Log-probabilities, in the legacy Completions shape ---------------------------------------------

def top_logprobs(chars: str, token: TokenLogprob, n: int) -> dict[str, float]:
    """The n most likely characters and the one chosen (so up to n + 1), as OpenAI answers."""
    top = {chars[i]: lp for i, lp in token.top[:n] if math.isfinite(lp)}
    if math.isfinite(token.logprob):
        top.setdefault(chars[token.token_id], token.logprob)
    return top


@dataclass
class LogprobsBuilder:
    """Builds `logprobs` for one choice, piece by piece (streams) or whole (JSON)."""

    chars: str
    n: int
    offset: int = 0  # text_offset of the next token

    def prompt(self, prompt_ids: list[int], scores: Sequence[TokenLogprob | None] | None
               ) -> schemas.CompletionLogprobs:
        scores = prompt_scores(scores, prompt_ids)
        logprobs = self._empty()
        for token_id, score in zip(prompt_ids, scores, strict=True):
            self._add(logprobs, self.chars[token_id], score)
        return logprobs

    def tokens(self, chunks: Sequence[TextChunk]) -> schemas.CompletionLogprobs:
        logprobs = self._empty()
        for chunk in chunks:
            if chunk.token is not None:
                self._add(logprobs, self.chars[chunk.token.token_id], chunk.token)
            else:  # an engine that reports no tokens: the characters output, without log-probabilities
                for char in chunk.text:
                    self._add(logprobs, char, None)
        return logprobs

    def _add(self, logprobs: schemas.CompletionLogprobs, text: str, score: TokenLogprob | None) -> None:
        logprobs.tokens.append(text)
        logprobs.token_logprobs.append(finite(score.logprob) if score else None)
        logprobs.top_logprobs.append(top_logprobs(self.chars, score, self.n) if score else None)
        logprobs.text_offset.append(self.offset)
        self.offset += len(text)

    @staticmethod
    def _empty() -> schemas.CompletionLogprobs:
        return schemas.CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])

    @staticmethod
    def join(first: schemas.CompletionLogprobs,
             second: schemas.CompletionLogprobs) -> schemas.CompletionLogprobs:
        return schemas.CompletionLogprobs(
            tokens=first.tokens + second.tokens, token_logprobs=first.token_logprobs + second.token_logprobs,
            top_logprobs=first.top_logprobs + second.top_logprobs,
            text_offset=first.text_offset + second.text_offset)


# --- Routes -----------------------------------------------------------------------------------------

@router.get("/models", response_model=schemas.ModelList, responses=ERROR_RESPONSES)
async def list_models(service: ServiceDep) -> schemas.ModelList:
    return schemas.ModelList(data=[model_card(service)])


@router.get("/models/{model_id}", response_model=schemas.ModelCard, responses=ERROR_RESPONSES)
async def get_model(model_id: str, service: ServiceDep) -> schemas.ModelCard:
    check_model(service, model_id)
    return model_card(service)


@router.post("/completions", response_model=schemas.Completion, responses=COMPLETION_RESPONSES)
async def create_completion(body: schemas.CompletionRequest, request: Request,
                            service: ServiceDep) -> schemas.Completion | Response:
    work = plan(service, body)
    handles = service.submit_all(work.rows)
    completion_id = f"cmpl-{request.state.request_id}"
    if body.stream:
        await service.until_disconnect(request.receive, handles,
                                       service.wait_for_admission(handles, service.settings.keepalive_s))
        return sse_response(_chunks(service, request, handles, work, completion_id),
                            service.settings.keepalive_s)
    outcomes = await service.complete(request, handles)
    log_fields(request, stream=False, finished=[o.finished for o in outcomes])
    totals = total_usage(sum(map(len, work.prompt_ids)), [o.finished for o in outcomes])
    return schemas.Completion(id=completion_id, created=int(time.time()), model=body.model,
                              choices=_choices(service, work, outcomes), usage=schemas.Usage(**totals))


def _choices(service: Service, work: Plan, outcomes: list[Outcome]) -> list[schemas.CompletionChoice]:
    body, chars = work.body, service.engine.tokenizer.chars
    choices = []
    for p, prompt in enumerate(work.prompts):
        rows = outcomes[p * work.best_of:(p + 1) * work.best_of]
        chosen = rows
        if work.best_of > work.n:  # the n of highest cumulative log-probability, best first (vLLM's rule)
            chosen = sorted(rows, key=lambda o: -o.finished.cumulative_logprob)[:work.n]
        for k, outcome in enumerate(chosen):
            logprobs = None
            if body.logprobs is not None:
                builder = LogprobsBuilder(chars, body.logprobs)
                if body.echo:  # the prompt's tokens first (their text_offset too)
                    scores = builder.prompt(work.prompt_ids[p], rows[0].finished.prompt_logprobs)
                    logprobs = LogprobsBuilder.join(scores, builder.tokens(outcome.chunks))
                else:
                    logprobs = builder.tokens(outcome.chunks)
            choices.append(schemas.CompletionChoice(
                index=p * work.n + k, text=(prompt if body.echo else "") + outcome.text, logprobs=logprobs,
                finish_reason=FINISH_REASONS[outcome.finished.finish_reason]))
    return choices


@dataclass
class _ChoiceStream:
    """One choice of a stream: its logprobs so far, its tokens so far (continuous usage), and its
    steps held back until its echoed prompt has gone out."""

    prompt: int
    builder: LogprobsBuilder
    tokens: int = 0
    echoed: bool = False
    held: list[tuple[list[TextChunk], Finished | None]] = field(default_factory=list)


def _chunks(service: Service, request: Request, handles: list[RequestHandle], work: Plan,
            completion_id: str) -> AsyncIterator[bytes]:
    body, chars = work.body, service.engine.tokenizer.chars
    created = int(time.time())
    model = body.model
    usage_in_every_chunk = continuous_usage(body)
    per_token = body.logprobs is not None or usage_in_every_chunk
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    samples = len(work.prompts) * work.best_of
    choices = {index: _ChoiceStream(prompt, LogprobsBuilder(chars, body.logprobs or 0))
               for prompt, index in map(work.choice, range(samples))}
    finished_rows: list[Finished] = []
    usage_sent = False

    def chunk(index: int, text: str, logprobs: schemas.CompletionLogprobs | None = None,
              finished: Finished | None = None) -> str:
        state = choices[index]
        reason = FINISH_REASONS[finished.finish_reason] if finished else None
        stats = None
        if usage_in_every_chunk:
            stats = schemas.Usage(**usage_counts(len(work.prompt_ids[state.prompt]), state.tokens))
        return schemas.Completion(id=completion_id, created=created, model=model, usage=stats, choices=[
            schemas.CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=reason)
        ]).model_dump_json()

    def echo(index: int, scores: Sequence[TokenLogprob | None] | None = None) -> list[str]:
        state = choices[index]
        state.echoed = True
        prompt = work.prompts[state.prompt]
        logprobs = state.builder.prompt(work.prompt_ids[state.prompt], scores) \
            if body.logprobs is not None else None
        events = [chunk(index, prompt, logprobs)] if prompt or logprobs is not None else []
        for chunks, finished in state.held:
            events += sample_events(index, chunks, finished)
        state.held = []
        return events

    def sample_events(index: int, chunks: list[TextChunk], finished: Finished | None) -> list[str]:
        state = choices[index]
        if not state.echoed:
            state.held.append((chunks, finished))
            return []
        events = []
        if per_token:
            for n, piece in enumerate(chunks):
                state.tokens += 1 if piece.token is not None else len(piece.text)
                last = finished is not None and n == len(chunks) - 1
                logprobs = state.builder.tokens([piece]) if body.logprobs is not None else None
                if piece.text or logprobs is not None or last:
                    events.append(chunk(index, piece.text, logprobs, finished if last else None))
            if finished is not None and not chunks:
                events.append(chunk(index, "", None, finished))
        else:
            text = "".join(piece.text for piece in chunks)
            if finished is None:
                events = [chunk(index, char) for char in text]
            else:
                events = [*(chunk(index, char) for char in text[:-1]),
                          chunk(index, text[-1:], None, finished)]
        return events

    def payloads(row: int, chunks: list[TextChunk], finished: Finished | None) -> list[str]:
        nonlocal usage_sent
        events = []
        if row >= samples:  # a prompt's scoring row: its choices' echo, then what they held back
            if finished is not None:
                for index, state in choices.items():
                    if state.prompt == row - samples:
                        events += echo(index, finished.prompt_logprobs)
        else:
            if finished is not None:
                finished_rows.append(finished)
            events = sample_events(work.choice(row)[1], chunks, finished)
        if include_usage and not usage_sent and len(finished_rows) == samples \
                and all(state.echoed for state in choices.values()):
            usage_sent = True
            totals = total_usage(sum(map(len, work.prompt_ids)), finished_rows)
            events.append(schemas.Completion(id=completion_id, created=created, model=model, choices=[],
                                             usage=schemas.Usage(**totals)).model_dump_json())
        return events

    opening: list[str] = []
    for index, state in choices.items():
        if not body.echo:
            state.echoed = True
        elif not work.scoring_rows:
            opening += echo(index)
    return stream_steps(service, request, handles, payloads, openai=True, opening=opening, trailer="[DONE]")


"""The native routes, in Hugging Face TGI's shapes: /generate (and POST /, where TGI clients such as
`huggingface_hub.InferenceClient` send it), /generate_stream, /tokenize.

Log-probabilities are of the model's raw distribution (before temperature and the filters), as vLLM
reports them: `details.tokens[].logprob` and every stream event's `token.logprob` are always filled,
`top_n_tokens` adds the most likely alternatives, `decoder_input_details` scores the prompt
(`details.prefill`), and `best_of` samples several and answers the one of highest mean log-probability
per character, as TGI ranks them.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing

from fastapi import APIRouter, Request
from fastapi.responses import Response

from service import errors, schemas
from service.engine import Finished, GenerationRequest, RequestHandle, TextChunk, TokenLogprob
from service.errors import APIError, stream_error_payload
from service.generation import (
    Outcome,
    Sampling,
    Service,
    ServiceDep,
    cancel_all,
    nth_sample,
    prompt_scores,
    sampling_params,
    timings,
    usage,
)
from service.sse import encode_events, sse_response

router = APIRouter(tags=["native (TGI)"])

ERROR_RESPONSES = {status: {"model": schemas.ErrorResponse} for status in (401, 413, 422, 429, 500, 503)}
GENERATE_RESPONSES = {
    **ERROR_RESPONSES,
    200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
          "description": "JSON, or with `stream: true` Server-Sent Events (see /generate_stream)"},
}
STREAM_RESPONSES = {
    **ERROR_RESPONSES,
    200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
          "description": "one `data:` event per generated character, each a StreamResponse"},
}

FINISH_REASONS = {"length": "length", "stop": "stop_sequence"}


def sampling(p: schemas.GenerateParameters) -> Sampling:
    return Sampling(p.temperature, p.top_k, p.top_p, p.repetition_penalty, p.seed, p.do_sample,
                    typical_p=p.typical_p, frequency_penalty=p.frequency_penalty, greedy_by_default=True)


def to_engine_requests(service: Service, body: schemas.GenerateRequest,
                       stream: bool) -> list[GenerationRequest]:
    """The rows of a native request: one, or best_of. Refuses what TGI refuses with streaming."""
    p = body.parameters
    best_of = p.best_of or 1
    if stream and best_of > 1:
        raise errors.invalid("parameters.best_of: must be 1 when streaming (as in TGI)",
                             param="parameters.best_of")
    if stream and p.decoder_input_details:
        raise errors.invalid("parameters.decoder_input_details: not with streaming (as in TGI); use "
                             "/generate", param="parameters.decoder_input_details")
    params = sampling_params(sampling(p), service.engine.tokenizer.vocab_size)
    if best_of > 1 and params.greedy:
        raise errors.invalid("parameters.best_of: needs sampling (do_sample: true or a temperature, "
                             "top_k, top_p or typical_p); greedy decoding would give the same text "
                             f"{best_of} times", param="parameters.best_of")
    service.check_rows(best_of, "best_of", "parameters.best_of")
    prompt_ids = service.encode(body.inputs, "inputs")
    if p.truncate is not None:
        prompt_ids = prompt_ids[-p.truncate:]
    max_new_tokens = p.max_new_tokens if p.max_new_tokens is not None else \
        min(service.settings.default_max_new_tokens, service.settings.max_new_tokens)
    service.check_max_new_tokens(max_new_tokens, "parameters.max_new_tokens")
    # Every stream event and details.tokens carry log-probabilities; a plain JSON answer needs none.
    logprobs = (p.top_n_tokens or 0) if stream or p.details else None
    prompt_logprobs = 0 if p.details and p.decoder_input_details else None
    ranked = best_of > 1
    first = GenerationRequest(prompt_ids, max_new_tokens, params, tuple(p.stop), logprobs=logprobs,
                              prompt_logprobs=prompt_logprobs, ranked=ranked, final_only=not stream)
    rest = GenerationRequest(prompt_ids, max_new_tokens, first.params, first.stop, logprobs=logprobs,
                             ranked=ranked, final_only=not stream)
    return [first] + [nth_sample(rest, i) for i in range(1, best_of)]


def stream_details(finished: Finished) -> schemas.StreamDetails:
    return schemas.StreamDetails(finish_reason=FINISH_REASONS[finished.finish_reason],
                                 generated_tokens=finished.generated_tokens, seed=finished.seed,
                                 input_length=finished.input_length, truncated=finished.truncated)


def log_fields(request: Request, stream: bool, finished: Sequence[Finished] = (), **extra: object) -> None:
    fields: dict[str, object] = {"stream": stream, **extra}
    if finished:
        first = finished[0]
        fields.update(finish_reason=first.finish_reason,
                      generated_tokens=sum(f.generated_tokens for f in finished),
                      prompt_chars=first.input_length, **timings(first))
        if len(finished) > 1:
            fields["rows"] = len(finished)
    request.state.log = fields


def finite(logprob: float | None) -> float | None:
    """JSON has no infinities: a log-probability of -inf (a character that cannot occur) is null."""
    return logprob if logprob is not None and math.isfinite(logprob) else None


def alternatives(chars: str, token: TokenLogprob, n: int) -> list[schemas.Token]:
    return [schemas.Token(id=i, text=chars[i], logprob=finite(lp)) for i, lp in token.top[:n]]


def generated_tokens(service: Service, outcome: Outcome,
                     top_n: int) -> tuple[list[schemas.Token], list[list[schemas.Token]] | None]:
    """details.tokens (one per generated character, a stop string's included) and details.top_tokens."""
    chars, tokens = service.engine.tokenizer.chars, outcome.tokens
    if tokens is None:  # the engine reported no tokens: the characters output, without log-probabilities
        stoi = service.engine.tokenizer.stoi
        return [schemas.Token(id=stoi[c], text=c) for c in outcome.text], None
    listed = [schemas.Token(id=t.token_id, text=chars[t.token_id], logprob=finite(t.logprob)) for t in tokens]
    return listed, ([alternatives(chars, t, top_n) for t in tokens] if top_n else None)


def prefill(service: Service, prompt_ids: list[int], finished: Finished) -> list[schemas.PrefillToken]:
    chars, scores = service.engine.tokenizer.chars, prompt_scores(finished.prompt_logprobs, prompt_ids)
    return [schemas.PrefillToken(id=i, text=chars[i], logprob=finite(score.logprob) if score else None)
            for i, score in zip(prompt_ids, scores, strict=True)]


@router.post("/generate", response_model=schemas.GenerateResponse, responses=GENERATE_RESPONSES,
             summary="Generate text (TGI's shape); streams with `stream: true`")
@router.post("/", response_model=schemas.GenerateResponse, responses=GENERATE_RESPONSES,
             include_in_schema=False)
async def generate(body: schemas.GenerateRequest, request: Request,
                   service: ServiceDep) -> schemas.GenerateResponse | Response:
    if body.stream:
        return await generate_stream(body, request, service)
    requests = to_engine_requests(service, body, stream=False)
    outcomes = await service.complete(request, service.submit_all(requests))
    log_fields(request, stream=False, finished=[o.finished for o in outcomes])
    p = body.parameters
    # TGI's rule: the sequence of highest mean log-probability per token (the first of equals).
    best = max(range(len(outcomes)), key=lambda i: outcomes[i].mean_logprob)
    answer = outcomes[best]
    prefix = body.inputs if p.return_full_text else ""
    details = None
    if p.details:
        top_n = p.top_n_tokens or 0
        prompt = prefill(service, requests[0].prompt_ids, outcomes[0].finished) \
            if p.decoder_input_details else []
        tokens, top_tokens = generated_tokens(service, answer, top_n)
        others = None
        if len(outcomes) > 1:
            others = []
            for i, outcome in enumerate(outcomes):
                if i == best:
                    continue
                other_tokens, other_top = generated_tokens(service, outcome, top_n)
                others.append(schemas.BestOfSequence(
                    generated_text=prefix + outcome.text,
                    finish_reason=FINISH_REASONS[outcome.finished.finish_reason],
                    generated_tokens=outcome.finished.generated_tokens, seed=outcome.finished.seed,
                    prefill=prompt, tokens=other_tokens, top_tokens=other_top))
        details = schemas.GenerateDetails(**stream_details(answer.finished).model_dump(), prefill=prompt,
                                          tokens=tokens, top_tokens=top_tokens, best_of_sequences=others)
    return schemas.GenerateResponse(generated_text=prefix + answer.text, details=details,
                                    usage=schemas.Usage(**usage(answer.finished)),
                                    timings=schemas.Timings(**timings(answer.finished)))


@router.post("/generate_stream", response_class=Response, responses=STREAM_RESPONSES,
             summary="Generate text as Server-Sent Events, one per character (TGI's framing)")
async def generate_stream(body: schemas.GenerateRequest, request: Request, service: ServiceDep) -> Response:
    handles = service.submit_all(to_engine_requests(service, body, stream=True))
    await service.until_disconnect(request.receive, handles,
                                   service.wait_for_admission(handles, service.settings.keepalive_s))
    prefix = body.inputs if body.parameters.return_full_text else ""
    events = _native_events(service, request, handles[0], prefix, body.parameters.top_n_tokens or 0)
    return sse_response(events, service.settings.keepalive_s)


def _token_event(index: int, token_id: int, text: str, logprob: float | None,
                 top: list[dict] | None) -> str:
    # A StreamResponse without the final fields, written by hand: this runs once per character.
    event: dict = {"index": index,
                   "token": {"id": token_id, "text": text, "logprob": logprob, "special": False}}
    if top is not None:
        event["top_tokens"] = top
    event.update(generated_text=None, details=None)
    return json.dumps(event, separators=(",", ":"))


def _native_events(service: Service, request: Request, handle: RequestHandle, prefix: str,
                   top_n: int) -> AsyncIterator[bytes]:
    tokenizer = service.engine.tokenizer
    chars, stoi = tokenizer.chars, tokenizer.stoi
    index, pieces = 0, []

    def units(chunks: list[TextChunk]) -> list[tuple[int, str, float | None, list[dict] | None]]:
        """(token id, text released, log-probability, alternatives) per generated token."""
        out = []
        for chunk in chunks:
            token = chunk.token
            if token is None:  # an engine that reports no tokens: one event per character output
                out.extend((stoi[c], c, None, [] if top_n else None) for c in chunk.text)
                continue
            top = [{"id": i, "text": chars[i], "logprob": finite(lp), "special": False}
                   for i, lp in token.top[:top_n]] if top_n else None
            out.append((token.token_id, chunk.text, finite(token.logprob), top))
        return out

    def payloads(row: int, chunks: list[TextChunk], finished: Finished | None) -> list[str]:
        nonlocal index
        pieces.extend(chunk.text for chunk in chunks)
        steps = units(chunks)
        # The last token travels in the final event, with the whole text and the details.
        body = steps if finished is None else steps[:-1]
        events = [_token_event(index + n, *step) for n, step in enumerate(body)]
        index += len(body)
        if finished is not None:
            if steps:
                token_id, text, logprob, top = steps[-1]
                last = schemas.Token(id=token_id, text=text, logprob=logprob)
                top_tokens = [schemas.Token(**t) for t in top] if top is not None else None
            else:  # nothing was generated, or the last step released nothing: TGI's special token
                last = schemas.Token(id=finished.last_token_id or 0, text="", special=True)
                top_tokens = [] if top_n else None
            events.append(schemas.StreamResponse(
                index=index, token=last, top_tokens=top_tokens, generated_text=prefix + "".join(pieces),
                details=stream_details(finished), usage=schemas.Usage(**usage(finished)),
                timings=schemas.Timings(**timings(finished))).model_dump_json())
        return events

    return stream_steps(service, request, [handle], payloads, openai=False)


async def stream_steps(service: Service, request: Request, handles: Sequence[RequestHandle],
                       payloads: Callable[[int, list[TextChunk], Finished | None], list[str]], *,
                       openai: bool, opening: Sequence[str] = (),
                       trailer: str | None = None) -> AsyncIterator[bytes]:
    """A request's SSE events, for either API: `opening` first, then `payloads(row, chunks, finished)`
    gives the events of each step of each row; a failure after the stream started becomes an error
    event (in that API's shape) and cancels the request's other rows; then `trailer`, if any. A
    client that leaves mid-stream cancels every row, freeing them."""
    ended = False
    finished_rows: list[Finished] = []
    log_fields(request, stream=True)
    try:
        if opening:
            yield encode_events(opening)
        async with aclosing(service.merged_steps(handles)) as steps:  # closed here: its tasks end with it
            async for row, chunks, finished in steps:
                if finished is not None:
                    finished_rows.append(finished)
                    if len(finished_rows) == len(handles):
                        ended = True
                        log_fields(request, stream=True, finished=finished_rows)
                events = payloads(row, chunks, finished)
                if events:
                    yield encode_events(events)
    except APIError as error:
        ended = True
        cancel_all(handles)
        log_fields(request, stream=True, error_type=error.error_type)
        yield encode_events([stream_error_payload(error.error_type, error.message, openai=openai,
                                                  code=error.code)])
    finally:
        if not ended:  # the client left mid-stream: free its rows
            cancel_all(handles)
            service.metrics.disconnects.inc()
            log_fields(request, stream=True, disconnected=True)
    if trailer is not None:
        yield encode_events([trailer])


@router.post("/tokenize", response_model=list[schemas.TokenizedCharacter], responses=ERROR_RESPONSES,
             summary="The characters of a text and their ids")
async def tokenize(body: schemas.TokenizeRequest, service: ServiceDep) -> list[schemas.TokenizedCharacter]:
    ids = service.encode(body.inputs, "inputs")
    return [schemas.TokenizedCharacter(id=i, text=c, start=n, stop=n + 1)
            for n, (i, c) in enumerate(zip(ids, body.inputs, strict=True))]

"""The native routes, in Hugging Face TGI's shapes: /generate (and POST /, where TGI clients such as
`huggingface_hub.InferenceClient` send it), /generate_stream, /tokenize."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter, Request
from fastapi.responses import Response

from service import schemas
from service.engine import Finished, GenerationRequest, RequestHandle
from service.errors import APIError, stream_error_payload
from service.generation import Sampling, Service, ServiceDep, sampling_params, timings, usage
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


def to_engine_request(service: Service, body: schemas.GenerateRequest) -> GenerationRequest:
    p = body.parameters
    prompt_ids = service.encode(body.inputs, "inputs")
    if p.truncate is not None:
        prompt_ids = prompt_ids[-p.truncate:]
    max_new_tokens = p.max_new_tokens if p.max_new_tokens is not None else \
        min(service.settings.default_max_new_tokens, service.settings.max_new_tokens)
    service.check_max_new_tokens(max_new_tokens, "parameters.max_new_tokens")
    sampling = Sampling(p.temperature, p.top_k, p.top_p, p.repetition_penalty, p.seed, p.do_sample)
    return GenerationRequest(prompt_ids, max_new_tokens, sampling_params(sampling),
                             tuple(p.stop))


def stream_details(finished: Finished) -> schemas.StreamDetails:
    return schemas.StreamDetails(finish_reason=FINISH_REASONS[finished.finish_reason],
                                 generated_tokens=finished.generated_tokens, seed=finished.seed,
                                 input_length=finished.input_length, truncated=finished.truncated)


def log_fields(request: Request, stream: bool, finished: Finished | None = None, **extra: object) -> None:
    fields: dict[str, object] = {"stream": stream, **extra}
    if finished is not None:
        fields.update(finish_reason=finished.finish_reason, generated_tokens=finished.generated_tokens,
                      prompt_chars=finished.input_length, **timings(finished))
    request.state.log = fields


@router.post("/generate", response_model=schemas.GenerateResponse, responses=GENERATE_RESPONSES,
             summary="Generate text (TGI's shape); streams with `stream: true`")
@router.post("/", response_model=schemas.GenerateResponse, responses=GENERATE_RESPONSES,
             include_in_schema=False)
async def generate(body: schemas.GenerateRequest, request: Request,
                   service: ServiceDep) -> schemas.GenerateResponse | Response:
    if body.stream:
        return await generate_stream(body, request, service)
    handle = service.submit(to_engine_request(service, body))
    text, finished = await service.complete(request, handle)
    log_fields(request, stream=False, finished=finished)
    prefix = body.inputs if body.parameters.return_full_text else ""
    details = None
    if body.parameters.details:
        stoi = service.engine.tokenizer.stoi
        details = schemas.GenerateDetails(**stream_details(finished).model_dump(),
                                          tokens=[schemas.Token(id=stoi[c], text=c) for c in text])
    return schemas.GenerateResponse(generated_text=prefix + text, details=details,
                                    usage=schemas.Usage(**usage(finished)),
                                    timings=schemas.Timings(**timings(finished)))


@router.post("/generate_stream", response_class=Response, responses=STREAM_RESPONSES,
             summary="Generate text as Server-Sent Events, one per character (TGI's framing)")
async def generate_stream(body: schemas.GenerateRequest, request: Request, service: ServiceDep) -> Response:
    handle = service.submit(to_engine_request(service, body))
    await service.until_disconnect(request.receive, handle,
                                   service.wait_for_admission(handle, service.settings.keepalive_s))
    prefix = body.inputs if body.parameters.return_full_text else ""
    return sse_response(_native_events(service, request, handle, prefix), service.settings.keepalive_s)


def _token_event(index: int, token_id: int, text: str) -> str:
    # A StreamResponse without the final fields, written by hand: this runs once per character.
    token = {"id": token_id, "text": text, "logprob": None, "special": False}
    return json.dumps({"index": index, "token": token, "generated_text": None, "details": None},
                      separators=(",", ":"))


def _native_events(service: Service, request: Request, handle: RequestHandle,
                   prefix: str) -> AsyncIterator[bytes]:
    stoi = service.engine.tokenizer.stoi
    index, pieces = 0, []

    def payloads(text: str, finished: Finished | None) -> list[str]:
        nonlocal index
        pieces.append(text)
        # The last character travels in the final event, with the whole text and the details.
        chars = text if finished is None else text[:-1]
        events = [_token_event(index + n, stoi[c], c) for n, c in enumerate(chars)]
        index += len(chars)
        if finished is not None:
            if text:
                last = schemas.Token(id=stoi[text[-1]], text=text[-1])
            else:  # the last step released nothing (a stop string ended it): TGI's special token
                last = schemas.Token(id=finished.last_token_id or 0, text="", special=True)
            events.append(schemas.StreamResponse(
                index=index, token=last, generated_text=prefix + "".join(pieces),
                details=stream_details(finished), usage=schemas.Usage(**usage(finished)),
                timings=schemas.Timings(**timings(finished))).model_dump_json())
        return events

    return stream_steps(service, request, handle, payloads, openai=False)


async def stream_steps(service: Service, request: Request, handle: RequestHandle,
                       payloads: Callable[[str, Finished | None], list[str]], *, openai: bool,
                       trailer: str | None = None) -> AsyncIterator[bytes]:
    """A request's SSE events, for either API: `payloads(text, finished)` gives the events of each
    step; a failure after the stream started becomes an error event (in that API's shape); then
    `trailer`, if any. A client that leaves mid-stream cancels the request, freeing its row."""
    ended = False
    log_fields(request, stream=True)
    try:
        async for text, finished in service.steps(handle):
            if finished is not None:
                ended = True
                log_fields(request, stream=True, finished=finished)
            events = payloads(text, finished)
            if events:
                yield encode_events(events)
    except APIError as error:
        ended = True
        log_fields(request, stream=True, error_type=error.error_type)
        yield encode_events([stream_error_payload(error.error_type, error.message, openai=openai)])
    finally:
        if not ended:  # the client left mid-stream: free its row
            handle.cancel()
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

"""The OpenAI-compatible routes: /v1/completions (stream or not) and /v1/models, faithful enough for
the official `openai` client. finish_reason is `stop` or `length`; streams end with `data: [DONE]`."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import Response

from service import schemas
from service.engine import Finished, GenerationRequest, RequestHandle
from service.errors import APIError
from service.generation import Sampling, Service, ServiceDep, sampling_params, usage
from service.native import log_fields, stream_steps
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


def to_engine_request(service: Service, body: schemas.CompletionRequest) -> GenerationRequest:
    check_model(service, body.model)
    prompt_ids = service.encode(body.prompt, "prompt")
    max_tokens = body.max_tokens if body.max_tokens is not None else \
        min(DEFAULT_MAX_TOKENS, service.settings.max_new_tokens)
    service.check_max_new_tokens(max_tokens, "max_tokens")
    stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    sampling = Sampling(body.temperature, body.top_k, body.top_p, body.repetition_penalty, body.seed)
    return GenerationRequest(prompt_ids, max_tokens, sampling_params(sampling), tuple(stop))


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
    handle = service.submit(to_engine_request(service, body))
    completion_id = f"cmpl-{request.state.request_id}"
    if body.stream:
        await service.until_disconnect(request.receive, handle,
                                       service.wait_for_admission(handle, service.settings.keepalive_s))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = _chunks(service, request, handle, completion_id, body.model, include_usage)
        return sse_response(chunks, service.settings.keepalive_s)
    text, finished = await service.complete(request, handle)
    log_fields(request, stream=False, finished=finished)
    return schemas.Completion(
        id=completion_id, created=int(time.time()), model=body.model,
        choices=[schemas.CompletionChoice(text=text, finish_reason=FINISH_REASONS[finished.finish_reason])],
        usage=schemas.Usage(**usage(finished)))


def _chunks(service: Service, request: Request, handle: RequestHandle, completion_id: str,
            model: str, include_usage: bool) -> AsyncIterator[bytes]:
    created = int(time.time())

    def chunk(text: str, finished: Finished | None = None) -> str:
        reason = FINISH_REASONS[finished.finish_reason] if finished else None
        return schemas.Completion(id=completion_id, created=created, model=model, choices=[
            schemas.CompletionChoice(text=text, finish_reason=reason)]).model_dump_json()

    def payloads(text: str, finished: Finished | None) -> list[str]:
        if finished is None:
            return [chunk(char) for char in text]
        last = [*(chunk(char) for char in text[:-1]), chunk(text[-1:], finished)]
        if include_usage:
            last.append(schemas.Completion(id=completion_id, created=created, model=model, choices=[],
                                           usage=schemas.Usage(**usage(finished))).model_dump_json())
        return last

    return stream_steps(service, request, handle, payloads, openai=True, trailer="[DONE]")


"""The FastAPI application: `create_app(settings, engine=None)` wires the engine, the routes, the
error handlers and the middleware together. Operational routes (health, readiness, info, metrics,
the playground page) live here; generation routes in service/native.py and service/openai_api.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from service import errors, native, openai_api, schemas
from service.engine import Engine, EngineLike
from service.errors import APIError, error_response
from service.generation import ClientDisconnected, Service
from service.metrics import ServiceMetrics
from service.middleware import APIKeyMiddleware, BodyLimitMiddleware, RequestContextMiddleware
from service.schemas import MAX_STOP_STRINGS
from service.settings import Settings

STATIC_DIR = Path(__file__).resolve().parent / "static"
LOGPROBS_NOTE = ("natural logarithms of the model's raw distribution, before temperature, penalties, "
                 "logit bias and the top-k / top-p / min-p / typical-p filters (as vLLM reports them)")
CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client left"; nobody receives it, the log does

try:
    VERSION = version("caesar-gpt")
except PackageNotFoundError:  # running from a source tree that was not installed
    VERSION = "0.0.0"


def create_app(settings: Settings, engine: EngineLike | None = None) -> FastAPI:
    """Build the app. Without `engine`, load the checkpoint that `settings` names (raises
    gpt.CheckpointError for a bad one). The engine starts (warm-up, then ready) with the app's
    lifespan and stops with it."""
    engine = engine if engine is not None else Engine.from_settings(settings)
    metrics = ServiceMetrics(engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.shutdown()

    app = FastAPI(title="caesar-gpt", version=VERSION, lifespan=lifespan,
                  description="A character-level GPT-2 trained on Julius Caesar: TGI- and OpenAI-style APIs.")
    app.state.service = Service(settings, engine, metrics)
    app.include_router(native.router)
    app.include_router(openai_api.router)
    app.include_router(operations)
    add_error_handlers(app)

    # Added innermost first: request context (outermost) > CORS > API keys > body limit > routes.
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(APIKeyMiddleware, api_keys=settings.api_keys)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
                           expose_headers=["X-Request-ID"])
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    return app


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        request.state.log = {**getattr(request.state, "log", {}), "error_type": error.error_type}
        return error_response(error, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(errors.from_validation_error(list(error.errors())), request.url.path)

    @app.exception_handler(ValidationError)
    async def invalid_model(request: Request, error: ValidationError) -> JSONResponse:
        return error_response(errors.from_validation_error(error), request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 400:  # FastAPI could not read the body (not UTF-8, nested too deep...)
            unreadable = errors.invalid(f"the body is not valid JSON: {error.detail}", code="invalid_json")
            return error_response(unreadable, request.url.path)
        error_type = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "validation")
        message = f"no route {request.method} {request.url.path[:200]}" if error.status_code in (404, 405) \
            else str(error.detail)
        return error_response(APIError(error.status_code, message, error_type, code=error_type,
                                       headers=error.headers), request.url.path)

    @app.exception_handler(ClientDisconnected)
    async def client_left(request: Request, error: ClientDisconnected) -> Response:
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(Exception)
    async def internal(request: Request, error: Exception) -> JSONResponse:
        return error_response(APIError(500, "internal error", "internal", code="internal_error"),
                              request.url.path)


# --- Operational routes --------------------------------------------------------------------------

operations = APIRouter(tags=["operations"])


def _service(request: Request) -> Service:
    return request.app.state.service


@operations.get("/health", response_model=schemas.Health, responses={503: {"model": schemas.Health}})
async def health(request: Request) -> JSONResponse:
    """Liveness: the process answers and the scheduler thread is alive."""
    alive = _service(request).engine.alive
    return JSONResponse({"status": "ok" if alive else "unhealthy"}, status_code=200 if alive else 503)


@operations.get("/ready", response_model=schemas.Readiness, responses={503: {"model": schemas.Readiness}})
async def ready(request: Request) -> JSONResponse:
    """Readiness: warmed up, scheduler alive, not draining."""
    engine = _service(request).engine
    if engine.ready:
        status = "ready"
    elif engine.draining:
        status = "draining"
    elif not engine.alive:
        status = "unhealthy"
    elif engine.restarting:
        status = "restarting"
    else:
        status = "loading"
    body = {"status": status, "queue": engine.queue_size, "running": engine.running_rows}
    headers = {} if status == "ready" else {"Retry-After": str(errors.RETRY_AFTER_UNAVAILABLE_S)}
    return JSONResponse(body, status_code=200 if status == "ready" else 503, headers=headers)


@operations.get("/info", response_model=schemas.Info)
async def info(request: Request) -> schemas.Info:
    """The model card, the limits a request must keep to, and the settings (never the API keys)."""
    service = _service(request)
    settings, card = service.settings, service.engine.model_card()
    limits = {"max_new_tokens": settings.max_new_tokens,
              "default_max_new_tokens": settings.default_max_new_tokens,
              "max_stop_strings": MAX_STOP_STRINGS, "max_batch_size": settings.max_batch_size,
              "max_queue": settings.max_queue, "max_body_bytes": settings.max_body_bytes,
              "context": card["context"], "max_logprobs": schemas.MAX_LOGPROBS,
              "max_top_n_tokens": schemas.MAX_LOGPROBS, "max_n": schemas.MAX_SAMPLES,
              "max_best_of": schemas.MAX_SAMPLES, "max_prompts": schemas.MAX_PROMPTS,
              "max_rows_per_request": settings.max_batch_size + settings.max_queue}
    parameters = {"native": list(schemas.GenerateParameters.model_fields),
                  "openai": list(schemas.CompletionRequest.model_fields)}
    return schemas.Info(model_id=settings.served_model_name, version=VERSION, model=card, limits=limits,
                        parameters=parameters, logprobs=LOGPROBS_NOTE, settings=settings.public_dict())


@operations.get("/metrics", response_class=Response,
                responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}})
async def metrics(request: Request) -> Response:
    """Prometheus exposition."""
    return Response(generate_latest(_service(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


@operations.get("/", response_class=FileResponse, include_in_schema=False)
async def playground() -> FileResponse:
    """The web playground (service/static/index.html)."""
    page = STATIC_DIR / "index.html"
    if not page.is_file():
        raise APIError(404, "no playground page in this installation", "not_found", code="not_found")
    return FileResponse(page, media_type="text/html")

"""The FastAPI app: OpenAI routes, error shapes, strict JSON bodies, disconnects; wrapped in guard.RequestGuard."""

from __future__ import annotations

import asyncio
import functools
import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from pllm import __version__
from pllm.runtime.server.async_engine import AsyncEngine
from pllm.runtime.server.guard import RequestGuard
from pllm.runtime.server.json_body import JSONBodyError, parse_json_body
from pllm.runtime.server.limits import MAX_BODY_BYTES, REQUEST_BODY_TIMEOUT_S
from pllm.runtime.server.protocol_chat import ChatCompletionRequest
from pllm.runtime.server.protocol_completions import CompletionRequest
from pllm.runtime.server.protocol_embeddings import EmbeddingRequest
from pllm.runtime.server.protocol_responses import (
    ChatCompletionResponse,
    CompletionResponse,
    DetokenizeResponse,
    EmbeddingResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeResponse,
)
from pllm.runtime.server.protocol_tokenize import DetokenizeRequest, TokenizeRequest
from pllm.runtime.server.request_stream import ClientDisconnected, EngineError, RequestStream
from pllm.runtime.server.serving import OpenAIServing
from pllm.runtime.server.serving_chat import ChatServing
from pllm.runtime.server.serving_completions import CompletionServing
from pllm.runtime.server.serving_embeddings import EmbeddingServing
from pllm.runtime.server.serving_lora import LoadLoRAAdapterRequest, LoraServing, UnloadLoRAAdapterRequest
from pllm.runtime.server.serving_tokenize import TokenizeServing
from pllm.runtime.server.serving_tools import ToolCalling
from pllm.runtime.server.sse import error_response

logger = logging.getLogger("pllm.server")

ERROR_RESPONSES = {s: {"model": ErrorResponse} for s in (400, 401, 404, 408, 413, 500, 503)}


class BadBody(StarletteHTTPException):
    """A 400 raised while FastAPI reads the body (only HTTPExceptions pass its body reader unchanged)."""

    def __init__(self, message: str, param: str | None):
        super().__init__(400, message)
        self.param = param


class _StrictJSONRequest(Request):
    async def json(self):
        if not hasattr(self, "_json"):
            try:
                self._json = parse_json_body(await self.body())
            except JSONBodyError as exc:
                raise BadBody(exc.message, exc.param) from None
        return self._json


class _StrictJSONRoute(APIRoute):
    """Every route parses its JSON body strictly, so no endpoint sees NaN, Infinity or text that is not UTF-8."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(_StrictJSONRequest(request.scope, request.receive))

        return strict


class SSEResponse(StreamingResponse):
    """An SSE response that aborts its engine requests however it ends (a disconnect may cancel it unstarted)."""

    def __init__(self, chunks, stream: RequestStream):
        super().__init__(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._stream = stream

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._stream.close()


async def _until_disconnect(raw: Request, stream: RequestStream, work) -> Response:
    """Await a non-streaming response while watching the socket: a client that leaves aborts its request."""

    async def watch():
        while (await raw.receive())["type"] != "http.disconnect":
            pass
        stream.cancel()

    watcher = asyncio.create_task(watch())
    try:
        body = await work
        return Response(body.model_dump_json(), media_type="application/json")
    except ClientDisconnected:
        return Response(status_code=499)  # nobody reads it; uvicorn drops it
    finally:
        watcher.cancel()
        stream.close()


def _is_json_type(content_type: str) -> bool:
    """Whether FastAPI parses a body of this Content-Type as JSON (application/json or application/*+json)."""
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    # Built from errors() (loc and msg only): str(exc) would echo the input, which may be huge.
    errors = exc.errors()
    parts, param = [], None
    for e in errors[:5]:
        loc = list(e.get("loc", ()))
        loc = loc[1:] if loc[:1] == ["body"] else loc
        if loc and isinstance(loc[0], str):
            param = param or loc[0]
        where = ".".join(str(x) for x in loc) if loc and isinstance(loc[0], str) else "body"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    message = f"{len(errors)} validation error(s): " + "; ".join(parts) + more
    return message[:2000], param


def create_app(
    engine: AsyncEngine,
    served_model_names: list[str],
    api_key: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    request_body_timeout_s: float = REQUEST_BODY_TIMEOUT_S,
    tool_call_parser: str | None = None,
    allow_runtime_lora_updating: bool = False,
) -> FastAPI:
    serving = OpenAIServing(engine, served_model_names)
    tool_calling = ToolCalling(tool_call_parser, serving.tokenizer.chat_template)
    completion_serving, chat_serving = CompletionServing(serving), ChatServing(serving, tool_calling)
    embedding_serving = EmbeddingServing(serving)
    tokenize_serving = TokenizeServing(serving, chat_serving)
    app = FastAPI(title="pllm", version=__version__)
    app.router.route_class = _StrictJSONRoute
    app.state.serving = serving
    app.state.embeddings = embedding_serving

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        content_type = request.headers.get("content-type", "")
        if not _is_json_type(content_type):  # FastAPI read it as bytes or a form: no field can be named
            got = f"got Content-Type {content_type[:100]!r}" if content_type else "no Content-Type was sent"
            return error_response(
                400, f"The body must be a JSON object sent with Content-Type: application/json ({got})."
            )
        message, param = _validation_message(exc)
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), getattr(exc, "param", None), headers=exc.headers)

    @app.exception_handler(EngineError)
    async def on_engine_error(_request, exc: EngineError):
        return error_response(exc.status, exc.message, exc.param, exc.retry_after_s)

    @app.exception_handler(Exception)
    async def on_internal_error(_request, exc: Exception):
        logger.error("internal error: %s", type(exc).__name__, exc_info=exc)
        return error_response(500, "Internal server error.")

    def log_ignored(body) -> None:
        if body.ignored_fields:
            # the names are the client's: escaped, so a newline or a terminal escape cannot forge or hide log lines
            fields = ", ".join(body.ignored_fields)[:500].encode("unicode_escape").decode("ascii")
            logger.info("ignored request fields: %s", fields)

    json_or_sse = {"content": {"text/event-stream": {}}}

    @app.post("/v1/completions", responses={**ERROR_RESPONSES, 200: {"model": CompletionResponse, **json_or_sse}})
    async def completions(body: CompletionRequest, raw: Request):
        arrival = time.monotonic()
        lora = serving.check_model(body.model)
        log_ignored(body)
        header_id = raw.headers.get("x-request-id")
        prep = serving.under_lora(await completion_serving.prepare(body, arrival, header_id), lora)
        stream = await engine.generate(prep.requests)
        if body.stream:
            return SSEResponse(completion_serving.stream(body, prep, stream), stream)
        return await _until_disconnect(raw, stream, completion_serving.response(body, prep, stream))

    chat_responses = {**ERROR_RESPONSES, 200: {"model": ChatCompletionResponse, **json_or_sse}}

    @app.post("/v1/chat/completions", responses=chat_responses)
    async def chat_completions(body: ChatCompletionRequest, raw: Request):
        arrival = time.monotonic()
        lora = serving.check_model(body.model)
        log_ignored(body)
        header_id = raw.headers.get("x-request-id")
        prep = serving.under_lora(await chat_serving.prepare(body, arrival, header_id), lora)
        stream = await engine.generate(prep.requests)
        if body.stream:
            return SSEResponse(chat_serving.stream(body, prep, stream), stream)
        return await _until_disconnect(raw, stream, chat_serving.response(body, prep, stream))

    @app.post("/v1/embeddings", responses={**ERROR_RESPONSES, 200: {"model": EmbeddingResponse}})
    async def embeddings(body: EmbeddingRequest, raw: Request):
        arrival = time.monotonic()
        serving.check_base_model(body.model)
        log_ignored(body)
        return await embedding_serving.create(body, arrival, functools.partial(_until_disconnect, raw))

    # As vLLM serves them: outside /v1, so not behind the API key (RequestGuard guards /v1 only).
    @app.post("/tokenize", response_model=TokenizeResponse, responses=ERROR_RESPONSES)
    async def tokenize(body: TokenizeRequest):
        serving.check_model(body.model)
        log_ignored(body)
        return await tokenize_serving.tokenize(body)

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=ERROR_RESPONSES)
    async def detokenize(body: DetokenizeRequest):
        serving.check_model(body.model)
        log_ignored(body)
        return await tokenize_serving.detokenize(body)

    def model_cards() -> list[ModelCard]:
        cards = [
            ModelCard(id=name, root=served_model_names[0], max_model_len=serving.max_model_len)
            for name in served_model_names
        ]
        cards += [  # as vLLM lists them: the adapter's folder as root, the base model as parent
            ModelCard(id=name, root=lora.path, parent=served_model_names[0], max_model_len=serving.max_model_len)
            for name, lora in serving.loras.items()
        ]
        return cards

    @app.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
    async def models():
        return ModelList(data=model_cards())

    # OpenAI's retrieve (the openai client's models.retrieve); a served name may hold a slash (org/model)
    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=ERROR_RESPONSES)
    async def model(model_id: str):
        card = next((c for c in model_cards() if c.id == model_id), None)
        if card is None:
            raise EngineError(404, f"The model `{model_id[:256]}` does not exist.", param="model")
        return card

    if allow_runtime_lora_updating:  # else unregistered, a 404, as vLLM's server without the setting
        logger.warning("LoRA adapters may be loaded and unloaded at runtime: /v1/load_lora_adapter reads any folder "
                       "it is given on this machine")
        lora_serving = LoraServing(serving)

        @app.post("/v1/load_lora_adapter", response_class=PlainTextResponse, responses=ERROR_RESPONSES)
        async def load_lora_adapter(body: LoadLoRAAdapterRequest):
            log_ignored(body)
            return PlainTextResponse(await lora_serving.load(body))

        @app.post("/v1/unload_lora_adapter", response_class=PlainTextResponse, responses=ERROR_RESPONSES)
        async def unload_lora_adapter(body: UnloadLoRAAdapterRequest):
            log_ignored(body)
            return PlainTextResponse(await lora_serving.unload(body))

    @app.get("/health", response_class=Response, responses={503: {"model": ErrorResponse}})
    async def health():
        if not engine.is_alive:
            return error_response(503, "The engine loop is dead.")
        if engine.draining:  # load balancers must stop routing here before the listener closes
            return error_response(503, "The server is draining (shutting down) and takes no new requests.")
        return Response(status_code=200)

    # vLLM's /ping (SageMaker's health check): /health's answer, on GET and POST
    app.add_api_route("/ping", health, methods=["GET", "POST"], response_class=Response,
                      responses={503: {"model": ErrorResponse}})

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        if engine.metrics is None:
            return Response(b"", media_type=CONTENT_TYPE_LATEST)
        return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def openapi():
        # Validation errors are 400 here, so FastAPI's generated 422 entries would document a lie.
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            for path in schema.get("paths", {}).values():
                for op in path.values():
                    op.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return RequestGuard(app, api_key, max_body_bytes, request_body_timeout_s)  # type: ignore[return-value]

"""The FastAPI app of `mm-llama serve`: `POST /v1/chat/completions` (plain or server-sent events), `GET /v1/models`,
`GET /health`.

Every refusal is a 4xx with OpenAI's error body (`{"error": {"message", "type", "param", "code"}}`), so the official
`openai` client raises its usual exception types; a request's state lives in its own `Job`, so a refused or broken
request leaves nothing behind. One log line per request: id, status, tokens in/out, latency.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ...generation import GenerationSettings, build_generation_inputs
from .engine import BatchingEngine, Job
from .media import MediaResolver
from .schema import (
    ApiError,
    ChatCompletionRequest,
    Usage,
    completion_chunk,
    completion_response,
)

logger = logging.getLogger("mm_llama.frontends.serving")
DISCONNECT_POLL_S = 0.25  # how often a waiting non-streamed request checks that its client is still there


@dataclass
class ServerConfig:
    """What the routes need besides the engine: the served name, context length and request defaults."""

    model_name: str
    context_length: int
    defaults: GenerationSettings  # for requests that leave max_tokens / temperature / top_p out
    api_key: str | None = None
    max_body_bytes: int = 64 * 2**20


def create_app(engine: BatchingEngine, resolver: MediaResolver, config: ServerConfig) -> Any:
    """The ASGI app: the FastAPI routes behind `RequestGuard` (API key and body size, checked before anything is
    parsed). Starts the engine on startup; on shutdown (after uvicorn let running requests finish) stops it."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await run_in_threadpool(engine.stop)
        resolver.close()

    app = FastAPI(title="MM-LLaMA", lifespan=lifespan, docs_url=None, redoc_url=None)
    _add_error_handlers(app)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": config.model_name, "waiting": engine.waiting}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "mm-llama"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        started = time.monotonic()
        if body.model != config.model_name:
            raise ApiError(404, f"The model {body.model!r} does not exist on this server; it serves "
                                f"{config.model_name!r} (GET /v1/models).", code="model_not_found", param="model")
        job = await run_in_threadpool(_prepare, engine, resolver, config, body, asyncio.get_running_loop())
        engine.submit(job)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_stream(job, config.model_name, include_usage, started),
                                     media_type="text/event-stream")
        kind, data = await _wait(job, request)
        if kind == "cancelled":
            _log(job, "cancelled", started, stream=False)
            return Response(status_code=499)
        if kind == "error":
            raise ApiError(500, data["message"], type="server_error")
        usage = _usage(job, data)
        _log(job, data["finish_reason"], started, stream=False, usage=usage, batch=data["batch_size"])
        return JSONResponse(completion_response(job.id, int(time.time()), config.model_name, data["text"],
                                                data["finish_reason"], usage))

    return RequestGuard(app, config.api_key, config.max_body_bytes)


def _prepare(engine: BatchingEngine, resolver: MediaResolver, config: ServerConfig, body: ChatCompletionRequest,
             loop: asyncio.AbstractEventLoop) -> Job:
    """Request -> Job (in a worker thread: media are decoded and embedded here). Raises ApiError for a conversation
    the model cannot take."""
    if body.messages[-1].role != "user":
        raise ApiError(400, f"The last message is a {body.messages[-1].role!r} message; end with the user message "
                            "to answer.", code="invalid_messages", param="messages")
    conversation = resolver.conversation(body.messages)
    try:
        inputs = build_generation_inputs(engine.processor, [conversation], engine.embedder)
    except ValueError as error:  # roles out of order, ...
        raise ApiError(400, str(error).replace("conversation, message", "messages"), code="invalid_messages",
                       param="messages") from error
    prompt_tokens = int(inputs["input_ids"].shape[1])
    if prompt_tokens >= config.context_length:
        raise ApiError(400, f"The prompt is {prompt_tokens} tokens; this model reads at most "
                            f"{config.context_length} tokens (prompt and answer). Shorten the messages.",
                       code="context_length_exceeded", param="messages")
    defaults = config.defaults
    limit = body.answer_limit or defaults.max_new_tokens
    return Job(
        id=f"chatcmpl-{uuid.uuid4().hex}", conversation=conversation, prompt_tokens=prompt_tokens,
        max_tokens=min(limit, config.context_length - prompt_tokens),  # what the context has left, at most
        temperature=defaults.temperature if body.temperature is None else body.temperature,
        top_p=defaults.top_p if body.top_p is None else body.top_p, seed=body.seed, stop=body.stop, loop=loop)


async def _wait(job: Job, request: Request) -> tuple[str, dict]:
    """The job's final event; ("cancelled", {}) when the client went away first (its row is then stopped)."""
    while True:
        try:
            kind, data = await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S)
        except TimeoutError:
            if await request.is_disconnected():
                job.cancel()
                return "cancelled", {}
            continue
        if kind != "delta":
            return kind, data


async def _stream(job: Job, model_name: str, include_usage: bool, started: float) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`. A client that disconnects closes
    this generator, which stops the job's row."""
    created = int(time.time())

    def event(payload: Any) -> str:
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    outcome = "cancelled"
    try:
        yield event(completion_chunk(job.id, created, model_name, {"role": "assistant", "content": ""}))
        while True:
            kind, data = await job.events.get()
            if kind == "delta":
                yield event(completion_chunk(job.id, created, model_name, {"content": data["text"]}))
                continue
            if kind == "error":
                outcome = "error"
                yield event(ApiError(500, data["message"], type="server_error").body())
            else:
                outcome = data["finish_reason"]
                usage = _usage(job, data)
                yield event(completion_chunk(job.id, created, model_name, {}, data["finish_reason"]))
                if include_usage:
                    yield event(completion_chunk(job.id, created, model_name, {}, usage=usage, with_choice=False))
                _log(job, outcome, started, stream=True, usage=usage, batch=data["batch_size"])
            yield "data: [DONE]\n\n"
            return
    finally:
        job.cancel()  # no effect on a finished job; stops the row of one whose client went away
        if outcome in ("cancelled", "error"):
            _log(job, outcome, started, stream=True)


def _usage(job: Job, data: dict) -> Usage:
    return Usage(prompt_tokens=job.prompt_tokens, completion_tokens=data["completion_tokens"],
                 total_tokens=job.prompt_tokens + data["completion_tokens"])


def _log(job: Job, outcome: str, started: float, stream: bool, usage: Usage | None = None, batch: int = 0) -> None:
    tokens_out = usage.completion_tokens if usage else job.generated
    logger.info("%s %s tokens_in=%d tokens_out=%d latency=%.3fs batch=%d stream=%s", job.id, outcome,
                job.prompt_tokens, tokens_out, time.monotonic() - started, batch, "yes" if stream else "no")


# ---------------------------------------------------------------------------------------------------- errors


def _error_response(request: Request, error: ApiError) -> JSONResponse:
    logger.info("%s %s %d %s: %s", request.method, request.url.path, error.status, error.code or error.type,
                error.message)
    return JSONResponse(error.body(), status_code=error.status)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return _error_response(request, error)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = error.errors()
        if any(problem.get("type") == "json_invalid" for problem in problems):
            detail = problems[0].get("ctx", {}).get("error", "")
            return _error_response(request, ApiError(400, f"The request body is not valid JSON ({detail}).",
                                                     code="invalid_json"))
        first = problems[0] if problems else {}
        where = ".".join(str(part) for part in first.get("loc", ())[1:]) or "body"
        message = "; ".join(f"{'.'.join(str(p) for p in problem.get('loc', ())[1:]) or 'body'}: "
                            f"{problem.get('msg', '')}" for problem in problems[:5])
        return _error_response(request, ApiError(400, f"Invalid request: {message}", param=where))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return _error_response(request, ApiError(error.status_code, str(error.detail), code=str(error.status_code)))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.exception("request failed")
        return _error_response(request, ApiError(500, f"Internal error ({type(error).__name__}); see the server "
                                                      "log.", type="server_error"))


class RequestGuard:
    """ASGI wrapper run before any parsing: the API key of `/v1/*` routes (`Authorization: Bearer KEY`), then the
    body size (413 over `max_body_bytes`, whether or not the client sent Content-Length). The body is read here and
    replayed to the app."""

    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.api_key and scope["path"].startswith("/v1"):
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                return await self._refuse(scope, send, ApiError(
                    401, "Incorrect or missing API key: send 'Authorization: Bearer <key>' with the key the server "
                         "was started with (--api_key).", code="invalid_api_key"))
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > 4 * self.max_body_bytes:
            return await self._refuse(scope, send, self._too_large(int(declared)))
        # A body somewhat over the limit is read to its end (and dropped) before the 413, so that the client, which
        # sends the whole body before it reads the answer, gets the 413 and not a broken connection.
        body, size, more = bytearray(), 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away while sending
            size += len(message.get("body", b""))
            if size <= self.max_body_bytes:
                body += message.get("body", b"")
            more = message.get("more_body", False)
        if size > self.max_body_bytes:
            return await self._refuse(scope, send, self._too_large(size))
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()  # disconnect notifications
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    def _too_large(self, size: int) -> ApiError:
        return ApiError(413, f"The request body is {size / 2**20:.1f} MiB; this server accepts at most "
                             f"{self.max_body_bytes / 2**20:.1f} MiB (--max_body_mb).", code="request_too_large")

    async def _refuse(self, scope: dict, send: Any, error: ApiError) -> None:
        logger.info("%s %s %d %s: %s", scope.get("method"), scope["path"], error.status, error.code, error.message)
        await JSONResponse(error.body(), status_code=error.status)(scope, None, send)


__all__ = ["RequestGuard", "ServerConfig", "create_app"]

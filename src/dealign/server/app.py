"""The FastAPI application: OpenAI-compatible endpoints over one ``Aligner``.

``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream``), ``GET /v1/models``,
``GET /v1/models/{id}`` and ``GET /health``; ``GET /`` is the explorer, a page that runs greedy and
DeAL side by side and plays the search back step by step (``static/``, ``docs/trace.md``).  Every error, including a malformed body and an unknown
route, is answered in OpenAI's error format with a message naming the problem; a 500 only ever means
a bug (its traceback goes to the server log, never to the client).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from ..backends.cpu_threads import release_team
from .worker import Job, Outcome, Worker
from .limits import ServerLimits
from .schemas import ApiError, ChatCompletionRequest, CompletionRequest, describe_validation, plan

log = logging.getLogger("dealign.server")
GRACE = 1.0  # seconds past a deadline before the handler stops waiting for the worker
POLL = 0.25  # how often a waiting handler checks the deadline and the connection
ROUTES = "POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, GET / (the explorer page)"
STATIC = Path(__file__).parent / "static"
# the page runs only its own script and style: text from a model or a user can never run as code there
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; "
                                           "base-uri 'none'; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorBody(BaseModel):
    """Every error this server answers (``ApiError.body()``), as the OpenAPI schema declares it."""

    error: ErrorDetail


# Why each error status is answered; the routes declare the ones they can return (``responses=``), so
# /openapi.json documents every status a client sees.  A 500 is not declared: it only ever means a bug.
WHY = {
    400: "Malformed JSON, a missing body, an unknown or invalid field or setting, a request over one of this "
         "server's limits (the message names the flag that sets it), or a prompt too long.",
    404: "The model named is not the one served here (see GET /v1/models).",
    413: "The request body is larger than this server accepts (--max-body-bytes).",
    429: "The queue is full (--queue-size): one request runs and the others wait; Retry-After says when to retry.",
    499: "The client closed the connection before the answer (logged; no client reads it).",
    503: "The request ran past this server's time limit (--timeout, queue included), or the server is shutting down.",
}
COMPLETION_ERRORS = (400, 404, 413, 429, 499, 503)
# One server-sent event (OpenAPI 3.0/3.1 put the per-event schema under ``schema``; 3.2 calls it itemSchema):
# ``data`` is a JSON chunk (or ``[DONE]``), as OpenAI streams it
SSE_EVENT = {"type": "object", "required": ["data"],
             "properties": {"data": {"type": "string", "contentMediaType": "application/json"},
                            "event": {"type": "string"}, "id": {"type": "string"}, "retry": {"type": "integer"}}}
STREAM = {200: {"description": "The answer as JSON or, with ``stream: true``, as server-sent events.",
                "content": {"text/event-stream": {"schema": SSE_EVENT}}}}


def errors(*statuses: int) -> dict[int, dict]:
    """The ``responses=`` entries of a route that can answer ``statuses``, with the error schema."""
    return {status: {"model": ErrorBody, "description": WHY[status]} for status in statuses}


def _without_422(app: FastAPI) -> None:
    """FastAPI documents a 422 for every route with a body; this server answers invalid bodies with a
    400 (OpenAI's convention), so the 422 and its validation-error schemas leave /openapi.json."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = generate()
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
        return app.openapi_schema

    app.openapi = openapi


class BodyTooLarge(HTTPException):
    """Raised while the body is read; FastAPI passes HTTPExceptions through to the handlers."""


class BodyLimit:
    """Refuses request bodies over ``max_bytes`` (413), by Content-Length or while reading."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"the request body is larger than this server accepts ({self.max_bytes} bytes, set by --max-body-bytes)"
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            response = _error(ApiError(413, message, code="body_too_large"))
            return await response(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > self.max_bytes:
                raise BodyTooLarge(413, message)
            return msg

        await self.app(scope, limited, send)


def _error(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def create_app(aligner: Any, limits: ServerLimits | None = None, *, model_name: str = "model") -> FastAPI:
    limits = limits or ServerLimits()
    worker = Worker(aligner, limits)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        worker.shutdown()

    app = FastAPI(title="dealign", summary="DeAL decoding-time alignment, OpenAI-compatible", lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.worker = worker
    _without_422(app)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = describe_validation(list(exc.errors()))
        return _error(ApiError(400, message, param=param))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}; this server offers {ROUTES}"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}; this server offers {ROUTES}"
        else:
            message = str(exc.detail)
        return _error(ApiError(exc.status_code, message, headers=getattr(exc, "headers", None)))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return _error(ApiError(500, f"internal server error ({type(exc).__name__}); the server log has the details",
                               type="server_error"))

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "dealign"}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name, **worker.status(), "rewards": limits.offered_rewards(),
                "limits": {"max_tokens": limits.max_tokens, "max_candidates": limits.max_candidates,
                           "timeout": limits.timeout, "allow_regex": limits.allow_regex}}

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", responses=errors(404))
    async def model(model_id: str) -> dict:
        _check_model(model_id, model_name)
        return model_card()

    @app.post("/v1/completions", responses={**STREAM, **errors(*COMPLETION_ERRORS)})
    async def completions(body: CompletionRequest, request: Request):
        return await _answer(request, body, chat=False, default_max_tokens=min(16, limits.max_tokens))

    @app.post("/v1/chat/completions", responses={**STREAM, **errors(*COMPLETION_ERRORS)})
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await _answer(request, body, chat=True, default_max_tokens=limits.max_tokens)

    async def _answer(request: Request, body, *, chat: bool, default_max_tokens: int):
        _check_model(body.model, model_name)
        cfg, reward, prompt_options, settings, fmt = plan(body, limits, default_max_tokens=default_max_tokens,
                                                          defaults=getattr(aligner, "search_defaults", None))
        job = Job(body.job_prompt(), cfg, reward, prompt_options, body.stop or [],
                  deadline=time.monotonic() + limits.timeout,
                  coverage=settings.coverage if settings is not None else None,
                  trace=bool(settings is not None and settings.output.get("trace")), constraint=fmt)
        worker.check_prompt(job)
        reply = _Reply(chat, model_name)
        if not body.stream:
            future = worker.submit(job)
            return reply.full(await _wait(future, job, request, worker))
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        future = worker.submit(job, emit=lambda item: loop.call_soon_threadsafe(events.put_nowait, item))
        future.add_done_callback(lambda _: events.put_nowait(None))  # after every delta the worker queued
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(reply, job, future, events, worker, request, include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


def _check_model(name: str, served: str) -> None:
    if name != served:
        raise ApiError(404, f"model {name!r} is not served here; this server serves {served!r} (see GET /v1/models)",
                       param="model", code="model_not_found")


async def _wait(future: asyncio.Future, job: Job, request: Request, worker: Worker) -> Outcome:
    """The job's outcome; gives up (and tells the worker) at the deadline or when the client leaves."""
    while not future.done():
        await asyncio.wait({future}, timeout=POLL)
        if not future.done() and await _late_or_gone(job, request, worker):
            raise ApiError(499, "the client closed the connection")
    return _outcome(future)


def _outcome(future: asyncio.Future) -> Outcome:
    """The worker's result; a job dropped without one (the server is stopping) is a 503."""
    outcome = None if future.cancelled() else future.result()
    if outcome is None:
        raise ApiError(503, "the server is shutting down; retry on another instance or later", type="unavailable")
    return outcome


async def _late_or_gone(job: Job, request: Request, worker: Worker) -> bool:
    """Checked while a handler waits for the worker: past the deadline raise the time-limit error; True
    if the client went away.  Either way the job is cancelled, so its search stops at the next step."""
    if time.monotonic() > job.deadline + GRACE:
        job.cancelled.set()
        raise worker.timeout_error()
    if await request.is_disconnected():
        job.cancelled.set()
        return True
    return False


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _stream(reply: "_Reply", job: Job, future: asyncio.Future, events: asyncio.Queue, worker: Worker,
                  request: Request, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: a chunk per committed delta, a final chunk with the finish reason and the
    ``alignment`` report, an optional usage chunk, then ``[DONE]``.  With ``alignment.trace`` the
    trace's parts come as chunks of their own, with no choices and a ``dealign_trace`` field
    (``docs/trace.md``), as the search makes them.  An error after the stream has
    started (time limit, bad prompt) is sent as an ``{"error": ...}`` event before ``[DONE]``."""
    try:
        if reply.chat:
            yield _sse(reply.chunk(role=True, text=""))
        while True:
            try:
                text = await asyncio.wait_for(events.get(), timeout=POLL)
            except asyncio.TimeoutError:
                if await _late_or_gone(job, request, worker):
                    return
                continue
            if text is None:
                break
            if isinstance(text, dict):  # a trace event: a chunk without choices, as OpenAI's usage chunk
                yield _sse({**reply.chunk(), "choices": [], "dealign_trace": text})
                continue
            yield _sse(reply.chunk(text=text))
        outcome = _outcome(future)
        if outcome.tail:
            yield _sse(reply.chunk(text=outcome.tail))
        final = reply.chunk(text="" if not reply.chat else None, finish_reason=outcome.finish_reason)
        final["alignment"] = outcome.alignment
        yield _sse(final)
        if include_usage:
            yield _sse({**reply.chunk(), "choices": [], "usage": _usage(outcome)})
    except ApiError as exc:
        yield _sse(exc.body())
    except Exception as exc:  # a bug: say so in the stream rather than cutting it
        log.exception("internal error while streaming")
        yield _sse({"error": {"message": f"internal server error ({type(exc).__name__})", "type": "server_error",
                              "param": None, "code": None}})
    finally:
        job.cancelled.set()  # a client that went away stops its search at the next step
    yield "data: [DONE]\n\n"


def _usage(outcome: Outcome) -> dict:
    return {"prompt_tokens": outcome.prompt_tokens, "completion_tokens": outcome.completion_tokens,
            "total_tokens": outcome.prompt_tokens + outcome.completion_tokens}


class _Reply:
    """OpenAI response bodies for one request (completion or chat, whole or chunked)."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat, self.model = chat, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _envelope(self, obj: str, choice: dict) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [choice]}

    def full(self, outcome: Outcome) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": outcome.text}, "logprobs": None,
                      "finish_reason": outcome.finish_reason}
        else:
            choice = {"index": 0, "text": outcome.text, "logprobs": None, "finish_reason": outcome.finish_reason}
        body = self._envelope("chat.completion" if self.chat else "text_completion", choice)
        return {**body, "usage": _usage(outcome), "alignment": outcome.alignment}

    def chunk(self, *, text: str | None = None, role: bool = False, finish_reason: str | None = None) -> dict:
        if self.chat:
            delta: dict = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return self._envelope("chat.completion.chunk", choice)
        return self._envelope("text_completion", {"index": 0, "text": text or "", "logprobs": None,
                                                  "finish_reason": finish_reason})


def check_address(host: str, port: int) -> None:
    """Fail early (before a model loads) if ``host:port`` cannot be listened on."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.create_server((host, port), family=family):
            pass
    except OSError as exc:
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def serve(aligner: Any, limits: ServerLimits, *, host: str, port: int, model_name: str,
          log_level: str = "info", on_ready: Callable[[str], None] | None = None) -> None:
    """Run the server until interrupted (uvicorn; at most ``limits.max_connections`` connections).
    ``on_ready(url)``, if given, is called once the server answers (``port`` 0 then picks a free one)."""
    import uvicorn

    app = create_app(aligner, limits, model_name=model_name)
    release_team()  # this thread loaded the model; the searches' threads compute from here on
    if on_ready is None:
        uvicorn.run(app, host=host, port=port, log_level=log_level, limit_concurrency=limits.max_connections,
                    timeout_keep_alive=5)
        return
    sock = socket.create_server((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, limit_concurrency=limits.max_connections,
                                           timeout_keep_alive=5))
    url = f"http://{host}:{sock.getsockname()[1]}/"

    def when_started() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if server.started:
            on_ready(url)

    threading.Thread(target=when_started, daemon=True).start()
    server.run(sockets=[sock])

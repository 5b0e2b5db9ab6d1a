"""The OpenAI-compatible HTTP handlers over one :class:`SelfExtendModel` (wire format: :mod:`.protocol`).

Any OpenAI client (any language) switches to a local SelfExtend model by changing its base URL.
Requests share the model through continuous batching (:mod:`selfextend_llm.batching`): they join
the running batch at step boundaries and leave when done.  The wait queue is bounded (past it: 429
with ``Retry-After``), each request has a timeout (504), a client that hangs up (streamed or not)
cancels its request, shutdown drains what was admitted, and errors come back in OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from .. import validation
from ..batching import ContinuousBatcher, QueueFullError, RequestHandle, RequestTimeoutError, ShuttingDownError
from ..model import ContextWindowExceededError, SelfExtendModel
from ..streaming import iterate_in_thread
from ..validation import missing_extra
from .metrics import ServerMetrics
from .protocol import ChatRequest, CompletionRequest, Responder, SamplingParams, error_body

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException
except ModuleNotFoundError as err:  # the optional [server] extra
    raise missing_extra("fastapi", "server") from err

log = logging.getLogger("selfextend_llm.server")

DEFAULT_MAX_BODY = 8 * 1024 * 1024  # bytes; about 2M tokens of text, far past any window here


class APIError(Exception):
    """A refusal with its HTTP status, in OpenAI's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        retry_after: float | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.retry_after = retry_after


def _error(status: int, message: str, type_: str, code: str | None = None, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, code, param), status_code=status)


class _Guard:
    """Key check, body-size limit, access log and latency metrics, as plain ASGI middleware.

    Not ``@app.middleware("http")``: Starlette's ``BaseHTTPMiddleware`` hides the client's
    disconnect from the handler, and a non-streamed request must see it to cancel its generation.
    """

    def __init__(self, app: Any, *, api_key: str | None, max_body_bytes: int, metrics: ServerMetrics):
        self.app, self.api_key, self.max_body_bytes, self.metrics = app, api_key, max_body_bytes, metrics

    def _refusal(self, headers: dict[bytes, bytes]) -> JSONResponse | None:
        if (
            self.api_key is not None
            and headers.get(b"authorization", b"").decode("latin-1") != f"Bearer {self.api_key}"
        ):
            return _error(401, "missing or wrong API key", "invalid_request_error", "invalid_api_key")
        length = headers.get(b"content-length")
        if length is not None:
            text = length.decode("latin-1")
            if not text.isdigit() or int(text) > self.max_body_bytes:
                return _error(
                    413, f"request body of {text!r} bytes is not a size up to the limit of {self.max_body_bytes}",
                    "invalid_request_error", "request_too_large",
                )  # fmt: skip
        return None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, path, status = time.perf_counter(), scope["path"], [500]

        async def recorded(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refusal = self._refusal(dict(scope["headers"])) if path.startswith("/v1/") else None
            if refusal is not None:
                await refusal(scope, receive, recorded)
            else:
                await self.app(scope, receive, recorded)
        finally:
            seconds = time.perf_counter() - start
            if path.startswith("/v1/"):
                self.metrics.observe(path, status[0], seconds)
            entry = {"event": "request", "id": uuid.uuid4().hex[:12], "method": scope["method"], "path": path}
            log.info(json.dumps({**entry, "status": status[0], "ms": round(seconds * 1e3, 1)}))


def _content(content: str | list[dict[str, Any]] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for block in content:
        if block.get("type") != "text":
            raise APIError(
                400, f"content blocks of type {block.get('type')!r} are not supported: text only", param="messages"
            )
        parts.append(block.get("text", ""))
    return "".join(parts)


def create_app(
    model: SelfExtendModel,
    *,
    api_key: str | None = None,
    model_id: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY,
    max_batch: int = 32,
    max_queue: int = 256,
    request_timeout: float | None = 600.0,
    prefill_chunk: int = 512,
) -> FastAPI:
    """The ASGI app; run it with any ASGI server (``selfextend-llm serve`` uses uvicorn).

    ``max_batch`` requests run at once, ``max_queue`` more may wait (then 429); ``request_timeout``
    seconds per request (None: no limit); ``prefill_chunk`` prompt tokens are prefilled per step,
    so a long prompt does not hold the running requests up for its whole prefill.
    """
    metrics = ServerMetrics()

    def new_batcher() -> ContinuousBatcher:
        return ContinuousBatcher(
            model, max_batch=max_batch, max_queue=max_queue, prefill_chunk=prefill_chunk, on_step=metrics.on_step
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if app.state.batcher.closed:  # served again after a shutdown (tests, notebooks)
            app.state.batcher = new_batcher()
        yield
        # SIGTERM/SIGINT: uvicorn stops accepting connections; finish what was admitted, then stop
        await asyncio.to_thread(app.state.batcher.close, drain=True, timeout=request_timeout)

    app = FastAPI(title="selfextend-llm", version="1", lifespan=lifespan)
    app.state.batcher, app.state.metrics = new_batcher(), metrics
    name = model_id or model.model_name
    created = int(time.time())

    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=max_body_bytes, metrics=metrics)

    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError):
        response = _error(err.status, err.message, err.type, err.code, err.param)
        if err.retry_after is not None:
            response.headers["Retry-After"] = str(max(1, math.ceil(err.retry_after)))
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        return _error(
            400,
            f"invalid request: {first.get('msg', 'malformed body')} ({where})",
            "invalid_request_error",
            param=where,
        )

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, err: HTTPException):
        # FastAPI's own refusals (an unreadable body, an unknown route) in the same shape as ours
        kind = "invalid_request_error" if err.status_code < 500 else "server_error"
        return _error(err.status_code, str(err.detail), kind)

    @app.exception_handler(ValueError)
    @app.exception_handler(TypeError)
    async def bad_value(_: Request, err: Exception):
        # the library's own checks (validation.py): they name the argument and what is allowed
        return _error(400, str(err), "invalid_request_error")

    @app.exception_handler(Exception)
    async def internal(_: Request, err: Exception):
        log.exception("internal error")
        return _error(500, f"internal error: {type(err).__name__}", "server_error")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name}

    @app.get("/metrics")
    async def prometheus_metrics():
        metrics.on_step(app.state.batcher.queue_depth, app.state.batcher.running, 0)
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card()]}

    @app.get("/v1/models/{model_name:path}")
    async def model_card(model_name: str):
        _check_model(model_name)
        return _model_card()

    def _model_card() -> dict[str, Any]:
        return {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "selfextend-llm",
            "context_window": model.context_window,
            "max_model_len": model.context_window,
            "pretrained_context": model.pretrained_context,
        }

    def _check_model(requested: str) -> None:
        if requested not in (name, model.model_name):
            raise APIError(
                404,
                f"the model {requested!r} does not exist; this server serves {name!r}",
                "invalid_request_error",
                "model_not_found",
                "model",
            )

    def _params(req: SamplingParams, max_tokens: int | None) -> dict[str, Any]:
        """Generation arguments, checked now: a stream cannot turn into a 400 once it has started."""
        validation.generation(
            max_new_tokens=max_tokens or 1, temperature=req.temperature, top_p=req.top_p, seed=req.seed
        )
        validation.stops(req.stop)
        return {
            "max_new_tokens": max_tokens or min(1024, model.context_window),
            "temperature": req.temperature,
            "top_p": req.top_p,
            "stop": req.stop,
            "seed": req.seed,
        }

    def _check_fits(prompt) -> int:
        n = model.count_tokens(prompt)
        try:
            model.check_fits(n)
        except ContextWindowExceededError as err:
            raise APIError(400, str(err), "invalid_request_error", "context_length_exceeded", "messages") from err
        return n

    def _submit(prompt: Any, params: dict[str, Any]) -> RequestHandle:
        try:
            return app.state.batcher.submit(prompt, **params, timeout=request_timeout)
        except QueueFullError as err:
            raise APIError(429, str(err), "rate_limit_error", "queue_full", retry_after=err.retry_after) from err
        except ShuttingDownError as err:
            raise APIError(503, str(err), "server_error", "shutting_down") from err

    async def _answer(prompt: Any, params: dict[str, Any], respond: Responder, stream: bool, request: Request):
        """The whole response, or an SSE stream of it; chat and text completions alike."""
        handle = _submit(prompt, params)
        if stream:
            return StreamingResponse(_sse(request, handle, respond), media_type="text/event-stream")
        watcher = asyncio.create_task(_cancel_on_disconnect(request, handle))
        try:
            chunks = [chunk async for chunk in iterate_in_thread(iter(handle))]
        except RequestTimeoutError as err:
            raise APIError(504, str(err), "timeout_error", "request_timeout") from err
        finally:
            watcher.cancel()
        last = chunks[-1]
        text = "".join(chunk.text for chunk in chunks)
        return respond.whole(text, last.finish_reason, last.prompt_tokens, last.completion_tokens)

    async def _cancel_on_disconnect(request: Request, handle: RequestHandle) -> None:
        """A non-streamed request whose client hung up is cancelled, not finished for nobody."""
        while not await request.is_disconnected():
            await asyncio.sleep(0.25)
        handle.cancel()

    async def _sse(request: Request, handle: RequestHandle, respond: Responder) -> AsyncIterator[bytes]:
        """SSE from the request's chunks; a disconnect cancels it; a late error ends the stream with it."""
        started = time.perf_counter()
        first = True
        try:
            async for chunk in iterate_in_thread(iter(handle)):
                if await request.is_disconnected():
                    return
                if first and chunk.text:
                    metrics.first_token.observe(time.perf_counter() - started)
                    first = False
                counts = (chunk.prompt_tokens, chunk.completion_tokens)
                for payload in respond.chunk(chunk.text, chunk.finish_reason, *counts):
                    yield f"data: {json.dumps(payload)}\n\n".encode()
        except Exception as err:  # the status line is sent: the error goes in the stream, in OpenAI's shape
            kind = "timeout_error" if isinstance(err, RequestTimeoutError) else "server_error"
            yield f"data: {json.dumps(error_body(str(err) or type(err).__name__, kind))}\n\n".encode()
        yield b"data: [DONE]\n\n"

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        _check_model(req.model)
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": _content(m.content)}
            for m in req.messages
        ]
        if req.response_format and req.response_format.get("type") in ("json_object", "json_schema"):
            schema = req.response_format.get("json_schema", {}).get("schema")
            hint = "Answer with one JSON object" + (
                f" matching this JSON schema: {json.dumps(schema)}" if schema else ""
            )
            messages.insert(0, {"role": "system", "content": hint + ", and nothing else."})
        if req.tools and not model.supports_tools:
            raise APIError(
                400, f"{name}'s chat template has no tool support; send the request without tools", param="tools"
            )
        _check_fits(messages)
        params = _params(req, req.max_completion_tokens or req.max_tokens)
        if req.tools:
            params["tools"] = [t.get("function", t) if t.get("type") == "function" else t for t in req.tools]
        return await _answer(messages, params, Responder("chat", name, req.include_usage), req.stream, request)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        _check_model(req.model)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) != 1:
            raise APIError(400, "send one prompt per request", param="prompt")
        _check_fits(prompts[0])
        params = _params(req, req.max_tokens)
        return await _answer(prompts[0], params, Responder("text", name, req.include_usage), req.stream, request)

    return app

"""The OpenAI-compatible HTTP handlers over one :class:`SelfExtendModel` (wire format: :mod:`.protocol`).

Any OpenAI client (any language) switches to a local SelfExtend model by changing its base URL.
Requests queue on the model rather than failing; a client that disconnects mid-stream stops its
generation and frees the model; errors come back in the OpenAI error shape.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from .. import validation
from ..model import ContextWindowExceededError, SelfExtendModel, StreamChunk
from ..streaming import iterate_in_thread
from ..validation import missing_extra
from .protocol import ChatRequest, CompletionRequest, Responder, SamplingParams, error_body

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
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
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param


def _error(status: int, message: str, type_: str, code: str | None = None, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, code, param), status_code=status)


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
) -> FastAPI:
    """The ASGI app; run it with any ASGI server (``selfextend-llm serve`` uses uvicorn)."""
    app = FastAPI(title="selfextend-llm", version="1")
    name = model_id or model.model_name
    created = int(time.time())

    @app.middleware("http")
    async def guard(request: Request, call_next):
        start = time.perf_counter()
        rid = uuid.uuid4().hex[:12]
        status = 500
        try:
            if request.url.path.startswith("/v1/"):
                if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
                    status = 401
                    return _error(401, "missing or wrong API key", "invalid_request_error", "invalid_api_key")
                length = request.headers.get("content-length")
                if length is not None and (not length.isdigit() or int(length) > max_body_bytes):
                    status = 413
                    return _error(
                        413,
                        f"request body of {length!r} bytes is not a size up to the limit of {max_body_bytes}",
                        "invalid_request_error",
                        "request_too_large",
                    )
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            log.info(
                json.dumps(
                    {
                        "event": "request",
                        "id": rid,
                        "method": request.method,
                        "path": request.url.path,
                        "status": status,
                        "ms": round((time.perf_counter() - start) * 1e3, 1),
                    }
                )
            )

    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError):
        return _error(err.status, err.message, err.type, err.code, err.param)

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

    # One request at a time reaches the model; the rest wait here, on the event loop, without holding
    # a worker thread (threads blocked on the model's lock could starve the stream that holds it).
    gate = asyncio.Lock()

    async def _answer(prompt: Any, params: dict[str, Any], respond: Responder, stream: bool, request: Request):
        """The whole response, or an SSE stream of it; chat and text completions alike."""
        if not stream:
            async with gate:
                done = await asyncio.to_thread(model.complete, prompt, **params)
            return respond.whole(done.text, done.finish_reason, done.prompt_tokens, done.completion_tokens)
        start = lambda: model.stream_chunks(prompt, **params)  # noqa: E731
        return StreamingResponse(_sse(request, start, respond), media_type="text/event-stream")

    async def _sse(
        request: Request, start: Callable[[], Iterator[StreamChunk]], respond: Responder
    ) -> AsyncIterator[bytes]:
        """SSE from a blocking chunk iterator; a disconnect closes it, which cancels generation."""
        async with gate:
            async for chunk in iterate_in_thread(start()):
                if await request.is_disconnected():
                    break
                counts = (chunk.prompt_tokens, chunk.completion_tokens)
                for payload in respond.chunk(chunk.text, chunk.finish_reason, *counts):
                    yield f"data: {json.dumps(payload)}\n\n".encode()
            else:
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

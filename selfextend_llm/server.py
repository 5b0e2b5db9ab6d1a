"""An OpenAI-compatible HTTP server over one :class:`SelfExtendModel`.

Any OpenAI client (any language) switches to a local SelfExtend model by changing its base URL.
Requests queue on the model's lock rather than failing; a client that disconnects mid-stream
stops its generation and frees the model; errors come back in the OpenAI error shape.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from . import validation
from .model import ContextWindowExceededError, SelfExtendModel
from .validation import missing_extra

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field
    from starlette.exceptions import HTTPException
except ModuleNotFoundError as err:  # the optional [server] extra
    raise missing_extra("fastapi", "server") from err

log = logging.getLogger("selfextend_llm.server")

DEFAULT_MAX_BODY = 8 * 1024 * 1024  # bytes; about 2M tokens of text, far past any window here


class APIError(Exception):
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
    return JSONResponse(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}, status_code=status
    )


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None


class ChatRequest(SamplingParams):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(SamplingParams):
    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=1)


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

    async def _run(fn, *args, **kwargs):
        async with gate:
            return await asyncio.to_thread(fn, *args, **kwargs)

    async def _stream(request: Request, start: Any, make: Any, final: Any) -> AsyncIterator[bytes]:
        """SSE from a blocking chunk iterator; a disconnect closes it, which cancels generation."""
        loop = asyncio.get_running_loop()
        end = object()
        async with gate:
            chunks = start()
            try:
                while True:
                    chunk = await loop.run_in_executor(None, next, chunks, end)
                    if chunk is end:
                        break
                    if await request.is_disconnected():
                        break
                    for payload in (make(chunk), final(chunk)):
                        if payload is not None:
                            yield f"data: {json.dumps(payload)}\n\n".encode()
                yield b"data: [DONE]\n\n"
            finally:
                await loop.run_in_executor(None, chunks.close)

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
        cid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not req.stream:
            done = await _run(model.complete, messages, **params)
            return {
                "id": cid,
                "object": "chat.completion",
                "created": now,
                "model": name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": done.text},
                        "finish_reason": done.finish_reason,
                        "logprobs": None,
                    }
                ],
                "usage": _usage(done.prompt_tokens, done.completion_tokens),
            }
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        base = {"id": cid, "object": "chat.completion.chunk", "created": now, "model": name}
        first = {"sent": False}

        def make(c):
            delta: dict[str, Any] = {"content": c.text} if c.text else {}
            if not first["sent"]:
                delta["role"], first["sent"] = "assistant", True
            if c.finish_reason is None and not delta:
                return None
            return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": c.finish_reason}]}

        final = _usage_chunk(base, include_usage)

        start = lambda: model.stream_chunks(messages, **params)
        return StreamingResponse(_stream(request, start, make, final), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        _check_model(req.model)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) != 1:
            raise APIError(400, "send one prompt per request", param="prompt")
        prompt = prompts[0]
        _check_fits(prompt)
        params = _params(req, req.max_tokens)
        cid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if not req.stream:
            done = await _run(model.complete, prompt, **params)
            return {
                "id": cid,
                "object": "text_completion",
                "created": now,
                "model": name,
                "choices": [{"index": 0, "text": done.text, "finish_reason": done.finish_reason, "logprobs": None}],
                "usage": _usage(done.prompt_tokens, done.completion_tokens),
            }
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        base = {"id": cid, "object": "text_completion", "created": now, "model": name}

        def make(c):
            if not c.text and c.finish_reason is None:
                return None
            return {
                **base,
                "choices": [{"index": 0, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}],
            }

        final = _usage_chunk(base, include_usage)

        return StreamingResponse(
            _stream(request, lambda: model.stream_chunks(prompt, **params), make, final), media_type="text/event-stream"
        )

    return app


def _usage_chunk(base: dict[str, Any], include_usage: bool):
    """The closing usage chunk of a stream (``stream_options.include_usage``), emitted with the last piece."""

    def final(chunk) -> dict[str, Any] | None:
        if chunk.finish_reason is None or not include_usage:
            return None
        return {**base, "choices": [], "usage": _usage(chunk.prompt_tokens, chunk.completion_tokens)}

    return final


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _uvicorn():
    try:
        import uvicorn
    except ModuleNotFoundError as err:  # the optional [server] extra
        raise missing_extra("uvicorn", "server") from err
    return uvicorn


class BackgroundServer:
    """Run the app with uvicorn in a thread (tests, notebooks); ``with BackgroundServer(app) as url: ...``."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        uvicorn = _uvicorn()

        self.config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        sock = self.server.servers[0].sockets[0]
        host, port = sock.getsockname()[:2]
        return f"http://{host}:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def serve(model: SelfExtendModel, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None) -> None:
    """Serve until interrupted; uvicorn finishes in-flight requests on SIGINT/SIGTERM."""
    uvicorn = _uvicorn()

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    uvicorn.run(
        create_app(model, api_key=api_key), host=host, port=port, log_level="info", timeout_graceful_shutdown=30
    )

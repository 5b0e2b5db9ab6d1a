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
import hmac
import json
import logging
import math
import os
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from .. import validation
from ..engine.sampling import Sampling
from ..engine.scheduler import (
    ContinuousBatcher,
    KVBudgetError,
    QueueFullError,
    RequestHandle,
    RequestTimeoutError,
    ShuttingDownError,
)  # fmt: skip
from ..model import ContextWindowExceededError, SelfExtendModel, StreamChunk
from ..streaming import iterate_in_thread
from ..structured import json_instruction
from ..tools import check_tools, keep_unparsed, openai_tool_calls, resolve_choice
from ..validation import missing_extra
from .metrics import ServerMetrics
from .protocol import (
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    Message,
    Responder,
    SamplingParams,
    TokenizeRequest,
    error_body,
)

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException
except ModuleNotFoundError as err:  # the optional [server] extra
    raise missing_extra("fastapi", "server") from err

log = logging.getLogger("selfextend_llm.server")

DEFAULT_MAX_BODY = 8 * 1024 * 1024  # bytes; about 2M tokens of text, far past any window here
#: Paths that need the API key (``/health`` and ``/metrics`` stay open for probes and scrapers).
PROTECTED = ("/v1/", "/tokenize", "/detokenize")
#: Where the API key is read from when ``api_key`` is not given (keeps it out of the process list).
API_KEY_ENV = "SELFEXTEND_API_KEY"


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


class ClientGone(Exception):
    """The client hung up before its answer was ready: logged and counted as 499 (nginx's "client closed
    request"), never as a server error."""


#: Status recorded for a request whose client hung up (no response could be sent).
CLIENT_CLOSED = 499


class _Guard:
    """Key check, body-size limit, access log and latency metrics, as plain ASGI middleware.

    Not ``@app.middleware("http")``: Starlette's ``BaseHTTPMiddleware`` hides the client's
    disconnect from the handler, and a non-streamed request must see it to cancel its generation.
    The body limit counts the bytes as they arrive, so a chunked body (no Content-Length) is held to
    it too; the key is compared in constant time.
    """

    def __init__(self, app: Any, *, api_key: str | None, max_body_bytes: int, metrics: ServerMetrics):
        self.app, self.api_key, self.max_body_bytes, self.metrics = app, api_key, max_body_bytes, metrics
        self._expected = None if api_key is None else f"Bearer {api_key}".encode()

    def _too_large(self, size: str) -> JSONResponse:
        return _error(
            413, f"request body of {size} bytes is over the limit of {self.max_body_bytes} bytes; send a smaller one",
            "invalid_request_error", "request_too_large",
        )  # fmt: skip

    def _refusal(self, headers: dict[bytes, bytes]) -> JSONResponse | None:
        if self._expected is not None and not hmac.compare_digest(headers.get(b"authorization", b""), self._expected):
            return _error(401, "missing or wrong API key", "invalid_request_error", "invalid_api_key")
        length = headers.get(b"content-length")
        if length is not None:
            text = length.decode("latin-1")
            if not text.isdigit() or int(text) > self.max_body_bytes:
                return self._too_large(repr(text))
        return None

    async def _read_body(self, receive: Any) -> tuple[list[dict], bool]:
        """The body's messages as they came, or (…, False) once more than the limit has arrived."""
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                return messages, True
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                return messages, False
            if not message.get("more_body", False):
                return messages, True

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, path, status = time.perf_counter(), scope["path"], [500]

        async def recorded(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refusal = self._refusal(dict(scope["headers"])) if path.startswith(PROTECTED) else None
            if refusal is None and scope["method"] in ("POST", "PUT", "PATCH"):
                body, within = await self._read_body(receive)
                if not within:
                    refusal = self._too_large(f"more than {self.max_body_bytes}")
                else:  # replay the body, then hand the live channel on (the handler waits for a disconnect)
                    receive = _replay(body, receive)
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


def _replay(messages: list[dict], receive: Any) -> Any:
    """An ASGI ``receive`` that gives ``messages`` first, then what ``receive`` gives."""
    pending = iter(messages)

    async def replayed() -> dict:
        return next(pending, None) or await receive()

    return replayed


def _message(m: Message) -> dict[str, Any]:
    """A request message as the chat template reads it: tool calls and tool results kept."""
    out: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": _content(m.content)}
    extra = m.model_extra or {}
    if extra.get("tool_calls"):
        calls = []
        for call in extra["tool_calls"]:
            fn = dict(call.get("function", {}))
            if isinstance(fn.get("arguments"), str):  # OpenAI sends a JSON string; templates want the object
                try:
                    fn["arguments"] = json.loads(fn["arguments"])
                except json.JSONDecodeError as err:
                    raise APIError(400, f"tool call arguments are not JSON: {err}", param="messages") from err
            calls.append({"type": "function", "id": call.get("id"), "function": fn})
        out["tool_calls"] = calls
    if extra.get("tool_call_id"):
        out["tool_call_id"] = extra["tool_call_id"]
    if extra.get("name"):
        out["name"] = extra["name"]
    return out


def _tool_calls(model: SelfExtendModel, text: str) -> tuple[str, list[dict[str, Any]]]:
    """Content and OpenAI ``tool_calls`` of an answer; unparseable calls stay in the content, not lost."""
    content, calls = model.parse_tool_calls(text)
    return keep_unparsed(content, calls), openai_tool_calls(calls)


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
    cors_origins: Sequence[str] | None = None,
    kv_budget_bytes: int | None = None,
) -> FastAPI:
    """The ASGI app; run it with any ASGI server (``selfextend-llm serve`` uses uvicorn).

    ``max_batch`` requests run at once, ``max_queue`` more may wait (then 429); ``request_timeout``
    seconds per request (None: no limit); ``prefill_chunk`` prompt tokens are prefilled per step,
    so a long prompt does not hold the running requests up for its whole prefill; ``kv_budget_bytes`` bounds
    the running requests' keys and values (None: half the free memory, or ``$SELFEXTEND_KV_BUDGET_BYTES``):
    past it requests wait, and one that alone exceeds it gets a 503 saying so.  ``api_key`` defaults
    to ``$SELFEXTEND_API_KEY`` (none: open); ``cors_origins`` lets browsers on those origins call the API.
    """
    if api_key is None:
        api_key = os.environ.get(API_KEY_ENV) or None
    metrics = ServerMetrics()

    def new_batcher() -> ContinuousBatcher:
        return ContinuousBatcher(
            model, max_batch=max_batch, max_queue=max_queue, prefill_chunk=prefill_chunk,
            kv_budget_bytes=kv_budget_bytes, on_step=metrics.on_step,
        )  # fmt: skip

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        # SIGTERM/SIGINT: uvicorn stops accepting connections; finish what was admitted (new requests
        # meanwhile: 503), then stop.  An app served again later (tests, notebooks) starts a new batcher.
        app.state.draining = True
        try:
            await asyncio.to_thread(app.state.batcher.close, drain=True, timeout=request_timeout)
        finally:
            app.state.draining = False

    app = FastAPI(title="selfextend-llm", version="1", lifespan=lifespan)
    app.state.batcher, app.state.metrics, app.state.draining = new_batcher(), metrics, False
    name = model_id or model.model_name
    created = int(time.time())

    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=max_body_bytes, metrics=metrics)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["*"], allow_headers=["*"]
        )  # outermost: preflight requests are answered before the key check

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

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, _: ClientGone):
        log.info(json.dumps({"event": "client_closed", "path": request.url.path}))
        return Response(status_code=CLIENT_CLOSED)  # nobody reads it; the status goes to the log and metrics

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
            # how far held-out retrieval was measured to hold (None: not measured); context_window is the hard limit
            "quality_context": model.quality_context,
            "quality": model.quality(),
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
        validation.integer("max_new_tokens", max_tokens or 1, minimum=1)
        Sampling.checked(req.temperature, req.top_p, seed=req.seed, **req.sampling)
        validation.stops(req.stop)
        return {
            "max_new_tokens": max_tokens or min(1024, model.context_window),
            "temperature": req.temperature,
            "top_p": req.top_p,
            "stop": req.stop,
            "seed": req.seed,
            **req.sampling,
        }

    def _check_length(prompt: Any) -> None:
        """A prompt that cannot fit the window whatever its tokens are is refused before it is tokenized
        (a 7 MB body would hold a worker for seconds to learn what its size already says)."""
        chars = len(prompt) if isinstance(prompt, str) else sum(len(str(m.get("content") or "")) for m in prompt)
        limit = model.context_window * validation.MAX_CHARS_PER_TOKEN
        if chars > limit:
            raise APIError(
                400,
                f"the prompt has {chars} characters, more than any prompt that fits this model's "
                f"{model.context_window}-token window (at most {validation.MAX_CHARS_PER_TOKEN} characters a token); "
                "send a shorter one",
                "invalid_request_error", "context_length_exceeded", "messages",
            )  # fmt: skip

    async def _submit(prompt: Any, params: dict[str, Any]) -> RequestHandle:
        """Tokenize, template, build the grammar and queue, in a worker thread: the event loop (health,
        streams of other clients) never waits for one request's preparation."""
        _check_length(prompt)
        return await asyncio.to_thread(_submit_now, prompt, params)

    def _submit_now(prompt: Any, params: dict[str, Any]) -> RequestHandle:
        if app.state.batcher.closed and not app.state.draining:  # served again after a shutdown
            app.state.batcher = new_batcher()
        try:
            return app.state.batcher.submit(prompt, **params, timeout=request_timeout)
        except ContextWindowExceededError as err:  # the batcher encodes once and checks the window
            raise APIError(400, str(err), "invalid_request_error", "context_length_exceeded", "messages") from err
        except QueueFullError as err:
            raise APIError(429, str(err), "rate_limit_error", "queue_full", retry_after=err.retry_after) from err
        except ShuttingDownError as err:
            raise APIError(503, str(err), "server_error", "shutting_down") from err
        except KVBudgetError as err:  # this server's memory, not the request's form: 503, not 400
            raise APIError(503, str(err), "server_error", "kv_budget_exceeded", "max_tokens") from err

    async def _answer(
        prompt: Any, params: dict[str, Any], respond: Responder, stream: bool, request: Request, tools: bool = False
    ):
        """The whole response, or an SSE stream of it; chat and text completions alike."""
        handle = await _submit(prompt, params)
        if stream:
            return StreamingResponse(_sse(request, handle, respond, tools), media_type="text/event-stream")
        chunks = await _collect(request, handle)
        last = chunks[-1]
        text = "".join(chunk.text for chunk in chunks)
        content, calls = _tool_calls(model, text) if tools else (text, [])
        return respond.whole(
            content, last.finish_reason, last.prompt_tokens, last.completion_tokens, calls, last.cached_tokens
        )

    async def _collect(request: Request, handle: RequestHandle) -> list[StreamChunk]:
        """All chunks of a non-streamed request; a hang-up cancels it, a timeout is a 504."""
        watcher = asyncio.create_task(_cancel_on_disconnect(request, handle))
        try:
            return [chunk async for chunk in iterate_in_thread(iter(handle))]
        except RequestTimeoutError as err:
            raise APIError(504, str(err), "timeout_error", "request_timeout") from err
        except Exception:
            if watcher.done() and not watcher.cancelled():  # the client hung up: not a server error
                raise ClientGone() from None
            raise
        finally:
            watcher.cancel()

    async def _cancel_on_disconnect(request: Request, handle: RequestHandle) -> None:
        """A non-streamed request whose client hung up is cancelled, not finished for nobody."""
        while not await request.is_disconnected():
            await asyncio.sleep(0.25)
        handle.cancel()

    async def _sse(
        request: Request, handle: RequestHandle, respond: Responder, tools: bool = False
    ) -> AsyncIterator[bytes]:
        """SSE from the request's chunks; a disconnect cancels it; a late error ends the stream with it.

        With tools the text is held until the end (a ``<tool_call>`` block must not reach the client
        as content), then sent as content and ``delta.tool_calls``."""
        started = time.perf_counter()
        first, held = True, []
        try:
            async for chunk in iterate_in_thread(iter(handle)):
                if await request.is_disconnected():
                    return
                if first and chunk.text:
                    metrics.first_token.observe(time.perf_counter() - started)
                    first = False
                if tools and chunk.finish_reason is None:
                    held.append(chunk.text)
                    continue
                text, reason, calls = chunk.text, chunk.finish_reason, []
                if tools:
                    text, calls = _tool_calls(model, "".join(held) + chunk.text)
                    reason = "tool_calls" if calls else reason
                payloads = respond.chunk(text, None) if tools and text else []
                payloads += [respond.tool_call_chunk(calls)] if calls else []
                payloads += respond.chunk(
                    "" if tools else text, reason, chunk.prompt_tokens, chunk.completion_tokens, chunk.cached_tokens
                )
                for payload in payloads:
                    yield f"data: {json.dumps(payload)}\n\n".encode()
        except Exception as err:  # the status line is sent: the error goes in the stream, in OpenAI's shape
            kind = "timeout_error" if isinstance(err, RequestTimeoutError) else "server_error"
            yield f"data: {json.dumps(error_body(str(err) or type(err).__name__, kind))}\n\n".encode()
        yield b"data: [DONE]\n\n"

    def _refuse_unsupported(req: Any) -> None:
        bad = req.unsupported()
        if bad is not None:
            raise APIError(400, f"{bad} is not supported by this server; leave it out (or at its default)", param=bad)

    def _tools(req: ChatRequest) -> tuple[list[dict[str, Any]] | None, Any]:
        """The tool definitions and ``tool_choice``, checked (400 naming the parameter) before any work."""
        try:
            tools = check_tools(req.tools) if req.tools else None
        except (TypeError, ValueError) as err:
            raise APIError(400, str(err), param="tools") from err
        try:
            resolve_choice(tools, req.tool_choice)
        except (TypeError, ValueError) as err:
            raise APIError(400, str(err), param="tool_choice") from err
        return tools, req.tool_choice

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        _check_model(req.model)
        _refuse_unsupported(req)
        messages = [_message(m) for m in req.messages]
        tools, tool_choice = _tools(req)
        constrained = req.response_format and req.response_format.get("type") in ("json_object", "json_schema")
        if constrained:
            messages = model.with_instruction(messages, json_instruction(req.response_format))
        params = _params(req, req.max_completion_tokens or req.max_tokens)
        if constrained:
            params["response_format"] = req.response_format
        params.update(tools=tools, tool_choice=tool_choice)
        respond = Responder("chat", name, req.include_usage)
        offered = bool(tools) and tool_choice != "none"
        return await _answer(messages, params, respond, req.stream, request, tools=offered)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        _check_model(req.model)
        _refuse_unsupported(req)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts:
            raise APIError(400, "prompt is an empty list; send at least one prompt", param="prompt")
        params = _params(req, req.max_tokens)
        respond = Responder("text", name, req.include_usage)
        if len(prompts) == 1:
            return await _answer(prompts[0], params, respond, req.stream, request)
        if req.stream:
            raise APIError(400, "stream one prompt per request (or send the list without stream)", param="stream")
        handles: list[RequestHandle] = []
        try:  # all in the running batch at once; one refused prompt withdraws the others
            for p in prompts:
                handles.append(await _submit(p, params))
        except APIError:
            for handle in handles:
                handle.cancel()
            raise
        results = await asyncio.gather(*(_collect(request, h) for h in handles))
        choices = [
            respond.choice("".join(c.text for c in chunks), chunks[-1].finish_reason, i)
            for i, chunks in enumerate(results)
        ]
        last = [chunks[-1] for chunks in results]
        return respond.many(
            choices,
            sum(c.prompt_tokens for c in last),
            sum(c.completion_tokens for c in last),
            sum(c.cached_tokens for c in last),
        )

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        _refuse_unsupported(req)
        if req.model is not None:
            _check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "send either prompt (text) or messages (chat)", param="prompt")
        prompt = req.prompt if req.prompt is not None else [_message(m) for m in req.messages]
        _check_length(prompt)
        # in a worker thread: a long text must not stall health checks and other clients' streams
        ids = await asyncio.to_thread(model.tokenize if isinstance(prompt, str) else model.encode, prompt)
        body = {"count": len(ids), "max_model_len": model.context_window, "tokens": ids}
        # encoded in the worker too: FastAPI's encoder walks a 180k-token list for 0.13 s on the event loop
        return Response(await asyncio.to_thread(json.dumps, body), media_type="application/json")

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        _refuse_unsupported(req)
        if req.model is not None:
            _check_model(req.model)
        vocab = len(model.tokenizer)
        bad = next((t for t in req.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary (0..{vocab - 1})", param="tokens")
        return {"prompt": await asyncio.to_thread(model.tokenizer.decode, req.tokens)}

    return app

"""Running the app: in the foreground with uvicorn (``selfextend-llm serve``) or in a thread (tests, notebooks)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from ..model import SelfExtendModel
from ..validation import missing_extra
from .app import FastAPI, create_app


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


def serve(
    model: SelfExtendModel,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    **app_options: Any,
) -> None:
    """Serve until interrupted.  On SIGINT/SIGTERM uvicorn stops accepting connections and the app drains
    the requests it admitted (up to ``request_timeout``) before exiting.  ``app_options``: see
    :func:`create_app` (``max_batch``, ``max_queue``, ``request_timeout``, ``prefill_chunk``, ``kv_budget_bytes``)."""
    uvicorn = _uvicorn()

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    app = create_app(model, api_key=api_key, **app_options)
    timeout = app_options.get("request_timeout", 600.0)
    uvicorn.run(
        app, host=host, port=port, log_level="info", timeout_graceful_shutdown=None if timeout is None else timeout + 5
    )

"""An OpenAI-compatible server over one model: :mod:`.protocol` (the wire format), :mod:`.app`
(the handlers), :mod:`.run` (uvicorn in the foreground or in a thread).

Needs the ``[server]`` extra (``pip install 'selfextend-llm[server]'``); importing this package
without it raises an ``ImportError`` that says so.
"""

from .app import APIError, create_app
from .run import BackgroundServer, serve

__all__ = ["APIError", "BackgroundServer", "create_app", "serve"]

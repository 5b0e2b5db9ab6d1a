"""The scheduler's old import path: it lives in :mod:`selfextend_llm.engine.scheduler` with the rest of the engine.

This module *is* that one (an alias, so ``monkeypatch`` and ``isinstance`` see the same objects); code that
imports ``selfextend_llm.batching`` keeps working."""

import sys

from .engine import scheduler

sys.modules[__name__] = scheduler

"""Where the model's CPU work runs: why the load happens in a thread of its own.

OpenMP (libgomp, which both PyTorch and the C kernels use) keeps a pool of worker threads per
thread that ever started a parallel region, and once it manages more threads than there are CPUs,
every pool stops spinning between regions and sleeps instead (``gomp_throttled_spin_count``).  A
decode step is ~200 short parallel regions, so each then waits for a wake-up: measured on 2 cores,
a step of the embedded default took 56 ms in the batcher's thread against 25 ms when that thread was
the only one with a pool (16 rows: 200 against 110 ms; the C product alone 22 against 11 ms).

The main thread that loads a model used to keep such a pool for the life of the process, so the
server's batcher thread always ran throttled.  :func:`in_passing_thread` runs the load in a thread
that ends with it, and its pool goes with it: whichever thread computes next (the batcher in a
server, the caller of ``complete()`` in a script) has the CPUs to itself.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def in_passing_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` run in a new thread that ends when it returns; its result or its exception.

    Nested calls (already in such a thread) run directly."""
    if getattr(_state, "inside", False):
        return fn(*args, **kwargs)
    box: dict[str, Any] = {}

    def target() -> None:
        _state.inside = True
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as err:  # noqa: BLE001 - handed to the caller as is
            box["error"] = err

    thread = threading.Thread(target=target, name="selfextend-load", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


_state = threading.local()

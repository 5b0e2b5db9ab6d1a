"""One bridge from the blocking model to asyncio, shared by the server and both integrations.

The model generates in threads (PyTorch releases the GIL in its kernels); async callers need its
streams as async iterators that never block the event loop.  :func:`iterate_in_thread` is the
only place that does that, so a fix to cancellation or error handling reaches every async user.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from typing import TypeVar

T = TypeVar("T")
_END = object()


async def iterate_in_thread(items: Iterator[T]) -> AsyncIterator[T]:
    """Drive a blocking iterator in one worker thread, yielding its items without blocking the loop.

    The whole iterator runs in a single dedicated thread: handing each ``next`` to the shared
    executor could starve it while other calls wait there on the model's lock.  An error in the
    iterator is raised here.  Leaving early (``break``, ``aclose``, a cancelled task) closes the
    iterator, which for a model stream cancels its generation, and waits until the thread is done,
    so the model is free again when this returns.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    stop = threading.Event()
    finished = loop.create_future()

    def send(item: object, error: BaseException | None = None) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (item, error))
        except RuntimeError:  # the loop is gone: nobody is listening any more
            stop.set()

    def produce() -> None:
        try:
            for item in items:
                send(item)
                if stop.is_set():
                    break
        except BaseException as err:  # hand the error to the consumer
            send(_END, err)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()
            send(_END)
            try:
                loop.call_soon_threadsafe(lambda: finished.done() or finished.set_result(None))
            except RuntimeError:
                pass

    threading.Thread(target=produce, daemon=True, name="selfextend-stream").start()
    try:
        while True:
            item, error = await queue.get()
            if error is not None:
                raise error
            if item is _END:
                return
            yield item
    finally:
        stop.set()
        await asyncio.shield(finished)

"""The one bridge from blocking generators to asyncio (server, LangChain, LlamaIndex)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from selfextend_llm.streaming import iterate_in_thread


def test_items_arrive_in_order_and_the_loop_stays_free():
    ticks = []

    def slow():
        for i in range(3):
            time.sleep(0.05)
            yield i

    async def main():
        async def ticker():
            while True:
                ticks.append(1)
                await asyncio.sleep(0.01)

        task = asyncio.create_task(ticker())
        got = [x async for x in iterate_in_thread(slow())]
        task.cancel()
        return got

    assert asyncio.run(main()) == [0, 1, 2]
    assert len(ticks) >= 5  # the event loop ran while the generator slept


def test_errors_reach_the_consumer():
    def failing():
        yield 1
        raise RuntimeError("model fell over")

    async def main():
        return [x async for x in iterate_in_thread(failing())]

    with pytest.raises(RuntimeError, match="model fell over"):
        asyncio.run(main())


def test_leaving_early_closes_the_generator_in_its_thread_and_waits_for_it():
    closed = threading.Event()

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
                time.sleep(0.01)
        finally:
            closed.set()  # a model stream cancels its generation here

    async def main():
        agen = iterate_in_thread(endless())
        got = []
        async for x in agen:
            got.append(x)
            if len(got) == 3:
                break
        await agen.aclose()
        return got

    assert asyncio.run(main()) == [0, 1, 2]
    assert closed.is_set()  # done by the time aclose returned

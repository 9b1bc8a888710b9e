"""The process's event loop: per-account in-flight caps and background work that close() waits for."""

from __future__ import annotations

import asyncio

from dispatcher.transport import LoopThread


def test_each_account_gets_its_own_share_of_requests_in_flight():
    loop = LoopThread(in_flight=3)
    try:
        assert loop.take("slow", 5) == 3  # capped at its share
        assert loop.take("slow", 1) == 0
        assert loop.take("fast", 2) == 2  # another account is untouched by the first being full
        loop.give_back("slow", 2)
        assert loop.take("slow", 5) == 2
        assert (loop.busy("slow"), loop.busy("fast")) == (3, 2)
    finally:
        loop.close()


def test_close_waits_for_work_started_in_the_background():
    loop = LoopThread()
    finished = []

    async def work() -> None:
        await asyncio.sleep(0.2)
        finished.append(True)

    loop.submit(work)
    loop.close()
    assert finished == [True]

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


def test_reserve_waits_for_room_for_the_whole_batch_then_takes_what_there_is():
    import threading
    import time

    loop = LoopThread(in_flight=10)
    try:
        assert loop.reserve("acct", 4, timeout=1.0) == 4  # room at once
        assert loop.reserve("acct", 30, timeout=0.0) == 6  # more than its share: what is left
        threading.Timer(0.2, loop.give_back, args=("acct", 5)).start()
        started = time.monotonic()
        assert loop.reserve("acct", 5, timeout=5.0) == 5  # woke when five came back, not before
        assert 0.15 < time.monotonic() - started < 4.0
        loop.give_back("acct", 3)
        started = time.monotonic()
        assert loop.reserve("acct", 8, timeout=0.2) == 3  # gave up waiting for eight: took the three free
        assert time.monotonic() - started >= 0.2 and loop.busy("acct") == 10
    finally:
        loop.close()

"""The process's event loop: per-account in-flight caps and background work that close() waits for."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

from dispatcher.transport import LoopThread


def test_each_account_gets_its_own_share_of_requests_in_flight():
    loop = LoopThread(in_flight=3)
    try:
        slow = loop.room({"slow": 5, "fast": 2}, timeout=0)
        assert dict(slow.held) == {"slow": 3, "fast": 2}  # capped at its share; the other account untouched
        assert loop.room({"slow": 1}, timeout=0).held["slow"] == 0
        slow.release("slow", 2)
        assert loop.room({"slow": 5}, timeout=0).held["slow"] == 2
        assert (loop.busy("slow"), loop.busy("fast")) == (3, 2)
    finally:
        loop.close()


def test_room_is_given_back_on_leaving_the_block_whatever_happens():
    loop = LoopThread(in_flight=4)
    try:
        try:
            with loop.room({"acct": 3}, timeout=0):
                assert loop.busy("acct") == 3
                raise RuntimeError("a step between claim and send failed")
        except RuntimeError:
            pass
        assert loop.busy("acct") == 0  # nothing leaked
        with loop.room({"acct": 3}, timeout=0) as room:
            moved = room.handover()  # the background send owns it now: leaving the block keeps it
        assert loop.busy("acct") == 3
        moved.close()
        moved.close()  # given back once, however often closed
        assert loop.busy("acct") == 0
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


def test_room_waits_for_the_whole_batch_then_takes_what_there_is():
    import threading
    import time

    loop = LoopThread(in_flight=10)
    try:
        assert loop.room({"acct": 4}, timeout=1.0).held["acct"] == 4  # room at once
        rest = loop.room({"acct": 30}, timeout=0.0)
        assert rest.held["acct"] == 6  # more than its share: what is left
        threading.Timer(0.2, rest.release, args=("acct", 5)).start()
        started = time.monotonic()
        assert loop.room({"acct": 5}, timeout=5.0).held["acct"] == 5  # woke when five came back, not before
        assert 0.15 < time.monotonic() - started < 4.0
        rest.release("acct", 1)
        started = time.monotonic()
        assert loop.room({"acct": 8}, timeout=0.2).held["acct"] == 1  # gave up waiting for eight: took what was free
        assert time.monotonic() - started >= 0.2 and loop.busy("acct") == 10
    finally:
        loop.close()


def test_tasks_waiting_for_room_are_served_in_the_order_they_came():
    """A task waiting for room for its whole batch is not overtaken by a smaller one that came
    later: overtaken again and again, it would give up after its wait, claim a part and hand
    the rest back to the broker (a new task, a new read of its ids, half a second later)."""
    import threading

    loop = LoopThread(in_flight=4)
    try:
        held = loop.room({"acct": 4}, timeout=0)
        served: list[tuple[str, int]] = []
        done = {name: threading.Event() for name in ("first", "second")}

        def wait_for_room(name: str, n: int) -> None:
            served.append((name, loop.room({"acct": n}, timeout=10).held["acct"]))
            done[name].set()

        threading.Thread(target=wait_for_room, args=("first", 3)).start()
        _until(lambda: len(loop._needs.get("acct", [])) == 1)
        threading.Thread(target=wait_for_room, args=("second", 1)).start()
        _until(lambda: len(loop._needs.get("acct", [])) == 2)
        held.release("acct", 1)  # room for the second, not yet for the first, which came before it
        assert not done["second"].wait(0.5)
        held.release("acct", 2)
        assert done["first"].wait(5)
        held.release("acct", 1)
        assert done["second"].wait(5)
        assert served == [("first", 3), ("second", 1)]
    finally:
        loop.close()


def _until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_a_send_never_goes_before_its_reserved_instant_on_the_worker_s_loop(monkeypatch):
    """The rate limiter's margin assumes a request leaves at or after its slot, never before.
    The worker's loop (uvloop) rounds a sleep to the nearest millisecond and wakes up to half of
    one early; each send must still wait for its own instant, by time.monotonic()."""
    from dispatcher import dispatch

    gone: dict[str, float] = {}

    class Adapter:
        idempotent_retry = True  # its start is recorded MARK_LEAD ahead, then it sleeps to the slot itself

        def merged_options(self, options: dict) -> dict:
            return options

        async def send(self, client, msg):  # type: ignore[no-untyped-def]
            gone[msg.id] = time.monotonic()
            return msg.id

    loop = LoopThread(in_flight=200)
    monkeypatch.setattr(dispatch.transport, "process_loop", lambda *a: loop)
    monkeypatch.setattr(dispatch.runtime, "adapter_for", lambda account: Adapter())
    messages = [SimpleNamespace(id=str(n), provider="acct", to="+14155550123", text="hi", options={}, not_before=None,
                                not_after=None, attempt_key=str(n), provider_ref=None) for n in range(150)]
    try:
        start = time.monotonic() + 0.05
        send_at = {m.id: dispatch.Slot(start + n * 0.00137, slack=1.0) for n, m in enumerate(messages)}
        loop.run(lambda: dispatch.send_all(messages, send_at))  # type: ignore[arg-type]
    finally:
        loop.close()
    early = {mid: send_at[mid].at - t for mid, t in gone.items() if t < send_at[mid].at}
    assert len(gone) == len(messages) and not early


def test_warming_up_a_warm_loop_makes_no_trip_to_it(monkeypatch):
    """dispatch_batch warms the loop up before every batch's rate-limit reservation: once the
    client and Wire exist, that must not wait for a turn of a busy loop."""
    from dispatcher import transport

    transport.warm_up()
    loop = transport.process_loop()
    assert loop.warm and loop._client is not None and loop._wire is not None
    trips = []
    monkeypatch.setattr(loop, "run", lambda *a, **k: trips.append(a))
    transport.warm_up()
    assert trips == []

"""Start marks written from the send loop itself, on PostgreSQL: no thread between it and the database.

A message's request waits for its start to be recorded (dispatch.py `Starts`) while holding one
of its account's request slots. Through a thread, that write took 40-70 ms under load: the hop
to the thread, the thread's turns at the GIL while psycopg talks to the database, and the hop
back (docs/throughput.md). Here the same compare-and-set UPDATE (queries.mark_started's, compiled
by SQLAlchemy once) goes over a few asynchronous psycopg connections owned by the loop, in
autocommit: one round trip, answered at the loop's next turn.

A connection that fails is closed and its write fails: the caller sends nothing for those ids,
as when the store cannot be reached through the pool; so does a write not answered within
WRITE_TIMEOUT (even if it committed, nothing was sent: the record hands those claims back by
their token). An idle connection the server dropped meanwhile is replaced and the write run again. SQLite keeps the thread (its writes are
local and must queue on the database lock).
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import make_url

from . import queries
from .db import normalize_url

CONNECTIONS = 4  # per loop and database: writes beyond wait for one (a new backend per write costs PostgreSQL a fork)
CONNECT_TIMEOUT = 5  # seconds
WRITE_TIMEOUT = 10  # seconds a write may take before its messages are taken as not started (a hung network)


class LoopStarts:
    """mark_started() for one PostgreSQL database, from coroutines of one event loop."""

    def __init__(self, url: str) -> None:
        self.conninfo = make_url(normalize_url(url)).set(drivername="postgresql").render_as_string(hide_password=False)
        dialect = postgresql.psycopg.dialect()  # type: ignore[attr-defined]
        keys = ["ids", "token", "now"]
        self.mark = queries._Many(queries._mark_started("postgresql"), dialect, keys)
        self.unmark = queries._Many(queries._unmark_started("postgresql"), dialect, keys)
        self.idle: list[Any] = []
        self.turns = asyncio.Semaphore(CONNECTIONS)  # created on, and used from, the loop that owns it

    async def mark_started(self, ids: list[str], token: str, now: datetime | None) -> set[str]:
        """The ids still held by the claim `token`, their start now recorded as `now` (None: taken back)."""
        import psycopg

        many = self.unmark if now is None else self.mark
        params = many.rows([{"ids": ids, "token": token, "now": now}])[0]
        async with self.turns:
            while True:
                reused = bool(self.idle)
                conn = self.idle.pop() if reused else await psycopg.AsyncConnection.connect(
                    self.conninfo, autocommit=True, connect_timeout=CONNECT_TIMEOUT)
                try:
                    done = await asyncio.wait_for(_run(conn, many.sql, params), WRITE_TIMEOUT)
                except psycopg.OperationalError:
                    broken = conn.broken or conn.closed
                    await _close(conn)
                    if reused and broken:  # an idle connection the server dropped: the same compare-and-set again
                        continue
                    raise
                except BaseException:
                    await _close(conn)
                    raise
                self.idle.append(conn)
                return done

    async def aclose(self) -> None:
        idle, self.idle = self.idle, []
        for conn in idle:
            await _close(conn)


async def _run(conn: Any, sql: str, params: Any) -> set[str]:
    cursor = await conn.execute(sql, params)
    return {row[0] for row in await cursor.fetchall()}


async def _close(conn: Any) -> None:
    try:
        await conn.close()
    except Exception:  # noqa: BLE001 - a broken connection is dropped either way
        pass


_writers: dict[int, tuple[asyncio.AbstractEventLoop, dict[str, LoopStarts]]] = {}


def for_loop(url: str) -> tuple[LoopStarts, bool]:
    """The running loop's writer for `url` (call from a coroutine on that loop), and whether it
    is new (then its owner closes it with the loop: `close_for_loop`)."""
    loop = asyncio.get_running_loop()
    held = _writers.get(id(loop))
    if held is None or held[0] is not loop:  # a loop of the same id, closed since
        held = _writers[id(loop)] = (loop, {})
    writer = held[1].get(url)
    if writer is None:
        writer = held[1][url] = LoopStarts(url)
        return writer, True
    return writer, False


async def close_for_loop() -> None:
    """Close the running loop's connections (the loop's shutdown)."""
    loop = asyncio.get_running_loop()
    held = _writers.pop(id(loop), None)
    if held is not None and held[0] is loop:
        for writer in held[1].values():
            await writer.aclose()

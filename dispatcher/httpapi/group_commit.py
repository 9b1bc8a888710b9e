"""Single sends that arrive together are stored in one transaction and enqueued together.

`POST /v1/messages` without an Idempotency-Key validates its message on the event loop
(dispatcher.api.row_values) and hands the row here. A writer stores whatever has gathered
with `dispatcher.api.store_many` (one INSERT, one commit, one broker publish per `batch_size` ids) in
a worker thread; what arrives meanwhile waits for the next round. Idle, a request is written
at once, alone; under load, a commit and a publish serve many requests, which is what lets
one process answer well over a thousand sends a second (bench/api.py). Two writers may run
at once, so a group need not wait for the previous group's commit to reach the disk
(PostgreSQL spends most of a group's time waiting for its commit; on SQLite they take turns,
common.one_writer). Each request is answered only after its row is committed.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any, Callable

from .. import api
from .common import one_writer

Store = Callable[[list[dict[str, Any]]], list[str]]


class GroupCommit:
    """Gathers validated rows and stores them a group at a time; `add` returns once committed."""

    def __init__(self, store: Store | None = None, max_rows: int = 500, writers: int = 2) -> None:
        single_sends = functools.partial(api.store_many, priority=True)  # queue.enqueue: not behind bulk sends
        self._store, self._max_rows, self._most = one_writer(store or single_sends), max_rows, writers
        self._waiting: list[tuple[dict[str, Any], asyncio.Future[None]]] = []
        self._writers: set[asyncio.Task[None]] = set()

    async def add(self, values: dict[str, Any]) -> None:
        """Store one row (column values); raises what storing it raised."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((values, done))
        if len(self._writers) < self._most:
            writer = asyncio.create_task(self._write_all())
            self._writers.add(writer)
            writer.add_done_callback(self._writers.discard)
        await asyncio.shield(done)  # a client that goes away does not unstore its message

    async def drain(self) -> None:
        """Wait until everything handed in so far is stored (shutdown)."""
        while self._writers:
            await asyncio.wait(set(self._writers))

    async def _write_all(self) -> None:
        while self._waiting:
            group, self._waiting = self._waiting[: self._max_rows], self._waiting[self._max_rows:]
            try:
                await asyncio.to_thread(self._store, [values for values, _ in group])
            except Exception as exc:  # noqa: BLE001 - every request of the group hears it
                for _, done in group:
                    if not done.done():
                        done.set_exception(exc)
            else:
                for _, done in group:
                    if not done.done():
                        done.set_result(None)

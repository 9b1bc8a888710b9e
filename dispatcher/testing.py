"""Helpers to run the real pipeline in tests and benchmarks: worker processes and waiting.

    with WorkerProcesses(count=4, env=env, concurrency=8):
        ids = dispatcher.send_many(...)
        wait_until_settled(ids, timeout=60)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Iterable, Mapping

from .keys import TASK_DISPATCH
from .queue import lane

SETTLED = {"accepted", "delivered", "failed", "rejected", "expired", "cancelled", "unknown"}


class WorkerProcesses:
    """`count` separate `dispatcher worker` processes (threads pool), stopped on exit."""

    def __init__(self, count: int, env: Mapping[str, str], concurrency: int = 8, beat: bool = False,
                 loglevel: str = "WARNING") -> None:
        self.count, self.env, self.concurrency, self.beat, self.loglevel = count, dict(env), concurrency, beat, loglevel
        self.procs: list[subprocess.Popen] = []
        self.logdir = tempfile.mkdtemp(prefix="dispatcher-workers-")

    def __enter__(self) -> "WorkerProcesses":
        cmd = [sys.executable, "-m", "dispatcher.cli"]
        for _ in range(self.count):
            self.spawn()
        if self.beat:
            log = open(os.path.join(self.logdir, "beat.log"), "w")
            self.procs.append(subprocess.Popen(
                [*cmd, "beat", "--loglevel", self.loglevel, "-s", os.path.join(self.logdir, "beat-schedule")],
                env=self.env, stdout=log, stderr=subprocess.STDOUT))
        return self

    def spawn(self) -> int:
        """Start one more worker process; returns its index (its log is worker<i>.log)."""
        i = len(self.procs)
        log = open(os.path.join(self.logdir, f"worker{i}.log"), "w")
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "dispatcher.cli", "worker", "--processes", "1", "--loglevel", self.loglevel,
             "-c", str(self.concurrency),
             "-n", f"w{i}-{os.getpid()}@%h", "--without-gossip", "--without-mingle", "--without-heartbeat"],
            env=self.env, stdout=log, stderr=subprocess.STDOUT))
        return i

    def kill(self, i: int, sig: int = signal.SIGKILL) -> None:
        """Send worker `i` a signal (SIGKILL by default: no shutdown code runs) and reap it."""
        self.procs[i].send_signal(sig)
        self.procs[i].wait(timeout=60)

    def alive(self) -> list[int]:
        return [i for i, p in enumerate(self.procs) if p.poll() is None]

    def enqueue(self, ids: Iterable[str], countdown: float = 0.0, batch_size: int = 100) -> None:
        """`dispatcher.queue.enqueue` for these workers' queues (the beat's and dispatch's seam)."""
        ids, app = list(ids), self._app()
        try:
            with app.producer_or_acquire() as producer:
                for start in range(0, len(ids), batch_size):
                    app.send_task(TASK_DISPATCH, args=[ids[start:start + batch_size]], countdown=countdown or None,
                                  queue=lane(countdown), producer=producer)
        finally:
            app.close()

    def _app(self):  # type: ignore[no-untyped-def]
        """A Celery app on the workers' own broker namespace (their DISPATCHER_REDIS_PREFIX)."""
        from .celery_app import create_app

        return create_app(prefix=self.env.get("DISPATCHER_REDIS_PREFIX", "dispatcher"))

    def publish(self, ids: Iterable[str], batch_size: int = 100) -> None:
        """Enqueue dispatch tasks for `ids` where these workers (and only workers sharing their
        key prefix) consume them; pair with an environment of a prefix of its own."""
        self.enqueue(ids, 0.0, batch_size)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until every worker answers a Celery ping: started, connected, consuming.

        Measurements of a running pipeline start after this, so that workers still importing
        and connecting (a second of CPU each) do not share the machine with the ones sending.
        """
        app = self._app()
        wanted = {f"w{i}-{os.getpid()}@" for i in range(self.count)}
        deadline = time.monotonic() + timeout
        try:
            while True:
                replies = app.control.ping(timeout=0.5) or []
                seen = {name.split("@")[0] + "@" for reply in replies for name in reply}
                if wanted <= seen:
                    return
                if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                    raise RuntimeError(f"{len(wanted - seen)} of {self.count} worker(s) not ready within {timeout}s "
                                       f"(logs in {self.logdir})")
        finally:
            app.close()

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def wait_until_settled(ids: Iterable[str], timeout: float, settled: set[str] = SETTLED, interval: float = 0.1) -> dict[str, str]:
    """Poll the store until every id has one of the `settled` statuses; returns id -> status."""
    from sqlalchemy import select

    from . import runtime
    from .store.db import session_scope
    from .store.models import Message

    wanted = list(ids)
    deadline = time.monotonic() + timeout
    statuses: dict[str, str] = {}
    while True:
        with session_scope(runtime.settings().database_url) as db:
            for start in range(0, len(wanted), 500):
                chunk = wanted[start : start + 500]
                statuses.update((row[0], row[1]) for row in db.execute(select(Message.id, Message.status).where(Message.id.in_(chunk))))
        if all(statuses.get(i) in settled for i in wanted):
            return statuses
        if time.monotonic() > deadline:
            pending = {s for i, s in statuses.items() if s not in settled}
            raise TimeoutError(f"{sum(1 for i in wanted if statuses.get(i) not in settled)} message(s) not settled "
                               f"within {timeout}s (statuses {sorted(pending)})")
        time.sleep(interval)


def most_in_window(instants: Iterable[float], length: float) -> int:
    """The largest number of instants inside any closed window of `length` seconds."""
    import bisect

    ordered = sorted(instants)
    return max((bisect.bisect_right(ordered, t + length) - i for i, t in enumerate(ordered)), default=0)


class SandboxProcess:
    """`dispatcher sandbox` in a child process (no GIL shared with the caller), driven over HTTP."""

    def __init__(self, port: int | None = None, latency_ms: int = 0) -> None:
        import socket

        if port is None:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
        self.port, self.latency_ms = port, latency_ms
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self._info: dict = {}

    def __enter__(self) -> "SandboxProcess":
        import httpx

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dispatcher.cli", "sandbox", "--port", str(self.port), "--latency-ms", str(self.latency_ms)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                self._info = httpx.get(f"{self.url}/_sandbox/info", timeout=1).json()
                return self
            except httpx.HTTPError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("the sandbox process did not start") from None
                time.sleep(0.1)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def base_url(self, kind: str) -> str:
        return f"{self.url}/{kind}"

    def credentials(self, kind: str) -> dict[str, str]:
        return self._info[kind]["credentials"]

    def _post(self, path: str, body: dict) -> dict:
        import httpx

        response = httpx.post(f"{self.url}/_sandbox/{path}", json=body, timeout=10)
        response.raise_for_status()
        return response.json()

    def configure(self, kind: str, **values: object) -> dict:
        return self._post("configure", {"kind": kind, **values})

    def set_faults(self, kind: str, **values: object) -> dict:
        return self._post("faults", {"kind": kind, **values})

    def requests(self, kind: str | None = None) -> list[dict]:
        import httpx

        params = {"kind": kind} if kind else {}
        return httpx.get(f"{self.url}/_sandbox/requests", params=params, timeout=30).json()["requests"]

"""Shared fixtures: a real Redis (own db + key prefix), real databases, the sandbox over HTTP.

Every test session picks its own Redis key prefix and PostgreSQL schema, so sessions on one
machine never see each other's data.
"""

from __future__ import annotations

import os
import uuid

import pytest

REDIS_URL = os.environ.get("DISPATCHER_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
PG_URL = os.environ.get("DISPATCHER_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
SESSION_TAG = f"t{os.getpid()}{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="session")
def redis_url() -> str:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL).ping()
    except redis.exceptions.ConnectionError:
        pytest.fail(f"Redis is not reachable at {REDIS_URL}: start one (see README)")
    return REDIS_URL


@pytest.fixture(scope="session")
def redis_prefix() -> str:
    return SESSION_TAG


@pytest.fixture()
def redis_client(redis_url: str, redis_prefix: str):
    import redis

    client = redis.Redis.from_url(redis_url)
    yield client
    for key in client.scan_iter(f"{redis_prefix}*", count=1000):
        client.delete(key)
    client.close()


@pytest.fixture(scope="session")
def sandbox():
    """All five provider twins on one loopback port for the whole session."""
    from dispatcher.sandbox.server import SandboxThread

    with SandboxThread(port=0) as sb:
        yield sb


@pytest.fixture()
def clean_sandbox(sandbox):
    sandbox.reset()
    yield sandbox
    sandbox.reset()


@pytest.fixture(scope="module")
def receiver():
    """The webhook receiver on loopback (`dispatcher webhooks` in a thread), one per test module."""
    from dispatcher.webhooks import ReceiverThread

    with ReceiverThread() as r:
        yield r


@pytest.fixture(scope="session")
def pg_url() -> str:
    """A PostgreSQL schema of this session's own (dropped at the end)."""
    import sqlalchemy as sa

    schema = f"dispatcher_{SESSION_TAG}"
    try:
        admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    except sa.exc.OperationalError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"PostgreSQL not reachable at {PG_URL}: {exc.__class__.__name__}")
    sep = "&" if "?" in PG_URL else "?"
    yield f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
    admin.dispose()


# --------------------------------------------------------------------------- the pipeline
# The Celery app reads the broker URL and key prefix once, at import: pin them for the session.
os.environ.setdefault("DISPATCHER_REDIS_URL", REDIS_URL)
os.environ["DISPATCHER_REDIS_PREFIX"] = SESSION_TAG


def write_config(path, sandbox, extra: str = "", **general) -> str:
    """A dispatcher.toml with one account per kind, all pointing at the sandbox."""
    lines = ["[dispatcher]"]
    defaults = {"retry_base": 0.05, "retry_cap": 0.5, "max_attempts": 4}
    defaults.update(general)
    for key, value in defaults.items():
        lines.append(f"{key} = {value!r}" if not isinstance(value, str) else f'{key} = "{value}"')
    em = sandbox.credentials("emsgnow")
    lines += [
        "",
        "[providers.alerts]",
        'kind = "emsgnow"',
        f'base_url = "{sandbox.base_url("emsgnow")}"',
        f'api_key = "{em["api_key"]}"',
        'from = "ACME"',
        "",
        "[providers.badkey]",
        'kind = "emsgnow"',
        f'base_url = "{sandbox.base_url("emsgnow")}"',
        'api_key = "wrong-key"',
        'from = "ACME"',
    ]
    path.write_text("\n".join(lines) + "\n" + extra)
    return str(path)


@pytest.fixture()
def dispatcher_env(tmp_path, sandbox, redis_url, monkeypatch):
    """A fresh SQLite store and config for one test; the runtime reloads from them."""
    from dispatcher import runtime

    sandbox.reset()
    monkeypatch.setenv("DISPATCHER_CONFIG", write_config(tmp_path / "dispatcher.toml", sandbox))
    monkeypatch.setenv("DISPATCHER_DATABASE_URL", f"sqlite:///{tmp_path / 'dispatcher.db'}")
    runtime.configure(None)
    yield tmp_path
    from dispatcher.transport import process_loop

    process_loop().drain(15)  # sends a worker started in the background finish inside their test
    runtime.configure(None)
    sandbox.reset()


@pytest.fixture(scope="session")
def celery_worker_thread(redis_url):
    """A real Celery worker (threads pool) consuming the session's queues on the real Redis."""
    from celery.contrib.testing.worker import start_worker

    from dispatcher import keys
    from dispatcher.worker import app

    app.conf.worker_concurrency = 8
    with start_worker(app, pool="threads", concurrency=8, perform_ping_check=False,
                      queues=list(keys.WORKER_QUEUES), shutdown_timeout=10, loglevel="WARNING"):
        yield app


def wait_for(predicate, timeout: float = 15.0, interval: float = 0.05):
    """Poll until predicate() is truthy (returning it) or fail after `timeout` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


def send_out(*ids: str, timeout: float = 15.0) -> dict[str, str]:
    """Dispatch `ids` in this process until none is left `queued`; returns their statuses.

    A send whose start was recorded later than its rate-limit slot allows is handed back unsent
    (never sent late) and goes again at the next dispatch; with no broker in these tests, that
    next dispatch is this helper's. On a slow machine a store write can take longer than the
    10 ms a 100/s limit allows (seen: 17-37 ms on SQLite)."""
    import dispatcher
    from dispatcher.dispatch import dispatch_batch

    def settled() -> dict[str, str] | None:
        dispatch_batch([i for i in ids if dispatcher.get(i).status == "queued"])
        statuses = {i: dispatcher.get(i).status for i in ids}
        return None if "queued" in statuses.values() else statuses

    return wait_for(settled, timeout)


@pytest.fixture(scope="session", autouse=True)
def _close_http_loop():
    yield
    from dispatcher.transport import close_process_loop

    close_process_loop()


@pytest.fixture()
def broker_down(monkeypatch):
    """send() cannot reach the broker: rows are stored `queued` and no task exists for them.

    Tests that drive the dispatch themselves use it, so that the session's worker cannot pick
    their messages up first.
    """
    from dispatcher import queue
    from dispatcher.errors import BrokerUnavailable

    def refuse(ids, countdown=0.0, batch_size=None, priority=False):
        raise BrokerUnavailable("broker unreachable (test)")

    monkeypatch.setattr(queue, "enqueue", refuse)

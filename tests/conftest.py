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

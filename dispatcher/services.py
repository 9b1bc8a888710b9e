"""Checks of the services the dispatcher needs, turned into one-line reasons instead of tracebacks."""

from __future__ import annotations

from .errors import BrokerUnavailable
from .redact import hide_url_passwords


def require_redis(url: str) -> None:
    """Raise BrokerUnavailable with a one-line hint when Redis does not answer."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except redis.exceptions.RedisError as exc:
        raise BrokerUnavailable(
            f"Redis is not reachable at {hide_url_passwords(url)} ({type(exc).__name__}); start one with "
            "`docker compose up -d redis` or `redis-server --daemonize yes`, or set DISPATCHER_REDIS_URL"
        ) from None
    finally:
        client.close()


def describe_service_error(exc: BaseException) -> str:
    """A one-line description of an unexpected error (connection problems named plainly).

    The password of any URL in it is starred.
    """
    text = hide_url_passwords(f"{type(exc).__name__}: {exc}".splitlines()[0])
    name = type(exc).__name__
    if "OperationalError" in name and "connect" in str(exc).lower():
        return f"the database is not reachable ({text[:200]}); check DISPATCHER_DATABASE_URL"
    return text[:300]

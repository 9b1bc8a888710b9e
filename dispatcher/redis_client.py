"""One small Redis client per (URL, process) for the operational helpers: activity counts,
the beat's tick and lock, health checks. Short timeouts: none of them may hold up a send."""

from __future__ import annotations

import os
import threading

import redis

_clients: dict[tuple[str, int, float], redis.Redis] = {}
_guard = threading.Lock()


def shared(url: str, timeout: float = 2.0) -> redis.Redis:
    """This process's client for `url` (a forked child never reuses its parent's connections)."""
    key = (url, os.getpid(), timeout)
    with _guard:
        client = _clients.get(key)
        if client is None:
            client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
            _clients[key] = client
    return client

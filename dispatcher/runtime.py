"""The process's current settings and adapters, loaded once and resettable (tests, reloads)."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from functools import lru_cache
from typing import TYPE_CHECKING, Iterator

from .config import Settings, load_settings
from .providers import adapter_class
from .providers.base import Adapter

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from .ratelimit import RateLimiter

_lock = threading.Lock()
_settings: Settings | None = None


def settings() -> Settings:
    global _settings
    if _settings is None:
        with _lock:
            if _settings is None:
                _settings = load_settings()
    return _settings


@contextmanager
def session() -> Iterator["Session"]:
    """A session on the configured store (schema brought up to date first); commits on success."""
    from .store.db import ensure_schema, session_scope

    url = settings().database_url
    ensure_schema(url)
    with session_scope(url) as db:
        yield db


def configure(new: Settings | None) -> None:
    """Replace the settings (None = read them again from file and environment on next use)."""
    global _settings
    with _lock:
        _settings = new
    adapter_for.cache_clear()


_limiters: dict[tuple[str, int, float], "RateLimiter"] = {}


def limiter() -> "RateLimiter":
    """This process's rate limiter over the shared Redis."""
    import os

    from .ratelimit import RateLimiter

    s = settings()
    key = (s.redis_url, os.getpid(), s.rate_margin)
    if key not in _limiters:
        _limiters[key] = RateLimiter.from_url(s.redis_url, margin_ratio=s.rate_margin)
    return _limiters[key]


@lru_cache(maxsize=256)
def adapter_for(account_name: str) -> Adapter:
    account = settings().account(account_name)
    return adapter_class(account.kind)(account)

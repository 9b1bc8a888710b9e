"""API keys of the HTTP API: create (shown once), list, revoke, and check a presented key.

    create_key(name, accounts=None) -> (KeyInfo, key)   the key's text exists only in the return value
    list_keys() -> [KeyInfo]
    revoke_key(name) -> KeyInfo
    KeyChecker().check(presented) -> KeyInfo | None

A key reads `dsp_<id>_<secret>`: 12 public hex digits that find the row, then 256 random
bits. Only the SHA-256 of the whole key is stored; a presented key's hash is compared with
`hmac.compare_digest` (constant time). Keys are never logged, printed (but once, by `create`)
or put in an error: a refusal says why without repeating what was presented.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Callable, Iterable

from sqlalchemy.exc import IntegrityError

from . import runtime
from .errors import NotFound, UnknownProvider, ValidationError
from .store import api_keys as table
from .store.models import utcnow

PREFIX = "dsp"
_KEY_FORM = re.compile(r"dsp_([0-9a-f]{12})_[A-Za-z0-9_-]{43}")
_NAME_FORM = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


@dataclass(frozen=True)
class KeyInfo:
    """What is known of a key without the key itself."""

    id: str
    name: str
    accounts: tuple[str, ...] | None  # None: every account
    created_at: datetime
    revoked_at: datetime | None = None

    def allows(self, account: str) -> bool:
        return self.accounts is None or account in self.accounts


def create_key(name: str, accounts: Iterable[str] | None = None) -> tuple[KeyInfo, str]:
    """A new key named `name`, limited to `accounts` (None: all). Returns (info, the key's text)."""
    if not isinstance(name, str) or not _NAME_FORM.fullmatch(name):
        raise ValidationError("name", "must be 1 to 100 letters, digits, '.', '_' or '-', starting with a letter or digit")
    limited = None if accounts is None else tuple(dict.fromkeys(accounts))
    if limited is not None:
        if not limited:
            raise ValidationError("accounts", "must name at least one provider account")
        configured = runtime.settings().providers
        for account in limited:
            if account not in configured:
                exc = UnknownProvider(account, list(configured))
                raise ValidationError("accounts", exc.rule)
    key_id = secrets.token_hex(6)
    text = f"{PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
    row = table.ApiKey(id=key_id, name=name, key_hash=_digest(text),
                       accounts=None if limited is None else list(limited), created_at=utcnow())
    taken = ValidationError("name", f"a key named {name!r} exists already: revoke it first or choose another name")
    try:
        with runtime.session() as db:
            if table.active_key(db, name) is not None:
                raise taken
            table.add_key(db, row)
    except IntegrityError:  # created meanwhile by another command
        raise taken from None
    return _info(row), text


def list_keys() -> list[KeyInfo]:
    with runtime.session() as db:
        return [_info(row) for row in table.all_keys(db)]


def revoke_key(name: str) -> KeyInfo:
    """Revoke the active key named `name` (NotFound when there is none)."""
    with runtime.session() as db:
        row = table.active_key(db, name)
        if row is None or not table.revoke(db, name, utcnow()):
            raise NotFound(f"no active API key named {name!r}")
        return _info(table.key_by_id(db, row.id) or row)


class KeyChecker:
    """Checks presented keys against the store, remembering good ones for `ttl` seconds.

    Only keys found good are remembered, so a new key works at once and a wrong one always
    costs a lookup; a revoked key stops working within `ttl` seconds (1 s by default) in every
    process serving the API. Safe from any thread.
    """

    def __init__(self, ttl: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl, self._clock = ttl, clock
        self._known: dict[str, tuple[float, str, KeyInfo]] = {}  # id -> (until, hash, info)
        self._lock = threading.Lock()

    def cached(self, presented: str) -> tuple[bool, KeyInfo | None]:
        """(True, the answer) when the store need not be asked; (False, None) when it must. Never blocks."""
        match = _KEY_FORM.fullmatch(presented)
        if match is None:
            return True, None  # not even the form of a key
        with self._lock:
            cached = self._known.get(match.group(1))
        if cached is None or cached[0] <= self._clock():
            return False, None
        return True, cached[2] if hmac.compare_digest(cached[1], _digest(presented)) else None

    def check(self, presented: str | None) -> KeyInfo | None:
        """The key's info when `presented` is a current key, else None. May read the store (blocking)."""
        if not presented:
            return None
        hit, info = self.cached(presented)
        if hit:
            return info
        key_id = presented.split("_", 2)[1]  # dsp_<id>_<secret>: the form was checked by cached()
        with runtime.session() as db:
            row = table.key_by_id(db, key_id)
        if row is None or row.revoked_at is not None or not hmac.compare_digest(row.key_hash, _digest(presented)):
            return None
        info = _info(row)
        with self._lock:
            self._known[key_id] = (self._clock() + self.ttl, row.key_hash, info)
        return info

    def forget(self) -> None:
        with self._lock:
            self._known.clear()


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _info(row: table.ApiKey) -> KeyInfo:
    accounts = None if row.accounts is None else tuple(row.accounts)
    return KeyInfo(row.id, row.name, accounts, row.created_at, row.revoked_at)

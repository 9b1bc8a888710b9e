"""Masking for logs and printouts: phone numbers never appear whole, URL tokens not at all."""

from __future__ import annotations

import re

_URL_TOKEN = re.compile(r"([?&](?:token|secret|key|signature)=)[^&#\s]*", re.IGNORECASE)


def mask(address: str | None) -> str:
    """'+447700900123' -> '+44*******123'; short values are starred entirely."""
    if not address:
        return ""
    text = str(address)
    if len(text) <= 6:
        return "*" * len(text)
    return text[:3] + "*" * (len(text) - 6) + text[-3:]


def hide_url_secrets(value: object) -> object:
    """A URL with the values of its token / secret / key / signature query parameters starred.

    An eMsgNow callback URL carries the webhook token (`?token=...`); anything not a string
    comes back unchanged.
    """
    if not isinstance(value, str):
        return value
    return _URL_TOKEN.sub(r"\1***", value)


def hide_password(url: str) -> str:
    """A database or broker URL with its password starred: 'redis://u:***@host/0'."""
    return re.sub(r"://([^:/@]*):[^@]*@", r"://\1:***@", url)

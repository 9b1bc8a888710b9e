"""Masking for logs and printouts: phone numbers never appear whole, URL tokens and passwords not at all."""

from __future__ import annotations

import re
from typing import Any

_URL_TOKEN = re.compile(r"([?&](?:token|secret|key|signature)=)[^&#\s]*", re.IGNORECASE)
# scheme://user:password@host -> scheme://user:***@host, anywhere in a text (redis://:pw@h too)
_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*:)[^\s/]*@")


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


def has_url_secret(value: object) -> bool:
    """Whether a string carries a URL token or password that hide_url_secrets / hide_url_passwords would star."""
    return isinstance(value, str) and bool(_URL_TOKEN.search(value) or _URL_PASSWORD.search(value))


def hide_url_passwords(text: str) -> str:
    """`text` with the password of every URL in it starred: "redis://:***@host:6379/0"."""
    return _URL_PASSWORD.sub(r"\1***@", text)


def hide_secrets_in(value: Any) -> Any:
    """A copy of a nested value (dicts, lists, strings) with URL tokens and passwords starred."""
    if isinstance(value, str):
        return hide_url_passwords(str(hide_url_secrets(value)))
    if isinstance(value, dict):
        return {k: hide_secrets_in(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [hide_secrets_in(v) for v in value]
    return value

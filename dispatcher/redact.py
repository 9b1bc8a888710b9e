"""Masking for logs: phone numbers and other addresses never appear whole."""

from __future__ import annotations


def mask(address: str | None) -> str:
    """'+447700900123' -> '+44*******123'; short values are starred entirely."""
    if not address:
        return ""
    text = str(address)
    if len(text) <= 6:
        return "*" * len(text)
    return text[:3] + "*" * (len(text) - 6) + text[-3:]

"""What a message's fields may hold so that every supported database stores them exactly.

A lone surrogate (U+D800..U+DFFF not in a pair) is not Unicode text: it cannot be encoded as
UTF-8, so SQLite's and PostgreSQL's drivers both fail on it. PostgreSQL holds no NUL character
in text or JSON. Options are stored as JSON, so their values must be JSON values: strings,
finite numbers, booleans, null, lists and mappings with string keys. Each check raises a
ValidationError naming the field, before anything is stored.
"""

from __future__ import annotations

import math
from typing import Any

from .errors import InvalidOption, ValidationError

MAX_DEPTH = 20  # nesting of an option's lists and mappings


def check_text(field: str, value: Any) -> None:
    """Refuse a string the database cannot hold exactly (a NUL, a lone surrogate)."""
    if not isinstance(value, str):
        return
    if "\x00" in value:
        raise ValidationError(field, "must not contain a NUL character (\\x00)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValidationError(field, f"must be valid Unicode text: a lone surrogate U+{ord(value[exc.start]):04X} "
                                     f"at position {exc.start}") from None


def check_option(field: str, value: Any, depth: int = 0) -> None:
    """Refuse an option value that is not a JSON value the database can hold exactly."""
    if depth > MAX_DEPTH:
        raise InvalidOption(field, f"is nested more than {MAX_DEPTH} levels deep")
    if value is None or isinstance(value, (bool, int)):
        return
    if isinstance(value, str):
        check_text(field, value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidOption(field, "must be a finite number")
    elif isinstance(value, (list, tuple)):
        for item in value:
            check_option(field, item, depth + 1)
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidOption(field, f"mapping keys must be strings, got {type(key).__name__}")
            check_text(field, key)
            check_option(field, item, depth + 1)
    else:
        raise InvalidOption(field, f"must be a string, number, boolean, list or mapping, got {type(value).__name__}")

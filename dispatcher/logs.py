"""Log format: `DISPATCHER_LOG_FORMAT=json` gives one JSON object per line, text otherwise.

Each JSON line has `time` (UTC, ISO 8601), `level`, `logger`, `message`, and, where the record
concerns one message, `message_id`, `account` and `attempt` (passed as `extra=about(...)`, or
the message id read from the text when exactly one appears in it); an exception comes as
`error`. Whatever the caller wrote, the formatter hides what must never reach a log: every
phone number written +E.164 keeps only its first and last three characters, tokens in URLs,
passwords in URLs and Bearer credentials become `***`.

Celery's worker and beat configure logging themselves; `celery_hooks` (connected when the
Celery app is imported) gives their handlers this formatter when JSON is asked for.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from datetime import datetime, timezone
from typing import Any

from .redact import hide_url_passwords, hide_url_secrets, mask

FIELDS = ("message_id", "account", "attempt")
_PHONE = re.compile(r"(?<![\w+])\+\d{7,15}(?!\d)")
_BEARER = re.compile(r"(Bearer\s+)[^\s\"',;]+", re.IGNORECASE)
_MESSAGE_ID = re.compile(r"(?<![0-9a-f])[0-9a-f]{32}(?![0-9a-f])")


def json_wanted() -> bool:
    return os.environ.get("DISPATCHER_LOG_FORMAT", "text").strip().lower() == "json"


def about(message_id: str | None = None, account: str | None = None, attempt: int | None = None) -> dict[str, Any]:
    """`extra=` for a log call that concerns one message: log.info(..., extra=about(m.id, m.provider, n))."""
    return {k: v for k, v in (("message_id", message_id), ("account", account), ("attempt", attempt)) if v is not None}


def scrub(text: str) -> str:
    """Hide phone numbers, URL tokens and passwords, and Bearer credentials in free text."""
    text = _PHONE.sub(lambda m: mask(m.group(0)), text)
    text = _BEARER.sub(r"\1***", text)
    return hide_url_passwords(str(hide_url_secrets(text)))


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        message = scrub(record.getMessage())
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": message,
        }
        for key in FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                out[key] = value
        if "message_id" not in out:
            ids = set(_MESSAGE_ID.findall(message))
            if len(ids) == 1:
                out["message_id"] = ids.pop()
        for key in ("task_id", "task_name"):  # Celery's task logger adds these
            value = getattr(record, key, None)
            if value not in (None, "???"):
                out[key] = value
        if record.exc_info:
            out["error"] = scrub(self.formatException(record.exc_info))
        return json.dumps(out, default=str, ensure_ascii=False)


def formatter() -> logging.Formatter:
    if json_wanted():
        return JsonFormatter()
    return logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")


def configure(level: int | str = logging.INFO, stream: Any = None) -> None:
    """Send the root logger's records to stderr in the chosen format (commands Celery does not run)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter())
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)


def _use_json(logger: logging.Logger | None = None, **_: Any) -> None:
    if not json_wanted():
        return
    for log in {logging.getLogger(), logger or logging.getLogger()}:
        for handler in log.handlers:
            handler.setFormatter(JsonFormatter())


def celery_hooks() -> None:
    """Give Celery's own log handlers (worker and beat, task loggers too) the JSON formatter."""
    from celery import signals

    signals.after_setup_logger.connect(_use_json, weak=False)
    signals.after_setup_task_logger.connect(_use_json, weak=False)

"""What every handler of the HTTP API uses: refusals and replies, reading JSON bodies and
query strings into the pydantic models, and the key's accounts.

A refusal reads "field: rule" in the words of dispatcher.ValidationError; pydantic's
complaints about a body's shape are put in the same form (`shape_refusal`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, TypeVar, get_origin

from aiohttp import web
from pydantic import BaseModel
from pydantic import ValidationError as ShapeError

from .. import runtime
from ..api_keys import KeyInfo
from ..store.db import is_sqlite

MAX_BODY = 1024 * 1024
IDEMPOTENCY_HEADER = "Idempotency-Key"
IDEMPOTENCY_DOC = ((IDEMPOTENCY_HEADER, "the same key again returns the first result (200) and sends nothing new"),)
API_KEY = web.RequestKey("api_key", KeyInfo)


class Refusal(Exception):
    """An answer other than success: status, the field at fault (or None) and the rule.

    Its message reads "field: rule", as a dispatcher.ValidationError's does.
    """

    def __init__(self, status: int, field: str | None, rule: str, headers: dict[str, str] | None = None) -> None:
        self.message = f"{field}: {rule}" if field else rule
        super().__init__(self.message)
        self.status, self.field, self.headers = status, field, headers


@dataclass(frozen=True)
class Reply:
    status: int
    body: BaseModel


# --------------------------------------------------------------------------- reading requests
def key_of(request: web.Request) -> KeyInfo:
    return request[API_KEY]


def allow(key: KeyInfo, account: str, field: str) -> None:
    if not key.allows(account):
        raise Refusal(403, field, f"this API key may not use provider account {account!r}")


async def json_body(request: web.Request, model: type[BaseModel]) -> Any:
    if request.content_type != "application/json":
        raise Refusal(415, "Content-Type", f"must be application/json, got {request.content_type or 'none'}")
    raw = await read_body(request)
    try:
        return model.model_validate_json(raw)
    except ShapeError as exc:
        raise shape_refusal(exc) from None


async def read_body(request: web.Request) -> bytes:
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise Refusal(413, "body", f"must be at most {MAX_BODY} bytes (1 MiB)") from None


def shape_refusal(exc: ShapeError) -> Refusal:
    """The first problem pydantic found, as a field name and a rule in send()'s words."""
    err = exc.errors(include_url=False)[0]
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "json_invalid":
        return Refusal(400, "body", "is not valid JSON")
    field = _field_name(err["loc"])
    rule = {
        "missing": "is required",
        "string_type": "must be a string",
        "dict_type": "must be a JSON object",
        "model_type": "must be a JSON object",
        "model_attributes_type": "must be a JSON object",
        "list_type": "must be a list",
        "extra_forbidden": "is not a field of this call",
        "too_long": f"at most {ctx.get('max_length')} messages",
        "too_short": f"at least {ctx.get('min_length')} message",
        "bool_parsing": "must be true or false",
        "bool_type": "must be true or false",
    }.get(kind)
    if rule is None and kind.startswith(("datetime", "date", "time")):
        rule = "must be an ISO 8601 date-time with a time zone (e.g. 2026-06-01T07:00:00Z)"
    return Refusal(422, field or "body", rule or str(err["msg"]).lower())


def _field_name(loc: tuple[Any, ...]) -> str:
    name = ""
    for part in loc:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name


def idempotency_key(request: web.Request) -> str | None:
    return request.headers.get(IDEMPOTENCY_HEADER)


def query_params(request: web.Request, model: type[BaseModel]) -> Any:
    """The query string as `model`: a list field takes every value given, any other field one."""
    data: dict[str, Any] = {}
    for name in dict.fromkeys(request.query.keys()):
        values = request.query.getall(name)
        field = model.model_fields.get(name)
        if field is not None and get_origin(field.annotation) is list:
            data[name] = values
        elif len(values) > 1:
            raise Refusal(422, name, "is given more than once")
        else:
            data[name] = values[0]
    try:
        return model.model_validate(data)
    except ShapeError as exc:
        raise shape_refusal(exc) from None


T = TypeVar("T")
_SQLITE_WRITER = threading.Lock()


def one_writer(fn: Callable[..., T]) -> Callable[..., T]:
    """`fn` (a store write, run in a worker thread) taking turns with this process's other writes
    when the store is SQLite. SQLite lets one transaction write at a time; a second one that
    finds the lock taken polls it through the busy handler, sleeping up to tens of milliseconds
    between tries, while a lock of the process hands over at once. PostgreSQL writes stay
    concurrent."""

    def run(*args: Any, **kwargs: Any) -> T:
        if not is_sqlite(runtime.settings().database_url):
            return fn(*args, **kwargs)
        with _SQLITE_WRITER:
            return fn(*args, **kwargs)

    return run

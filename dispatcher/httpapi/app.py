"""The producer API's aiohttp app: the route table, the handlers, and how refusals are answered.

Every answer is JSON. A refusal is `{"error": {"field": ..., "message": ...}}`; a
dispatcher.ValidationError becomes 422 with its own field and words, NotFound 404, TooLate
409. A request is checked in this order: the key (401), the body's type, size and JSON
(415, 413, 400) and shape (422), the key's accounts (403), then the rules of a send (422);
nothing is stored before all of them pass. Store work runs in worker threads, off the loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any, Callable

from aiohttp import web
from pydantic import BaseModel
from pydantic import ValidationError as ShapeError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, OperationalError

from .. import __version__, api, runtime
from ..api_keys import KeyChecker, KeyInfo
from ..errors import ConfigError, NotFound, TooLate, ValidationError
from ..store.models import Message as Row
from .group_commit import GroupCommit
from .models import BatchIn, BatchOut, ErrorDetail, ErrorOut, Health, MessageIn, MessageOut
from .openapi import Route, spec

log = logging.getLogger("dispatcher.httpapi")
MAX_BODY = 1024 * 1024
IDEMPOTENCY_HEADER = "Idempotency-Key"
MAX_BATCH_KEY = 190  # a batch's key gets "#<index>" per message; stored keys hold 200 characters
CHECKER = web.AppKey("checker", KeyChecker)
COMMITS = web.AppKey("commits", GroupCommit)
ROUTE = web.AppKey("route_of", dict)
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
    raw = await _read(request)
    try:
        return model.model_validate_json(raw)
    except ShapeError as exc:
        raise _shape_refusal(exc) from None


async def _read(request: web.Request) -> bytes:
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise Refusal(413, "body", f"must be at most {MAX_BODY} bytes (1 MiB)") from None


def _shape_refusal(exc: ShapeError) -> Refusal:
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
    }.get(kind)
    if rule is None and kind.startswith(("datetime", "date", "time")):
        rule = "must be an ISO 8601 date-time with a time zone (e.g. 2026-06-01T07:00:00Z)"
    return Refusal(422, field or "body", rule or str(err["msg"]).lower())


def _field_name(loc: tuple[Any, ...]) -> str:
    name = ""
    for part in loc:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name


def _idempotency_key(request: web.Request) -> str | None:
    return request.headers.get(IDEMPOTENCY_HEADER)


# --------------------------------------------------------------------------- handlers
async def post_message(request: web.Request) -> Reply:
    """Store and enqueue one message (201), or with a used Idempotency-Key return the first (200)."""
    msg = await json_body(request, MessageIn)
    allow(key_of(request), msg.provider, "provider")
    args = msg.send_args()
    provider, to, text = args.pop("provider"), args.pop("to"), args.pop("text")
    idem = _idempotency_key(request)
    if idem is None:
        values = api.row_values(provider, to, text, **args)
        await request.app[COMMITS].add(values)
        return Reply(201, MessageOut.of_values(values))
    try:
        row = api.build_row(provider, to, text, idempotency_key=idem, **args)
    except ValidationError as exc:
        if exc.field == "idempotency_key":
            raise Refusal(422, IDEMPOTENCY_HEADER, exc.rule) from None
        raise
    stored, new = await asyncio.to_thread(api.store_one, row)
    return Reply(201 if new else 200, MessageOut.of(stored))


async def post_batch(request: web.Request) -> Reply:
    """Store and enqueue up to 1,000 messages in one transaction; one invalid refuses them all."""
    batch = await json_body(request, BatchIn)
    key = key_of(request)
    for index, msg in enumerate(batch.messages):
        allow(key, msg.provider, f"messages[{index}].provider")
    items = [msg.send_args() for msg in batch.messages]
    idem = _idempotency_key(request)
    if idem is not None:
        if not 0 < len(idem) <= MAX_BATCH_KEY:
            raise Refusal(422, IDEMPOTENCY_HEADER, f"must be 1 to {MAX_BATCH_KEY} characters for a batch")
        for index, item in enumerate(items):
            item["idempotency_key"] = f"{idem}#{index}"
    ids, new = await asyncio.to_thread(_send_batch, items)
    return Reply(201 if new else 200, BatchOut(ids=ids))


def _send_batch(items: list[dict[str, Any]]) -> tuple[list[str], bool]:
    """send_many(); with idempotency keys, (the ids stored under them, in order; whether all are new)."""
    keys = [item.get("idempotency_key") for item in items]
    if not any(keys):
        return api.send_many(items), True
    try:
        ids = api.send_many(items)
    except IntegrityError:  # PostgreSQL: a concurrent request stored these keys first; it committed
        ids = []
    if len(ids) == len(items):
        return ids, True
    with runtime.session() as db:
        found = dict(db.execute(select(Row.idempotency_key, Row.id).where(Row.idempotency_key.in_(keys))).all())  # type: ignore[union-attr]
    return [found[k] for k in keys], False


async def get_message(request: web.Request) -> Reply:
    """The message with its status, delivery events and attempts."""
    msg = await asyncio.to_thread(api.get, request.match_info["id"])
    allow(key_of(request), msg.provider, "provider")
    return Reply(200, MessageOut.of(msg))


async def cancel_message(request: web.Request) -> Reply:
    """Cancel a message not yet handed to the provider (200); 409 once it is with the provider."""
    message_id = request.match_info["id"]
    msg = await asyncio.to_thread(api.get, message_id)
    allow(key_of(request), msg.provider, "provider")
    return Reply(200, MessageOut.of(await asyncio.to_thread(api.cancel, message_id)))


async def healthz(request: web.Request) -> Reply:
    """Liveness: answers without a key."""
    return Reply(200, Health(status="ok"))


async def openapi_json(request: web.Request) -> web.Response:
    return web.Response(text=request.app[SPEC], content_type="application/json")


IDEMPOTENCY_DOC = ((IDEMPOTENCY_HEADER, "the same key again returns the first result (200) and sends nothing new"),)
MESSAGE_ROUTES = (
    Route("POST", "/v1/messages", post_message, "Send one message", {201: MessageOut, 200: MessageOut, 403: ErrorOut},
          body=MessageIn, headers=IDEMPOTENCY_DOC),
    Route("POST", "/v1/messages/batch", post_batch, "Send up to 1,000 messages",
          {201: BatchOut, 200: BatchOut, 403: ErrorOut}, body=BatchIn, headers=IDEMPOTENCY_DOC,
          description="One invalid message refuses the whole batch (422 naming `messages[i]`); the ids come "
                      "back in the order given. With an Idempotency-Key, message i is stored under `KEY#i`."),
    Route("GET", "/v1/messages/{id}", get_message, "A message, its events and attempts",
          {200: MessageOut, 403: ErrorOut, 404: ErrorOut}),
    Route("POST", "/v1/messages/{id}/cancel", cancel_message, "Cancel a message not yet with the provider",
          {200: MessageOut, 403: ErrorOut, 404: ErrorOut, 409: ErrorOut}),
    Route("GET", "/healthz", healthz, "Liveness (no key needed)", {200: Health}, public=True),
)
SPEC = web.AppKey("spec", str)


# --------------------------------------------------------------------------- answering
def _json(status: int, body: BaseModel, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=body.model_dump_json(), status=status, content_type="application/json", headers=headers)


def refusal_response(refusal: Refusal) -> web.Response:
    return _json(refusal.status, ErrorOut(error=ErrorDetail(field=refusal.field, message=refusal.message)),
                 refusal.headers)


def _wrap(route: Route) -> Callable[[web.Request], Any]:
    """The handler as aiohttp calls it: its Reply checked against the route's declarations, then sent."""

    async def handle(request: web.Request) -> web.StreamResponse:
        reply = await route.handler(request)
        if isinstance(reply, web.StreamResponse):
            return reply
        declared = route.answers.get(reply.status)
        if declared is None or not isinstance(reply.body, declared):
            raise RuntimeError(f"{route.operation_id} answered {reply.status} {type(reply.body).__name__}, "
                               "which its route does not declare")
        return _json(reply.status, reply.body)

    handle.__name__ = route.operation_id
    return handle


def _guard(checker: KeyChecker) -> Any:
    @web.middleware
    async def guard(request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            route = request.app[ROUTE].get(request.match_info.route.resource)
            if route is not None and not route.public:
                request[API_KEY] = await _authenticate(checker, request)
            return await handler(request)
        except Refusal as refusal:
            return refusal_response(refusal)
        except ValidationError as exc:
            return refusal_response(Refusal(422, exc.field, exc.rule))
        except NotFound as exc:
            return refusal_response(Refusal(404, "id", str(exc)))
        except TooLate as exc:
            return refusal_response(Refusal(409, "id", str(exc)))
        except web.HTTPException as exc:  # aiohttp's own: unknown path, method not allowed
            if exc.status < 400:
                raise
            return refusal_response(Refusal(exc.status, None, exc.reason.lower() if exc.reason else "refused",
                                            {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None))
        except (ConfigError, OperationalError) as exc:
            log.error("%s %s: the store is not available: %s", request.method, request.path, type(exc).__name__)
            return refusal_response(Refusal(503, None, "the store is not available; try again", {"Retry-After": "1"}))
        except Exception:  # noqa: BLE001 - one line for the client, the traceback for the log
            log.exception("%s %s failed", request.method, request.path)
            return refusal_response(Refusal(500, None, "internal error"))

    return guard


async def _authenticate(checker: KeyChecker, request: web.Request) -> KeyInfo:
    header = request.headers.get("Authorization", "")
    scheme, _, presented = header.partition(" ")
    if not header:
        raise Refusal(401, "Authorization", "an API key is required: Authorization: Bearer KEY",
                      {"WWW-Authenticate": "Bearer"})
    if scheme.lower() != "bearer" or not presented.strip():
        raise Refusal(401, "Authorization", "must be 'Bearer KEY'", {"WWW-Authenticate": "Bearer"})
    presented = presented.strip()
    hit, info = checker.cached(presented)
    if not hit:
        info = await asyncio.to_thread(checker.check, presented)
    if info is None:
        log.info("refused a request to %s %s from %s: unknown or revoked API key",
                 request.method, request.path, request.remote)
        raise Refusal(401, "Authorization", "unknown or revoked API key", {"WWW-Authenticate": "Bearer"})
    return info


# --------------------------------------------------------------------------- the app
def routes() -> tuple[Route, ...]:
    """Every route the API serves (campaign routes join when campaigns exist)."""
    return MESSAGE_ROUTES


def openapi_document() -> dict[str, Any]:
    return spec(routes(), title="dispatcher HTTP API", version=__version__,
                description="Send SMS through the dispatcher from any language: the same rules, errors and "
                            "guarantees as dispatcher.send(). Errors are {\"error\": {\"field\", \"message\"}}.")


def build_app(checker: KeyChecker | None = None) -> web.Application:
    checker = checker or KeyChecker()
    app = web.Application(client_max_size=MAX_BODY, middlewares=[_guard(checker)])
    app[CHECKER], app[COMMITS] = checker, GroupCommit()
    app[SPEC] = json.dumps(openapi_document())
    route_of: dict[Any, Route] = {}
    for route in routes():
        resource = app.router.add_resource(route.path)
        resource.add_route(route.method, _wrap(route))
        route_of[resource] = route
    app[ROUTE] = route_of
    app.router.add_get("/openapi.json", openapi_json)

    async def finish_writes(app: web.Application) -> None:
        await app[COMMITS].drain()

    app.on_shutdown.append(finish_writes)
    return app

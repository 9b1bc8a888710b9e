"""The producer API's aiohttp app: its routes, the key check, and how refusals are answered.

Every answer is JSON. A refusal is `{"error": {"field": ..., "message": ...}}`; a
dispatcher.ValidationError becomes 422 with its own field and words, NotFound 404, TooLate
409. A request is checked in this order: the key (401), the body's type, size and JSON
(415, 413, 400) and shape (422), the key's accounts (403), then the rules of a send (422);
nothing is stored before all of them pass. Store work runs in worker threads, off the loop.
The handlers live in messages.py and campaigns.py; each answers a `Reply` that is checked
here against its route's declarations before it is sent.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Callable

from aiohttp import web
from pydantic import BaseModel
from sqlalchemy.exc import OperationalError

from .. import __version__
from ..api_keys import KeyChecker, KeyInfo
from ..errors import ConfigError, NotFound, TooLate, ValidationError
from .campaigns import CAMPAIGN_ROUTES
from .common import API_KEY, MAX_BODY, Refusal
from .group_commit import GroupCommit
from .messages import COMMITS, MESSAGE_ROUTES
from .models import ErrorDetail, ErrorOut
from .openapi import Route, spec

log = logging.getLogger("dispatcher.httpapi")
ROUTE = web.AppKey("route_of", dict)
SPEC = web.AppKey("spec", str)


def routes() -> tuple[Route, ...]:
    """Every route the API serves."""
    return MESSAGE_ROUTES + CAMPAIGN_ROUTES


def openapi_document() -> dict[str, Any]:
    return spec(routes(), title="dispatcher HTTP API", version=__version__,
                description="Send SMS through the dispatcher from any language: the same rules, errors and "
                            "guarantees as dispatcher.send(). Errors are {\"error\": {\"field\", \"message\"}}.")


async def openapi_json(request: web.Request) -> web.Response:
    return web.Response(text=request.app[SPEC], content_type="application/json")


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
            route = request.app[ROUTE].get(request.match_info.route)
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
def build_app(checker: KeyChecker | None = None) -> web.Application:
    checker = checker or KeyChecker()
    app = web.Application(client_max_size=MAX_BODY, middlewares=[_guard(checker)])
    app[COMMITS] = GroupCommit()
    app[SPEC] = json.dumps(openapi_document())
    route_of: dict[Any, Route] = {}  # aiohttp's route -> its declaration
    resources: dict[str, Any] = {}
    for route in routes():
        if route.path not in resources:
            resources[route.path] = app.router.add_resource(route.path)
        route_of[resources[route.path].add_route(route.method, _wrap(route))] = route
    app[ROUTE] = route_of
    app.router.add_get("/openapi.json", openapi_json)

    async def finish_writes(app: web.Application) -> None:
        await app[COMMITS].drain()

    app.on_shutdown.append(finish_writes)
    return app

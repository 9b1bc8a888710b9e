"""`dispatcher webhooks`: a small HTTP receiver for delivery reports, beside status polling.

One route per provider account: `POST|PATCH /webhooks/{account}`. Accounts of the kinds with
delivery webhooks (eMsgNow, eSMS Africa, emnify) are served; each must set `webhook_secret`:

* esms_africa: the HMAC key of `X-Webhook-Signature: sha256=<hex HMAC-SHA256 of the raw body>`;
  the body is the message object (`id`, `status`, `timeline`), sent at the final state only.
* emnify: the callback secret of `Authorization: Bearer <JWT, HS256>`; the body (a PATCH) is
  the SMS object (`id`, `status` {id, description}, dates, `endpoint` {id}).
* emsgnow: eMsgNow documents no signature, so the callback URL given to it carries the
  secret: `https://HOST/webhooks/ACCOUNT?token=<webhook_secret>`. The body is an event object
  (or the `/events` listing); see `emsgnow.callback_events`.

Answers: 404 unknown account (or one whose kind has no webhooks); 401 {"error": ...} when
the account has no webhook_secret, or the signature / token / JWT is missing or wrong (logged
at WARNING with the account and the reason, never the secret nor the credential presented);
400 for a body that is not JSON, names no message and event, or holds text no store can keep
(a NUL, a lone surrogate); 200 {"stored": n} when the
message is known (n = events new to the store: 0 for a replay); 202 {"stored": 0,
"unknown": n} when no message of that account has the provider's id (logged at INFO): a 2xx,
so the provider does not retry forever for a message this store never sent. But while the
account has sends whose result is not recorded yet, the report may have overtaken its own
send's answer: then 503 with Retry-After 1, so the provider tries again (and polling would
still fetch the event if it gives up).

The events go through `intake.apply_events`, the same path as the poller: each is stored
once (unique per message and event id), the message follows its latest event, and final
statuses never move back, so duplicates and out-of-order deliveries are harmless. Database
work runs off the event loop (`asyncio.to_thread`). The access log is off: an eMsgNow
callback URL carries its token in the query string.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable

from aiohttp import web
from sqlalchemy import or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from . import metrics, runtime, storable
from .appserver import AppThread, serve_until_signal
from .config import ProviderAccount, Settings
from .errors import ValidationError
from .intake import apply_events
from .providers import adapter_class
from .providers.base import WEBHOOK_SECRET_KEY, DeliveryEvent
from .providers.emnify import sms_events, split_ref
from .providers.emsgnow import callback_events
from .providers.esms_africa import events_from_message, webhook_message
from .store.models import SENDING, Message, utcnow
from .webhook_auth import why_emnify_jwt_fails, why_esms_signature_fails, why_token_fails

log = logging.getLogger("dispatcher.webhooks")
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8780
ROUTE = "/webhooks/{account}"
MAX_BODY = 1024 * 1024


class BadBody(ValueError):
    """The body is not a delivery report this kind sends; the text says why (no body content)."""


@dataclass(frozen=True)
class Report:
    """The events one webhook body carries about one provider message."""

    ref: str  # the provider's id: eMsgNow trackingId, eSMS Africa message id, emnify SMS id
    events: list[DeliveryEvent]
    endpoint_id: str | None = None  # emnify: the endpoint the SMS went to, when the body says


# --------------------------------------------------------------------------- reading bodies
def read_emsgnow(data: Any) -> list[Report]:
    tracking_id, events = callback_events(data)
    if not tracking_id or not events:
        raise BadBody("no trackingId and event in the body")
    return [Report(tracking_id, events)]


def read_esms_africa(data: Any) -> list[Report]:
    message = webhook_message(data)
    events = events_from_message(message) if message is not None else []
    if message is None or not events:
        raise BadBody("no message id and status in the body")
    return [Report(str(message["id"]), events)]


def read_emnify(data: Any) -> list[Report]:
    items = data if isinstance(data, list) else [data]
    reports = []
    for sms in items:
        if not isinstance(sms, dict) or sms.get("id") in (None, ""):
            raise BadBody("no SMS id in the body")
        events = sms_events(sms)
        if not events:
            raise BadBody("no readable status id in the body")
        endpoint = sms.get("endpoint")
        endpoint_id = endpoint.get("id") if isinstance(endpoint, dict) else sms.get("endpoint_id")
        reports.append(Report(str(sms["id"]), events, None if endpoint_id is None else str(endpoint_id)))
    if not reports:
        raise BadBody("no SMS object in the body")
    return reports


def _check_storable(data: Any) -> None:
    """Refuse a body holding text no store can keep (a NUL, a lone surrogate from a \\ud800 escape)."""
    try:
        storable.check_option("body", data)
    except ValidationError as exc:
        raise BadBody(f"the body holds something the store cannot keep: {exc.rule}") from None


READERS: dict[str, Callable[[Any], list[Report]]] = {
    "emsgnow": read_emsgnow, "esms_africa": read_esms_africa, "emnify": read_emnify,
}


def why_refused(kind: str, secret: str, request_headers: Any, query: Any, body: bytes) -> str | None:
    """None when the request proves it comes from the provider, else the reason."""
    if kind == "esms_africa":
        return why_esms_signature_fails(secret, body, request_headers.get("X-Webhook-Signature"))
    if kind == "emnify":
        return why_emnify_jwt_fails(secret, request_headers.get("Authorization"))
    return why_token_fails(secret, query.get("token"))


# --------------------------------------------------------------------------- the store side
def find_message(db: Session, account: str, kind: str, report: Report) -> tuple[Message, bool] | None:
    """(message, whether this report settles it) for the provider's id, or None when unknown."""
    if kind != "emnify":
        row = db.execute(select(Message).where(Message.provider == account, Message.provider_ref == report.ref)
                         .limit(1)).scalars().first()
        return None if row is None else (row, True)
    return _find_emnify_sms(db, account, report.ref, report.endpoint_id)


def _find_emnify_sms(db: Session, account: str, sms_id: str, endpoint_id: str | None) -> tuple[Message, bool] | None:
    """The message whose provider_ref "endpoint/id1,id2,..." lists the SMS; a long text follows its last part."""
    if endpoint_id is not None:
        exact = db.execute(select(Message).where(Message.provider == account,
                                                 Message.provider_ref == f"{endpoint_id}/{sms_id}")
                           .limit(1)).scalars().first()
        if exact is not None:
            return exact, True
    part = _like_escape(sms_id)
    patterns = (f"%/{part}", f"%/{part},%", f"%,{part}", f"%,{part},%")
    candidates = db.execute(select(Message).where(  # `IS NOT NULL`: SQLite then takes the partial index on refs
        Message.provider == account, Message.provider_ref.is_not(None),
        or_(*(Message.provider_ref.like(p, escape="\\") for p in patterns)))
    ).scalars()
    for row in candidates:
        endpoint, ids = split_ref(row.provider_ref)
        if sms_id in ids and (endpoint_id is None or endpoint == endpoint_id):
            return row, sms_id == ids[-1]
    return None


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


@dataclass(frozen=True)
class Stored:
    """What one delivery of reports did to the store."""

    events: int  # events new to the store
    unknown: int  # reports naming no message of the account
    sends_in_flight: bool  # the account has sends whose result is not recorded yet


def store_reports(account: str, kind: str, reports: list[Report], now: datetime) -> Stored:
    """Store what the reports say of known messages. Runs in a worker thread."""
    try:
        return _store(account, kind, reports, now)
    except IntegrityError:  # the same event stored meanwhile by a concurrent delivery: once more sees it
        return _store(account, kind, reports, now)


def _store(account: str, kind: str, reports: list[Report], now: datetime) -> Stored:
    stored = unknown = 0
    with runtime.session() as db:
        for report in reports:
            found = find_message(db, account, kind, report)
            if found is None:
                unknown += 1
                continue
            message, settles = found
            stored += apply_events(db, message.id, report.events, now, settles=settles).new_events
        in_flight = bool(unknown) and db.execute(
            select(Message.id).where(Message.provider == account, Message.status == SENDING).limit(1)
        ).first() is not None
    return Stored(stored, unknown, in_flight)


# --------------------------------------------------------------------------- the app
def webhook_accounts(settings: Settings) -> dict[str, ProviderAccount]:
    """The accounts whose kind sends delivery webhooks."""
    return {name: acc for name, acc in settings.providers.items() if adapter_class(acc.kind).has_webhooks}


def build_app(settings: Callable[[], Settings] = runtime.settings) -> web.Application:
    """The receiver; `settings` is read on every request, so a reloaded config applies at once."""

    async def receive(request: web.Request) -> web.Response:
        name = request.match_info["account"]
        account = webhook_accounts(settings()).get(name)
        if account is None:
            return _answer(404, {"error": "no such webhook account"})
        secret = account.get(WEBHOOK_SECRET_KEY)
        body = await request.read()
        reason = "no webhook_secret is configured for this account" if not secret else \
            why_refused(account.kind, secret, request.headers, request.query, body)
        if reason is not None:
            log.warning("webhook refused for account %s: %s", name, reason)
            return _answer(401, {"error": "unauthorized"})
        try:
            data = json.loads(body)
            _check_storable(data)
            reports = READERS[account.kind](data)
        except (ValueError, BadBody) as exc:
            why = str(exc) if isinstance(exc, BadBody) else "the body is not JSON"
            log.warning("webhook for account %s not understood: %s", name, why)
            return _answer(400, {"error": why})
        result = await asyncio.to_thread(store_reports, name, account.kind, reports, utcnow())
        stored, unknown = result.events, result.unknown
        if unknown == len(reports):
            refs = ", ".join(r.ref for r in reports)
            if result.sends_in_flight:  # the report may have overtaken its own send's result
                log.info("webhook for account %s names no known message (%s) while sends are being "
                         "recorded; answered 503 so the provider retries", name, refs)
                return _answer(503, {"error": "not known yet; retry", "unknown": unknown}, {"Retry-After": "1"})
            log.info("webhook for account %s names no known message (%s); answered 202", name, refs)
            return _answer(202, {"stored": 0, "unknown": unknown})
        log.debug("webhook for account %s: %d new events", name, stored)
        return _answer(200, {"stored": stored} if not unknown else {"stored": stored, "unknown": unknown})

    app = web.Application(client_max_size=MAX_BODY, middlewares=[metrics.webhook_middleware()])
    app.router.add_route("POST", ROUTE, receive)
    app.router.add_route("PATCH", ROUTE, receive)
    return app


def _answer(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(body, status=status, headers=headers)


# --------------------------------------------------------------------------- running it
def serve(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, out: Callable[[str], None] = print) -> None:
    """Serve the receiver in the foreground until Ctrl-C or SIGTERM."""
    asyncio.run(_serve(host, port, out))


async def _serve(host: str, port: int, out: Callable[[str], None]) -> None:
    accounts = webhook_accounts(runtime.settings())

    def started(bound: int) -> None:
        out(f"webhook receiver on http://{host}:{bound}  (Ctrl-C to stop)")
        if not accounts:
            out("  no account of a kind with webhooks (emsgnow, esms_africa, emnify) is configured")
        for name, acc in accounts.items():
            state = "" if acc.get(WEBHOOK_SECRET_KEY) else "  [no webhook_secret: every report is refused]"
            token = "?token=<webhook_secret>" if acc.kind == "emsgnow" else ""
            out(f"  {name} ({acc.kind}): /webhooks/{name}{token}{state}")

    await serve_until_signal(build_app(), host, port, started)


class ReceiverThread(AppThread):
    """The receiver on its own event loop in a daemon thread (tests, the demo)."""

    def __init__(self, host: str = DEFAULT_HOST, port: int = 0) -> None:
        super().__init__(build_app, host, port, name="dispatcher-webhooks")

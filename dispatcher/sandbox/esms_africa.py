"""eSMS Africa twin: `POST /api/messages/send`, `GET /api/messages/{id}`, `GET /api/messages/status` (seed 003).

Authentication: `Authorization: Bearer <api_key>`; missing or unknown -> 401
{"detail": "Missing or invalid API key"}. Accepted: `credentials["api_key"]`, `extra["api_keys"]`
and the read-only keys of `extra["read_only_keys"]` (default "esms_test_readonly"), which may
read but not send: 403 {"detail": {"code": "insufficient_scope", ...}}.

Errors, in the order they are checked (`detail` is a string, {code, message} or a list):
* 400 [{"loc": ["body", field], "msg", "type", "input"}]: a field missing or of the wrong type
  (to, text required strings; sender_id, route, scheduled_at strings; schedule_mode "now" or
  "scheduled"), FastAPI style but with the provider's 400.
* 400 invalid_phone: `to` not E.164 (+, then 8-15 digits, no spaces or dashes).
* 400 no_route: routes exist only for the countries of ROUTES below (KE +254, UG +256,
  TZ +255, NG +234, RW +250, GH +233, ZA +27); any other country code, or a `route` that is
  unknown or does not serve the number, has no route.
* 400 text_too_long: more than MAX_SEGMENTS (10) segments.
* 400 invalid_schedule: scheduled without scheduled_at, scheduled_at not exactly
  YYYY-MM-DDThh:mm:ssZ, less than 5 minutes or more than 7 days ahead of `settings.clock`, or a
  scheduled_at with schedule_mode "now".
* 403 (string detail, the seed's words): a sender id not approved, or not approved for the
  destination country. Approved by default (`extra["sender_ids"]`, name -> country list or "*"):
  eSMSAfrica and ClinicApp everywhere, MyApp for KE and TZ only.
* 422 insufficient_balance {"detail": {code, message, balance, cost}}: the wallet
  (`extra["balance"]`, in `extra["wallet_currency"]`, default 1,000,000 KES) is below the cost.
  Each send debits it, so `balance_after` falls; configure `extra.balance` to change it live.
* 429 {"detail": "Rate limit exceeded"} with Retry-After (seconds) when `settings.rate_limit`
  is set (default None: the provider publishes no number), counted per API key on every route.

Segments: GSM-7 160 / 153 septets (extension characters take two), UCS-2 70 / 67 code units.
Cost: the route's per-segment price (route currency) times segments, converted to the wallet
currency with the fixed rates of KES_PER_UNIT (35 UGX = 1.2022 KES, as in the seed).

An `Idempotency-Key` header seen before from the same API key answers the first (successful)
response again and creates nothing.

Delivery (`delivery_step` = s, from acceptance, or from scheduled_at for scheduled messages):
  queued and submitted at once, sent after s, delivered after 2s. A number ending in "0000"
  instead goes sent, retrying (2s), retrying (3s), failed (4s): the provider retries twice.
  A scheduled message shows "scheduled" (at creation) until its time. Timeline times are ISO
  8601 with "+00:00". `GET /api/messages/status?ids=a,b` takes up to 100 ids (more -> 400
  too_many_ids) and lists {id, status, updated_at} for the ids found, in the order asked.

Delivery webhook: with `extra["webhook_url"]` and `extra["webhook_secret"]` set when a message
is sent, the message object (as `GET /api/messages/{id}` shows it, timeline included) is
POSTed to webhook_url once, at its final state (delivered or failed), signed
`X-Webhook-Signature: sha256=<hex HMAC-SHA256 of the exact body bytes>` with webhook_secret.
Sent by the sandbox server's `CallbackScheduler` (callbacks.py: timeout, retries, log, replay).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from aiohttp import web

from .callbacks import Outgoing, json_body, report_settings, scheduler_of
from .common import (
    STATE_KEY,
    FixedWindow,
    KindSettings,
    bearer_token,
    json_response,
    random_uuid,
    read_json,
    request_key,
    seconds_until,
)

KIND = "esms_africa"
DEFAULT_CREDENTIALS: dict[str, str] = {"api_key": "esms_test_sandbox_key"}
READ_ONLY_KEY = "esms_test_readonly"


@dataclass(frozen=True)
class Route:
    code: str
    country: str
    currency: str
    price: float  # per segment, in `currency`


ROUTES = {  # by country calling code
    "254": Route("ESMS_KE", "KE", "KES", 0.80),
    "256": Route("ESMS_UG", "UG", "UGX", 35.0),
    "255": Route("ESMS_TZ", "TZ", "TZS", 25.0),
    "234": Route("ESMS_NG", "NG", "NGN", 4.0),
    "250": Route("ESMS_RW", "RW", "RWF", 15.0),
    "233": Route("ESMS_GH", "GH", "GHS", 0.12),
    "27": Route("ESMS_ZA", "ZA", "ZAR", 0.35),
}
KES_PER_UNIT = {"KES": 1.0, "UGX": 0.034349, "TZS": 0.05, "NGN": 0.084, "RWF": 0.095, "GHS": 8.4,
                "ZAR": 7.05, "USD": 129.0}
DEFAULT_SENDER = "eSMSAfrica"
DEFAULT_SENDER_IDS: dict[str, Any] = {"eSMSAfrica": "*", "ClinicApp": "*", "MyApp": ["KE", "TZ"]}
MAX_SEGMENTS = 10
MAX_STATUS_IDS = 100
MIN_LEAD, MAX_LEAD = 5 * 60, 7 * 24 * 3600
FAILING_SUFFIX = "0000"
RETRIES = 2

_E164 = re.compile(r"^\+[1-9][0-9]{7,14}$")
_SCHEDULED_AT = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
GSM7_BASIC = set(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENSION = set("^{}\\[~]|€\f")
API_KEY = request_key("esms_api_key", str)


def default_settings() -> KindSettings:
    return KindSettings(
        credentials=dict(DEFAULT_CREDENTIALS),
        rate_limit=None,
        rate_window=60.0,
        delivery_step=0.5,
        extra={
            "balance": 1_000_000.0,
            "wallet_currency": "KES",
            "api_keys": [],
            "read_only_keys": [READ_ONLY_KEY],
            "sender_ids": dict(DEFAULT_SENDER_IDS),
        },
    )


def fault_body(status: int, message: str) -> dict[str, Any]:
    """An injected failure in eSMS Africa's error shape."""
    return {"detail": message}


# --------------------------------------------------------------------------- segments
def count_segments(text: str) -> int:
    """Parts the text takes: GSM-7 160/153 septets, else UCS-2 70/67 code units; no pair split."""
    if all(ch in GSM7_BASIC or ch in GSM7_EXTENSION for ch in text):
        costs = [2 if ch in GSM7_EXTENSION else 1 for ch in text]
        single, multi = 160, 153
    else:
        costs = [2 if ord(ch) > 0xFFFF else 1 for ch in text]
        single, multi = 70, 67
    if sum(costs) <= single:
        return 1
    parts, used = 1, 0
    for cost in costs:
        if used + cost > multi:
            parts, used = parts + 1, 0
        used += cost
    return parts


# --------------------------------------------------------------------------- state
class Refused(Exception):
    """A refusal: the HTTP status and the `detail` to answer with."""

    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(status, detail)
        self.status, self.detail = status, detail


def coded(status: int, code: str, message: str, **more: Any) -> Refused:
    """A refusal whose detail is {code, message, ...}."""
    return Refused(status, {"code": code, "message": message, **more})


@dataclass
class Message:
    id: str
    api_key: str
    to: str
    text: str
    sender_id: str
    route: Route
    segments: int
    cost: float
    cost_currency: str
    route_cost: float
    created: float
    scheduled_at: float | None

    @property
    def start(self) -> float:
        return self.scheduled_at if self.scheduled_at is not None else self.created

    def steps(self) -> list[tuple[str, int]]:
        """(status, how many delivery steps after the start) of every state it goes through."""
        if self.to.endswith(FAILING_SUFFIX):
            steps = [("queued", 0), ("submitted", 0), ("sent", 1)]
            return steps + [("retrying", 2 + i) for i in range(RETRIES)] + [("failed", 2 + RETRIES)]
        return [("queued", 0), ("submitted", 0), ("sent", 1), ("delivered", 2)]

    def final_at(self, step: float) -> float:
        """When the message reaches its final state."""
        return self.start + self.steps()[-1][1] * step

    def timeline(self, now: float, step: float) -> list[dict[str, str]]:
        start = self.start
        if now < start:
            return [_entry("scheduled", self.created)]
        entries = [_entry(status, start + k * step) for status, k in self.steps() if start + k * step <= now]
        if self.scheduled_at is not None:
            entries.insert(0, _entry("scheduled", self.created))
        return entries

    def public(self, now: float, step: float) -> dict[str, Any]:
        timeline = self.timeline(now, step)
        return {
            "id": self.id,
            "to": self.to,
            "text": self.text,
            "sender_id": self.sender_id,
            "route": self.route.code,
            "status": timeline[-1]["status"],
            "segments": self.segments,
            "cost": self.cost,
            "cost_currency": self.cost_currency,
            "route_cost": self.route_cost,
            "route_currency": self.route.currency,
            "scheduled_at": _iso(self.scheduled_at) if self.scheduled_at is not None else None,
            "created_at": _iso(self.created),
            "updated_at": timeline[-1]["at"],
            "timeline": timeline,
        }


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=timezone.utc).isoformat()


def _entry(status: str, at: float) -> dict[str, str]:
    return {"status": status, "at": _iso(at)}


class EsmsState:
    """Messages by id, first answers by idempotency key, and the per-key rate counters."""

    def __init__(self) -> None:
        self.messages: dict[str, Message] = {}
        self.answers: dict[tuple[str, str], dict[str, Any]] = {}
        self.window = FixedWindow()

    def reset(self) -> None:
        self.messages.clear()
        self.answers.clear()
        self.window.reset()


# --------------------------------------------------------------------------- app
def make_app(settings: KindSettings) -> web.Application:
    state = EsmsState()
    app = web.Application(middlewares=[_key_and_rate(settings, state)])
    app[STATE_KEY] = state

    async def send(request: web.Request) -> web.Response:
        api_key = request[API_KEY]
        if api_key in (settings.extra.get("read_only_keys") or ()):
            raise coded(403, "insufficient_scope", "This API key lacks the 'messages:send' scope")
        idem = request.headers.get("Idempotency-Key")
        if idem and (api_key, idem) in state.answers:
            return json_response(state.answers[(api_key, idem)])
        body, problem = await read_json(request)
        answer = _accept(body, problem, api_key, settings, state)
        if idem:
            state.answers[(api_key, idem)] = answer
        _report_final(request, settings, state.messages[answer["id"]])
        return json_response(answer)

    async def statuses(request: web.Request) -> web.Response:
        raw = request.query.get("ids")
        if raw is None:
            raise Refused(400, [{"loc": ["query", "ids"], "msg": "Field required", "type": "missing", "input": None}])
        ids = [i for i in (part.strip() for part in raw.split(",")) if i]
        if len(ids) > MAX_STATUS_IDS:
            raise coded(400, "too_many_ids", f"At most {MAX_STATUS_IDS} ids per request, got {len(ids)}")
        now, found = settings.clock(), []
        for msg_id in ids:
            msg = state.messages.get(msg_id)
            if msg is not None and msg.api_key == request[API_KEY]:
                public = msg.public(now, settings.delivery_step)
                found.append({k: public[k] for k in ("id", "status", "updated_at")})
        return json_response(found)

    async def one(request: web.Request) -> web.Response:
        msg = state.messages.get(request.match_info["message_id"])
        if msg is None or msg.api_key != request[API_KEY]:
            raise Refused(404, "Message not found")
        return json_response(msg.public(settings.clock(), settings.delivery_step))

    app.router.add_post("/api/messages/send", send)
    app.router.add_get("/api/messages/status", statuses)
    app.router.add_get("/api/messages/{message_id}", one)
    return app


def _key_and_rate(settings: KindSettings, state: EsmsState):
    """Check the Bearer key, count it in its window, and turn a Refused into its reply."""

    @web.middleware
    async def middleware(request: web.Request, handler):
        api_key = bearer_token(request)
        accepted = {settings.credentials.get("api_key")}
        accepted.update(settings.extra.get("api_keys") or ())
        accepted.update(settings.extra.get("read_only_keys") or ())
        if api_key is None or api_key not in accepted:
            return json_response({"detail": "Missing or invalid API key"}, status=401)
        if settings.rate_limit is not None:
            now = settings.clock()
            allowed, _, reset_at = state.window.hit(api_key, settings.rate_limit, settings.rate_window, now)
            if not allowed:
                headers = {"Retry-After": str(max(1, seconds_until(reset_at, now)))}
                return json_response({"detail": "Rate limit exceeded"}, status=429, headers=headers)
        request[API_KEY] = api_key
        try:
            return await handler(request)
        except Refused as refused:
            return json_response({"detail": refused.detail}, status=refused.status)

    return middleware


# --------------------------------------------------------------------------- delivery webhook
def _report_final(request: web.Request, settings: KindSettings, msg: Message) -> None:
    """With `extra` webhook_url and webhook_secret set, POST the message once at its final state."""
    url, secret = settings.extra.get("webhook_url"), settings.extra.get("webhook_secret")
    scheduler = scheduler_of(request)
    if not url or not secret or scheduler is None:
        return

    def build(now: float) -> Outgoing:
        body = json_body(msg.public(now, settings.delivery_step))
        return Outgoing("POST", str(url), body, {"Content-Type": "application/json",
                                                 "X-Webhook-Signature": webhook_signature(str(secret), body)})

    scheduler.schedule(KIND, msg.final_at(settings.delivery_step), settings.clock, build,
                       **report_settings(settings.extra))


def webhook_signature(secret: str, body: bytes) -> str:
    """`sha256=<hex HMAC-SHA256 of the exact body bytes>`, keyed with the webhook secret."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


# --------------------------------------------------------------------------- sending
def _accept(body: Any, problem: str | None, api_key: str, settings: KindSettings, state: EsmsState) -> dict[str, Any]:
    """Validate one send, debit the wallet, store the message; the success body. Raises Refused."""
    if problem is not None:
        raise Refused(400, [{"loc": ["body"], "msg": f"JSON decode error: {problem}", "type": "json_invalid"}])
    _check_fields(body)
    now = settings.clock()
    to = body["to"]
    if not _E164.match(to):
        raise coded(400, "invalid_phone", f"Phone number {to!r} could not be parsed or is missing a country code: "
                                          "use E.164, e.g. +256712345678")
    route = _route(to, body.get("route"))
    segments = count_segments(body["text"])
    if segments > MAX_SEGMENTS:
        raise coded(400, "text_too_long", f"Text takes {segments} segments; at most {MAX_SEGMENTS} are allowed")
    scheduled_at = _schedule(body, now)
    sender = body.get("sender_id") or DEFAULT_SENDER
    _check_sender(sender, route, settings)
    route_cost = round(route.price * segments, 4)
    wallet = settings.extra.get("wallet_currency", "KES")
    cost = round(route_cost * KES_PER_UNIT[route.currency] / KES_PER_UNIT.get(wallet, 1.0), 4)
    balance = float(settings.extra.get("balance", 0.0))
    if balance < cost:
        raise coded(422, "insufficient_balance", f"Balance {wallet} {balance:.2f} < estimated cost {wallet} {cost:.2f}",
                    balance=balance, cost=cost)
    settings.extra["balance"] = round(balance - cost, 4)
    msg = Message(f"msg-{random_uuid()}", api_key, to, body["text"], sender, route, segments, cost, wallet,
                  route_cost, now, scheduled_at)
    state.messages[msg.id] = msg
    return {
        "id": msg.id,
        "status": "scheduled" if scheduled_at is not None else "submitted",
        "segments": segments,
        "cost": cost,
        "cost_currency": wallet,
        "route_cost": route_cost,
        "route_currency": route.currency,
        "route": route.code,
        "balance_after": settings.extra["balance"],
        "scheduled_at": _iso(scheduled_at) if scheduled_at is not None else None,
    }


def _check_fields(body: Any) -> None:
    """FastAPI-style list of every missing or ill-typed field."""
    if not isinstance(body, dict):
        raise Refused(400, [{"loc": ["body"], "type": "model_attributes_type", "input": body,
                             "msg": "Input should be a valid dictionary or object to extract fields from"}])
    errors = []
    for name in ("to", "text"):
        if name not in body or body[name] is None:
            errors.append({"loc": ["body", name], "msg": "Field required", "type": "missing", "input": None})
        elif not isinstance(body[name], str):
            errors.append(_string_error(name, body[name]))
        elif body[name] == "":
            errors.append({"loc": ["body", name], "msg": "String should have at least 1 character",
                           "type": "string_too_short", "input": "", "ctx": {"min_length": 1}})
    for name in ("sender_id", "route", "scheduled_at"):
        if body.get(name) is not None and not isinstance(body[name], str):
            errors.append(_string_error(name, body[name]))
    mode = body.get("schedule_mode", "now")
    if mode not in ("now", "scheduled"):
        errors.append({"loc": ["body", "schedule_mode"], "msg": "Input should be 'now' or 'scheduled'",
                       "type": "literal_error", "input": mode, "ctx": {"expected": "'now' or 'scheduled'"}})
    if errors:
        raise Refused(400, errors)


def _string_error(name: str, value: Any) -> dict[str, Any]:
    return {"loc": ["body", name], "msg": "Input should be a valid string", "type": "string_type", "input": value}


def _route(to: str, asked: str | None) -> Route:
    digits = to[1:]
    route = next((r for cc, r in ROUTES.items() if digits.startswith(cc)), None)
    if route is None:
        raise coded(400, "no_route", f"No active route for the destination country of {to}")
    if asked and asked != route.code:
        known = {r.code for r in ROUTES.values()}
        why = "is not an active route" if asked not in known else f"does not serve {route.country} numbers"
        raise coded(400, "no_route", f"Route {asked} {why}")
    return route


def _schedule(body: dict[str, Any], now: float) -> float | None:
    mode, text = body.get("schedule_mode", "now"), body.get("scheduled_at")
    if mode == "now":
        if text is not None:
            raise coded(400, "invalid_schedule", "scheduled_at needs schedule_mode 'scheduled'")
        return None
    if text is None:
        raise coded(400, "invalid_schedule", "scheduled_at is required when schedule_mode is 'scheduled'")
    if not _SCHEDULED_AT.match(text):
        raise coded(400, "invalid_schedule", f"scheduled_at must be UTC as YYYY-MM-DDThh:mm:ssZ, got {text!r}")
    try:
        at = datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()
    except ValueError:
        raise coded(400, "invalid_schedule", f"scheduled_at is not a real date: {text!r}") from None
    if at - now < MIN_LEAD:
        raise coded(400, "invalid_schedule", "scheduled_at must be at least 5 minutes in the future")
    if at - now > MAX_LEAD:
        raise coded(400, "invalid_schedule", "scheduled_at must be at most 7 days in the future")
    return at


def _check_sender(sender: str, route: Route, settings: KindSettings) -> None:
    approved = (settings.extra.get("sender_ids") or {}).get(sender)
    if approved is None:
        raise Refused(403, f"Sender ID '{sender}' not found or not approved. Check your sender IDs at /sender-ids")
    if approved != "*" and route.country not in approved:
        raise Refused(403, f"Sender ID '{sender}' is not approved for {route.country}. "
                           f"Approved countries: {', '.join(approved)}")

"""eMsgNow twin: `POST /sms`, `GET /sms/:id`, `/sms/:id/events`, `/sms/:id/events/:eventId` (seed 004).

What it checks, as the seed documents it:
* `x-api-key` on every call: missing -> 401 {"error": "API key is required"}, wrong -> 403
  {"error": "Invalid API key"}. Accepted keys: `credentials["api_key"]` plus any listed in
  `extra["api_keys"]` (for tests of per-key limits). A message is visible only to its own key.
* A fixed window per API key (`rate_limit` per `rate_window`, default 600 per 60 s), counted on
  every route of the twin before the key is checked (an absent key is counted per client
  address). Every response carries X-RateLimit-Limit, X-RateLimit-Remaining and
  X-RateLimit-Reset (whole seconds until the window resets); beyond the limit 429
  {"error": "Rate limit exceeded"}. The seed publishes nothing more (no Retry-After).
* `POST /sms` validation -> 400 {"error": "<field>: <rule>"}: `to` required, E.164 with or
  without the leading + (8-15 digits); `from` required; exactly one of `message` (at most 160
  characters) and `templateId` (optional `variables` object); `clientId` at most 100
  characters; `messageType` "sms"; `notBefore` / `notAfter` UTC date-times (ending in Z or
  +00:00), notAfter later than notBefore; `callbackUrl` an http(s) URL.
* Success: 200 {"message": "SMS received successfully", "trackingId": <16 hex chars>}.

Delivery, computed when read from `settings.clock` (`delivery_step` = s seconds):
  "processing" at acceptance (or at notBefore if later), "sent to provider" s later,
  "delivered" 2*s later. Before notBefore a message has no events yet.
Magic recipients (the digits of `to`):
  ending in "0000": the last event is "failed" instead of "delivered";
  and whatever the number, if notAfter passes before the message is sent to the provider, the
  last event is "expired" (at notAfter) instead.
Delivery reports: a message sent with `callbackUrl` has each of its events POSTed there as
it happens, one JSON object per event, the shape `GET /sms/:id/events/:eventId` answers
({"messageId", "id", "message": {"trackingId", "status", "statusAt", ...}, "timestamp"}).
The seed documents no signature, so none is added (a receiver puts its own token in the URL).
Sent by the sandbox server's `CallbackScheduler` (see callbacks.py; retries, log, replay);
`extra["callback_timeout"]`, `["callback_retries"]` and `["callback_delay"]` tune it.

Event ids are random 20-character ids fixed at acceptance. Templates known to the twin
(`extra["templates"]`, `{{name}}` placeholders) are rendered into the stored `message`;
an unknown templateId is accepted and stored with `message` null.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from aiohttp import web

from .callbacks import Outgoing, json_body, report_settings, scheduler_of
from .common import (
    STATE_KEY,
    FixedWindow,
    KindSettings,
    json_response,
    random_hex,
    random_id,
    read_json,
    request_key,
    seconds_until,
    utc_iso,
)

KIND = "emsgnow"
DEFAULT_CREDENTIALS: dict[str, str] = {"api_key": "sandbox-emsgnow-key"}
DEFAULT_TEMPLATES = {"gPVTbWpwQHXgg8KSZ6sX": "Hello {{name}}, your appointment is at {{etor}}."}

FAILING_SUFFIX = "0000"
MAX_MESSAGE = 160
MAX_CLIENT_ID = 100
_PHONE = re.compile(r"^\+?[0-9]{8,15}$")
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z0-9_]+)\s*\}\}")
API_KEY = request_key("emsgnow_api_key", str)


def default_settings() -> KindSettings:
    return KindSettings(
        credentials=dict(DEFAULT_CREDENTIALS),
        rate_limit=600,
        rate_window=60.0,
        delivery_step=0.5,
        extra={"api_keys": [], "templates": dict(DEFAULT_TEMPLATES)},
    )


def fault_body(status: int, message: str) -> dict[str, Any]:
    """An injected failure in eMsgNow's error shape."""
    return {"error": message}


class BadRequest(ValueError):
    """A validation failure; its text is the `error` of the 400 reply."""


@dataclass
class Sms:
    """One accepted message and the times its events fall due."""

    tracking_id: str
    api_key: str
    body: dict[str, Any]
    message: str | None
    created: float
    start: float  # when "processing" happens
    not_after: float | None
    event_ids: list[str] = field(default_factory=list)  # drawn on first read, then fixed

    def timeline(self, step: float) -> list[tuple[str, float]]:
        """Every (status, time) this message goes through, due or not."""
        sent_at, final_at = self.start + step, self.start + 2 * step
        if self.not_after is not None and self.not_after < sent_at:
            return [("processing", self.start), ("expired", max(self.not_after, self.start))]
        final = "failed" if _digits(self.body["to"]).endswith(FAILING_SUFFIX) else "delivered"
        return [("processing", self.start), ("sent to provider", sent_at), (final, final_at)]

    def events(self, now: float, step: float) -> list[dict[str, Any]]:
        """The events that have happened by `now`, oldest first."""
        due = [(s, at) for s, at in self.timeline(step) if at <= now]
        return [self.event(i, status, at) for i, (status, at) in enumerate(due)]

    def event(self, index: int, status: str, at: float) -> dict[str, Any]:
        while len(self.event_ids) <= index:
            self.event_ids.append(random_id())
        return {
            "id": self.event_ids[index],
            "message": {
                "channel": "sms",
                "trackingId": self.tracking_id,
                "clientId": self.body.get("clientId", ""),
                "status": status,
                "statusAt": utc_iso(at),
                "additionalInfo": {},
            },
            "timestamp": utc_iso(at),
        }

    def details(self, now: float, step: float) -> dict[str, Any]:
        events = self.events(now, step)
        updated = events[-1]["timestamp"] if events else utc_iso(self.created)
        optional = {k: self.body[k] for k in ("templateId", "variables", "callbackUrl") if k in self.body}
        return {
            "to": self.body["to"],
            "from": self.body["from"],
            "message": self.message,
            "clientId": self.body.get("clientId", ""),
            "messageType": self.body.get("messageType", "sms"),
            **optional,
            "trackingId": self.tracking_id,
            "notBefore": self.body.get("notBefore"),
            "notAfter": self.body.get("notAfter"),
            "created": utc_iso(self.created),
            "updated": updated,
            "events": events,
        }


class EmsgnowState:
    """Messages by tracking id and the per-key rate counters."""

    def __init__(self) -> None:
        self.messages: dict[str, Sms] = {}
        self.window = FixedWindow()

    def reset(self) -> None:
        self.messages.clear()
        self.window.reset()


# --------------------------------------------------------------------------- app
def make_app(settings: KindSettings) -> web.Application:
    state = EmsgnowState()
    app = web.Application(middlewares=[_rate_and_key(settings, state)])
    app[STATE_KEY] = state

    async def send(request: web.Request) -> web.Response:
        return await _send(request, settings, state)

    async def details(request: web.Request) -> web.Response:
        sms, now = _owned(request, settings, state)
        return json_response(sms.details(now, settings.delivery_step))

    async def events(request: web.Request) -> web.Response:
        sms, now = _owned(request, settings, state)
        return json_response({"messageId": sms.tracking_id, "events": sms.events(now, settings.delivery_step)})

    async def one_event(request: web.Request) -> web.Response:
        sms, now = _owned(request, settings, state)
        for event in sms.events(now, settings.delivery_step):
            if event["id"] == request.match_info["event_id"]:
                return json_response({"messageId": sms.tracking_id, **event})
        return json_response({"error": "Event not found"}, status=404)

    app.router.add_post("/sms", send)
    app.router.add_get("/sms/{tracking_id}", details)
    app.router.add_get("/sms/{tracking_id}/events", events)
    app.router.add_get("/sms/{tracking_id}/events/{event_id}", one_event)
    return app


def _accepted_keys(settings: KindSettings) -> set[str]:
    keys = {settings.credentials.get("api_key", "")}
    keys.update(settings.extra.get("api_keys") or ())
    keys.discard("")
    return keys


def _rate_and_key(settings: KindSettings, state: EmsgnowState):
    """Count the request in its key's window, then check the key; headers go on every reply."""

    @web.middleware
    async def middleware(request: web.Request, handler):
        api_key = request.headers.get("x-api-key", "")
        headers: dict[str, str] = {}
        if settings.rate_limit is not None:
            now = settings.clock()
            bucket = api_key or f"addr:{request.remote}"
            allowed, remaining, reset_at = state.window.hit(bucket, settings.rate_limit, settings.rate_window, now)
            headers = {
                "X-RateLimit-Limit": str(settings.rate_limit),
                "X-RateLimit-Remaining": str(remaining),
                "X-RateLimit-Reset": str(seconds_until(reset_at, now)),
            }
            if not allowed:
                return json_response({"error": "Rate limit exceeded"}, status=429, headers=headers)
        if not api_key:
            response = json_response({"error": "API key is required"}, status=401)
        elif api_key not in _accepted_keys(settings):
            response = json_response({"error": "Invalid API key"}, status=403)
        else:
            request[API_KEY] = api_key
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                response = json_response({"error": exc.reason}, status=exc.status)
        response.headers.update(headers)
        return response

    return middleware


def _owned(request: web.Request, settings: KindSettings, state: EmsgnowState) -> tuple[Sms, float]:
    sms = state.messages.get(request.match_info["tracking_id"])
    if sms is None or sms.api_key != request[API_KEY]:
        raise _NotFound()
    return sms, settings.clock()


class _NotFound(web.HTTPNotFound):
    def __init__(self) -> None:
        super().__init__(reason="SMS not found")


async def _send(request: web.Request, settings: KindSettings, state: EmsgnowState) -> web.Response:
    body, problem = await read_json(request)
    if problem is not None or not isinstance(body, dict):
        return json_response({"error": "Request body must be a JSON object"}, status=400)
    now = settings.clock()
    try:
        not_before, not_after = _validate(body)
    except BadRequest as exc:
        return json_response({"error": str(exc)}, status=400)
    tracking_id = random_hex(16)
    while tracking_id in state.messages:
        tracking_id = random_hex(16)
    sms = state.messages[tracking_id] = Sms(
        tracking_id=tracking_id,
        api_key=request[API_KEY],
        body=body,
        message=_render(body, settings),
        created=now,
        start=max(now, not_before or now),
        not_after=not_after,
    )
    if body.get("callbackUrl"):
        _report_events(request, settings, sms)
    return json_response({"message": "SMS received successfully", "trackingId": tracking_id})


def _report_events(request: web.Request, settings: KindSettings, sms: Sms) -> None:
    """Have each event of the message POSTed to its callbackUrl when the event happens."""
    scheduler = scheduler_of(request)
    if scheduler is None:
        return
    url, tuning = sms.body["callbackUrl"], report_settings(settings.extra)
    for index, (status, at) in enumerate(sms.timeline(settings.delivery_step)):
        def build(now: float, index: int = index, status: str = status, at: float = at) -> Outgoing:
            event = {"messageId": sms.tracking_id, **sms.event(index, status, at)}
            return Outgoing("POST", url, json_body(event), {"Content-Type": "application/json"})

        scheduler.schedule(KIND, at, settings.clock, build, **tuning)


# --------------------------------------------------------------------------- validation
def _validate(body: dict[str, Any]) -> tuple[float | None, float | None]:
    """Raise BadRequest naming the field; return (notBefore, notAfter) as epoch seconds."""
    to = body.get("to")
    if to in (None, ""):
        raise BadRequest("to is required")
    if not isinstance(to, str) or not _PHONE.match(to):
        raise BadRequest("to must be a phone number in E.164 format, e.g. +1234567890")
    sender = body.get("from")
    if sender in (None, ""):
        raise BadRequest("from is required")
    if not isinstance(sender, str):
        raise BadRequest("from must be a string")
    _validate_content(body)
    client_id = body.get("clientId")
    if client_id is not None and (not isinstance(client_id, str) or len(client_id) > MAX_CLIENT_ID):
        raise BadRequest(f"clientId must be a string of at most {MAX_CLIENT_ID} characters")
    if body.get("messageType", "sms") != "sms":
        raise BadRequest('messageType must be "sms"')
    callback = body.get("callbackUrl")
    if callback is not None and (not isinstance(callback, str) or not re.match(r"^https?://\S+$", callback)):
        raise BadRequest("callbackUrl must be an http or https URL")
    not_before = _utc_time(body, "notBefore")
    not_after = _utc_time(body, "notAfter")
    if not_before is not None and not_after is not None and not_after <= not_before:
        raise BadRequest("notAfter must be later than notBefore")
    return not_before, not_after


def _validate_content(body: dict[str, Any]) -> None:
    message, template_id = body.get("message"), body.get("templateId")
    if message in (None, "") and template_id in (None, ""):
        raise BadRequest("message or templateId is required")
    if message not in (None, "") and template_id not in (None, ""):
        raise BadRequest("message and templateId cannot both be given")
    if message not in (None, ""):
        if not isinstance(message, str):
            raise BadRequest("message must be a string")
        if len(message) > MAX_MESSAGE:
            raise BadRequest(f"message must be at most {MAX_MESSAGE} characters (got {len(message)})")
    elif not isinstance(template_id, str):
        raise BadRequest("templateId must be a string")
    variables = body.get("variables")
    if variables is not None and not isinstance(variables, dict):
        raise BadRequest("variables must be an object")


def _utc_time(body: dict[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a UTC date-time string, e.g. 2024-11-10T02:48:08.004Z")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise BadRequest(f"{name} must be a UTC date-time string, e.g. 2024-11-10T02:48:08.004Z") from None
    if parsed.tzinfo is None or parsed.utcoffset() != timezone.utc.utcoffset(None):
        raise BadRequest(f"{name} must be in UTC (end with Z or +00:00)")
    return parsed.timestamp()


def _render(body: dict[str, Any], settings: KindSettings) -> str | None:
    if body.get("message"):
        return body["message"]
    template = (settings.extra.get("templates") or {}).get(body["templateId"])
    if template is None:
        return None
    variables = body.get("variables") or {}
    return _PLACEHOLDER.sub(lambda m: str(variables.get(m.group(1), m.group(0))), template)


def _digits(number: str) -> str:
    return number.lstrip("+")

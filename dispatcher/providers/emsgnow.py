"""eMsgNow (`emsgnow`): POST /sms with an x-api-key, plain or templated (seed 004).

* Address: `to` is an E.164 number; sent as given (the seed's templated example drops the
  `+`, so the API accepts both).
* Text: `message` up to 160 characters, or `template_id` (+ `variables`) instead of text.
* Passed through: notBefore / notAfter (UTC, millisecond ISO 8601), callbackUrl, clientId
  (at most 100 characters), `from` from the message or the account default.
* Answer: 200 {"trackingId"} -> Accepted; 400/401/403 {"error"} -> Rejected; 429 and 5xx ->
  RetryLater. Every response carries X-RateLimit-Limit/Remaining/Reset, Reset being the
  seconds until the window resets.
* A 200 whose body cannot be read (cut, garbled, no trackingId) -> Accepted without a
  provider_ref: eMsgNow answers 200 only when it took the message (its errors have statuses
  of their own), and it has no idempotency key, so a resend would be a second SMS. Without a
  trackingId the message cannot be polled (its status request is refused, and polling gives
  up on it after poll_max_age); `detail["unreadable_answer"]` keeps what came back. A 200 with
  an {"error"} is still Rejected.
* 5xx -> RetryLater (eMsgNow said it failed); 502 / 504 are a gateway's and ambiguous
  (`base.http_outcome`): with on_timeout = "unknown" the message is not resent.
* No look-up after a crash (`lookup` says cannot_tell): the seed's only reads are
  GET /sms/:messageId and its events, keyed by the trackingId that the lost answer carried;
  nothing lists messages or finds one by clientId.
* Status: GET /sms/:id/events -> events "processing", "sent to provider", "delivered".
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import httpx

from ..errors import InvalidAddress, InvalidOption, MissingField, ValidationError
from .base import (
    Accepted,
    Adapter,
    HeaderAuth,
    DeliveryEvent,
    OutboundMessage,
    Outcome,
    Rejected,
    http_outcome,
    json_or_none,
    parse_time,
    utc_iso,
)

_E164 = re.compile(r"\+?[1-9][0-9]{6,14}")  # the whole string (fullmatch), ASCII digits
_STATUS = {"processing": "accepted", "sent to provider": "accepted", "delivered": "delivered",
           "failed": "failed", "undelivered": "failed", "expired": "expired", "rejected": "failed"}


class EmsgnowAdapter(Adapter):
    kind: ClassVar[str] = "emsgnow"
    credentials = ("api_key",)
    defaults = ("from", "callback_url")
    options = ("from", "callback_url", "client_id", "template_id", "variables")
    required_options = ("from",)
    max_length = 160
    text_required = False  # a template may stand in for the text
    has_status = True
    has_webhooks = True
    # Seed 004: the only reads are GET /sms/:messageId (+ /events), keyed by the trackingId of the
    # lost answer; nothing lists messages or finds one by clientId, and there is no idempotency key.
    no_lookup_reason = "cannot be asked: its reads need the trackingId of the lost answer, and nothing lists messages"

    def validate(self, to: str, text: str | None, options: dict[str, Any]) -> None:
        if not isinstance(to, str) or not _E164.fullmatch(to):
            raise InvalidAddress("to", "must be an E.164 phone number such as +14155550123")
        super().validate(to, text, options)
        template = options.get("template_id")
        if text and template:
            raise ValidationError("template_id", "give either text or template_id, not both")
        if not text and not template:
            raise MissingField("text", "required unless template_id is given")
        if "variables" in options and not isinstance(options["variables"], dict):
            raise InvalidOption("variables", "must be a mapping of template variable names to values")
        client_id = options.get("client_id")
        if client_id is not None and (not isinstance(client_id, str) or len(client_id) > 100):
            raise InvalidOption("client_id", "must be a string of at most 100 characters")
        callback = self.merged_options(options).get("callback_url")
        if callback is not None and not re.match(r"https?://\S+\Z", str(callback)):
            raise InvalidOption("callback_url", "must be an http(s) URL")

    def auth(self) -> httpx.Auth:
        return HeaderAuth({"x-api-key": self.account.get("api_key")})

    def build_request(self, msg: OutboundMessage) -> httpx.Request:
        opts = msg.options
        body: dict[str, Any] = {"to": msg.to, "from": opts["from"]}
        if opts.get("template_id"):
            body["templateId"] = opts["template_id"]
            if opts.get("variables"):
                body["variables"] = opts["variables"]
        else:
            body["message"] = msg.text
        if msg.not_before is not None:
            body["notBefore"] = utc_iso(msg.not_before, millis=True)
        if msg.not_after is not None:
            body["notAfter"] = utc_iso(msg.not_after, millis=True)
        if opts.get("callback_url"):
            body["callbackUrl"] = opts["callback_url"]
        if opts.get("client_id"):
            body["clientId"] = opts["client_id"]
        return self.json_post(self.url("/sms"), body, {"content-type": "application/json"})

    def parse_response(self, response: httpx.Response, msg: OutboundMessage) -> Outcome:
        data = json_or_none(response)
        if response.status_code == 200 and isinstance(data, dict) and data.get("trackingId"):
            return Accepted(provider_ref=str(data["trackingId"]), detail={"message": data.get("message")})
        error = data.get("error") if isinstance(data, dict) else None
        text = str(error or response.text[:200] or response.reason_phrase)
        if response.status_code == 200 and error:
            return Rejected(code="unexpected_response", message=f"200 without trackingId: {text}")
        if response.status_code == 200:
            return Accepted(provider_ref=None, detail={"unreadable_answer": response.text[:200]})
        code = {401: "api_key_required", 403: "invalid_api_key", 429: "rate_limited"}.get(
            response.status_code, f"http_{response.status_code}"
        )
        retry_at = None
        if response.status_code == 429:
            signal = self.read_rate(response)
            retry_at = signal.pause_until if signal else None
        return http_outcome(response.status_code, code, text, retry_at)

    def build_status_request(self, msg: OutboundMessage) -> httpx.Request:
        if not msg.provider_ref:
            raise ValueError("no eMsgNow trackingId to ask about (the send's answer could not be read)")
        return httpx.Request("GET", self.url(f"/sms/{msg.provider_ref}/events"))

    def parse_status(self, response: httpx.Response, msg: OutboundMessage) -> list[DeliveryEvent]:
        data = json_or_none(response)
        if response.status_code != 200 or not isinstance(data, dict):
            return []
        return events_from_items(data.get("events") or [])


# --------------------------------------------------------------------------- pure event readers
def events_from_items(items: Any) -> list[DeliveryEvent]:
    """DeliveryEvents from eMsgNow event objects {"id", "message": {status, statusAt, ...}, "timestamp"}."""
    events = []
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict) or item.get("id") in (None, ""):
            continue
        inner = item.get("message") if isinstance(item.get("message"), dict) else {}
        word = str(inner.get("status", "")).lower()
        at = parse_time(inner.get("statusAt") or item.get("timestamp"))
        events.append(
            DeliveryEvent(
                event_id=str(item.get("id")),
                status=_STATUS.get(word, "accepted"),
                provider_status=word,
                occurred_at=None if at is None else _from_epoch(at),
                detail={"additionalInfo": inner.get("additionalInfo") or {}},
            )
        )
    return events


def callback_events(data: Any) -> tuple[str | None, list[DeliveryEvent]]:
    """(trackingId, events) from a body eMsgNow posts to a message's callbackUrl.

    The seed documents no callback body, so every shape its API uses for events is read: one
    event object as `GET /sms/:id/events/:eventId` returns it ({"messageId"?, "id", "message":
    {"trackingId", "status", "statusAt", ...}, "timestamp"}), the `/events` listing
    ({"messageId", "events": [...]}), or a bare list of event objects.
    """
    if isinstance(data, list):
        items, tracking_id = data, None
    elif isinstance(data, dict) and isinstance(data.get("events"), list):
        items, tracking_id = data["events"], data.get("messageId") or data.get("trackingId")
    elif isinstance(data, dict):
        items, tracking_id = [data], data.get("messageId") or data.get("trackingId")
    else:
        return None, []
    if not tracking_id:
        tracking_id = next((item["message"].get("trackingId") for item in items if isinstance(item, dict)
                            and isinstance(item.get("message"), dict) and item["message"].get("trackingId")), None)
    return (str(tracking_id) if tracking_id else None), events_from_items(items)


def _from_epoch(value: float):  # type: ignore[no-untyped-def]
    from datetime import datetime, timezone

    return datetime.fromtimestamp(value, tz=timezone.utc)

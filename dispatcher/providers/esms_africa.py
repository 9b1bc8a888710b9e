"""eSMS Africa (`esms_africa`): POST /api/messages/send with a Bearer API key (seed 003).

* Address: `to` is an E.164 number ("+" then 7-15 digits, no spaces, dashes or brackets)
  that the `phonenumbers` library finds valid.
* Text: required, at most 1530 characters (ten 153-character GSM-7 segments). The provider
  splits and bills segments itself; the limit only keeps a runaway text from costing a fortune.
* Options: `sender_id` and `route` (account defaults, a message may override). Neither is
  required: the provider falls back to the route's default sender and detects the route.
* Scheduling: the dispatcher owns `not_before`. When a message is handed over with a
  not_before between 5 minutes and 7 days ahead of now (with `SCHEDULE_MARGIN` of slack on
  both sides, by the injectable `clock`), the adapter asks the provider to hold it:
  `schedule_mode: "scheduled"` and `scheduled_at` (YYYY-MM-DDThh:mm:ssZ, rounded up to the
  whole second so it never goes early). Otherwise it sends at once: holding messages outside
  that window is the dispatcher's job.
* Idempotency: every send carries `Idempotency-Key: <attempt_key>` (as the official SDK does),
  so a retry after an ambiguous failure reuses the key and cannot create a second message.
* Answer: 200/201 {"id", "status", "segments", "cost", ...} -> Accepted (a "failed" status
  there is still Accepted: the provider retries it itself and the status poll settles it).
  A 2xx without a readable message id (a body cut short, not JSON) -> RetryLater
  "unreadable_answer", ambiguous: the provider said it took the message, and the retry reuses
  the Idempotency-Key, which gives back the original message instead of a second one.
  5xx -> RetryLater with a fresh key (the provider said it failed); 502 / 504 are a gateway's
  and ambiguous (`base.http_outcome`): the key is reused, which is harmless here.
  Errors carry `detail` as a string, an object {code, message, ...} or a list of validation
  errors; each becomes a readable Rejected (400 invalid_phone / no_route / text_too_long,
  401, 403 sender_id_not_approved / insufficient_scope, 422 insufficient_balance). A string
  `detail` (the seed's 403 examples) takes its code from its words ("Sender ID ..." ->
  sender_id_not_approved), else from the status. 429 with Retry-After and 5xx -> RetryLater.
* Status: GET /api/messages/{id} -> one DeliveryEvent per `timeline` entry, event id
  "{id}:{index}:{status}". queued/scheduled/retrying -> pending, submitted/sent -> accepted,
  delivered, failed. A "failed" entry followed by a later "retrying" was not the end (the
  provider retries a failed message up to twice), so it reads as pending.
  The batch form GET /api/messages/status?ids=a,b (at most 100) has its own builder/parser.
* Delivery webhooks (final state only, signed `X-Webhook-Signature: sha256=<hex>`) carry the
  same message object; `events_from_message` reads both (see dispatcher/webhooks.py).
"""

from __future__ import annotations

import math
import re
import time
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, ClassVar, Iterable

import httpx
import phonenumbers

from ..config import ProviderAccount
from ..errors import InvalidAddress, InvalidOption
from .base import (
    PROVIDER_STATUS_MAX,
    Accepted,
    Adapter,
    HeaderAuth,
    DeliveryEvent,
    OutboundMessage,
    Outcome,
    RateSignal,
    bounded,
    http_outcome,
    json_or_none,
    parse_time,
    unreadable_success,
    utc_iso,
)

SEND_PATH = "/api/messages/send"
STATUS_BATCH_MAX = 100
SCHEDULE_MIN = timedelta(minutes=5)
SCHEDULE_MAX = timedelta(days=7)
SCHEDULE_MARGIN = timedelta(seconds=30)
_E164 = re.compile(r"\+[1-9][0-9]{6,14}")  # the whole string (fullmatch)
_STATUS = {"queued": "pending", "scheduled": "pending", "retrying": "pending", "submitted": "accepted",
           "sent": "accepted", "delivered": "delivered", "failed": "failed", "expired": "expired",
           "cancelled": "cancelled", "canceled": "cancelled", "rejected": "failed", "undelivered": "failed"}
_CODE_BY_STATUS = {400: "invalid_request", 401: "invalid_api_key", 403: "forbidden", 404: "not_found",
                   422: "invalid_request", 429: "rate_limited"}
# Words in a string `detail` that name one of the documented codes (the seed's 403 examples are strings).
_CODE_BY_WORDS = (
    ("sender id", "sender_id_not_approved"),
    ("scope", "insufficient_scope"),
    ("balance", "insufficient_balance"),
    ("route", "no_route"),
    ("scheduled_at", "invalid_schedule"),
    ("phone", "invalid_phone"),
    ("too long", "text_too_long"),
)


# --------------------------------------------------------------------------- pure pieces
def check_e164(to: Any) -> None:
    """Raise InvalidAddress naming `to` unless it is a valid E.164 number without separators."""
    if not isinstance(to, str) or not _E164.fullmatch(to):
        raise InvalidAddress("to", "must be an E.164 number: + then country code and number, no spaces "
                                   "or dashes, e.g. +256712345678")
    try:
        number = phonenumbers.parse(to, None)
    except phonenumbers.NumberParseException:
        number = None
    if number is None or not phonenumbers.is_valid_number(number):
        raise InvalidAddress("to", f"is not a valid phone number for its country code ({to[:4]}...)")


def scheduled_at(not_before: datetime | None, now: float) -> str | None:
    """`scheduled_at` for a not_before the provider can hold (5 min .. 7 days ahead), else None."""
    if not_before is None:
        return None
    lead = not_before - datetime.fromtimestamp(now, tz=timezone.utc)
    if not SCHEDULE_MIN + SCHEDULE_MARGIN <= lead <= SCHEDULE_MAX - SCHEDULE_MARGIN:
        return None
    whole = datetime.fromtimestamp(math.ceil(not_before.timestamp()), tz=timezone.utc)
    return utc_iso(whole)


def read_error(status: int, data: Any, fallback: str) -> tuple[str, str]:
    """(code, readable message) from an error answer's `detail` in any of its three shapes."""
    detail = data.get("detail") if isinstance(data, dict) else None
    derived = _CODE_BY_STATUS.get(status, f"http_{status}")
    if isinstance(detail, dict):
        code = str(detail.get("code") or derived)
        message = str(detail.get("message") or detail.get("msg") or code)
        extras = {k: v for k, v in detail.items() if k not in ("code", "message", "msg")}
        if extras:
            message += " (" + ", ".join(f"{k}={v}" for k, v in extras.items()) + ")"
        return code, message
    if isinstance(detail, list):
        lines = [_validation_line(item) for item in detail]
        return "invalid_request", "; ".join(line for line in lines if line) or "invalid request"
    if isinstance(detail, str) and detail:
        return _code_from_words(detail, status, derived), detail
    message = data.get("message") if isinstance(data, dict) else None
    return derived, str(message or fallback)


def _code_from_words(detail: str, status: int, derived: str) -> str:
    """A documented code named by the words of a string `detail` (400 / 403 / 422 only)."""
    if status not in (400, 403, 422):
        return derived
    lowered = detail.lower()
    return next((code for words, code in _CODE_BY_WORDS if words in lowered), derived)


def _validation_line(item: Any) -> str:
    """{"loc": ["body", "to"], "msg": "value is not a valid phone number"} -> "to: value is ..."."""
    if not isinstance(item, dict):
        return str(item)
    loc = item.get("loc") or item.get("field") or ()
    if isinstance(loc, str):
        loc = [loc]
    where = ".".join(str(p) for p in loc if p not in ("body", "query", "path"))
    what = str(item.get("msg") or item.get("message") or item.get("type") or "invalid")
    return f"{where}: {what}" if where else what


def timeline_events(message_id: str, timeline: Iterable[Any]) -> list[DeliveryEvent]:
    """One DeliveryEvent per timeline entry, oldest first as the provider lists them."""
    entries = [e for e in timeline if isinstance(e, dict) and e.get("status")]
    events = []
    for index, entry in enumerate(entries):
        word = str(entry["status"]).lower()
        retried_later = word == "failed" and any(
            str(e["status"]).lower() == "retrying" for e in entries[index + 1:]
        )
        at = parse_time(_first(entry, "at", "timestamp", "time", "created_at", "occurred_at"))
        detail = {k: v for k, v in entry.items() if k not in ("status", "at", "timestamp", "time", "created_at",
                                                             "occurred_at")}
        if retried_later:
            detail["retried"] = True
        events.append(DeliveryEvent(
            event_id=f"{message_id}:{index}:{word}",
            status="pending" if retried_later else _STATUS.get(word, "accepted"),
            provider_status=word,
            occurred_at=None if at is None else datetime.fromtimestamp(at, tz=timezone.utc),
            detail=detail,
        ))
    return events


def events_from_message(data: dict[str, Any], fallback_id: str | None = None) -> list[DeliveryEvent]:
    """The events of a message object {"id", "status", "updated_at", "timeline": [...]}.

    Without a timeline, the current status is the only event. The same reader serves the
    status endpoint and the delivery webhook, whose body is the message object.
    """
    message_id = str(data.get("id") or fallback_id or "")
    timeline = data.get("timeline")
    if isinstance(timeline, list) and timeline:
        return timeline_events(message_id, timeline)
    if data.get("status"):
        return timeline_events(message_id, [{"status": data["status"], "at": data.get("updated_at")}])
    return []


def webhook_message(data: Any) -> dict[str, Any] | None:
    """The message object a delivery webhook carries: the body itself, or its `data` / `message`."""
    if not isinstance(data, dict):
        return None
    for name in ("data", "message"):
        inner = data.get(name)
        if isinstance(inner, dict) and inner.get("id") is not None:
            return inner
    return data if data.get("id") is not None else None


def _first(entry: dict[str, Any], *names: str) -> Any:
    for name in names:
        if entry.get(name) not in (None, ""):
            return entry[name]
    return None


# --------------------------------------------------------------------------- the adapter
class EsmsAfricaAdapter(Adapter):
    kind: ClassVar[str] = "esms_africa"
    credentials = ("api_key",)
    defaults = ("sender_id", "route")
    options = ("sender_id", "route")
    max_length = 1530
    has_status = True
    has_webhooks = True
    status_batch_max = STATUS_BATCH_MAX
    idempotent_retry = True
    # No look-up: a message id exists only in the lost answer, but none is needed: a resend with
    # the same Idempotency-Key is answered with the original message and creates nothing new.
    no_lookup_reason = ("needs no look-up: resend with the same attempt key (Idempotency-Key), "
                        "which returns the original message if it arrived")

    def __init__(self, account: ProviderAccount, *, clock: Callable[[], float] = time.time) -> None:
        super().__init__(account)
        self.clock = clock

    def validate(self, to: str, text: str | None, options: dict[str, Any]) -> None:
        check_e164(to)
        super().validate(to, text, options)
        for name, value in self.merged_options(options).items():
            if not isinstance(value, str) or not value.strip():
                raise InvalidOption(name, "must be a non-empty string")

    def auth(self) -> HeaderAuth:
        return HeaderAuth({"Authorization": f"Bearer {self.account.get('api_key')}"})

    def build_body(self, msg: OutboundMessage) -> dict[str, Any]:
        body: dict[str, Any] = {"to": msg.to, "text": msg.text}
        for name in ("sender_id", "route"):
            if msg.options.get(name):
                body[name] = msg.options[name]
        at = scheduled_at(msg.not_before, self.clock())
        if at is not None:
            body["schedule_mode"] = "scheduled"
            body["scheduled_at"] = at
        return body

    def build_request(self, msg: OutboundMessage) -> httpx.Request:
        headers = {"content-type": "application/json", "accept": "application/json"}
        if msg.attempt_key:
            headers["Idempotency-Key"] = msg.attempt_key
        return self.json_post(self.url(SEND_PATH), self.build_body(msg), headers)

    def parse_response(self, response: httpx.Response, msg: OutboundMessage) -> Outcome:
        data = json_or_none(response)
        status = response.status_code
        if 200 <= status < 300 and isinstance(data, dict) and data.get("id"):
            return Accepted(
                provider_ref=str(data["id"]),
                segments=_int(data.get("segments")),
                cost=_float(data.get("cost")),
                cost_currency=data.get("cost_currency"),
                provider_status=data.get("status"),
                detail={k: data.get(k) for k in ("route", "balance_after", "scheduled_at", "route_cost",
                                                  "route_currency")},
            )
        if 200 <= status < 300:
            return unreadable_success(response)
        code, message = read_error(status, data, response.text[:200] or response.reason_phrase)
        retry_at = None
        if status == 429:
            signal = self.read_rate(response)
            retry_at = signal.pause_until if signal else None
            code = "rate_limited" if code == _CODE_BY_STATUS[429] else code
        return http_outcome(status, code, message, retry_at)

    def read_rate(self, response: httpx.Response) -> RateSignal | None:
        """Only a 429's Retry-After (seconds) is published; no numeric limit."""
        if response.status_code != 429:
            return None
        now = time.time()
        retry_at = parse_time(response.headers.get("retry-after"), now)
        return RateSignal(retry_at=retry_at if retry_at is not None else now + 1.0)

    # ---- delivery status
    def build_status_request(self, msg: OutboundMessage) -> httpx.Request:
        if not msg.provider_ref:
            raise ValueError("no eSMS Africa message id to ask about")
        return httpx.Request("GET", self.url(f"/api/messages/{msg.provider_ref}"),
                             headers={"accept": "application/json"})

    def parse_status(self, response: httpx.Response, msg: OutboundMessage) -> list[DeliveryEvent]:
        data = json_or_none(response)
        if response.status_code != 200 or not isinstance(data, dict):
            return []
        return events_from_message(data, msg.provider_ref)

    def is_final_word(self, word: str) -> bool:
        return _STATUS.get(word.lower()) in ("delivered", "failed", "expired", "cancelled")

    def build_status_batch_request(self, refs: list[str]) -> httpx.Request:
        """GET /api/messages/status?ids=a,b,... for 1 to 100 message ids."""
        if not refs or len(refs) > STATUS_BATCH_MAX:
            raise ValueError(f"between 1 and {STATUS_BATCH_MAX} ids per status request, got {len(refs)}")
        return httpx.Request("GET", self.url("/api/messages/status"), params={"ids": ",".join(refs)},
                             headers={"accept": "application/json"})

    def parse_status_batch(self, response: httpx.Response) -> dict[str, str]:
        """{message id: the provider's status word} for every id the answer lists."""
        data = json_or_none(response)
        if response.status_code != 200 or data is None:
            return {}
        items = data
        if isinstance(data, dict):
            items = next((data[k] for k in ("messages", "results", "data", "items") if isinstance(data.get(k), list)),
                         None)
            if items is None:  # {"id": "status", ...} or {"id": {"status": ...}}
                return {str(k): _word(v.get("status") if isinstance(v, dict) else v) for k, v in data.items()
                        if isinstance(v, (str, dict))}
        return {str(item["id"]): _word(item.get("status")) for item in items
                if isinstance(item, dict) and item.get("id") is not None}


def _word(value: Any) -> str:
    """A status word as the store keeps it (provider_status is bounded)."""
    return bounded(value, PROVIDER_STATUS_MAX) or ""


def _int(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _float(value: Any) -> float | None:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None

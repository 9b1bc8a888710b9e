"""esimfly twin: `POST /api/v1/business/esims/send-sms` with HMAC request signing (seed 000).

Sandbox credentials (`DEFAULT_CREDENTIALS`): access code `esf_sandbox_access_code`, secret key
`sk_sandbox_secret_key`. More pairs can be accepted through `extra["accounts"]`
({access_code: secret_key}); `extra["disabled_access_codes"]` lists known codes that answer
INVALID_USER.

Every request is checked in this order (the first failure answers):
1. Rate limit: a fixed window per access code (`rate_limit` per `rate_window`, default 1000
   per 3600 s, the published limit), counted on every request before authentication (a request
   without RT-AccessCode is counted per client address). Every response carries
   X-RateLimit-Limit, X-RateLimit-Remaining and X-RateLimit-Reset; Reset is the window's end as
   a Unix timestamp in whole seconds, or ISO 8601 (`2026-01-01T00:00:00.000Z`, as JavaScript's
   toISOString writes it) when `extra["reset_format"] == "iso"` (the public docs show both).
   Beyond the limit: 429 RATE_LIMIT_EXCEEDED. `rate_limit=None` switches limit and headers off.
2. Authentication, all 401 except DUPLICATE_REQUEST (the excerpt gives no statuses; assumed):
   - any of RT-AccessCode, RT-RequestID, RT-Timestamp, RT-Signature missing or empty -> HMAC_REQUIRED
   - unknown access code -> INVALID_API_KEY
   - RT-RequestID not a UUID v4 (any letter case) -> INVALID_REQUEST_ID
   - RT-Timestamp not integer milliseconds, or more than 5 minutes before or after the twin's
     clock (`settings.clock`) -> INVALID_TIMESTAMP
   - RT-Signature is not HMAC-SHA256(secret, timestamp + requestId + accessCode + raw body bytes
     exactly as received) in hex -> INVALID_SIGNATURE. The seed's client upper-cases the hex; the
     twin compares case-insensitively in constant time unless `extra["uppercase_signature_only"]`.
   - access code listed in `extra["disabled_access_codes"]` -> INVALID_USER
   - request id already seen for this access code -> 409 DUPLICATE_REQUEST. Ids are remembered
     (case-insensitively) from the moment a request passes the checks above, whatever the body
     then turns out to be, for `extra["request_id_ttl"]` seconds (default 86400) of the twin's
     clock. A retry that re-signs with a fresh timestamp but reuses the request id of an
     ambiguous attempt therefore learns whether that attempt arrived.
3. Body (400 unless stated), in the seed's words:
   - Content-Type not application/json, or the body not a JSON object -> INVALID_REQUEST (a
     code of the twin's own; the excerpt only says the header is required)
   - neither a non-empty string `iccid` nor an integer `esimId` -> MISSING_IDENTIFIER (a value of
     the wrong type counts as absent; `iccid` wins when both are given)
   - `message` absent, null, empty or not a string -> MISSING_MESSAGE
   - `message` longer than 500 UTF-16 code units (JavaScript's `length`; an emoji counts 2) ->
     MESSAGE_TOO_LONG
4. The eSIM. A valid ICCID is 18-22 digits starting "89"; any other ICCID, and any esimId
   below 1, -> 404 ESIM_NOT_FOUND. Magic endings of the ICCID (or of esimId's decimal digits):
     ...0001 -> 400 SMS_NOT_SUPPORTED     ...0002 -> 400 SMS_FAILED
     ...0003 -> 403 FORBIDDEN             ...0004 -> 404 ESIM_NOT_FOUND
   Anything else: 200 {"success": true, "message": "SMS sent successfully"}, recorded in
   `state.accepted`. esimfly has no delivery status, so the twin keeps none.

Error bodies are {"success": false, "message": ..., "code": ...}.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .common import STATE_KEY, FixedWindow, KindSettings, json_response, read_json, utc_iso

KIND = "esimfly"
SEND_PATH = "/api/v1/business/esims/send-sms"
DEFAULT_CREDENTIALS: dict[str, str] = {
    "access_code": "esf_sandbox_access_code",
    "secret_key": "sk_sandbox_secret_key",
}
TIMESTAMP_TOLERANCE_MS = 5 * 60 * 1000
MAX_MESSAGE_UTF16 = 500

_UUID_V4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$", re.IGNORECASE)
_ICCID = re.compile(r"^89[0-9]{16,20}$")
_AUTH_HEADERS = ("RT-AccessCode", "RT-RequestID", "RT-Timestamp", "RT-Signature")


def default_settings() -> KindSettings:
    return KindSettings(
        credentials=dict(DEFAULT_CREDENTIALS),
        rate_limit=1000,
        rate_window=3600.0,
        extra={
            "reset_format": "unix",
            "accounts": {},
            "disabled_access_codes": [],
            "request_id_ttl": 86400.0,
            "uppercase_signature_only": False,
        },
    )


def fault_body(status: int, message: str) -> dict[str, Any]:
    """An injected failure in esimfly's error shape."""
    return {"success": False, "message": message, "code": "INTERNAL_ERROR" if status >= 500 else "ERROR"}


class Refusal(Exception):
    """A documented error: answers `status` with {"success": false, "message", "code"}."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


# The eSIM outcomes (status, code, message), by the last four digits of the identifier.
_MAGIC: dict[str, tuple[int, str, str]] = {
    "0001": (400, "SMS_NOT_SUPPORTED", "SMS is not supported for this eSIM"),
    "0002": (400, "SMS_FAILED", "Failed to send SMS"),
    "0003": (403, "FORBIDDEN", "You do not have permission to access this eSIM"),
    "0004": (404, "ESIM_NOT_FOUND", "eSIM not found"),
}
_NOT_FOUND = _MAGIC["0004"]


@dataclass(frozen=True)
class AcceptedSend:
    """One SMS the twin accepted."""

    access_code: str
    request_id: str
    iccid: str | None
    esim_id: int | None
    message: str
    received_at: float


class EsimflyState:
    """Rate windows, request ids seen per access code, and the accepted sends."""

    def __init__(self) -> None:
        self.window = FixedWindow()
        self.seen_request_ids: dict[tuple[str, str], float] = {}  # (access code, id) -> first seen
        self.accepted: list[AcceptedSend] = []

    def reset(self) -> None:
        self.window.reset()
        self.seen_request_ids.clear()
        self.accepted.clear()

    def first_sighting(self, access_code: str, request_id: str, now: float, ttl: float) -> bool:
        """Remember the id; False when it was already seen within `ttl` seconds."""
        self._forget_older_than(now - ttl)
        key = (access_code, request_id.lower())
        if key in self.seen_request_ids:
            return False
        self.seen_request_ids[key] = now
        return True

    def _forget_older_than(self, horizon: float) -> None:
        # insertion order is arrival order, so the stale ones sit at the front
        while self.seen_request_ids:
            key, seen_at = next(iter(self.seen_request_ids.items()))
            if seen_at >= horizon:
                return
            del self.seen_request_ids[key]


# --------------------------------------------------------------------------- app
def make_app(settings: KindSettings) -> web.Application:
    state = EsimflyState()
    app = web.Application()
    app[STATE_KEY] = state

    async def send_sms(request: web.Request) -> web.Response:
        return await _send_sms(request, settings, state)

    app.router.add_post(SEND_PATH, send_sms)
    return app


async def _send_sms(request: web.Request, settings: KindSettings, state: EsimflyState) -> web.Response:
    now = settings.clock()
    allowed, rate_headers = _count(request, settings, state, now)
    if not allowed:
        return _refuse(Refusal(429, "RATE_LIMIT_EXCEEDED", "Rate limit exceeded"), rate_headers)
    raw = await request.read()
    try:
        access_code, request_id = _authenticate(request, raw, settings, state, now)
        body = await _json_object(request)
        iccid, esim_id, message = _read_body(body)
        _check_esim(iccid, esim_id)
    except Refusal as refusal:
        return _refuse(refusal, rate_headers)
    state.accepted.append(AcceptedSend(access_code, request_id, iccid, esim_id, message, now))
    return json_response({"success": True, "message": "SMS sent successfully"}, headers=rate_headers)


def _refuse(refusal: Refusal, headers: dict[str, str]) -> web.Response:
    body = {"success": False, "message": refusal.message, "code": refusal.code}
    return json_response(body, status=refusal.status, headers=headers)


# --------------------------------------------------------------------------- rate limit
def _count(request: web.Request, settings: KindSettings, state: EsimflyState, now: float) -> tuple[bool, dict[str, str]]:
    """Count the request in its access code's window: (allowed, the X-RateLimit-* headers)."""
    if settings.rate_limit is None:
        return True, {}
    bucket = request.headers.get("RT-AccessCode") or f"addr:{request.remote}"
    allowed, remaining, reset_at = state.window.hit(bucket, settings.rate_limit, settings.rate_window, now)
    return allowed, {
        "X-RateLimit-Limit": str(settings.rate_limit),
        "X-RateLimit-Remaining": str(remaining),
        "X-RateLimit-Reset": _reset_value(reset_at, settings),
    }


def _reset_value(reset_at: float, settings: KindSettings) -> str:
    if settings.extra.get("reset_format") == "iso":
        return utc_iso(reset_at)
    return str(math.ceil(reset_at))


# --------------------------------------------------------------------------- authentication
def _secrets(settings: KindSettings) -> dict[str, str]:
    """Every accepted access code and its secret key."""
    known = dict(settings.extra.get("accounts") or {})
    code, secret = settings.credentials.get("access_code"), settings.credentials.get("secret_key")
    if code and secret:
        known[code] = secret
    return known


def _authenticate(request: web.Request, raw: bytes, settings: KindSettings, state: EsimflyState,
                  now: float) -> tuple[str, str]:
    """Check the four RT-* headers; return (access code, request id) or raise a Refusal."""
    values = [request.headers.get(name, "") for name in _AUTH_HEADERS]
    if not all(values):
        raise Refusal(401, "HMAC_REQUIRED", "HMAC authentication required: send RT-AccessCode, "
                      "RT-RequestID, RT-Timestamp and RT-Signature")
    access_code, request_id, timestamp, signature = values
    secret = _secrets(settings).get(access_code)
    if secret is None:
        raise Refusal(401, "INVALID_API_KEY", "Invalid API key")
    if not _UUID_V4.match(request_id):
        raise Refusal(401, "INVALID_REQUEST_ID", "RT-RequestID must be a UUID v4")
    if not _timestamp_fresh(timestamp, now):
        raise Refusal(401, "INVALID_TIMESTAMP", "Request timestamp is invalid or expired")
    if not _signature_matches(signature, secret, timestamp + request_id + access_code, raw, settings):
        raise Refusal(401, "INVALID_SIGNATURE", "Invalid signature")
    if access_code in (settings.extra.get("disabled_access_codes") or ()):
        raise Refusal(401, "INVALID_USER", "User account is disabled")
    ttl = float(settings.extra.get("request_id_ttl", 86400.0))
    if not state.first_sighting(access_code, request_id, now, ttl):
        raise Refusal(409, "DUPLICATE_REQUEST", "Duplicate request: this RT-RequestID was already used")
    return access_code, request_id


def _timestamp_fresh(timestamp: str, now: float) -> bool:
    if not timestamp.isascii() or not timestamp.isdigit():
        return False
    return abs(int(timestamp) - now * 1000.0) <= TIMESTAMP_TOLERANCE_MS


def _signature_matches(given: str, secret: str, prefix: str, raw: bytes, settings: KindSettings) -> bool:
    expected = hmac.new(secret.encode(), prefix.encode() + raw, hashlib.sha256).hexdigest().upper()
    if not settings.extra.get("uppercase_signature_only"):
        given = given.upper()
    return hmac.compare_digest(expected.encode(), given.encode("utf-8", errors="replace"))


# --------------------------------------------------------------------------- body
async def _json_object(request: web.Request) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise Refusal(400, "INVALID_REQUEST", "Content-Type must be application/json")
    body, problem = await read_json(request)
    if problem is not None or not isinstance(body, dict):
        raise Refusal(400, "INVALID_REQUEST", "Request body must be a JSON object")
    return body


def _read_body(body: dict[str, Any]) -> tuple[str | None, int | None, str]:
    """(iccid, esimId, message) as the seed validates them, in its order."""
    iccid = body.get("iccid")
    esim_id = body.get("esimId")
    if not (isinstance(iccid, str) and iccid):
        iccid = None
    if iccid is not None or isinstance(esim_id, bool) or not isinstance(esim_id, int):
        esim_id = None
    if iccid is None and esim_id is None:
        raise Refusal(400, "MISSING_IDENTIFIER", "Provide either iccid or esimId")
    message = body.get("message")
    if not (isinstance(message, str) and message):
        raise Refusal(400, "MISSING_MESSAGE", "Message is required")
    if utf16_length(message) > MAX_MESSAGE_UTF16:
        raise Refusal(400, "MESSAGE_TOO_LONG", "Message cannot exceed 500 characters")
    return iccid, esim_id, message


def utf16_length(text: str) -> int:
    """The length JavaScript reports: UTF-16 code units."""
    return len(text.encode("utf-16-le")) // 2


def _check_esim(iccid: str | None, esim_id: int | None) -> None:
    """Raise the eSIM's magic refusal, if it has one."""
    if iccid is not None:
        if not _ICCID.match(iccid):
            raise Refusal(*_NOT_FOUND)
        digits = iccid
    else:
        assert esim_id is not None
        if esim_id < 1:
            raise Refusal(*_NOT_FOUND)
        digits = str(esim_id)
    outcome = _MAGIC.get(digits[-4:])
    if outcome is not None:
        raise Refusal(*outcome)

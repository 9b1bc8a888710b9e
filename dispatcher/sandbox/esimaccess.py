"""eSIM Access twin: `POST /api/v1/open/esim/sendSms` (seed 001, providers.md "eSIM Access").

Sandbox credentials (`DEFAULT_CREDENTIALS`): access code `esa_sandbox_access_code`, secret key
`esa_sandbox_secret_key`. More pairs can be accepted through `extra["accounts"]`
({access_code: secret_key}).

Every answer is the envelope {"errorCode": str|null, "errorMsg": str|null, "success": bool,
"obj": null} with HTTP 200, errors included (the documented quirk). `extra["error_field"] =
"errorMessage"` renames the text field, as the provider's other pages spell it. The one
exception is the rate limit (an assumption: the docs publish 8 requests/second and nothing
about the answer): beyond it, HTTP 429 with the envelope {"errorCode": "900001", "errorMsg":
"Too many requests"} and `Retry-After` = whole seconds until the window ends (1 by default).

Checks, in this order (the first failure answers):
1. `extra["blocked"]` true -> 101002 "IP is blocked" (the provider's IP allow-list, as a switch).
2. Rate limit: a fixed window per access code (`rate_limit` per `rate_window`, default 8 per
   1 s), counted on every request before authentication (no RT-AccessCode: per client address).
   No X-RateLimit-* headers (none are documented).
3. Authentication. RT-AccessCode absent or unknown -> 101004 "Invalid AccessCode or SecretKey"
   (101004 is the twin's choice; the docs number only 101001-101003). Then either or both of:
   - header mode (the seed's): RT-SecretKey must equal the secret key, else 101004;
   - HMAC mode (whenever RT-Signature is sent): RT-Timestamp must be integer milliseconds within
     5 minutes of the twin's clock, either way, else 101001 "The timestamp has expired";
     RT-RequestID must be present and RT-Signature must be the hex HMAC-SHA256(secretKey,
     timestamp + requestId + accessCode + raw body bytes as received), either letter case,
     else 101003 "Signature mismatch". Request ids are not checked for reuse (nothing is
     documented about replays).
   Neither RT-SecretKey nor RT-Signature -> 101004.
4. Body (the docs give no codes for these; the twin's choices):
   - Content-Type not application/json, or the body not a JSON object -> 100004 "Invalid request body"
   - neither a non-empty string `esimTranNo` nor `iccid` -> 100001 (wrong types count as absent;
     `esimTranNo` wins when both are given, as the provider prefers it)
   - `message` absent, null, empty or not a string -> 100002
   - `message` longer than 500 UTF-16 code units (Java's String.length) -> 100003
5. The eSIM. A valid esimTranNo is exactly 14 digits (like the seed's 23072017992029); a valid
   ICCID is 18-22 digits starting "89". Anything else -> 310403 "The eSIM transaction number
   does not exist". Magic endings (both identifiers):
     ...0002 -> 200002 "This operation is not allowed" (SMS not supported, smsStatus 0)
     ...0403 -> 310403 "The eSIM transaction number does not exist"
   Anything else: {"errorCode": null, "errorMsg": null, "success": true, "obj": null},
   recorded in `state.accepted`. No delivery status exists, so the twin keeps none.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .common import STATE_KEY, FixedWindow, KindSettings, json_response, read_json

KIND = "esimaccess"
SEND_PATH = "/api/v1/open/esim/sendSms"
DEFAULT_CREDENTIALS: dict[str, str] = {
    "access_code": "esa_sandbox_access_code",
    "secret_key": "esa_sandbox_secret_key",
}
TIMESTAMP_TOLERANCE_MS = 5 * 60 * 1000
MAX_MESSAGE_UTF16 = 500

TIMESTAMP_EXPIRED = ("101001", "The timestamp has expired")
IP_BLOCKED = ("101002", "IP is blocked")
SIGNATURE_MISMATCH = ("101003", "Signature mismatch")
BAD_CREDENTIALS = ("101004", "Invalid AccessCode or SecretKey")
MISSING_TARGET = ("100001", "esimTranNo or iccid is required")
MISSING_MESSAGE = ("100002", "message is required")
MESSAGE_TOO_LONG = ("100003", "message cannot exceed 500 characters")
BAD_BODY = ("100004", "Invalid request body")
NOT_ALLOWED = ("200002", "This operation is not allowed")
NOT_FOUND = ("310403", "The eSIM transaction number does not exist")
TOO_MANY = ("900001", "Too many requests")

_ESIM_TRAN_NO = re.compile(r"^[0-9]{14}$")
_ICCID = re.compile(r"^89[0-9]{16,20}$")
_MAGIC = {"0002": NOT_ALLOWED, "0403": NOT_FOUND}


def default_settings() -> KindSettings:
    return KindSettings(
        credentials=dict(DEFAULT_CREDENTIALS),
        rate_limit=8,
        rate_window=1.0,
        extra={"error_field": "errorMsg", "blocked": False, "accounts": {}},
    )


def fault_body(status: int, message: str) -> dict[str, Any]:
    """An injected failure in the envelope (always spelled with `errorMsg`)."""
    return {"errorCode": str(status), "errorMsg": message, "success": False, "obj": None}


class Refusal(Exception):
    """An error answered in the envelope: (errorCode, text)."""

    def __init__(self, error: tuple[str, str]) -> None:
        super().__init__(error[1])
        self.code, self.text = error


@dataclass(frozen=True)
class AcceptedSend:
    """One SMS the twin accepted; `auth` is "header", "hmac" or "both"."""

    access_code: str
    auth: str
    esim_tran_no: str | None
    iccid: str | None
    message: str
    received_at: float


class EsimAccessState:
    """Rate windows and the accepted sends."""

    def __init__(self) -> None:
        self.window = FixedWindow()
        self.accepted: list[AcceptedSend] = []

    def reset(self) -> None:
        self.window.reset()
        self.accepted.clear()


# --------------------------------------------------------------------------- app
def make_app(settings: KindSettings) -> web.Application:
    state = EsimAccessState()
    app = web.Application()
    app[STATE_KEY] = state

    async def send_sms(request: web.Request) -> web.Response:
        return await _send_sms(request, settings, state)

    app.router.add_post(SEND_PATH, send_sms)
    return app


async def _send_sms(request: web.Request, settings: KindSettings, state: EsimAccessState) -> web.Response:
    now = settings.clock()
    if settings.extra.get("blocked"):
        return _envelope(settings, IP_BLOCKED)
    allowed, retry_after = _count(request, settings, state, now)
    if not allowed:
        return _envelope(settings, TOO_MANY, status=429, headers={"Retry-After": str(retry_after)})
    raw = await request.read()
    try:
        access_code, auth = _authenticate(request, raw, settings, now)
        body = await _json_object(request)
        esim_tran_no, iccid, message = _read_body(body)
        _check_esim(esim_tran_no, iccid)
    except Refusal as refusal:
        return _envelope(settings, (refusal.code, refusal.text))
    state.accepted.append(AcceptedSend(access_code, auth, esim_tran_no, iccid, message, now))
    return _envelope(settings, None)


def _envelope(settings: KindSettings, error: tuple[str, str] | None, *, status: int = 200,
              headers: dict[str, str] | None = None) -> web.Response:
    text_field = settings.extra.get("error_field") or "errorMsg"
    code, text = error if error is not None else (None, None)
    body = {"errorCode": code, text_field: text, "success": error is None, "obj": None}
    return json_response(body, status=status, headers=headers)


def _count(request: web.Request, settings: KindSettings, state: EsimAccessState, now: float) -> tuple[bool, int]:
    """Count the request in its access code's window: (allowed, seconds until the window ends)."""
    if settings.rate_limit is None:
        return True, 0
    bucket = request.headers.get("RT-AccessCode") or f"addr:{request.remote}"
    allowed, _, reset_at = state.window.hit(bucket, settings.rate_limit, settings.rate_window, now)
    return allowed, max(1, math.ceil(reset_at - now))


# --------------------------------------------------------------------------- authentication
def _secrets(settings: KindSettings) -> dict[str, str]:
    """Every accepted access code and its secret key."""
    known = dict(settings.extra.get("accounts") or {})
    code, secret = settings.credentials.get("access_code"), settings.credentials.get("secret_key")
    if code and secret:
        known[code] = secret
    return known


def _authenticate(request: web.Request, raw: bytes, settings: KindSettings, now: float) -> tuple[str, str]:
    """Return (access code, "header" | "hmac" | "both") or raise a Refusal."""
    access_code = request.headers.get("RT-AccessCode", "")
    secret = _secrets(settings).get(access_code) if access_code else None
    if secret is None:
        raise Refusal(BAD_CREDENTIALS)
    given_secret = request.headers.get("RT-SecretKey")
    signature = request.headers.get("RT-Signature")
    if not given_secret and not signature:
        raise Refusal(BAD_CREDENTIALS)
    if given_secret and not hmac.compare_digest(given_secret.encode(), secret.encode()):
        raise Refusal(BAD_CREDENTIALS)
    if signature:
        _verify_signature(request, raw, access_code, secret, signature, now)
    if given_secret and signature:
        return access_code, "both"
    return access_code, "header" if given_secret else "hmac"


def _verify_signature(request: web.Request, raw: bytes, access_code: str, secret: str, signature: str,
                      now: float) -> None:
    timestamp = request.headers.get("RT-Timestamp", "")
    if not (timestamp.isascii() and timestamp.isdigit()) or abs(int(timestamp) - now * 1000.0) > TIMESTAMP_TOLERANCE_MS:
        raise Refusal(TIMESTAMP_EXPIRED)
    request_id = request.headers.get("RT-RequestID", "")
    if not request_id:
        raise Refusal(SIGNATURE_MISMATCH)
    signed = (timestamp + request_id + access_code).encode() + raw
    expected = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected.encode(), signature.lower().encode("utf-8", errors="replace")):
        raise Refusal(SIGNATURE_MISMATCH)


# --------------------------------------------------------------------------- body
async def _json_object(request: web.Request) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise Refusal(BAD_BODY)
    body, problem = await read_json(request)
    if problem is not None or not isinstance(body, dict):
        raise Refusal(BAD_BODY)
    return body


def _read_body(body: dict[str, Any]) -> tuple[str | None, str | None, str]:
    """(esimTranNo, iccid, message); only one of the first two is kept."""
    esim_tran_no = _non_empty_string(body.get("esimTranNo"))
    iccid = None if esim_tran_no is not None else _non_empty_string(body.get("iccid"))
    if esim_tran_no is None and iccid is None:
        raise Refusal(MISSING_TARGET)
    message = _non_empty_string(body.get("message"))
    if message is None:
        raise Refusal(MISSING_MESSAGE)
    if utf16_length(message) > MAX_MESSAGE_UTF16:
        raise Refusal(MESSAGE_TOO_LONG)
    return esim_tran_no, iccid, message


def _non_empty_string(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def utf16_length(text: str) -> int:
    """The length Java reports: UTF-16 code units."""
    return len(text.encode("utf-16-le")) // 2


def _check_esim(esim_tran_no: str | None, iccid: str | None) -> None:
    """Raise the eSIM's magic refusal, if it has one."""
    if esim_tran_no is not None:
        identifier, valid = esim_tran_no, _ESIM_TRAN_NO.match(esim_tran_no)
    else:
        assert iccid is not None
        identifier, valid = iccid, _ICCID.match(iccid)
    if not valid:
        raise Refusal(NOT_FOUND)
    error = _MAGIC.get(identifier[-4:])
    if error is not None:
        raise Refusal(error)

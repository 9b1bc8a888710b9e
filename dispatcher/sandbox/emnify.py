"""emnify twin: token exchange and the endpoint SMS API (seed 002 + providers.md).

    POST   /api/v1/authenticate                        {"application_token"} -> 200 {"auth_token"}
    POST   /api/v1/endpoint/{endpoint_id}/sms          send (Bearer auth_token) -> 201, empty body
    GET    /api/v1/endpoint/{endpoint_id}/sms          list sent (MT) and received (MO), newest first
    GET    /api/v1/endpoint/{endpoint_id}/sms/{sms_id} one SMS object
    DELETE /api/v1/endpoint/{endpoint_id}/sms/{sms_id} cancel a buffered SMS -> 204

Errors use emnify's shape {"error_code": int, "error_token": str, "message": str}; the twin's
error_code is the HTTP status, error_token says what is wrong.

Authentication: the accepted application tokens are `credentials["application_token"]` and
`extra["application_tokens"]`; anything else -> 401 invalid_application_token. The auth_token is
a JWT-shaped string (HS512 header, sub/iat/exp/jti claims) valid `extra["token_ttl"]` seconds
(default 3600) by `settings.clock`; an unknown token -> 401 invalid_token, an expired one -> 401
token_expired. Every exchange is counted (`state.authentications`, and the request log).

Rate limits, per source address (the client IP), fixed windows of `rate_window` (300 s):
`rate_limit` (2000) requests on every route, and `extra["auth_rate_limit"]` (100) on
/api/v1/authenticate; beyond -> 429 rate_limit_exceeded with Retry-After (seconds).

Sending: endpoint ids are positive integers (else 400 invalid_endpoint_id); ids >= 900000 do
not exist (404 endpoint_not_found). Body validation -> 422: `source_address` required, a
positive number or a string (digits, up to 15, or alphanumeric, up to 11); `payload` a
non-empty string; `dcs` 0 (GSM-7) or 8 (UCS-2), detected from the payload when absent;
`udh` an even-length hex string. The payload may hold 160 GSM-7 septets or 70 UCS-2 code units,
153 / 67 when a udh is present (emnify never splits: each part is its own request).
A success is 201 with an EMPTY body and `Location: <path of the new SMS>`, the absolute path on
the server that answered (under the sandbox it includes the /emnify mount): take the SMS id from
its last segment.

Listing: `GET .../sms` answers a JSON array of SMS objects, as `GET .../sms/{sms_id}` shows
each, the SMS sent to the endpoint (sms_type MT) and the SMS it sent (MO), newest first. The
docs give no paging for it; the twin takes `page` (from 1) and `per_page` (1 to 1000, default
1000), as emnify's other collections do. Received SMS come from `extra["received_sms"]`, a
list of {"endpoint_id", "payload", "source_address" (the device's number), "at" (epoch s;
default: the time of the listing)}: a device cannot be simulated otherwise.

Delivery, computed when read (`delivery_step` = s, from submit_date):
  status 1 "Delivery attempt pending", after s 2 "In progress", after 2s 4 "Delivered".
  Endpoint ids ending in 13: 5 "Failed" after 2s (retry_count 2).
  Endpoint ids ending in 77 (device offline): 3 "Buffered" after s, until cancelled (DELETE ->
  7 "Canceled") or until expiry_date (`extra["sms_validity"]`, default 1 day) -> 6 "Expired".
  DELETE of an SMS that is not buffered -> 409 sms_not_buffered.

Delivery reports: with `extra["callback_url"]` and `extra["callback_secret"]` set when an SMS
is submitted, the SMS object (as `GET .../sms/{sms_id}` shows it) is PATCHed to callback_url
at each status change after submission (2 or 3, then 4, 5, 6 or 7), with
`Authorization: Bearer <JWT HS256 signed with callback_secret>` (claims iss, iat and an exp
CALLBACK_TOKEN_TTL seconds later, by the wall clock the receiver checks). A cancellation is
reported at once. Sent by the sandbox server's `CallbackScheduler` (callbacks.py: timeout,
retries, log, replay).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import jwt
from aiohttp import web

from .callbacks import Outgoing, json_body, report_settings, scheduler_of
from .common import (
    STATE_KEY,
    FixedWindow,
    KindSettings,
    bearer_token,
    json_response,
    random_id,
    read_json,
    seconds_until,
)

KIND = "emnify"
DEFAULT_CREDENTIALS: dict[str, str] = {"application_token": "sandbox-emnify-application-token"}
UNKNOWN_ENDPOINTS_FROM = 900_000
FAILING_SUFFIX, OFFLINE_SUFFIX = "13", "77"
STATUS = {1: "Delivery attempt pending", 2: "In progress", 3: "Buffered", 4: "Delivered", 5: "Failed",
          6: "Expired", 7: "Canceled"}
LIMITS = {0: (160, 153), 8: (70, 67)}  # dcs -> (alone, with a udh)
_SIGNING_KEY = b"emnify-sandbox-signing-key"
CALLBACK_TOKEN_TTL = 60  # seconds a delivery report's JWT is valid
_ALNUM_SENDER = re.compile(r"^[A-Za-z0-9 ]{1,11}$")
_DIGIT_SENDER = re.compile(r"^\+?[0-9]{1,15}$")
_HEX = re.compile(r"^(?:[0-9A-Fa-f]{2})+$")
GSM7_BASIC = set(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENSION = set("^{}\\[~]|€\f")


def default_settings() -> KindSettings:
    return KindSettings(
        credentials=dict(DEFAULT_CREDENTIALS),
        rate_limit=2000,
        rate_window=300.0,
        delivery_step=0.5,
        extra={"token_ttl": 3600, "auth_rate_limit": 100, "application_tokens": [], "sms_validity": 86400},
    )


def error(status: int, token: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return json_response({"error_code": status, "error_token": token, "message": message}, status, headers)


def fault_body(status: int, message: str) -> dict[str, Any]:
    """An injected failure in emnify's error shape."""
    return {"error_code": status, "error_token": "injected_failure", "message": message}


class Refused(Exception):
    """A refusal carrying its reply."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


# --------------------------------------------------------------------------- SMS
@dataclass
class Sms:
    id: int
    endpoint_id: int
    source_address: str | int
    payload: str
    udh: str | None
    dcs: int
    submitted: float
    expires: float
    cancelled_at: float | None = None

    def status_at(self, now: float, step: float) -> tuple[int, float | None]:
        """(status id, when it became final or None) at `now`."""
        ending = str(self.endpoint_id)
        if ending.endswith(OFFLINE_SUFFIX):
            if self.cancelled_at is not None:
                return 7, self.cancelled_at
            if now >= self.expires:
                return 6, self.expires
            return (3, None) if now >= self.submitted + step else (1, None)
        if now >= self.submitted + 2 * step:
            return (5 if ending.endswith(FAILING_SUFFIX) else 4), self.submitted + 2 * step
        return (2, None) if now >= self.submitted + step else (1, None)

    def changes(self, step: float) -> list[tuple[int, float]]:
        """(status id, when) of the status changes due after submission, cancellation aside."""
        if str(self.endpoint_id).endswith(OFFLINE_SUFFIX):
            return [(3, self.submitted + step), (6, self.expires)]
        final = 5 if str(self.endpoint_id).endswith(FAILING_SUFFIX) else 4
        return [(2, self.submitted + step), (final, self.submitted + 2 * step)]

    def public(self, now: float, step: float) -> dict[str, Any]:
        status, final_at = self.status_at(now, step)
        failed = status == 5
        return {
            "id": self.id,
            "submit_date": _date(self.submitted),
            "delivery_date": _date(final_at) if status == 4 else None,
            "expiry_date": _date(self.expires),
            "final_date": _date(final_at) if final_at is not None else None,
            "retry_date": _date(self.submitted + step) if failed else None,
            "retry_count": 2 if failed else 0,
            "source_address": self.source_address,
            "payload": self.payload,
            "udh": self.udh,
            "dcs": self.dcs,
            "sms_type": {"id": 1, "description": "MT"},
            "endpoint": {"id": self.endpoint_id},
            "status": {"id": status, "description": STATUS[status]},
        }


def _date(epoch: float) -> str:
    """emnify's date style: 2019-08-27T12:32:03.000+0000."""
    dt = datetime.fromtimestamp(epoch, tz=timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}+0000"


class EmnifyState:
    """Auth tokens, SMS by endpoint, counters. SMS ids keep increasing across resets."""

    _ids = itertools.count(1)

    def __init__(self) -> None:
        self.tokens: dict[str, float] = {}  # auth_token -> expires at
        self.sms: dict[int, dict[int, Sms]] = {}  # endpoint id -> sms id -> Sms
        self.window = FixedWindow()
        self.authentications = 0

    def next_id(self) -> int:
        return next(self._ids)

    def reset(self) -> None:
        self.tokens.clear()
        self.sms.clear()
        self.window.reset()
        self.authentications = 0


# --------------------------------------------------------------------------- app
def make_app(settings: KindSettings) -> web.Application:
    state = EmnifyState()
    app = web.Application(middlewares=[_limits_and_token(settings, state)])
    app[STATE_KEY] = state

    async def authenticate(request: web.Request) -> web.Response:
        body, _ = await read_json(request)
        token = body.get("application_token") if isinstance(body, dict) else None
        accepted = {settings.credentials.get("application_token")}
        accepted.update(settings.extra.get("application_tokens") or ())
        if not isinstance(token, str) or not token or token not in accepted:
            return error(401, "invalid_application_token", "The application token is invalid or revoked")
        state.authentications += 1
        now = settings.clock()
        auth_token = _jwt(now, float(settings.extra.get("token_ttl", 3600)))
        state.tokens[auth_token] = now + float(settings.extra.get("token_ttl", 3600))
        return json_response({"auth_token": auth_token})

    async def send(request: web.Request) -> web.Response:
        endpoint_id = _endpoint(request)
        body, problem = await read_json(request)
        if problem is not None or not isinstance(body, dict):
            return error(400, "invalid_json", "The request body must be a JSON object")
        fields = _validate(body)
        now = settings.clock()
        sms = Sms(state.next_id(), endpoint_id, submitted=now,
                  expires=now + float(settings.extra.get("sms_validity", 86400)), **fields)
        state.sms.setdefault(endpoint_id, {})[sms.id] = sms
        for status, at in sms.changes(settings.delivery_step):
            _report(request, settings, sms, status, at)
        return web.Response(status=201, headers={"Location": f"{request.path.rstrip('/')}/{sms.id}"})

    async def listing(request: web.Request) -> web.Response:
        endpoint_id = _endpoint(request)
        now, step = settings.clock(), settings.delivery_step
        listed = [s.public(now, step) for s in state.sms.get(endpoint_id, {}).values()]
        listed += _received(settings.extra.get("received_sms") or (), endpoint_id, now)
        newest_first = sorted(listed, key=lambda s: s["id"], reverse=True)
        page, per_page = _paging(request)
        return json_response(newest_first[(page - 1) * per_page: page * per_page])

    async def one(request: web.Request) -> web.Response:
        sms = _find(request, state)
        return json_response(sms.public(settings.clock(), settings.delivery_step))

    async def cancel(request: web.Request) -> web.Response:
        sms = _find(request, state)
        now = settings.clock()
        status, _ = sms.status_at(now, settings.delivery_step)
        if status != 3:
            return error(409, "sms_not_buffered", f"Only a buffered SMS can be cancelled; this one is {STATUS[status]}")
        sms.cancelled_at = now
        _report(request, settings, sms, 7, now)
        return web.Response(status=204)

    app.router.add_post("/api/v1/authenticate", authenticate)
    app.router.add_post("/api/v1/endpoint/{endpoint_id}/sms", send)
    app.router.add_get("/api/v1/endpoint/{endpoint_id}/sms", listing)
    app.router.add_get("/api/v1/endpoint/{endpoint_id}/sms/{sms_id}", one)
    app.router.add_delete("/api/v1/endpoint/{endpoint_id}/sms/{sms_id}", cancel)
    return app


def _limits_and_token(settings: KindSettings, state: EmnifyState):
    """Per-source rate limits on every route, then the Bearer auth_token on all but /authenticate."""

    @web.middleware
    async def middleware(request: web.Request, handler):
        now = settings.clock()
        source = request.remote or "unknown"
        is_auth = request.path.endswith("/api/v1/authenticate")
        limits = [("all", settings.rate_limit)]
        if is_auth:
            limits.append(("auth", settings.extra.get("auth_rate_limit")))
        for name, limit in limits:
            if limit is None:
                continue
            allowed, _, reset_at = state.window.hit(f"{name}:{source}", int(limit), settings.rate_window, now)
            if not allowed:
                retry = {"Retry-After": str(max(1, seconds_until(reset_at, now)))}
                message = f"Too many requests: {limit} per {settings.rate_window:g} s"
                return error(429, "rate_limit_exceeded", message, retry)
        if not is_auth:
            token = bearer_token(request)
            expires = state.tokens.get(token or "")
            if expires is None:
                return error(401, "invalid_token", "Missing or unknown auth token: authenticate first")
            if now >= expires:
                return error(401, "token_expired", "The auth token has expired: authenticate again")
        try:
            return await handler(request)
        except Refused as refused:
            return refused.response

    return middleware


def _report(request: web.Request, settings: KindSettings, sms: Sms, status: int, at: float) -> None:
    """PATCH the SMS object to the configured callback URL once it reaches `status` at `at`."""
    url, secret = settings.extra.get("callback_url"), settings.extra.get("callback_secret")
    scheduler = scheduler_of(request)
    if not url or not secret or scheduler is None:
        return

    def build(now: float) -> Outgoing | None:  # the SMS as it was at `at`, even when sent late
        if sms.status_at(at, settings.delivery_step)[0] != status:
            return None  # overtaken (a buffered SMS cancelled before it expired): nothing to report
        issued = int(time.time())
        token = jwt.encode({"iss": "emnify", "iat": issued, "exp": issued + CALLBACK_TOKEN_TTL},
                           str(secret), algorithm="HS256")
        return Outgoing("PATCH", str(url), json_body(sms.public(at, settings.delivery_step)),
                        {"Content-Type": "application/json", "Authorization": f"Bearer {token}"})

    scheduler.schedule(KIND, at, settings.clock, build, **report_settings(settings.extra))


def _jwt(now: float, ttl: float) -> str:
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data, separators=(",", ":")).encode()).rstrip(b"=").decode()

    head = part({"alg": "HS512", "typ": "JWT"})
    claims = part({"sub": "sandbox-application", "iss": "emnify-sandbox", "iat": int(now), "exp": int(now + ttl),
                   "jti": random_id(24)})
    signature = hmac.new(_SIGNING_KEY, f"{head}.{claims}".encode(), hashlib.sha512).digest()
    return f"{head}.{claims}.{base64.urlsafe_b64encode(signature).rstrip(b'=').decode()}"


def _endpoint(request: web.Request) -> int:
    raw = request.match_info["endpoint_id"]
    if not raw.isdigit() or int(raw) <= 0:
        raise Refused(error(400, "invalid_endpoint_id", f"endpoint_id must be a positive integer, got {raw!r}"))
    endpoint_id = int(raw)
    if endpoint_id >= UNKNOWN_ENDPOINTS_FROM:
        raise Refused(error(404, "endpoint_not_found", f"Endpoint {endpoint_id} not found"))
    return endpoint_id


def _find(request: web.Request, state: EmnifyState) -> Sms:
    endpoint_id = _endpoint(request)
    raw = request.match_info["sms_id"]
    sms = state.sms.get(endpoint_id, {}).get(int(raw)) if raw.isdigit() else None
    if sms is None:
        raise Refused(error(404, "sms_not_found", f"SMS {raw} not found for endpoint {endpoint_id}"))
    return sms


RECEIVED_IDS_FROM = 10_000_000  # ids of the configured received SMS (above any id a test will send)


def _received(configured: Any, endpoint_id: int, now: float) -> list[dict[str, Any]]:
    """The configured SMS the endpoint sent (MO), as the listing shows them."""
    shown = []
    for index, item in enumerate(configured if isinstance(configured, list) else ()):
        if not isinstance(item, dict) or str(item.get("endpoint_id")) != str(endpoint_id):
            continue
        at = float(item.get("at") or now)
        shown.append({
            "id": RECEIVED_IDS_FROM + index, "submit_date": _date(at), "delivery_date": _date(at),
            "final_date": _date(at), "expiry_date": None, "retry_date": None, "retry_count": 0,
            "source_address": str(item.get("source_address") or "4915112345678"),
            "payload": str(item.get("payload") or ""), "udh": None, "dcs": 0,
            "sms_type": {"id": 2, "description": "MO"}, "endpoint": {"id": endpoint_id},
            "status": {"id": 4, "description": STATUS[4]},
        })
    return shown


def _paging(request: web.Request) -> tuple[int, int]:
    try:
        page = int(request.query.get("page", "1"))
        per_page = int(request.query.get("per_page", "1000"))
    except ValueError:
        raise Refused(error(400, "invalid_paging", "page and per_page must be integers")) from None
    if page < 1 or not 1 <= per_page <= 1000:
        raise Refused(error(400, "invalid_paging", "page must be >= 1 and per_page between 1 and 1000"))
    return page, per_page


def _invalid(message: str) -> Refused:
    return Refused(error(422, "validation_failed", message))


def _validate(body: dict[str, Any]) -> dict[str, Any]:
    """The stored fields of a valid send; raises Refused (422) naming the field."""
    source = body.get("source_address")
    if source is None or source == "":
        raise _invalid("source_address is required")
    if isinstance(source, bool) or not isinstance(source, (str, int)):
        raise _invalid("source_address must be a number or a string")
    if isinstance(source, int) and source <= 0:
        raise _invalid("source_address must be a positive number")
    if isinstance(source, str) and not (_DIGIT_SENDER.match(source) or _ALNUM_SENDER.match(source)):
        raise _invalid("source_address must be up to 15 digits or up to 11 letters and digits")
    payload = body.get("payload")
    if not isinstance(payload, str) or payload == "":
        raise _invalid("payload is required and must be a non-empty string")
    udh = body.get("udh")
    if udh is not None and (not isinstance(udh, str) or not _HEX.match(udh)):
        raise _invalid("udh must be an even-length hex string, e.g. 050003CC0201")
    dcs = _dcs(body.get("dcs"), payload)
    units = _units(payload, dcs)
    limit = LIMITS[dcs][1 if udh else 0]
    if units > limit:
        unit = "GSM-7 septets" if dcs == 0 else "UCS-2 code units"
        raise _invalid(f"payload is {units} {unit}; at most {limit} fit one SMS{' with a udh' if udh else ''}")
    return {"source_address": source, "payload": payload, "udh": udh, "dcs": dcs}


def _dcs(given: Any, payload: str) -> int:
    gsm = all(ch in GSM7_BASIC or ch in GSM7_EXTENSION for ch in payload)
    if given is None:
        return 0 if gsm else 8
    if isinstance(given, bool) or given not in LIMITS:
        raise _invalid("dcs must be 0 (GSM-7) or 8 (UCS-2)")
    if given == 0 and not gsm:
        raise _invalid("payload has characters outside GSM-7: send it with dcs 8")
    return int(given)


def _units(payload: str, dcs: int) -> int:
    if dcs == 0:
        return sum(2 if ch in GSM7_EXTENSION else 1 for ch in payload)
    return sum(2 if ord(ch) > 0xFFFF else 1 for ch in payload)

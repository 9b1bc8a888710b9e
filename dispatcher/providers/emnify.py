"""emnify (`emnify`): SMS to an IoT endpoint, Bearer token from an application token (seed 002).

* Address: `to` is an emnify endpoint id, a positive integer written as a string.
  `source_address` (account default or message option) is a number of up to 15 digits or
  a name of up to 11 letters, digits and spaces, as GSM sender addresses go.
* Auth (`EmnifyAuth`): `POST /api/v1/authenticate {"application_token"}` -> `{"auth_token"}`,
  then `Authorization: Bearer <auth_token>` on every call. The token is cached per worker
  process per account (base URL + application token) and shared by every request in flight:
  one asyncio.Lock per event loop (created lazily, so a loop that died leaves nothing behind)
  makes 200 concurrent first sends authenticate once. A 401 renews the token once and the
  request is retried once with the new token, all inside the httpx Auth flow; a second 401
  is the final answer. When the authenticate call itself fails, its answer is the final
  response and `parse_response` reads it (401/403 rejected, 429/5xx retried).
* Send: `POST /api/v1/endpoint/{to}/sms {"source_address", "payload"}` -> 201 Created.
  emnify does not split long text, so the adapter does: when `segments.split()` gives more
  than one part, each part is its own request (sent one after another) carrying
  `udh` = "050003" + ref + total + seq (two uppercase hex digits each; ref is derived from the
  message id, so every attempt of a message uses the same ref) and, for a UCS-2 text,
  `"dcs": 8`. A single SMS goes without udh/dcs: emnify picks its encoding itself.
  At most `MAX_PARTS` parts (the provider_ref has to fit in the store).
* The SMS id comes from the 201's `Location` header (".../sms/{sms_id}"). When it is absent,
  `send()` lists `GET /api/v1/endpoint/{to}/sms` and takes the newest SMS (highest
  submit_date, then highest id) whose payload (and udh, for a part) equals what was sent.
* provider_ref: "{endpoint_id}/{sms_id}", or "{endpoint_id}/{id1},{id2},..." for a long text
  (every part's id, in order; parts whose id could not be recovered are left out).
* Partial failure of a long text: parts already accepted cannot be recalled, and a retry of
  the whole message would deliver them twice. So a failure of part 1 is returned as it is
  (nothing went out), while any failure of a later part, transient or not, is
  `Rejected("partial_send")` whose message names the parts accepted (with their refs) and
  the failing part's own code and message. Nothing is ever resent automatically.
* Errors `{"error_code", "error_token", "message"}`: 401 after renewal -> Rejected
  ("auth_failed"), 404 -> Rejected (unknown endpoint), 400/422 -> Rejected with emnify's
  message; 429 (Retry-After) and 5xx -> RetryLater. The code is emnify's `error_token` when
  it gives one, else a name derived from the status.
* Status: `GET /api/v1/endpoint/{id}/sms/{sms_id}` -> one DeliveryEvent for the SMS's current
  status (ids 1 pending, 2 in progress, 3 buffered, 4 delivered, 5 failed, 6 expired,
  7 canceled), event id "{sms_id}:{status_id}". A long text is followed by its last part.
  Status requests must be sent with `auth=adapter.auth()` (they need the token too).
  `sms_events` reads the SMS object, for the poll and for delivery-report callbacks alike.
* Cancel: `DELETE /api/v1/endpoint/{id}/sms/{sms_id}` of every part of a buffered SMS.
* Look-up after a crash (`lookup`): `GET /api/v1/endpoint/{id}/sms` lists the SMS sent to and
  received from the endpoint. Our SMS is an MT entry (sms_type MT, or no sms_type) whose payload
  (and udh, for a part of a long text: its ref byte is fixed by the message id) is what we
  send, submitted at or after `since` less LOOKUP_SKEW (5 s of clock difference between us and
  emnify). Every part matched exactly once -> found, with the provider_ref a send would have
  recorded; no part matched -> absent; two candidates for one part (the same text sent twice
  to the endpoint within seconds) or only some parts matched -> cannot_tell: we could not say
  which is ours, and resending some parts would duplicate the others. The listing's order and
  paging are not documented: pages (`page`, `per_page` = 1000, as the twin serves them) are read
  until one is short or repeats, or, when a page is ordered newest first, until it reaches SMS
  older than the window; at most LOOKUP_PAGES pages, else cannot_tell. A failed listing (network,
  non-200, authentication) is cannot_tell. The source address is not compared: emnify may
  write it back in another form, and a false "absent" would send the SMS twice.
* Malformed answers: a 2xx is success whatever its body (the 201 has none; the id comes from
  Location). 5xx -> RetryLater (emnify said it failed); 502 / 504 are a gateway's and ambiguous
  (`base.http_outcome`): with on_timeout = "unknown" the message is not resent. A failure of
  the authenticate call is never ambiguous: the SMS request had not started.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import threading
import time
import weakref
from datetime import datetime, timezone
from typing import Any, AsyncGenerator, ClassVar, Generator

import httpx

from ..errors import InvalidAddress, InvalidOption, TextTooLong
from ..segments import split
from .base import (
    PROVIDER_STATUS_MAX,
    Accepted,
    Adapter,
    DeliveryEvent,
    LookupResult,
    OutboundMessage,
    Outcome,
    Rejected,
    RetryLater,
    SendResult,
    TRANSPORT_ERRORS,
    bounded,
    http_outcome,
    json_or_none,
    network_outcome,
    parse_time,
)

AUTH_PATH = "/api/v1/authenticate"
MAX_PARTS = 10
LOOKUP_SKEW = 5.0  # seconds emnify's clock may be behind ours when its submit_date is compared with `since`
LOOKUP_PAGE = 1000  # SMS per page of the listing
LOOKUP_PAGES = 20  # pages read at most before giving up (cannot_tell)
UCS2_DCS = 8
_ENDPOINT_ID = re.compile(r"[1-9][0-9]{0,18}")  # the whole string (fullmatch)
_SOURCE = re.compile(r"\+?[0-9]{1,15}|[A-Za-z0-9 ]{1,11}")  # (fullmatch) GSM sender: a number or an 11-character name
_SMS_ID_IN_LOCATION = re.compile(r"/sms/([^/?#]+)/?(?:[?#].*)?$")
_STATUS = {1: "pending", 2: "accepted", 3: "pending", 4: "delivered", 5: "failed", 6: "expired", 7: "cancelled"}
_CODE_BY_STATUS = {400: "invalid_request", 401: "auth_failed", 403: "forbidden", 404: "endpoint_not_found",
                   409: "conflict", 422: "invalid_request", 429: "rate_limited"}


# --------------------------------------------------------------------------- the token cache
class TokenSlot:
    """The auth token of one account in this process, and the locks that guard its renewal.

    `failures` counts failed authentications and `last_failure` keeps the latest one's outcome,
    so that requests that queued behind a failing authentication give up at once with the
    same outcome instead of each trying (and timing out) in turn.
    """

    def __init__(self) -> None:
        self.token: str | None = None
        self.renewals = 0  # authentications that gave a token (for tests and metrics)
        self.failures = 0
        self.last_failure: Outcome | None = None
        self.thread_lock = threading.RLock()  # for the sync flow
        self._loop_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )
        self._guard = threading.Lock()

    def loop_lock(self) -> asyncio.Lock:
        """The lock of the running event loop, made on first use there."""
        loop = asyncio.get_running_loop()
        with self._guard:
            lock = self._loop_locks.get(loop)
            if lock is None:
                lock = self._loop_locks[loop] = asyncio.Lock()
            return lock

    def fail(self, outcome: Outcome) -> None:
        self.last_failure = outcome
        self.failures += 1

    def __repr__(self) -> str:
        return f"TokenSlot(token={'***' if self.token else None}, renewals={self.renewals}, failures={self.failures})"


_slots: dict[tuple[str, str], TokenSlot] = {}
_slots_guard = threading.Lock()


def token_slot(base_url: str, application_token: str) -> TokenSlot:
    """The process-wide slot of one account, keyed by API root and a digest of its token."""
    key = (base_url, hashlib.sha256(application_token.encode()).hexdigest())
    with _slots_guard:
        slot = _slots.get(key)
        if slot is None:
            slot = _slots[key] = TokenSlot()
        return slot


def clear_token_cache() -> None:
    """Forget every cached auth token of this process (tests; a credential rotation)."""
    with _slots_guard:
        _slots.clear()


class AuthenticationFailed(Exception):
    """Raised from the Auth flow when an authentication this request waited for has just failed."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(getattr(outcome, "message", "") or "emnify authentication failed")
        self.outcome = outcome


# --------------------------------------------------------------------------- auth
class EmnifyAuth(httpx.Auth):
    """Bearer auth whose token exchange is one extra request yielded inside the flow.

    Flow: [POST /api/v1/authenticate if no token is cached] -> the request with
    `Authorization: Bearer <token>` -> on 401: [authenticate again, unless another request
    already renewed the token meanwhile] -> the request once more. A failed authentication
    ends the flow with the authenticate answer as the final response; the requests that were
    waiting for it raise `AuthenticationFailed` carrying the same outcome.
    """

    def __init__(self, base_url: str, application_token: str, slot: TokenSlot | None = None) -> None:
        self._base_url = base_url
        self._application_token = application_token
        self.slot = slot or token_slot(base_url, application_token)

    def authenticate_request(self, sending: httpx.Request | None = None) -> httpx.Request:
        """The token exchange, with the timeouts of the request it is made for: httpx gives its
        client's timeouts only to the request passed to `send()`, not to one an Auth flow yields,
        so without them a hanging authenticate call would wait for ever (holding the lock that
        every other send of the account waits on)."""
        body = json.dumps({"application_token": self._application_token}).encode()
        extensions = {"timeout": sending.extensions["timeout"]} if sending and "timeout" in sending.extensions else {}
        return httpx.Request("POST", self._base_url + AUTH_PATH, content=body, extensions=extensions,
                             headers={"content-type": "application/json", "accept": "application/json"})

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        stale: str | None = None
        for _ in range(2):
            failures_seen = self.slot.failures
            with self.slot.thread_lock:
                token = self._usable_token(stale, failures_seen)
                if token is None:
                    try:
                        answer = yield self.authenticate_request(request)
                    except BaseException:
                        self.slot.fail(_UNREACHABLE)
                        raise
                    answer.read()
                    token = self._keep_token(answer)
                    if token is None:
                        return
            response = yield _with_bearer(request, token)
            if response.status_code != 401:
                return
            stale = token

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        stale: str | None = None
        for _ in range(2):
            failures_seen = self.slot.failures
            async with self.slot.loop_lock():
                token = self._usable_token(stale, failures_seen)
                if token is None:
                    try:
                        answer = yield self.authenticate_request(request)
                    except BaseException:
                        self.slot.fail(_UNREACHABLE)
                        raise
                    await answer.aread()
                    token = self._keep_token(answer)
                    if token is None:
                        return
            response = yield _with_bearer(request, token)
            if response.status_code != 401:
                return
            stale = token

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        return self.sync_auth_flow(request)

    def _usable_token(self, stale: str | None, failures_seen: int) -> str | None:
        """The cached token if it is not the one just refused; None means: authenticate now."""
        token = self.slot.token
        if token is not None and token != stale:
            return token
        if self.slot.failures != failures_seen and self.slot.last_failure is not None:
            raise AuthenticationFailed(self.slot.last_failure)
        return None

    def _keep_token(self, answer: httpx.Response) -> str | None:
        data = json_or_none(answer) if answer.is_success else None
        token = data.get("auth_token") if isinstance(data, dict) else None
        if not isinstance(token, str) or not token:
            self.slot.fail(authentication_outcome(answer))
            return None
        self.slot.token = token
        self.slot.renewals += 1
        return token

    def __repr__(self) -> str:
        return f"EmnifyAuth(base_url={self._base_url!r}, application_token=***)"


def _with_bearer(request: httpx.Request, token: str) -> httpx.Request:
    request.headers["Authorization"] = f"Bearer {token}"
    return request


# --------------------------------------------------------------------------- pure pieces
def concat_udh(ref: int, total: int, seq: int) -> str:
    """The 8-bit-reference concatenation header: IEI 00, length 03, ref, total, seq (hex)."""
    for name, value in (("ref", ref), ("total", total), ("seq", seq)):
        if not 0 <= value <= 255:
            raise ValueError(f"{name} must fit in one byte, got {value}")
    return f"050003{ref:02X}{total:02X}{seq:02X}"


def concat_ref(message_id: str) -> int:
    """A one-byte reference fixed by the message id: the same on every attempt of a message."""
    return hashlib.sha256(message_id.encode()).digest()[0]


def sms_id_from_location(location: str | None) -> str | None:
    """'https://.../api/v1/endpoint/12345/sms/678' -> '678'."""
    if not location:
        return None
    m = _SMS_ID_IN_LOCATION.search(location)
    return m.group(1) if m else None


def split_ref(provider_ref: str | None) -> tuple[str, list[str]]:
    """'12345/7,8,9' -> ('12345', ['7', '8', '9']); ('', []) when there is nothing to address."""
    if not provider_ref or "/" not in provider_ref:
        return "", []
    endpoint_id, _, ids = provider_ref.partition("/")
    return endpoint_id, [i for i in ids.split(",") if i]


def find_sent_sms(listing: Any, payload: str, udh: str | None = None) -> str | None:
    """The id of the newest SMS in a `GET .../sms` listing with this payload (and udh)."""
    items = listing.get("items") if isinstance(listing, dict) else listing
    if not isinstance(items, list):
        return None
    matches = [
        item for item in items
        if isinstance(item, dict) and item.get("payload") == payload and item.get("id") is not None
        and (udh is None or str(item.get("udh") or "").upper() == udh.upper())
    ]
    if not matches:
        return None
    newest = max(matches, key=lambda item: (parse_time(item.get("submit_date")) or 0.0, _numeric(item.get("id"))))
    return str(newest["id"])


def _numeric(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def error_outcome(response: httpx.Response, retry_at: float | None = None) -> Outcome:
    """An emnify error answer {"error_code", "error_token", "message"} as Rejected / RetryLater."""
    data = json_or_none(response)
    data = data if isinstance(data, dict) else {}
    status = response.status_code
    token = data.get("error_token")
    code = str(token) if token else _CODE_BY_STATUS.get(status, f"http_{status}")
    message = str(data.get("message") or response.text[:200] or response.reason_phrase)
    if data.get("error_code") is not None:
        message = f"{message} (error_code {data['error_code']})"
    if status == 429 and retry_at is None:
        retry_at = time.time() + 1.0
    return http_outcome(status, code, message, retry_at)


def authentication_outcome(response: httpx.Response, retry_at: float | None = None) -> Outcome:
    """A failed `POST /api/v1/authenticate`: a refused token is final, 429 / 5xx are retried."""
    status = response.status_code
    if 200 <= status < 300:
        return Rejected("auth_failed", "emnify's authenticate answer carried no auth_token")
    if status == 429 and retry_at is None:
        retry_at = parse_time(response.headers.get("retry-after"))
    outcome = error_outcome(response, retry_at)
    message = f"authentication with the application token failed: {outcome.message}"
    if isinstance(outcome, RetryLater):
        return RetryLater(outcome.code, message, outcome.retry_at)
    return Rejected("auth_failed", message)


_UNREACHABLE = RetryLater("auth_unreachable", "the authenticate request did not complete (network error or timeout)")


def _on_authenticate(exc: BaseException) -> bool:
    """The network failed on the token exchange: the SMS itself was certainly not sent."""
    try:
        return exc.request.url.path.endswith(AUTH_PATH)  # type: ignore[attr-defined]
    except (RuntimeError, AttributeError):  # no request: not an httpx error, or one raised without it
        return False


def _is_authenticate_answer(response: httpx.Response) -> bool:
    try:
        return response.request.url.path.endswith(AUTH_PATH)
    except RuntimeError:  # a response built without its request
        return False


def _from_epoch(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, tz=timezone.utc)


# --------------------------------------------------------------------------- the adapter
class EmnifyAdapter(Adapter):
    kind: ClassVar[str] = "emnify"
    credentials = ("application_token",)
    defaults = ("source_address",)
    options = ("source_address",)
    required_options = ("source_address",)
    max_length = 153 * MAX_PARTS  # 1530 GSM-7 characters; UCS-2 is bounded by MAX_PARTS instead
    default_rate_limit = "2000/5m"
    has_status = True
    has_lookup = True  # the endpoint's SMS list shows whether a lost request arrived
    has_webhooks = True

    def validate(self, to: str, text: str | None, options: dict[str, Any]) -> None:
        if not isinstance(to, str) or not _ENDPOINT_ID.fullmatch(to):
            raise InvalidAddress("to", "must be an emnify endpoint id: a positive integer such as 12345")
        super().validate(to, text, options)
        source = self.merged_options(options).get("source_address")
        if isinstance(source, bool) or not isinstance(source, (str, int)) or not _SOURCE.fullmatch(str(source)):
            raise InvalidOption("source_address", "must be a sender number of up to 15 digits or a name of up to "
                                                  "11 letters, digits and spaces")
        parts = split(text or "").count
        if parts > MAX_PARTS:
            raise TextTooLong("text", f"at most {MAX_PARTS} SMS parts for kind 'emnify', this text takes {parts}")

    def auth(self) -> EmnifyAuth:
        return EmnifyAuth(self.account.base_url, str(self.account.get("application_token")))

    # ---- building
    def part_bodies(self, msg: OutboundMessage) -> list[dict[str, Any]]:
        """The JSON body of every request the text takes: one, or one per concatenated part."""
        source = str(msg.options.get("source_address", self.account.get("source_address", "")))
        segments = split(msg.text or "")
        if segments.count <= 1:
            return [{"source_address": source, "payload": msg.text or ""}]
        ref = concat_ref(msg.id)
        bodies = []
        for seq, part in enumerate(segments.parts, 1):
            body: dict[str, Any] = {"source_address": source, "payload": part,
                                    "udh": concat_udh(ref, segments.count, seq)}
            if segments.encoding == "ucs2":
                body["dcs"] = UCS2_DCS
            bodies.append(body)
        return bodies

    def build_part_requests(self, msg: OutboundMessage) -> list[httpx.Request]:
        return [self._post_sms(msg.to, body) for body in self.part_bodies(msg)]

    def build_request(self, msg: OutboundMessage) -> httpx.Request:
        """The request of a one-part text (or the first part of a long one: see `send`)."""
        return self.build_part_requests(msg)[0]

    def _post_sms(self, endpoint_id: str, body: dict[str, Any]) -> httpx.Request:
        return self.json_post(self.url(f"/api/v1/endpoint/{endpoint_id}/sms"), body,
                              {"content-type": "application/json", "accept": "application/json"})

    # ---- reading
    def parse_response(self, response: httpx.Response, msg: OutboundMessage) -> Outcome:
        """One SMS request's answer. Accepted's provider_ref is None when no Location came back."""
        status = response.status_code
        retry_at = None
        if status == 429:
            signal = self.read_rate(response)
            retry_at = signal.pause_until if signal else None
        if _is_authenticate_answer(response):
            return authentication_outcome(response, retry_at)
        if 200 <= status < 300:
            sms_id = sms_id_from_location(response.headers.get("location"))
            ref = f"{msg.to}/{sms_id}" if sms_id else None
            return Accepted(provider_ref=ref, segments=1, detail={"sms_id": sms_id})
        outcome = error_outcome(response, retry_at)
        if status == 401:
            return Rejected("auth_failed", f"emnify refused a freshly renewed auth token: {outcome.message}")
        return outcome

    # ---- sending (several requests for a long text)
    async def send(self, client: httpx.AsyncClient, msg: OutboundMessage) -> SendResult:
        """Send every part in order; Accepted only when all are, see the module docstring."""
        auth = self.auth()
        bodies = self.part_bodies(msg)
        started = time.perf_counter()
        sms_ids: list[str | None] = []
        requests = 0
        http_status, rate = None, None
        for seq, body in enumerate(bodies, 1):
            try:
                response = await client.send(self._post_sms(msg.to, body), auth=auth)
                await response.aread()
            except AuthenticationFailed as exc:  # an authentication this send waited for failed
                outcome: Outcome = exc.outcome
            except TRANSPORT_ERRORS as exc:
                outcome = _UNREACHABLE if _on_authenticate(exc) else network_outcome(exc)
                requests += 1
            else:
                requests += 1 + len(response.history)
                http_status, rate = response.status_code, self.read_rate(response)
                outcome = self.parse_response(response, msg)
                if isinstance(outcome, Accepted) and outcome.provider_ref is None:
                    found, looked = await self._recover_sms_id(client, auth, msg.to, body)
                    requests += looked
                    outcome = Accepted(provider_ref=f"{msg.to}/{found}" if found else None, segments=1)
            if not isinstance(outcome, Accepted):
                if seq > 1:
                    outcome = _partial(msg.to, sms_ids, seq, len(bodies), outcome)
                return SendResult(outcome, http_status, _ms_since(started), rate, requests)
            sms_ids.append(split_ref(outcome.provider_ref)[1][0] if outcome.provider_ref else None)
        return SendResult(self._accepted(msg, bodies, sms_ids), http_status, _ms_since(started), rate, requests)

    def _accepted(self, msg: OutboundMessage, bodies: list[dict[str, Any]], sms_ids: list[str | None]) -> Accepted:
        known = [i for i in sms_ids if i]
        detail: dict[str, Any] = {"sms_ids": sms_ids}
        if len(bodies) > 1:
            detail["udh_ref"] = bodies[0]["udh"][6:8]
            detail["encoding"] = "ucs2" if "dcs" in bodies[0] else "gsm7"
        if len(known) < len(sms_ids):
            detail["unidentified_parts"] = [n for n, i in enumerate(sms_ids, 1) if not i]
        ref = f"{msg.to}/{','.join(known)}" if known else None
        return Accepted(provider_ref=ref, segments=len(bodies), detail=detail)

    async def _recover_sms_id(self, client: httpx.AsyncClient, auth: httpx.Auth, endpoint_id: str,
                              body: dict[str, Any]) -> tuple[str | None, int]:
        """(the id of the SMS just sent, requests made) from the endpoint's SMS listing."""
        request = httpx.Request("GET", self.url(f"/api/v1/endpoint/{endpoint_id}/sms"),
                                headers={"accept": "application/json"})
        try:
            response = await client.send(request, auth=auth)
            await response.aread()
        except (*TRANSPORT_ERRORS, AuthenticationFailed):
            return None, 1
        if response.status_code != 200:
            return None, 1 + len(response.history)
        return find_sent_sms(json_or_none(response), body["payload"], body.get("udh")), 1 + len(response.history)

    # ---- look-up after a crash
    async def lookup(self, client: httpx.AsyncClient, msg: OutboundMessage, since: datetime) -> LookupResult:
        """Find the message's SMS (every part) in the endpoint's SMS list; see the module docstring."""
        bodies = self.part_bodies(msg)
        earliest = _epoch(since) - LOOKUP_SKEW
        listing = await self._sms_since(client, msg.to, earliest)
        if isinstance(listing, str):
            return LookupResult.cannot_tell(listing)
        sms_ids: list[str | None] = []
        status = None
        for seq, body in enumerate(bodies, 1):
            matches = [item for item in listing if _is_our_sms(item, body)]
            if len(matches) > 1:
                which = f"part {seq} of {len(bodies)}" if len(bodies) > 1 else "the text"
                return LookupResult.cannot_tell(
                    f"{len(matches)} SMS to endpoint {msg.to} since {since.isoformat()} carry {which} "
                    f"(ids {', '.join(str(m['id']) for m in matches)}): which one is ours cannot be told")
            sms_ids.append(str(matches[0]["id"]) if matches else None)
            if matches and isinstance(matches[0].get("status"), dict):
                status = matches[0]["status"].get("description")
        found = [n for n, i in enumerate(sms_ids, 1) if i]
        if not found:
            return LookupResult.absent(f"no SMS to endpoint {msg.to} since {since.isoformat()} carries this text "
                                       f"({len(listing)} SMS listed in that time)")
        if len(found) < len(bodies):
            return LookupResult.cannot_tell(
                f"only part(s) {', '.join(map(str, found))} of {len(bodies)} reached endpoint {msg.to} (sms ids "
                f"{', '.join(i for i in sms_ids if i)}); the rest did not, and resending would duplicate the others")
        accepted = self._accepted(msg, bodies, sms_ids)
        accepted = Accepted(provider_ref=accepted.provider_ref, segments=accepted.segments,
                            provider_status=bounded(status, PROVIDER_STATUS_MAX),
                            detail={**accepted.detail, "found_by": "endpoint SMS list"})
        ids = ", ".join(i for i in sms_ids if i)
        return LookupResult.found(accepted, f"found in endpoint {msg.to}'s SMS list (sms ids {ids})")

    async def _sms_since(self, client: httpx.AsyncClient, endpoint_id: str, earliest: float) -> list[dict] | str:
        """The SMS of the endpoint submitted at or after `earliest` (epoch s), or why they could not be listed."""
        auth = self.auth()
        kept: list[dict[str, Any]] = []
        seen: set[str] = set()
        for page in range(1, LOOKUP_PAGES + 1):
            request = httpx.Request("GET", self.url(f"/api/v1/endpoint/{endpoint_id}/sms"),
                                    params={"page": page, "per_page": LOOKUP_PAGE},
                                    headers={"accept": "application/json"})
            try:
                response = await client.send(request, auth=auth)
                await response.aread()
            except AuthenticationFailed as exc:
                return f"could not list the endpoint's SMS: {getattr(exc.outcome, 'message', exc)}"
            except TRANSPORT_ERRORS as exc:
                return f"could not list the endpoint's SMS: {network_outcome(exc).message}"
            items = json_or_none(response) if response.status_code == 200 else None
            if isinstance(items, dict):
                items = items.get("items")
            if not isinstance(items, list):
                return f"could not list the endpoint's SMS: HTTP {response.status_code} {response.text[:200]!r}"
            ids = [str(item.get("id")) for item in items if isinstance(item, dict)]
            if ids and all(i in seen for i in ids):
                break  # the same page again: the listing ignores paging and was read whole
            seen.update(ids)
            kept += [item for item in items if isinstance(item, dict) and _submitted(item, earliest)]
            if len(items) < LOOKUP_PAGE or _newest_first_and_past(items, earliest):
                break
        else:
            return f"the endpoint's SMS list is longer than {LOOKUP_PAGES} pages of {LOOKUP_PAGE}: not read to the end"
        return kept

    # ---- delivery status
    def build_status_request(self, msg: OutboundMessage) -> httpx.Request:
        endpoint_id, sms_ids = split_ref(msg.provider_ref)
        if not sms_ids:
            raise ValueError(f"provider_ref {msg.provider_ref!r} names no emnify SMS")
        return httpx.Request("GET", self.url(f"/api/v1/endpoint/{endpoint_id}/sms/{sms_ids[-1]}"),
                             headers={"accept": "application/json"})

    def parse_status(self, response: httpx.Response, msg: OutboundMessage) -> list[DeliveryEvent]:
        data = json_or_none(response)
        if response.status_code != 200 or not isinstance(data, dict):
            return []
        return sms_events(data, (split_ref(msg.provider_ref)[1] or ["?"])[-1])

    # ---- cancel
    async def cancel(self, client: httpx.AsyncClient, msg: OutboundMessage) -> bool:
        """DELETE every part of a buffered SMS; True only when emnify took back all of them."""
        endpoint_id, sms_ids = split_ref(msg.provider_ref)
        if not sms_ids:
            return False
        auth = self.auth()
        cancelled = True
        for sms_id in sms_ids:
            request = httpx.Request("DELETE", self.url(f"/api/v1/endpoint/{endpoint_id}/sms/{sms_id}"))
            try:
                response = await client.send(request, auth=auth)
                await response.aread()
            except (*TRANSPORT_ERRORS, AuthenticationFailed):
                cancelled = False
                continue
            cancelled = cancelled and response.status_code in (200, 204)
        return cancelled


def sms_events(data: dict[str, Any], fallback_sms_id: str | None = None) -> list[DeliveryEvent]:
    """The one event of an SMS object (id, status {id, description}, dates): its current status.

    Read from the status endpoint and from the delivery-report callback (a PATCH whose body is
    the SMS object). Event id "{sms_id}:{status_id}"; nothing when the status id is unreadable.
    """
    status = data.get("status") if isinstance(data.get("status"), dict) else {}
    try:
        status_id = int(status.get("id"))
    except (TypeError, ValueError):
        return []
    sms_id = data.get("id")
    if sms_id is None:
        sms_id = fallback_sms_id or "?"
    normalized = _STATUS.get(status_id, "accepted")
    return [DeliveryEvent(
        event_id=f"{sms_id}:{status_id}",
        status=normalized,
        provider_status=str(status.get("description") or status_id),
        occurred_at=_from_epoch(_status_time(data, normalized)),
        detail={k: data.get(k) for k in ("submit_date", "delivery_date", "final_date", "expiry_date",
                                          "retry_date", "retry_count") if data.get(k) is not None},
    )]


def _status_time(data: dict[str, Any], normalized: str) -> float | None:
    if normalized == "delivered":
        names = ("delivery_date", "final_date", "submit_date")
    elif normalized in ("failed", "expired", "cancelled"):
        names = ("final_date", "submit_date")
    else:
        names = ("submit_date",)
    for name in names:
        value = parse_time(data.get(name)) if data.get(name) else None
        if value is not None:
            return value
    return None


def _epoch(moment: datetime) -> float:
    """Epoch seconds of an aware datetime (a naive one is read as UTC, as the store keeps them)."""
    return (moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)).timestamp()


def _submitted(item: dict[str, Any], earliest: float) -> bool:
    """Submitted at or after `earliest`; an SMS whose date cannot be read is kept (it cannot be ruled out)."""
    at = parse_time(item.get("submit_date")) if item.get("submit_date") else None
    return at is None or at >= earliest


def _newest_first_and_past(items: list[Any], earliest: float) -> bool:
    """The page is ordered newest first (by id, descending) and its last SMS is older than `earliest`:
    every later page is older still."""
    ids = [_numeric(item.get("id")) for item in items if isinstance(item, dict)]
    if len(ids) < 2 or any(a <= b for a, b in zip(ids, ids[1:])):
        return False
    last = items[-1]
    at = parse_time(last.get("submit_date")) if isinstance(last, dict) and last.get("submit_date") else None
    return at is not None and at < earliest


def _is_our_sms(item: dict[str, Any], body: dict[str, Any]) -> bool:
    """An MT SMS with the payload (and udh) of one of our requests."""
    sms_type = item.get("sms_type")
    if isinstance(sms_type, dict) and str(sms_type.get("description") or "").upper() == "MO":
        return False
    if item.get("payload") != body["payload"] or item.get("id") is None:
        return False
    return str(item.get("udh") or "").upper() == str(body.get("udh") or "").upper()


def _partial(endpoint_id: str, sms_ids: list[str | None], seq: int, total: int, failure: Outcome) -> Rejected:
    """Part `seq` of `total` failed after the earlier ones were accepted: never resend."""
    refs = ",".join(i or "?" for i in sms_ids)
    code = getattr(failure, "code", "unknown")
    message = getattr(failure, "message", "")
    sent = "part 1 was" if seq == 2 else f"parts 1-{seq - 1} were"
    return Rejected(
        "partial_send",
        f"{sent} accepted of {total} (endpoint {endpoint_id}, sms ids {refs}) and cannot be recalled; "
        f"part {seq} failed ({code}: {message}); not resent, to avoid duplicate parts",
    )


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0

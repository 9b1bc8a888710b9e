"""The seam every provider kind plugs into.

An adapter is mostly declarations plus four pure pieces:

* `validate(to, text, options)`   refuse bad input before anything is stored;
* `auth()`                        an `httpx.Auth` that signs the exact bytes sent;
* `build_request(msg)`            an `httpx.Request` built from an `OutboundMessage`;
* `parse_response(response, msg)` one typed `Outcome`: Accepted | RetryLater | Rejected;
* `read_rate(response)`           what the provider said about its rate limit, if anything.

`send()` glues them together over an `httpx.AsyncClient` and maps network errors once,
here at the edge (`network_outcome`). Nothing about queues, retries or storage lives in an
adapter. `lookup()` asks the provider, after a crash, whether a send that may have started
arrived (`LookupResult`); kinds that cannot tell keep the default.

How a failure reads (the case table per kind is tests/test_provider_faults.py):

| what happened | outcome | why |
|---|---|---|
| no connection was made (DNS, refused, connect timeout, TLS handshake, waiting for a pooled connection) | RetryLater connect_error | provably nothing left: send again, with a fresh key |
| anything after the connection existed: reset, closed, read timeout, a body that stopped mid-way | RetryLater timeout / network_error, ambiguous | the provider may have it: never a fresh key |
| 500, 503 and other 5xx with the provider's answer | RetryLater | the provider said it failed |
| 502, 504 | RetryLater, ambiguous | a gateway said so, not the provider: see `http_outcome` |
| 2xx whose body cannot be read | per kind, see each adapter's docstring | success was said but not what it was |

Strings an outcome carries into bounded columns of the store are bounded here, once
(`Accepted`, `RetryLater`, `Rejected`, `DeliveryEvent`): codes 100 characters, provider
statuses 64, currencies 8, event ids 200; a provider ref longer than 200 is not kept (a cut
ref would name another message), its whole text goes to `detail["provider_ref_too_long"]`.
"""

from __future__ import annotations

import email.utils
import hashlib
import hmac
import json
import math
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, ClassVar, Generator

import aiohttp
import httpx

from ..config import ProviderAccount
from ..errors import ConfigError, InvalidOption, MissingField, TextTooLong, ValidationError
from ..segments import count as count_parts


# --------------------------------------------------------------------------- bounded strings
# The widths of the store's columns these strings end in (dispatcher/store/models.py; a test
# keeps the two in step). The adapter layer does not import the store.
PROVIDER_REF_MAX = 200  # messages.provider_ref
PROVIDER_STATUS_MAX = 64  # messages.provider_status, events.provider_status
CODE_MAX = 100  # messages.error_code, attempts.provider_code
CURRENCY_MAX = 8  # messages.cost_currency
EVENT_ID_MAX = 200  # events.event_id


def bounded(value: Any, limit: int) -> str | None:
    """`value` as a string of at most `limit` characters (None stays None)."""
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    return text[:limit]


def bounded_id(value: str, limit: int = EVENT_ID_MAX) -> str:
    """An identifier of at most `limit` characters that stays distinct: a longer one keeps its
    beginning and ends with a digest of the whole."""
    if len(value) <= limit:
        return value
    digest = hashlib.sha256(value.encode()).hexdigest()[:24]
    return f"{value[: limit - len(digest) - 1]}~{digest}"


def _set(obj: object, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)  # the outcome dataclasses are frozen


# --------------------------------------------------------------------------- outcomes
@dataclass(frozen=True)
class Accepted:
    """The provider took the message. `provider_ref` identifies it there (None if the kind has none)."""

    provider_ref: str | None = None
    segments: int | None = None
    cost: float | None = None
    cost_currency: str | None = None
    provider_status: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        ref = self.provider_ref
        if ref is not None and (not isinstance(ref, str) or len(ref) > PROVIDER_REF_MAX):
            _set(self, "detail", {**self.detail, "provider_ref_too_long": str(ref)[:2000]})
            _set(self, "provider_ref", None)
        _set(self, "provider_status", bounded(self.provider_status, PROVIDER_STATUS_MAX))
        _set(self, "cost_currency", bounded(self.cost_currency, CURRENCY_MAX))


@dataclass(frozen=True)
class RetryLater:
    """A transient failure: try again, not before `retry_at` (epoch seconds) when the provider said so.

    `ambiguous` is True when the request may have reached the provider (anything after the
    connection existed, see `network_outcome`): a retry must then reuse the attempt's
    idempotency key where the kind has one, and an account with on_timeout = "unknown" whose
    kind has none must not resend it at all.
    """

    code: str
    message: str = ""
    retry_at: float | None = None
    ambiguous: bool = False

    def __post_init__(self) -> None:
        _set(self, "code", bounded(self.code, CODE_MAX) or "")


@dataclass(frozen=True)
class Rejected:
    """Refused for good; `code` and `message` are the provider's own words where it gave them."""

    code: str
    message: str = ""

    def __post_init__(self) -> None:
        _set(self, "code", bounded(self.code, CODE_MAX) or "")


Outcome = Accepted | RetryLater | Rejected


@dataclass(frozen=True)
class RateSignal:
    """What a response said about the account's limit. Times are epoch seconds."""

    limit: int | None = None
    remaining: int | None = None
    reset_at: float | None = None
    retry_at: float | None = None  # from a 429 / Retry-After: nothing may go before this

    @property
    def pause_until(self) -> float | None:
        """When the account may send again, if the provider asked for a pause."""
        if self.retry_at is not None:
            return self.retry_at
        if self.remaining is not None and self.remaining <= 0 and self.reset_at is not None:
            return self.reset_at
        return None


@dataclass(frozen=True)
class SendResult:
    """One attempt as it is recorded: the outcome plus what the wire showed."""

    outcome: Outcome
    http_status: int | None = None
    latency_ms: float = 0.0
    rate: RateSignal | None = None
    requests: int = 1


@dataclass(frozen=True)
class DeliveryEvent:
    """One delivery event read from a provider (status endpoint or webhook)."""

    event_id: str  # the provider's event id, or a stable synthesized one
    status: str  # normalized: accepted | delivered | failed | expired | cancelled | pending
    provider_status: str  # the provider's own word
    occurred_at: datetime | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _set(self, "event_id", bounded_id(str(self.event_id)))
        _set(self, "provider_status", bounded(self.provider_status, PROVIDER_STATUS_MAX) or "")


# --------------------------------------------------------------------------- lookup after a crash
FOUND, ABSENT, CANNOT_TELL = "found", "absent", "cannot_tell"


@dataclass(frozen=True)
class LookupResult:
    """What the provider says about a message whose request may have started before a crash.

    * `found`: the provider has it; `accepted` reads exactly as if the lost answer had been an
      Accepted (provider ref, status), so it can be recorded the same way.
    * `absent`: the provider's own list proves it never arrived: it may be sent (again).
    * `cannot_tell`: the kind cannot look a message up, or the look-up failed or was not
      conclusive; `reason` says which, for the log and the message's error.
    """

    state: str  # FOUND | ABSENT | CANNOT_TELL
    accepted: "Accepted | None" = None
    reason: str = ""

    @classmethod
    def found(cls, accepted: "Accepted", reason: str = "") -> "LookupResult":
        return cls(FOUND, accepted, reason)

    @classmethod
    def absent(cls, reason: str) -> "LookupResult":
        return cls(ABSENT, None, reason)

    @classmethod
    def cannot_tell(cls, reason: str) -> "LookupResult":
        return cls(CANNOT_TELL, None, reason)


@dataclass(frozen=True)
class OutboundMessage:
    """What an adapter is given to send: no database rows, no secrets of the store."""

    id: str
    to: str
    text: str | None
    options: dict[str, Any] = field(default_factory=dict)  # account defaults merged under message options
    not_before: datetime | None = None
    not_after: datetime | None = None
    attempt_key: str = ""  # idempotency / request id of this attempt; reused after an ambiguous failure
    provider_ref: str | None = None


# --------------------------------------------------------------------------- helpers
def utc_iso(dt: datetime, *, millis: bool = False) -> str:
    """`2026-06-01T07:00:00Z` (or with .mmm) from an aware datetime."""
    dt = dt.astimezone(timezone.utc)
    if millis:
        return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


MAX_AHEAD = 86_400.0  # seconds: a provider's time further ahead than a day is read as a day ahead


def parse_time(value: Any, now: float | None = None) -> float | None:
    """A reset / retry / event time as epoch seconds.

    Accepts a delta in seconds (small numbers), a Unix timestamp in seconds or milliseconds,
    an ISO 8601 string, or an HTTP date. Returns None when it cannot be read, and for nan or
    an infinity (`Retry-After: nan` is as good as no Retry-After). A time more than MAX_AHEAD
    (a day) ahead of `now` is read as `now + MAX_AHEAD`: no provider pauses an account for
    weeks, and a value that says so is a bug of theirs, not a reason to stop for a year.
    """
    now = time.time() if now is None else now
    at = _read_time(value, now)
    if at is None or not math.isfinite(at) or at < 0.0:
        return None
    return min(at, now + MAX_AHEAD)


def _read_time(value: Any, now: float) -> float | None:
    if value is None or value == "":
        return None
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        number = None
    if number is not None:
        if not math.isfinite(number):
            return None
        if number >= 1e12:
            return number / 1000.0
        if number >= 1e9:
            return number
        return now + max(number, 0.0)
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=timezone.utc)
        return dt.timestamp()
    except (ValueError, OverflowError):
        pass
    try:
        return email.utils.parsedate_to_datetime(text).timestamp()
    except (TypeError, ValueError, OverflowError, IndexError):
        return None


def read_standard_rate_headers(response: httpx.Response, now: float | None = None) -> RateSignal | None:
    """X-RateLimit-Limit/Remaining/Reset and Retry-After, as most providers send them."""
    h = response.headers
    limit, remaining = h.get("x-ratelimit-limit"), h.get("x-ratelimit-remaining")
    reset, retry_after = h.get("x-ratelimit-reset"), h.get("retry-after")
    if limit is None and remaining is None and reset is None and retry_after is None and response.status_code != 429:
        return None
    retry_at = parse_time(retry_after, now)
    reset_at = parse_time(reset, now)
    if response.status_code == 429 and retry_at is None:
        retry_at = reset_at if reset_at is not None else (time.time() if now is None else now) + 1.0
    return RateSignal(
        limit=_int_or_none(limit), remaining=_int_or_none(remaining), reset_at=reset_at, retry_at=retry_at
    )


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(float(value)) if value is not None else None
    except ValueError:
        return None


# 502 Bad Gateway and 504 Gateway Timeout are said by a proxy in front of the provider, not by
# the provider: the proxy lost the answer (the service closed or reset the connection, or did
# not answer in time) and cannot know whether the service took the message. That is the
# same ambiguity as our own read timeout, so they read as ambiguous for every kind:
# - esimfly, eSMS Africa (idempotent): the retry reuses the attempt key, which costs nothing
#   and turns a message that did arrive into DUPLICATE_REQUEST / the original answer instead
#   of a second SMS;
# - eMsgNow, eSIM Access, emnify: nothing changes unless the account asked on_timeout =
#   "unknown", whose owner chose an `unknown` over a risk of a duplicate: this is such a risk.
# Every other 5xx (500, 503, ...) is the provider's own answer that it failed: retried with a
# fresh key. (A provider that fails after acting and then says 500 breaks its own contract.)
GATEWAY_STATUSES = (502, 504)


def http_outcome(status: int, code: str, message: str, retry_at: float | None = None) -> Outcome:
    """The usual reading of an HTTP error status: 408/425/429/5xx retry, other 4xx reject.

    502 and 504 retry as ambiguous (see GATEWAY_STATUSES)."""
    if status in (408, 425, 429) or status >= 500:
        return RetryLater(code=code or f"http_{status}", message=message, retry_at=retry_at,
                          ambiguous=status in GATEWAY_STATUSES)
    return Rejected(code=code or f"http_{status}", message=message)


def unreadable_success(response: httpx.Response) -> RetryLater:
    """A 2xx whose body cannot be read, for a kind whose answer decides success and whose retry
    reuses the attempt key or is governed by on_timeout: ambiguous, the provider may have it."""
    return RetryLater(code="unreadable_answer", ambiguous=True,
                      message=f"{response.status_code} with a body that cannot be read: {response.text[:200]!r}")


def json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def utf16_length(text: str) -> int:
    """Length as JavaScript and Java count it (UTF-16 code units): an emoji counts 2."""
    return len(text.encode("utf-16-le")) // 2


class HeaderAuth(httpx.Auth):
    """Fixed credential headers on every request (an API key, a Bearer key, a secret pair).

    Its repr names the headers and never their values.
    """

    def __init__(self, headers: dict[str, str]) -> None:
        self._headers = dict(headers)

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers.update(self._headers)
        yield request

    def __repr__(self) -> str:
        return f"HeaderAuth({', '.join(f'{name}=***' for name in self._headers)})"


# --------------------------------------------------------------------------- the adapter
URLS_KEPT = 32  # parsed URLs an adapter keeps (Adapter.url)
WEBHOOK_SECRET_KEY = "webhook_secret"  # optional account key of kinds with webhooks (see dispatcher/webhooks.py)


class Adapter:
    """Base of every provider kind. Subclasses declare, validate, build and parse."""

    kind: ClassVar[str]
    credentials: ClassVar[tuple[str, ...]] = ()  # required secret fields of the account
    optional_credentials: ClassVar[dict[str, Any]] = {}  # optional account fields with defaults
    defaults: ClassVar[tuple[str, ...]] = ()  # account-level defaults a message may override
    options: ClassVar[tuple[str, ...]] = ()  # message options this kind accepts
    required_options: ClassVar[tuple[str, ...]] = ()  # options (or defaults) a message must end up with
    max_length: ClassVar[int | None] = None  # characters of text
    text_required: ClassVar[bool] = True
    default_rate_limit: ClassVar[str | None] = None
    has_status: ClassVar[bool] = False  # a delivery status endpoint exists
    status_batch_max: ClassVar[int] = 0  # ids one status-check request may ask about (0: no such form)
    idempotent_retry: ClassVar[bool] = False  # a reused attempt_key makes a resend harmless
    has_lookup: ClassVar[bool] = False  # `lookup` can find a message whose answer was lost
    has_webhooks: ClassVar[bool] = False  # `dispatcher webhooks` takes its delivery reports (key WEBHOOK_SECRET_KEY)
    # Why `lookup` cannot tell, for kinds that keep the default (said in the log and the message's error).
    no_lookup_reason: ClassVar[str] = "offers no way to ask whether a message arrived"

    def __init__(self, account: ProviderAccount) -> None:
        self.account = account

    @classmethod
    def secret_fields(cls) -> tuple[str, ...]:
        """Account fields never shown: the credentials, and the webhook secret where there is one."""
        return cls.credentials + ((WEBHOOK_SECRET_KEY,) if cls.has_webhooks else ())

    @classmethod
    def account_keys(cls) -> set[str]:
        """Every kind-specific key an account of this kind may set."""
        keys = set(cls.credentials) | set(cls.optional_credentials) | set(cls.defaults)
        return (keys | {WEBHOOK_SECRET_KEY}) if cls.has_webhooks else keys

    # ---- validation (before anything is stored)
    def validate(self, to: str, text: str | None, options: dict[str, Any]) -> None:
        """Raise a ValidationError naming the field; subclasses extend with address rules."""
        unknown = set(options) - set(self.options) if options else None
        if unknown:
            name = sorted(unknown)[0]
            allowed = ", ".join(sorted(self.options)) or "none"
            raise InvalidOption(name, f"not an option of kind {self.kind!r} (allowed: {allowed})")
        merged = self.merged_options(options)
        for name in self.required_options:
            if merged.get(name) in (None, ""):
                raise MissingField(name, f"required for kind {self.kind!r}: pass it or set it on the account")
        if text is None or text == "":
            if self.text_required:
                raise MissingField("text", "must be a non-empty string")
        elif not isinstance(text, str):
            raise ValidationError("text", "must be a string")
        elif self.max_length is not None and len(text) > self.max_length:
            raise TextTooLong("text", f"at most {self.max_length} characters for kind {self.kind!r}, got {len(text)}")

    def merged_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Account defaults with the message's own options on top (a new dict each call)."""
        defaults = self.__dict__.get("_defaults")
        if defaults is None:  # the account's fields are read once per adapter, not per message
            fields = self.account.fields
            defaults = self.__dict__["_defaults"] = {k: fields[k] for k in self.defaults if fields.get(k) not in (None, "")}
        merged = dict(defaults)
        for k, v in options.items():
            if v is not None:
                merged[k] = v
        return merged

    def count_segments(self, text: str | None) -> int:
        return count_parts(text) if text else 0

    # ---- the wire
    def auth(self) -> httpx.Auth | None:
        return None

    def timeouts(self, client: httpx.AsyncClient | None = None) -> dict[str, float]:
        """The account's `timeout` as a request extension (a Request built by hand carries none),
        never longer than the client's own (transport.make_client caps every request)."""
        t = float(self.account.timeout)
        cap = client.timeout.read if client is not None else None
        if cap is not None:
            t = min(t, cap)
        made = self.__dict__.setdefault("_timeouts", {})  # one per cap: built once, not per message
        if t not in made:
            made[t] = httpx.Timeout(t, connect=min(t, 5.0)).as_dict()
        return dict(made[t])

    def url(self, path: str) -> httpx.URL:
        """The account's URL of `path`; the fixed paths of sends are parsed once, not per message."""
        urls = self.__dict__.setdefault("_urls", {})
        url = urls.get(path)
        if url is None:
            url = httpx.URL(self.account.base_url + path)
            if len(urls) < URLS_KEPT:  # paths naming a message (status polls) are many: not all kept
                urls[path] = url
        return url

    def build_request(self, msg: OutboundMessage) -> httpx.Request:
        raise NotImplementedError

    @staticmethod
    def json_post(url: httpx.URL, body: Any, headers: dict[str, str], *, ascii_only: bool = True) -> httpx.Request:
        """A POST of `body` as compact JSON, its bytes and headers exactly those of
        `httpx.Request("POST", url, content=..., headers=headers)`: Host first, then `headers`,
        then Content-Length. Built from the bytes as they are, it skips httpx's content
        encoding, which took two thirds of the request's making on every send."""
        content = json.dumps(body, separators=(",", ":"), ensure_ascii=ascii_only).encode()
        raw = [("Host", url.netloc.decode("ascii")), *headers.items(), ("Content-Length", str(len(content)))]
        request = httpx.Request("POST", url, headers=raw, stream=httpx.ByteStream(content))
        request.read()  # `request.content`, the bytes a signature covers
        return request

    def parse_response(self, response: httpx.Response, msg: OutboundMessage) -> Outcome:
        raise NotImplementedError

    def read_rate(self, response: httpx.Response) -> RateSignal | None:
        return read_standard_rate_headers(response)

    async def send(self, client: httpx.AsyncClient, msg: OutboundMessage) -> SendResult:
        """Build, sign, post and judge one message. Network errors become RetryLater here.

        `client` is an httpx.AsyncClient or the worker's transport.Wire (the same `send(request,
        auth=)` and `timeout`, without httpx's client layers; docs/throughput.md)."""
        request = self.build_request(msg)
        request.extensions.setdefault("timeout", self.timeouts(client))
        started = time.perf_counter()
        try:
            response = await client.send(request, auth=self.auth() or httpx.USE_CLIENT_DEFAULT)
            await response.aread()
        except TRANSPORT_ERRORS as exc:
            return SendResult(network_outcome(exc), None, (time.perf_counter() - started) * 1000.0)
        latency = (time.perf_counter() - started) * 1000.0
        return SendResult(self.parse_response(response, msg), response.status_code, latency, self.read_rate(response))

    # ---- delivery status (kinds with `has_status`)
    def build_status_request(self, msg: OutboundMessage) -> httpx.Request:
        raise NotImplementedError(f"{self.kind} has no delivery status endpoint")

    def parse_status(self, response: httpx.Response, msg: OutboundMessage) -> list[DeliveryEvent]:
        raise NotImplementedError(f"{self.kind} has no delivery status endpoint")

    # ---- batched status checks (kinds with `status_batch_max`): the current word of many messages at once
    def build_status_batch_request(self, refs: list[str]) -> httpx.Request:
        raise NotImplementedError(f"{self.kind} has no batched status endpoint")

    def parse_status_batch(self, response: httpx.Response) -> dict[str, str]:
        """{provider ref: the provider's current status word} for every message the answer lists."""
        raise NotImplementedError(f"{self.kind} has no batched status endpoint")

    def is_final_word(self, word: str) -> bool:
        """Whether a status word of the batched check means the provider has finished with the message."""
        return False

    # ---- cancel of a message the provider holds (kinds that can)
    async def cancel(self, client: httpx.AsyncClient, msg: OutboundMessage) -> bool:
        """Recall a message the provider holds. False when the kind cannot."""
        return False

    # ---- settling a send that may have started before a crash
    async def lookup(self, client: httpx.AsyncClient, msg: OutboundMessage, since: datetime) -> LookupResult:
        """Ask the provider whether `msg` arrived from a request started at or after `since`
        (an aware datetime: when the attempt's request started, by our clock).

        Call it once that request can no longer be in flight (its timeout has passed since
        `since`), or `absent` may only mean "not yet". Never raises for a network failure: that
        is `cannot_tell`. The default, for kinds with no way to ask, is `cannot_tell`.
        """
        return LookupResult.cannot_tell(f"{self.kind} {self.no_lookup_reason}")


# --------------------------------------------------------------------------- network errors
# Everything the transport may raise for a request that did not get a whole answer. httpx-aiohttp
# maps most of aiohttp's errors onto httpx's, but lets some through as they are (UploadAbortedError,
# for one), and an OSError or TimeoutError may come from below either.
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (httpx.HTTPError, aiohttp.ClientError, OSError)

# aiohttp errors raised only while the connection is being made, before any byte of the request
# was written (aiohttp ClientSession._request: the connector's errors, and a connect that timed
# out, are raised from `connector.connect()`, before `req.send(conn)`; ClientConnectorError
# covers DNS, refused, unreachable, TLS handshake and proxy connect failures).
_NOT_SENT_AIOHTTP = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)
# Without aiohttp underneath (httpx's own transport), httpcore raises these only while
# connecting or waiting for a pooled connection.
_NOT_SENT_HTTPX = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


def network_outcome(exc: BaseException) -> RetryLater:
    """Map a transport error to a retry, ambiguous unless nothing can have left.

    Only a failure that provably happened before any byte of the request left counts as not
    sent (`connect_error`, not ambiguous). httpx-aiohttp 0.2 cannot be read by the httpx class
    alone: it maps every aiohttp ClientConnectionError, refused and DNS included, but also a
    reset (ClientOSError ECONNRESET) or a closed connection (ServerDisconnectedError) after the
    request was written, to httpx.ConnectTimeout; so the aiohttp error it chains (`from`) is
    what decides. aiohttp retries a dead pooled keep-alive connection itself only for idempotent
    methods, never for the POST of a send, so a send on a pooled connection that turns out dead
    fails with ServerDisconnectedError or ClientOSError: ambiguous, since the request may have
    been written before the peer's close was seen.
    """
    if _not_sent(exc):
        return RetryLater(code="connect_error", message=_brief(exc))
    if _timed_out(exc):
        return RetryLater(code="timeout", message=_brief(exc), ambiguous=True)
    return RetryLater(code="network_error", message=_brief(exc), ambiguous=True)


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and what it was raised from (or while handling), outermost first."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _not_sent(exc: BaseException) -> bool:
    chain = _chain(exc)
    below = [e for e in chain if isinstance(e, aiohttp.ClientError)]
    if below:  # aiohttp underneath: its errors are the precise ones (all of them, should it have retried)
        return all(isinstance(e, _NOT_SENT_AIOHTTP) for e in below)
    return isinstance(exc, _NOT_SENT_HTTPX)


def _timed_out(exc: BaseException) -> bool:
    chain = _chain(exc)
    below = [e for e in chain if isinstance(e, aiohttp.ClientError)]
    if below:  # httpx-aiohttp calls a closed connection a ConnectTimeout: only aiohttp's own class tells
        return any(isinstance(e, TimeoutError) for e in below)  # ServerTimeoutError and its kinds
    return any(isinstance(e, (httpx.TimeoutException, TimeoutError)) for e in chain)


def _brief(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]


def require_config(condition: bool, key: str, problem: str) -> None:
    """Raise a ConfigError carrying the account key it concerns."""
    if not condition:
        err = ConfigError(problem)
        err.key = key  # type: ignore[attr-defined]
        raise err


# --------------------------------------------------------------------------- RT- request signing
# esimfly and eSIM Access share one scheme (esimfly in uppercase hex, eSIM Access's HMAC mode in hex).
ICCID_PATTERN = r"89[0-9]{16,20}"  # (fullmatch) ITU-T E.118: 18-22 digits starting with the telecom prefix 89


class RtHmacAuth(httpx.Auth):
    """Signs with RT-AccessCode, RT-RequestID, RT-Timestamp (ms) and RT-Signature.

    RT-Signature = hex HMAC-SHA256(secret, timestamp + requestId + accessCode + body), the body
    being the exact bytes sent. The request id is the one the builder put in `RT-RequestID`
    (the attempt key); a fresh UUID v4 only when there is none. `clock` gives epoch seconds.
    """

    requires_request_body = True

    def __init__(
        self, access_code: str, secret_key: str, *, uppercase: bool, clock: Callable[[], float] = time.time
    ) -> None:
        self._access_code = access_code
        self._secret_key = secret_key
        self._uppercase = uppercase
        self._clock = clock

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request_id = request.headers.get("RT-RequestID") or str(uuid.uuid4())
        timestamp = str(int(self._clock() * 1000))
        request.headers["RT-AccessCode"] = self._access_code
        request.headers["RT-RequestID"] = request_id
        request.headers["RT-Timestamp"] = timestamp
        request.headers["RT-Signature"] = self.signature(timestamp, request_id, request.content)
        yield request

    def signature(self, timestamp: str, request_id: str, body: bytes) -> str:
        signed = (timestamp + request_id + self._access_code).encode() + body
        digest = hmac.new(self._secret_key.encode(), signed, hashlib.sha256).hexdigest()
        return digest.upper() if self._uppercase else digest

    def __repr__(self) -> str:
        return "RtHmacAuth(access_code=***, secret_key=***)"

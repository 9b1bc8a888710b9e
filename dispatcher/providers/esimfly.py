"""esimfly (`esimfly`): POST /api/v1/business/esims/send-sms, HMAC-signed (seed 000).

* Address: `to` is the eSIM's ICCID (18-22 digits starting with 89). Instead, the option
  `esim_id` (a positive integer, or its digits as a string as the CLI passes them) names the
  eSIM by its esimfly id; `to` may then be empty, or the same id again. Both at once is refused,
  since the provider would silently prefer the ICCID.
* Text: `message`, at most 500 characters as the seed's JavaScript counts them (UTF-16 code
  units: an emoji counts 2), so validate() refuses what the provider would.
* Signing: RT-AccessCode, RT-RequestID, RT-Timestamp (ms) and RT-Signature = uppercase hex
  HMAC-SHA256(secret, timestamp + requestId + accessCode + body) over the exact bytes sent
  (`base.RtHmacAuth`). RT-RequestID is the attempt key: a fresh UUID v4 per attempt, the same one
  again only after an ambiguous failure.
* Answer: 200 {"success": true} is final (esimfly has no delivery status) -> Accepted. esimfly
  returns no message id, so `provider_ref` is None and the request id is kept in `detail`.
  Errors {"success": false, "code"} map through `_CODES`:
  - SMS_FAILED ("Failed to send SMS", the network refused delivery) -> RetryLater: the request
    was judged and answered, so a later attempt with a fresh request id cannot double-send.
  - INVALID_TIMESTAMP (older than 5 minutes: clock skew or a long stall) -> RetryLater; the next
    attempt is signed with a new timestamp. The dispatcher's attempt limit bounds repeats.
  - RATE_LIMIT_EXCEEDED / HTTP 429 -> RetryLater at X-RateLimit-Reset; 5xx -> RetryLater.
  - DUPLICATE_REQUEST -> Accepted. The attempt key is reused only after an ambiguous failure
    (timeout, dropped connection) or to settle a claim lost in a crash; providers.md: a reused
    RequestID answered with DUPLICATE_REQUEST proves the first attempt arrived. Sending again
    under a new id would risk a second SMS, so the message counts as accepted, with
    `detail["proven_by"] = "DUPLICATE_REQUEST"` to show the first answer itself was never seen.
    DUPLICATE_REQUEST proves arrival, not success: had the lost first answer been SMS_FAILED or
    ESIM_NOT_FOUND, the message is still marked accepted (validate() screens malformed ICCIDs).
  - every other documented code (bad input, unknown or foreign eSIM, bad credentials or
    signature) -> Rejected; an undocumented code follows its HTTP status.
  - a 200 whose body is not a JSON object (cut, garbled, a proxy's page) -> RetryLater
    "unreadable_answer", ambiguous: esimfly may have sent the SMS, and the retry reuses the
    RT-RequestID, so DUPLICATE_REQUEST then proves that it did (or the send simply happens).
  - 5xx -> RetryLater: esimfly said it failed (its `success: false` answer), so a fresh
    request id is right; 502 / 504 come from a gateway and are ambiguous (`base.http_outcome`):
    the retry reuses the id, and DUPLICATE_REQUEST settles it.
* Rate: published 1000/hour; X-RateLimit-Limit/Remaining/Reset, Reset given as ISO 8601 or as a
  Unix timestamp (both read by `base.parse_time`).
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any, Callable, ClassVar

import httpx

from ..config import ProviderAccount
from ..errors import InvalidAddress, InvalidOption, TextTooLong
from .base import (
    ICCID_PATTERN,
    Accepted,
    Adapter,
    OutboundMessage,
    Outcome,
    Rejected,
    RetryLater,
    RtHmacAuth,
    http_outcome,
    json_or_none,
    unreadable_success,
    utf16_length,
)

SEND_PATH = "/api/v1/business/esims/send-sms"
_ICCID = re.compile(ICCID_PATTERN)

# The provider's error code -> how the dispatcher treats it. Anything absent follows the HTTP status.
_CODES: dict[str, type[Outcome]] = {
    "MISSING_IDENTIFIER": Rejected,
    "MISSING_MESSAGE": Rejected,
    "MESSAGE_TOO_LONG": Rejected,
    "SMS_NOT_SUPPORTED": Rejected,
    "FORBIDDEN": Rejected,
    "ESIM_NOT_FOUND": Rejected,
    "INVALID_API_KEY": Rejected,
    "INVALID_SIGNATURE": Rejected,
    "HMAC_REQUIRED": Rejected,
    "INVALID_USER": Rejected,
    "INVALID_REQUEST_ID": Rejected,
    "SMS_FAILED": RetryLater,
    "INVALID_TIMESTAMP": RetryLater,
    "RATE_LIMIT_EXCEEDED": RetryLater,
    "DUPLICATE_REQUEST": Accepted,
}


class EsimflyAdapter(Adapter):
    kind: ClassVar[str] = "esimfly"
    credentials = ("access_code", "secret_key")
    options = ("esim_id",)
    max_length = 500
    default_rate_limit = "1000/h"
    has_status = False
    idempotent_retry = True
    # No look-up: esimfly returns no message id and lists nothing, but it needs none: a resend
    # with the same RT-RequestID is answered DUPLICATE_REQUEST if the first one arrived.
    no_lookup_reason = ("lists no messages; resend with the same attempt key (RT-RequestID): "
                        "DUPLICATE_REQUEST proves an earlier arrival")

    def __init__(self, account: ProviderAccount, *, clock: Callable[[], float] = time.time) -> None:
        super().__init__(account)
        self.clock = clock  # signs RT-Timestamp; injectable for tests

    def validate(self, to: str, text: str | None, options: dict[str, Any]) -> None:
        super().validate(to, text, options)
        if isinstance(text, str) and utf16_length(text) > self.max_length:
            rule = f"at most {self.max_length} UTF-16 code units for kind {self.kind!r} (an emoji counts 2)"
            raise TextTooLong("text", rule)
        if options.get("esim_id") is None:
            if not isinstance(to, str) or not _ICCID.fullmatch(to):
                raise InvalidAddress("to", "must be an ICCID: 18-22 digits starting with 89 (or pass esim_id)")
            return
        esim_id = esim_id_of(options["esim_id"])
        if esim_id is None:
            raise InvalidOption("esim_id", "must be a positive integer (the eSIM id esimfly assigned)")
        if to not in (None, "", str(esim_id)):
            rule = "give either an ICCID in to or esim_id, not both (with esim_id, to may be empty)"
            raise InvalidAddress("to", rule)

    def auth(self) -> httpx.Auth:
        return RtHmacAuth(
            self.account.get("access_code"), self.account.get("secret_key"), uppercase=True, clock=self.clock
        )

    def build_request(self, msg: OutboundMessage) -> httpx.Request:
        esim_id = esim_id_of(msg.options.get("esim_id"))
        body: dict[str, Any] = {"esimId": esim_id} if esim_id is not None else {"iccid": msg.to}
        body["message"] = msg.text
        return self.json_post(self.url(SEND_PATH), body, {"Content-Type": "application/json",
                                                          "RT-RequestID": msg.attempt_key or str(uuid.uuid4())},
                              ascii_only=False)

    def parse_response(self, response: httpx.Response, msg: OutboundMessage) -> Outcome:
        data = json_or_none(response)
        if response.status_code == 200 and not isinstance(data, dict):
            return unreadable_success(response)
        data = data if isinstance(data, dict) else {}
        request_id = _request_id(response) or msg.attempt_key or None
        if response.status_code == 200 and data.get("success") is True:
            return Accepted(detail={"request_id": request_id, "message": data.get("message")})
        code = str(data.get("code") or "")
        text = str(data.get("message") or response.text[:200] or response.reason_phrase)
        treatment = _CODES.get(code)
        if treatment is Accepted:
            return Accepted(
                provider_status=code,
                detail={"request_id": request_id, "proven_by": "DUPLICATE_REQUEST", "message": text},
            )
        if treatment is RetryLater or response.status_code == 429:
            return RetryLater(code=code or "http_429", message=text, retry_at=self._pause_until(response))
        if treatment is Rejected:
            return Rejected(code=code, message=text)
        if response.status_code == 200:
            return Rejected(code=code or "unexpected_response", message=f"200 without success: {text}")
        return http_outcome(response.status_code, code, text)

    def _pause_until(self, response: httpx.Response) -> float | None:
        signal = self.read_rate(response)
        return signal.pause_until if signal else None


def esim_id_of(value: Any) -> int | None:
    """The esim_id option as a positive 64-bit int (an int, or a string of digits), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 < value <= ESIM_ID_MAX else None
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 19 \
            and 0 < int(value) <= ESIM_ID_MAX:
        return int(value)
    return None


ESIM_ID_MAX = 2**63 - 1


def _request_id(response: httpx.Response) -> str | None:
    """The RT-RequestID the answered request carried (None for a response built without one)."""
    try:
        return response.request.headers.get("RT-RequestID")
    except RuntimeError:  # httpx: a Response built by hand has no request
        return None

"""eSIM Access (`esimaccess`): POST /api/v1/open/esim/sendSms (seed 001).

* Address: `to` is the esimTranNo (digits). Instead, the option `iccid` (18-22 digits starting
  with 89) names the eSIM; `to` may then be empty, or the same ICCID again. The esimTranNo is
  preferred: ICCIDs are recycled between customers.
* Text: `message`, at most 500 characters (providers.md; the excerpt gives no number), counted
  as UTF-16 code units like esimfly's (an emoji counts 2): the stricter reading, assumed.
* Auth, chosen per account by `auth`:
  - "header" (default, the excerpt's curl): RT-AccessCode + RT-SecretKey;
  - "hmac": RT-AccessCode, RT-RequestID (the attempt key), RT-Timestamp (ms) and RT-Signature =
    lowercase hex HMAC-SHA256(secretKey, timestamp + requestId + accessCode + body) over the
    exact bytes sent (`base.RtHmacAuth`).
  Any other value is a ConfigError on key `auth`.
* Answer: the envelope {success, errorCode, errorMsg | errorMessage, obj} is read whatever the
  HTTP status. HTTP 429 and 5xx -> RetryLater (honouring Retry-After). success true -> Accepted;
  eSIM Access returns no message id (`obj` is null), so `provider_ref` is None. Codes map through
  `_CODES`; 101001 (timestamp expired) is retried with a fresh signature; an undocumented code
  is Rejected with its code and text kept, since its meaning cannot be guessed safely.
* A 2xx whose envelope cannot be read (not a JSON object with `success`) -> RetryLater
  "unreadable_answer", ambiguous: eSIM Access answers its errors with HTTP 200 too, so a 200
  alone proves nothing, while the request did reach it. Whether that is resent follows the
  account's on_timeout, as for a timeout.
* 5xx -> RetryLater (eSIM Access said it failed); 502 / 504 are a gateway's and ambiguous
  (`base.http_outcome`): with on_timeout = "unknown" the message is not resent.
* No delivery status and no idempotency key: a 200 is final, and a resend is a new SMS.
* No look-up after a crash (`lookup` says cannot_tell): the excerpt documents only sendSms;
  there is no endpoint listing the SMS sent to an eSIM, no message id in the answer, and
  RT-RequestID is not documented to be deduplicated, so a lost answer cannot be recovered.
* Rate: published 8 requests/second.
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
    HeaderAuth,
    OutboundMessage,
    Outcome,
    Rejected,
    RetryLater,
    RtHmacAuth,
    GATEWAY_STATUSES,
    http_outcome,
    json_or_none,
    unreadable_success,
    utf16_length,
    require_config,
)

SEND_PATH = "/api/v1/open/esim/sendSms"
AUTH_MODES = ("header", "hmac")
_ESIM_TRAN_NO = re.compile(r"[0-9]{1,32}")  # the whole string (fullmatch), ASCII digits
_ICCID = re.compile(ICCID_PATTERN)

_CODES: dict[str, type[RetryLater] | type[Rejected]] = {
    "200002": Rejected,  # this operation is not allowed (SMS not supported for the package)
    "310403": Rejected,  # the eSIM transaction number does not exist
    "101001": RetryLater,  # timestamp expired: the next attempt is signed anew
    "101002": Rejected,  # IP blocked
    "101003": Rejected,  # signature mismatch
}


class EsimAccessAdapter(Adapter):
    kind: ClassVar[str] = "esimaccess"
    credentials = ("access_code", "secret_key")
    optional_credentials = {"auth": "header"}
    options = ("iccid",)
    max_length = 500
    default_rate_limit = "8/s"
    has_status = False
    idempotent_retry = False
    # Seed 001: only sendSms is documented; its answer carries no id (obj is null), nothing lists
    # the SMS sent to an eSIM, and RT-RequestID is not said to be deduplicated.
    no_lookup_reason = "cannot be asked: no message id, no list of sent SMS, no deduplicated request id"

    def __init__(self, account: ProviderAccount, *, clock: Callable[[], float] = time.time) -> None:
        super().__init__(account)
        self.auth_mode = account.get("auth", "header")
        require_config(
            self.auth_mode in AUTH_MODES, "auth", f"must be 'header' or 'hmac', got {self.auth_mode!r}"
        )
        self.clock = clock  # signs RT-Timestamp in hmac mode; injectable for tests

    def validate(self, to: str, text: str | None, options: dict[str, Any]) -> None:
        super().validate(to, text, options)
        if isinstance(text, str) and utf16_length(text) > self.max_length:
            rule = f"at most {self.max_length} UTF-16 code units for kind {self.kind!r} (an emoji counts 2)"
            raise TextTooLong("text", rule)
        iccid = options.get("iccid")
        if iccid is None:
            if not isinstance(to, str) or not _ESIM_TRAN_NO.fullmatch(to):
                raise InvalidAddress("to", "must be an esimTranNo: 1-32 digits (or pass iccid)")
            return
        if not isinstance(iccid, str) or not _ICCID.fullmatch(iccid):
            raise InvalidOption("iccid", "must be an ICCID: 18-22 digits starting with 89")
        if to not in (None, "", iccid):
            rule = "give either an esimTranNo in to or iccid, not both (with iccid, to may be empty)"
            raise InvalidAddress("to", rule)

    def auth(self) -> httpx.Auth:
        access_code, secret_key = self.account.get("access_code"), self.account.get("secret_key")
        if self.auth_mode == "hmac":
            return RtHmacAuth(access_code, secret_key, uppercase=False, clock=self.clock)
        return HeaderAuth({"RT-AccessCode": access_code, "RT-SecretKey": secret_key})

    def build_request(self, msg: OutboundMessage) -> httpx.Request:
        iccid = msg.options.get("iccid")
        body = {"iccid": iccid} if iccid else {"esimTranNo": msg.to}
        body["message"] = msg.text
        headers = {"Content-Type": "application/json"}
        if self.auth_mode == "hmac":
            headers["RT-RequestID"] = msg.attempt_key or str(uuid.uuid4())
        return self.json_post(self.url(SEND_PATH), body, headers, ascii_only=False)

    def parse_response(self, response: httpx.Response, msg: OutboundMessage) -> Outcome:
        status = response.status_code
        data = json_or_none(response)
        data = data if isinstance(data, dict) else {}
        code = "" if data.get("errorCode") in (None, "") else str(data["errorCode"])
        text = str(
            data.get("errorMsg") or data.get("errorMessage") or response.text[:200] or response.reason_phrase
        )
        if status == 429 or status >= 500:
            signal = self.read_rate(response)
            retry_at = signal.pause_until if signal else None
            return RetryLater(code=code or f"http_{status}", message=text, retry_at=retry_at,
                              ambiguous=status in GATEWAY_STATUSES)
        if 200 <= status < 300 and not isinstance(data.get("success"), bool) and not code:
            return unreadable_success(response)
        if 200 <= status < 300 and data.get("success") is True:
            obj = data.get("obj")
            return Accepted(detail={"obj": obj} if obj is not None else {})
        treatment = _CODES.get(code)
        if treatment is not None:
            return treatment(code=code, message=text)
        if code:
            return Rejected(code=code, message=text)
        if status == 200:
            return Rejected(code="unexpected_response", message=f"200 without success: {text}")
        return http_outcome(status, "", text)

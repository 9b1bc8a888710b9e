"""esimfly adapter: validation, the signed request, the answer table, and the sandbox over HTTP."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
import uuid
from datetime import datetime, timezone

import httpx
import pytest

from dispatcher.config import ProviderAccount
from dispatcher.errors import InvalidAddress, InvalidOption, TextTooLong
from dispatcher.providers import adapter_class
from dispatcher.providers.base import Accepted, OutboundMessage, Rejected, RetryLater
from dispatcher.providers.esimfly import SEND_PATH, EsimflyAdapter

SEED_ACCESS_CODE = "esf_your_access_code"
SEED_SECRET = "sk_your_secret_key"
SEED_ICCID = "8948010010036785060"
SEED_TEXT = "Welcome! Your eSIM is ready to use."
SEED_REQUEST_ID = "3f2b8c1e-7a4d-4e8b-9c2a-1d5e6f7a8b9c"
SEED_BODY = b'{"iccid":"8948010010036785060","message":"Welcome! Your eSIM is ready to use."}'
# Computed once with the seed's own algorithm (hmac/hashlib below) and written down here.
SEED_SIGNATURE = "2DBA32B826CADD2B2B7378012E05724B8495B455A20F9F627577A3E7A41D1270"
FIXED_CLOCK = lambda: 1_700_000_000.0  # noqa: E731  -> RT-Timestamp "1700000000000"


def make_adapter(base_url: str = "https://esimfly.example", access_code: str = SEED_ACCESS_CODE,
                 secret_key: str = SEED_SECRET, clock=FIXED_CLOCK) -> EsimflyAdapter:
    account = ProviderAccount(
        name="fly", kind="esimfly", base_url=base_url,
        fields={"access_code": access_code, "secret_key": secret_key},
        secret_fields=EsimflyAdapter.secret_fields(),
    )
    return EsimflyAdapter(account, clock=clock)


def make_msg(to: str = SEED_ICCID, text: str = SEED_TEXT, attempt_key: str = SEED_REQUEST_ID,
             **options) -> OutboundMessage:
    return OutboundMessage(id="m1", to=to, text=text, options=options, attempt_key=attempt_key)


def signed(adapter: EsimflyAdapter, msg: OutboundMessage) -> httpx.Request:
    """Drive the Auth flow by hand, as httpx would, and return the request it sends."""
    flow = adapter.auth().sync_auth_flow(adapter.build_request(msg))
    return next(flow)


def seed_algorithm(secret: str, timestamp: str, request_id: str, access_code: str, body: bytes) -> str:
    """The seed's Node.js example, in Python."""
    data = (timestamp + request_id + access_code).encode() + body
    return hmac.new(secret.encode(), data, hashlib.sha256).hexdigest().upper()


# --------------------------------------------------------------------------- declarations
def test_registry_finds_the_adapter_with_its_declarations():
    cls = adapter_class("esimfly")
    assert cls is EsimflyAdapter
    assert cls.credentials == ("access_code", "secret_key")
    declared = (cls.max_length, cls.default_rate_limit, cls.has_status, cls.idempotent_retry)
    assert declared == (500, "1000/h", False, True)


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize("to", ["", "123", "8948010010036785", "7948010010036785060", "89480100100367850601234",
                                "89480100100367850x0", " 8948010010036785060"])
def test_validate_refuses_a_to_that_is_not_an_iccid(to):
    with pytest.raises(InvalidAddress) as err:
        make_adapter().validate(to, "hi", {})
    assert err.value.field == "to"


@pytest.mark.parametrize("to", [SEED_ICCID, "894801001003678506", "8948010010036785060123"])
def test_validate_accepts_iccids_of_18_to_22_digits(to):
    make_adapter().validate(to, "hi", {})


def test_validate_refuses_text_over_500_characters_and_accepts_500():
    adapter = make_adapter()
    adapter.validate(SEED_ICCID, "x" * 500, {})
    with pytest.raises(TextTooLong) as err:
        adapter.validate(SEED_ICCID, "x" * 501, {})
    assert err.value.field == "text"


def test_validate_counts_text_as_the_provider_does_an_emoji_is_two():
    adapter = make_adapter()
    adapter.validate(SEED_ICCID, "x" * 498 + "👋", {})
    with pytest.raises(TextTooLong) as err:
        adapter.validate(SEED_ICCID, "x" * 499 + "👋", {})
    assert err.value.field == "text"


def test_validate_refuses_an_unknown_option_by_name():
    with pytest.raises(InvalidOption) as err:
        make_adapter().validate(SEED_ICCID, "hi", {"sender_id": "ACME"})
    assert err.value.field == "sender_id"


@pytest.mark.parametrize("to,esim_id", [("", 42), (None, "42"), ("42", 42)])
def test_validate_accepts_esim_id_with_an_empty_or_matching_to(to, esim_id):
    make_adapter().validate(to, "hi", {"esim_id": esim_id})


@pytest.mark.parametrize("esim_id", [0, -3, "abc", "4.2", True, 1.5])
def test_validate_refuses_an_esim_id_that_is_not_a_positive_integer(esim_id):
    with pytest.raises(InvalidOption) as err:
        make_adapter().validate("", "hi", {"esim_id": esim_id})
    assert err.value.field == "esim_id"


def test_validate_refuses_an_iccid_and_an_esim_id_together():
    with pytest.raises(InvalidAddress) as err:
        make_adapter().validate(SEED_ICCID, "hi", {"esim_id": 42})
    assert err.value.field == "to"


# --------------------------------------------------------------------------- the signed request
def test_signature_matches_the_seed_algorithm_on_the_fixed_vector():
    assert seed_algorithm(SEED_SECRET, "1700000000000", SEED_REQUEST_ID, SEED_ACCESS_CODE, SEED_BODY) == SEED_SIGNATURE
    request = signed(make_adapter(), make_msg())
    assert request.content == SEED_BODY
    assert request.headers["RT-Timestamp"] == "1700000000000"
    assert request.headers["RT-RequestID"] == SEED_REQUEST_ID
    assert request.headers["RT-AccessCode"] == SEED_ACCESS_CODE
    assert request.headers["RT-Signature"] == SEED_SIGNATURE


def test_request_is_a_json_post_to_the_documented_path():
    request = signed(make_adapter("https://api.esimfly.example"), make_msg())
    assert request.method == "POST"
    assert str(request.url) == "https://api.esimfly.example" + SEND_PATH
    assert request.headers["Content-Type"] == "application/json"
    assert "RT-SecretKey" not in request.headers and SEED_SECRET not in str(request.headers)


def test_signature_covers_the_exact_utf8_bytes_of_non_ascii_text():
    msg = make_msg(text="Grüße 👋 — eSIM bereit")
    request = signed(make_adapter(), msg)
    assert json.loads(request.content) == {"iccid": SEED_ICCID, "message": "Grüße 👋 — eSIM bereit"}
    assert "Grüße 👋 — eSIM bereit".encode() in request.content  # as UTF-8, as the seed client writes it, not \u-escaped
    expected = seed_algorithm(SEED_SECRET, "1700000000000", SEED_REQUEST_ID, SEED_ACCESS_CODE, request.content)
    assert request.headers["RT-Signature"] == expected


def test_esim_id_is_sent_as_an_integer_instead_of_the_iccid():
    request = signed(make_adapter(), make_msg(to="", esim_id="42"))
    assert request.content == b'{"esimId":42,"message":"Welcome! Your eSIM is ready to use."}'


def test_each_attempt_signs_its_own_timestamp_from_the_clock():
    now = [1_700_000_000.0]
    adapter = make_adapter(clock=lambda: now[0])
    first = signed(adapter, make_msg())
    now[0] += 2.5
    second = signed(adapter, make_msg())
    assert (first.headers["RT-Timestamp"], second.headers["RT-Timestamp"]) == ("1700000000000", "1700000002500")
    assert first.headers["RT-Signature"] != second.headers["RT-Signature"]


def test_a_message_without_attempt_key_still_gets_a_uuid4_request_id():
    request = signed(make_adapter(), make_msg(attempt_key=""))
    assert uuid.UUID(request.headers["RT-RequestID"]).version == 4


def test_secrets_never_show_in_reprs():
    adapter = make_adapter(access_code="esf_live_code", secret_key="sk_live_secret")
    for shown in (repr(adapter.auth()), repr(adapter.account)):
        assert "sk_live_secret" not in shown and "esf_live_code" not in shown


# --------------------------------------------------------------------------- the answer table
def answer(status: int, body, headers: dict[str, str] | None = None) -> httpx.Response:
    request = httpx.Request("POST", "https://esimfly.example" + SEND_PATH, headers={"RT-RequestID": SEED_REQUEST_ID})
    if isinstance(body, (bytes, str)):
        return httpx.Response(status, content=body, headers=headers, request=request)
    return httpx.Response(status, json=body, headers=headers, request=request)


def error(code: str, message: str = "...") -> dict:
    return {"success": False, "message": message, "code": code}


ANSWERS = [
    # status, body, outcome class, code
    (200, {"success": True, "message": "SMS sent successfully"}, Accepted, None),
    (409, error("DUPLICATE_REQUEST", "Duplicate request"), Accepted, None),
    (400, error("MISSING_IDENTIFIER", "Provide either iccid or esimId"), Rejected, "MISSING_IDENTIFIER"),
    (400, error("MISSING_MESSAGE", "Message is required"), Rejected, "MISSING_MESSAGE"),
    (400, error("MESSAGE_TOO_LONG", "Message cannot exceed 500 characters"), Rejected, "MESSAGE_TOO_LONG"),
    (400, error("SMS_NOT_SUPPORTED", "SMS is not supported for this eSIM"), Rejected, "SMS_NOT_SUPPORTED"),
    (403, error("FORBIDDEN", "You do not have permission to access this eSIM"), Rejected, "FORBIDDEN"),
    (404, error("ESIM_NOT_FOUND", "eSIM not found"), Rejected, "ESIM_NOT_FOUND"),
    (401, error("INVALID_API_KEY"), Rejected, "INVALID_API_KEY"),
    (401, error("INVALID_SIGNATURE"), Rejected, "INVALID_SIGNATURE"),
    (401, error("HMAC_REQUIRED"), Rejected, "HMAC_REQUIRED"),
    (401, error("INVALID_USER"), Rejected, "INVALID_USER"),
    (400, error("INVALID_REQUEST_ID"), Rejected, "INVALID_REQUEST_ID"),
    (400, error("SMS_FAILED", "Failed to send SMS"), RetryLater, "SMS_FAILED"),
    (401, error("INVALID_TIMESTAMP"), RetryLater, "INVALID_TIMESTAMP"),
    (429, error("RATE_LIMIT_EXCEEDED"), RetryLater, "RATE_LIMIT_EXCEEDED"),
    (429, b"Too Many Requests", RetryLater, "http_429"),
    (500, b"<html>oops</html>", RetryLater, "http_500"),
    (503, error("SERVICE_UNAVAILABLE"), RetryLater, "SERVICE_UNAVAILABLE"),
    (400, error("SOMETHING_NEW"), Rejected, "SOMETHING_NEW"),
    # a 200 that cannot be read is ambiguous: see tests/test_provider_faults.py
    (200, {"success": False, "message": "odd"}, Rejected, "unexpected_response"),
]


@pytest.mark.parametrize("status,body,kind,code", ANSWERS, ids=[f"{a[0]}-{a[3] or a[2].__name__}" for a in ANSWERS])
def test_every_documented_answer_reads_as_one_outcome(status, body, kind, code):
    outcome = make_adapter().parse_response(answer(status, body), make_msg())
    assert type(outcome) is kind
    if code is not None:
        assert outcome.code == code
    if isinstance(outcome, RetryLater):
        assert outcome.ambiguous is False  # the provider answered: a retry takes a fresh request id


def test_success_has_no_provider_ref_but_keeps_the_request_id():
    response = answer(200, {"success": True, "message": "SMS sent successfully"})
    outcome = make_adapter().parse_response(response, make_msg())
    assert outcome == Accepted(detail={"request_id": SEED_REQUEST_ID, "message": "SMS sent successfully"})


def test_duplicate_request_is_accepted_and_says_what_proved_it():
    outcome = make_adapter().parse_response(answer(409, error("DUPLICATE_REQUEST")), make_msg())
    assert outcome.provider_status == "DUPLICATE_REQUEST"
    assert outcome.detail["proven_by"] == "DUPLICATE_REQUEST" and outcome.detail["request_id"] == SEED_REQUEST_ID


def test_rejection_keeps_the_providers_message():
    outcome = make_adapter().parse_response(answer(404, error("ESIM_NOT_FOUND", "eSIM not found")), make_msg())
    assert outcome == Rejected(code="ESIM_NOT_FOUND", message="eSIM not found")


RESET_AT = float((int(time.time()) // 60 + 60) * 60)  # a whole minute about an hour ahead
_RESET_ISO = datetime.fromtimestamp(RESET_AT, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")


@pytest.mark.parametrize("reset", [_RESET_ISO + "Z", _RESET_ISO + ".000Z", str(int(RESET_AT)),
                                   str(int(RESET_AT * 1000))])
def test_rate_limit_retries_at_the_reset_whether_iso_or_unix(reset):
    headers = {"X-RateLimit-Limit": "1000", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": reset}
    response = answer(429, error("RATE_LIMIT_EXCEEDED"), headers)
    adapter = make_adapter()
    outcome = adapter.parse_response(response, make_msg())
    assert outcome.retry_at == pytest.approx(RESET_AT)
    rate = adapter.read_rate(response)
    assert (rate.limit, rate.remaining) == (1000, 0)
    assert rate.reset_at == rate.pause_until == pytest.approx(RESET_AT)


def test_rate_headers_on_a_success_are_read_without_a_pause():
    headers = {"X-RateLimit-Limit": "1000", "X-RateLimit-Remaining": "997", "X-RateLimit-Reset": "2030-01-01T12:00:00Z"}
    rate = make_adapter().read_rate(answer(200, {"success": True}, headers))
    assert (rate.limit, rate.remaining, rate.pause_until) == (1000, 997, None)


# --------------------------------------------------------------------------- against the sandbox
SMS_NOT_SUPPORTED_ICCID = "8948010010036780001"  # the twin's magic endings
SMS_FAILED_ICCID = "8948010010036780002"


def sandbox_adapter(sandbox, secret_key: str | None = None) -> EsimflyAdapter:
    creds = sandbox.credentials("esimfly")
    return make_adapter(sandbox.base_url("esimfly"), creds["access_code"], secret_key or creds["secret_key"],
                        clock=time.time)


def send(adapter: EsimflyAdapter, msg: OutboundMessage, timeout: float = 5.0):
    import dataclasses

    adapter.account = dataclasses.replace(adapter.account, timeout=timeout)  # the account's timeout applies

    async def go():
        async with httpx.AsyncClient() as client:
            return await adapter.send(client, msg)

    return asyncio.run(go())


def fresh_msg(**kwargs) -> OutboundMessage:
    return make_msg(attempt_key=str(uuid.uuid4()), **kwargs)


def test_sandbox_accepts_a_signed_send_and_sees_the_exact_request(clean_sandbox):
    creds = clean_sandbox.credentials("esimfly")
    msg = fresh_msg()
    result = send(sandbox_adapter(clean_sandbox), msg)
    assert isinstance(result.outcome, Accepted), result.outcome
    assert result.http_status == 200 and result.rate.limit == 1000 and result.rate.remaining == 999
    (seen,) = clean_sandbox.requests("esimfly")
    assert (seen.method, seen.path) == ("POST", SEND_PATH)
    assert seen.body == SEED_BODY
    assert seen.headers["RT-RequestID"] == msg.attempt_key
    assert seen.headers["RT-AccessCode"] == creds["access_code"]
    assert seen.headers["Content-Type"] == "application/json"
    expected = seed_algorithm(creds["secret_key"], seen.headers["RT-Timestamp"], msg.attempt_key,
                              creds["access_code"], seen.body)
    assert seen.headers["RT-Signature"] == expected


def test_sandbox_accepts_a_send_addressed_by_esim_id(clean_sandbox):
    result = send(sandbox_adapter(clean_sandbox), fresh_msg(to="", esim_id=42))
    assert isinstance(result.outcome, Accepted), result.outcome
    (seen,) = clean_sandbox.requests("esimfly")
    assert seen.json == {"esimId": 42, "message": SEED_TEXT}


def test_sandbox_retry_of_an_ambiguous_attempt_is_proven_accepted_by_duplicate_request(clean_sandbox):
    clean_sandbox.set_faults("esimfly", hang_next=1, hang_ms=400)
    adapter, msg = sandbox_adapter(clean_sandbox), fresh_msg()
    first = send(adapter, msg, timeout=0.1)
    assert isinstance(first.outcome, RetryLater) and first.outcome.ambiguous
    wait_until_answered(clean_sandbox, count=1)  # the first attempt did arrive and was sent
    again = send(adapter, msg)  # the dispatcher reuses the attempt key after an ambiguous failure
    assert isinstance(again.outcome, Accepted), again.outcome
    assert again.outcome.detail["proven_by"] == "DUPLICATE_REQUEST"
    codes = [(r.status, (r.response_json or {}).get("code")) for r in clean_sandbox.requests("esimfly")]
    assert codes == [(200, None), (409, "DUPLICATE_REQUEST")]


def test_sandbox_refuses_an_esim_without_sms_for_good(clean_sandbox):
    result = send(sandbox_adapter(clean_sandbox), fresh_msg(to=SMS_NOT_SUPPORTED_ICCID))
    assert result.outcome == Rejected(code="SMS_NOT_SUPPORTED", message="SMS is not supported for this eSIM")


def test_sandbox_refuses_a_wrong_secret_for_good(clean_sandbox):
    result = send(sandbox_adapter(clean_sandbox, secret_key="sk_wrong"), fresh_msg())
    assert isinstance(result.outcome, Rejected) and result.outcome.code == "INVALID_SIGNATURE"


def test_sandbox_delivery_failure_is_retried_later(clean_sandbox):
    result = send(sandbox_adapter(clean_sandbox), fresh_msg(to=SMS_FAILED_ICCID))
    assert isinstance(result.outcome, RetryLater) and result.outcome.code == "SMS_FAILED"


def test_sandbox_server_error_is_retried_later(clean_sandbox):
    clean_sandbox.set_faults("esimfly", fail_next=1)
    result = send(sandbox_adapter(clean_sandbox), fresh_msg())
    assert isinstance(result.outcome, RetryLater) and result.http_status == 500
    assert not result.outcome.ambiguous


@pytest.mark.parametrize("reset_format", ["unix", "iso"])
def test_sandbox_rate_limit_pauses_until_the_window_resets(clean_sandbox, reset_format):
    window_start = (time.time() // 60) * 60
    now = lambda: window_start + 30.0  # noqa: E731  one clock for the twin and the signer
    clean_sandbox.settings("esimfly").clock = now
    clean_sandbox.configure("esimfly", rate_limit=1, rate_window=60, extra={"reset_format": reset_format})
    adapter = sandbox_adapter(clean_sandbox)
    adapter.clock = now
    first, second = send(adapter, fresh_msg()), send(adapter, fresh_msg())
    assert isinstance(first.outcome, Accepted)
    assert (first.rate.remaining, first.rate.pause_until) == (0, window_start + 60)
    assert isinstance(second.outcome, RetryLater) and second.http_status == 429
    assert (second.outcome.code, second.outcome.retry_at) == ("RATE_LIMIT_EXCEEDED", window_start + 60)
    assert second.rate.pause_until == window_start + 60


def wait_until_answered(sandbox, count: int, deadline_s: float = 5.0) -> None:
    """Poll the sandbox log until `count` esimfly requests carry an answer."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if sum(1 for r in sandbox.requests("esimfly") if r.status is not None) >= count:
            return
        time.sleep(0.02)
    raise AssertionError(f"the sandbox answered fewer than {count} esimfly requests within {deadline_s} s")

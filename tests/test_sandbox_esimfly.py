"""The esimfly twin answers as seed 000 documents: HMAC signing, auth errors, body errors, rate limit.

Requests are built and signed here, with raw httpx, from the seed's own algorithm (never through
the adapter): uppercase hex HMAC-SHA256(secret, timestamp + requestId + accessCode + body).
Most tests run the twin alone on 127.0.0.1 with a fixed clock; the last ones go through the
whole sandbox server.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from dataclasses import dataclass, fields
from typing import Any, Iterator

import httpx
import pytest
from aiohttp import web

from dispatcher.sandbox import esimfly
from .twins import FixedClock, TwinServer
from dispatcher.sandbox.common import STATE_KEY, KindSettings

ACCESS_CODE = esimfly.DEFAULT_CREDENTIALS["access_code"]
SECRET_KEY = esimfly.DEFAULT_CREDENTIALS["secret_key"]
PATH = "/api/v1/business/esims/send-sms"
T0 = 1_780_000_000.0  # a fixed "now" for the twin's clock
GOOD_ICCID = "8948010010036785060"  # the seed's example


@dataclass
class Twin:
    client: httpx.Client
    settings: KindSettings
    state: esimfly.EsimflyState
    clock: FixedClock


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[TwinServer, KindSettings]]:
    settings = esimfly.default_settings()
    with TwinServer(esimfly.make_app(settings)) as server:
        yield server, settings


@pytest.fixture()
def twin(served) -> Iterator[Twin]:
    server, settings = served
    fresh = esimfly.default_settings()
    for f in fields(KindSettings):
        setattr(settings, f.name, getattr(fresh, f.name))
    clock = FixedClock(T0)
    settings.clock = clock
    state = server.app[STATE_KEY]
    state.reset()
    with httpx.Client(base_url=server.url, timeout=5) as client:
        yield Twin(client, settings, state, clock)


# --------------------------------------------------------------------------- signing, as the seed does it
def sign(body: bytes, *, access_code: str = ACCESS_CODE, secret: str = SECRET_KEY,
         request_id: str | None = None, timestamp: str | int | None = None) -> dict[str, str]:
    request_id = request_id or str(uuid.uuid4())
    timestamp = str(timestamp if timestamp is not None else int(T0 * 1000))
    sign_data = (timestamp + request_id + access_code).encode() + body
    signature = hmac.new(secret.encode(), sign_data, hashlib.sha256).hexdigest().upper()
    return {
        "RT-AccessCode": access_code,
        "RT-RequestID": request_id,
        "RT-Timestamp": timestamp,
        "RT-Signature": signature,
        "Content-Type": "application/json",
    }


def body_of(payload: Any) -> bytes:
    return json.dumps(payload).encode()


def send(twin: Twin, payload: Any = None, **sign_args: Any) -> httpx.Response:
    body = body_of(payload if payload is not None else {"iccid": GOOD_ICCID, "message": "Welcome!"})
    return twin.client.post(PATH, content=body, headers=sign(body, **sign_args))


def error(code: str, message: str) -> dict[str, Any]:
    return {"success": False, "message": message, "code": code}


# --------------------------------------------------------------------------- success
def test_correctly_signed_send_is_accepted_and_recorded(twin: Twin) -> None:
    request_id = str(uuid.uuid4())
    response = send(twin, {"iccid": GOOD_ICCID, "message": "Welcome! Your eSIM is ready to use."},
                    request_id=request_id)
    assert response.status_code == 200
    assert response.json() == {"success": True, "message": "SMS sent successfully"}
    [sent] = twin.state.accepted
    assert (sent.access_code, sent.request_id, sent.iccid, sent.esim_id) == (ACCESS_CODE, request_id, GOOD_ICCID, None)
    assert sent.message == "Welcome! Your eSIM is ready to use."


def test_esim_id_identifies_the_esim_when_no_iccid(twin: Twin) -> None:
    response = send(twin, {"esimId": 12345, "message": "hi"})
    assert response.status_code == 200
    assert twin.state.accepted[0].esim_id == 12345


def test_signature_covers_the_exact_bytes_sent(twin: Twin) -> None:
    body = b'{\n  "message" : "spaced out",\n  "iccid" : "8948010010036785060"\n}'
    response = twin.client.post(PATH, content=body, headers=sign(body))
    assert response.status_code == 200


def test_lowercase_signature_is_accepted_unless_uppercase_is_required(twin: Twin) -> None:
    body = body_of({"iccid": GOOD_ICCID, "message": "hi"})
    headers = sign(body)
    headers["RT-Signature"] = headers["RT-Signature"].lower()
    assert twin.client.post(PATH, content=body, headers=headers).status_code == 200
    twin.settings.extra["uppercase_signature_only"] = True
    headers = sign(body)
    headers["RT-Signature"] = headers["RT-Signature"].lower()
    response = twin.client.post(PATH, content=body, headers=headers)
    assert (response.status_code, response.json()["code"]) == (401, "INVALID_SIGNATURE")


# --------------------------------------------------------------------------- authentication errors
@pytest.mark.parametrize("missing", ["RT-AccessCode", "RT-RequestID", "RT-Timestamp", "RT-Signature"])
def test_a_missing_signing_header_is_hmac_required(twin: Twin, missing: str) -> None:
    body = body_of({"iccid": GOOD_ICCID, "message": "hi"})
    headers = sign(body)
    del headers[missing]
    response = twin.client.post(PATH, content=body, headers=headers)
    assert response.status_code == 401
    assert response.json()["code"] == "HMAC_REQUIRED"
    assert response.json()["success"] is False
    assert not twin.state.accepted


def test_unknown_access_code_is_invalid_api_key(twin: Twin) -> None:
    response = send(twin, access_code="esf_nobody")
    assert response.status_code == 401
    assert response.json() == error("INVALID_API_KEY", "Invalid API key")


@pytest.mark.parametrize(
    "request_id",
    [
        "not-a-uuid",
        "6ba7b810-9dad-11d1-80b4-00c04fd430c8",  # version 1
        "0b6e3c58-5a3e-4c1d-7f2a-3e4b5c6d7e8f",  # version 4, wrong variant
        "0b6e3c58-5a3e-4c1d-8f2a-3e4b5c6d7e8",  # one digit short
    ],
)
def test_request_id_must_be_a_uuid_v4(twin: Twin, request_id: str) -> None:
    response = send(twin, request_id=request_id)
    assert (response.status_code, response.json()["code"]) == (401, "INVALID_REQUEST_ID")


def test_uppercase_uuid_v4_request_id_is_accepted(twin: Twin) -> None:
    assert send(twin, request_id=str(uuid.uuid4()).upper()).status_code == 200


@pytest.mark.parametrize(
    ("offset_ms", "accepted"),
    [(0, True), (-300_000, True), (300_000, True), (-300_001, False), (300_001, False), (-86_400_000, False)],
)
def test_timestamp_must_be_within_five_minutes_of_the_clock(twin: Twin, offset_ms: int, accepted: bool) -> None:
    response = send(twin, timestamp=int(T0 * 1000) + offset_ms)
    if accepted:
        assert response.status_code == 200
    else:
        assert (response.status_code, response.json()["code"]) == (401, "INVALID_TIMESTAMP")


@pytest.mark.parametrize("timestamp", ["1780000000.5", "soon", str(int(T0))])
def test_timestamp_must_be_milliseconds(twin: Twin, timestamp: str) -> None:
    response = send(twin, timestamp=timestamp)
    assert (response.status_code, response.json()["code"]) == (401, "INVALID_TIMESTAMP")


def test_wrong_secret_is_invalid_signature(twin: Twin) -> None:
    response = send(twin, secret="sk_wrong")
    assert response.status_code == 401
    assert response.json() == error("INVALID_SIGNATURE", "Invalid signature")


def test_body_changed_after_signing_is_invalid_signature(twin: Twin) -> None:
    headers = sign(body_of({"iccid": GOOD_ICCID, "message": "hi"}))
    response = twin.client.post(PATH, content=body_of({"iccid": GOOD_ICCID, "message": "HI"}), headers=headers)
    assert (response.status_code, response.json()["code"]) == (401, "INVALID_SIGNATURE")
    assert not twin.state.accepted


def test_disabled_access_code_is_invalid_user(twin: Twin) -> None:
    twin.settings.extra["disabled_access_codes"] = [ACCESS_CODE]
    response = send(twin)
    assert (response.status_code, response.json()["code"]) == (401, "INVALID_USER")


# --------------------------------------------------------------------------- duplicate request ids
def test_reused_request_id_is_duplicate_request_even_when_re_signed(twin: Twin) -> None:
    request_id = str(uuid.uuid4())
    assert send(twin, request_id=request_id).status_code == 200
    twin.clock.now += 30  # a retry a little later, freshly signed
    response = send(twin, request_id=request_id, timestamp=int(twin.clock.now * 1000))
    assert response.status_code == 409
    assert response.json()["code"] == "DUPLICATE_REQUEST"
    assert len(twin.state.accepted) == 1


def test_request_id_is_spent_by_a_refused_body_but_not_by_a_bad_signature(twin: Twin) -> None:
    bad_signature = str(uuid.uuid4())
    assert send(twin, request_id=bad_signature, secret="sk_wrong").status_code == 401
    assert send(twin, request_id=bad_signature).status_code == 200

    refused_body = str(uuid.uuid4())
    assert send(twin, {"iccid": GOOD_ICCID}, request_id=refused_body).json()["code"] == "MISSING_MESSAGE"
    assert send(twin, request_id=refused_body).json()["code"] == "DUPLICATE_REQUEST"


def test_request_ids_are_per_access_code(twin: Twin) -> None:
    twin.settings.extra["accounts"] = {"esf_other": "sk_other"}
    request_id = str(uuid.uuid4())
    assert send(twin, request_id=request_id).status_code == 200
    assert send(twin, request_id=request_id, access_code="esf_other", secret="sk_other").status_code == 200


# --------------------------------------------------------------------------- body errors and magic eSIMs
@pytest.mark.parametrize(
    ("payload", "status", "code", "message"),
    [
        ({"message": "hi"}, 400, "MISSING_IDENTIFIER", "Provide either iccid or esimId"),
        ({"iccid": "", "message": "hi"}, 400, "MISSING_IDENTIFIER", "Provide either iccid or esimId"),
        ({"iccid": 8948010010036785060, "message": "hi"}, 400, "MISSING_IDENTIFIER", "Provide either iccid or esimId"),
        ({"esimId": "12345", "message": "hi"}, 400, "MISSING_IDENTIFIER", "Provide either iccid or esimId"),
        ({"iccid": GOOD_ICCID}, 400, "MISSING_MESSAGE", "Message is required"),
        ({"iccid": GOOD_ICCID, "message": ""}, 400, "MISSING_MESSAGE", "Message is required"),
        ({"iccid": GOOD_ICCID, "message": None}, 400, "MISSING_MESSAGE", "Message is required"),
        ({"iccid": GOOD_ICCID, "message": "x" * 501}, 400, "MESSAGE_TOO_LONG", "Message cannot exceed 500 characters"),
        ({"iccid": GOOD_ICCID, "message": "😀" * 251}, 400, "MESSAGE_TOO_LONG", "Message cannot exceed 500 characters"),
        ({"iccid": "8948010010036780001", "message": "hi"}, 400, "SMS_NOT_SUPPORTED", "SMS is not supported for this eSIM"),
        ({"iccid": "8948010010036780002", "message": "hi"}, 400, "SMS_FAILED", "Failed to send SMS"),
        ({"iccid": "8948010010036780003", "message": "hi"}, 403, "FORBIDDEN",
         "You do not have permission to access this eSIM"),
        ({"iccid": "8948010010036780004", "message": "hi"}, 404, "ESIM_NOT_FOUND", "eSIM not found"),
        ({"esimId": 70001, "message": "hi"}, 400, "SMS_NOT_SUPPORTED", "SMS is not supported for this eSIM"),
        ({"esimId": 70002, "message": "hi"}, 400, "SMS_FAILED", "Failed to send SMS"),
        ({"esimId": 70003, "message": "hi"}, 403, "FORBIDDEN", "You do not have permission to access this eSIM"),
        ({"esimId": 70004, "message": "hi"}, 404, "ESIM_NOT_FOUND", "eSIM not found"),
        ({"esimId": 0, "message": "hi"}, 404, "ESIM_NOT_FOUND", "eSIM not found"),
        ({"iccid": "12345", "message": "hi"}, 404, "ESIM_NOT_FOUND", "eSIM not found"),
        ({"iccid": "1948010010036785060", "message": "hi"}, 404, "ESIM_NOT_FOUND", "eSIM not found"),
        ({"iccid": "89480100100367850601234", "message": "hi"}, 404, "ESIM_NOT_FOUND", "eSIM not found"),
    ],
)
def test_documented_body_and_esim_errors(twin: Twin, payload: dict, status: int, code: str, message: str) -> None:
    response = send(twin, payload)
    assert response.status_code == status
    assert response.json() == error(code, message)
    assert not twin.state.accepted


@pytest.mark.parametrize("text", ["x" * 500, "😀" * 250, "é" * 500])
def test_message_of_exactly_500_characters_is_accepted(twin: Twin, text: str) -> None:
    assert send(twin, {"iccid": GOOD_ICCID, "message": text}).status_code == 200


def test_iccid_wins_over_esim_id(twin: Twin) -> None:
    response = send(twin, {"iccid": "8948010010036780003", "esimId": 12345, "message": "hi"})
    assert response.json()["code"] == "FORBIDDEN"


@pytest.mark.parametrize(
    ("body", "content_type"),
    [(b'{"iccid": "8948010010036785060", "message": "hi"}', "text/plain"), (b"not json", "application/json"),
     (b'["a list"]', "application/json")],
)
def test_body_must_be_a_json_object_sent_as_json(twin: Twin, body: bytes, content_type: str) -> None:
    headers = sign(body)
    headers["Content-Type"] = content_type
    response = twin.client.post(PATH, content=body, headers=headers)
    assert (response.status_code, response.json()["code"]) == (400, "INVALID_REQUEST")


# --------------------------------------------------------------------------- rate limit
def test_every_response_carries_rate_headers_and_the_limit_answers_429(twin: Twin) -> None:
    twin.settings.rate_limit = 3
    window_end = int(T0 - T0 % 3600 + 3600)
    responses = [send(twin), send(twin, secret="sk_wrong"), send(twin, {"message": "no id"}), send(twin)]
    assert [r.status_code for r in responses] == [200, 401, 400, 429]
    assert [r.headers["X-RateLimit-Remaining"] for r in responses] == ["2", "1", "0", "0"]
    assert {r.headers["X-RateLimit-Limit"] for r in responses} == {"3"}
    assert {r.headers["X-RateLimit-Reset"] for r in responses} == {str(window_end)}
    assert responses[-1].json() == error("RATE_LIMIT_EXCEEDED", "Rate limit exceeded")
    assert len(twin.state.accepted) == 1

    twin.clock.now = window_end  # the next window opens
    response = send(twin, timestamp=window_end * 1000)
    assert response.status_code == 200
    assert response.headers["X-RateLimit-Remaining"] == "2"


def test_default_limit_is_1000_per_hour(twin: Twin) -> None:
    response = send(twin)
    assert response.headers["X-RateLimit-Limit"] == "1000"
    assert response.headers["X-RateLimit-Remaining"] == "999"


def test_rate_limited_request_does_not_spend_its_request_id(twin: Twin) -> None:
    twin.settings.rate_limit = 1
    assert send(twin).status_code == 200
    request_id = str(uuid.uuid4())
    assert send(twin, request_id=request_id).status_code == 429
    twin.clock.now += 3600
    assert send(twin, request_id=request_id, timestamp=int(twin.clock.now * 1000)).status_code == 200


def test_reset_can_be_iso_8601(twin: Twin) -> None:
    twin.settings.extra["reset_format"] = "iso"
    response = send(twin)
    assert response.headers["X-RateLimit-Reset"] == "2026-05-28T21:00:00.000Z"  # T0 = 20:26:40 UTC


def test_each_access_code_has_its_own_window(twin: Twin) -> None:
    twin.settings.rate_limit = 1
    twin.settings.extra["accounts"] = {"esf_other": "sk_other"}
    assert send(twin).status_code == 200
    assert send(twin).status_code == 429
    assert send(twin, access_code="esf_other", secret="sk_other").status_code == 200


# --------------------------------------------------------------------------- through the sandbox server
def test_through_the_sandbox_a_signed_send_is_accepted_and_logged(clean_sandbox) -> None:
    creds = clean_sandbox.credentials("esimfly")
    body = body_of({"iccid": GOOD_ICCID, "message": "via the sandbox"})
    now_ms = int(clean_sandbox.settings("esimfly").clock() * 1000)
    headers = sign(body, access_code=creds["access_code"], secret=creds["secret_key"], timestamp=now_ms)
    url = clean_sandbox.base_url("esimfly") + PATH
    first = httpx.post(url, content=body, headers=headers, timeout=5)
    again = httpx.post(url, content=body, headers=headers, timeout=5)
    assert first.status_code == 200
    assert first.json() == {"success": True, "message": "SMS sent successfully"}
    assert first.headers["X-RateLimit-Limit"] == "1000"
    assert (again.status_code, again.json()["code"]) == (409, "DUPLICATE_REQUEST")
    logged = clean_sandbox.requests("esimfly")
    assert [(r.path, r.status) for r in logged] == [(PATH, 200), (PATH, 409)]
    assert logged[0].body == body

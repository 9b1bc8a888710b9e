"""The eSIM Access twin answers as seed 001 documents: the envelope on HTTP 200, both auth modes.

Requests are built here with raw httpx (never through the adapter). Header mode sends
RT-AccessCode + RT-SecretKey as the seed's curl does; HMAC mode signs hex
HMAC-SHA256(secretKey, timestamp + requestId + accessCode + body) as providers.md describes.
Most tests run the twin alone on 127.0.0.1 with a fixed clock; the last one goes through the
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

from dispatcher.sandbox import esimaccess
from .twins import FixedClock, TwinServer
from dispatcher.sandbox.common import STATE_KEY, KindSettings

ACCESS_CODE = esimaccess.DEFAULT_CREDENTIALS["access_code"]
SECRET_KEY = esimaccess.DEFAULT_CREDENTIALS["secret_key"]
PATH = "/api/v1/open/esim/sendSms"
T0 = 1_780_000_000.25  # a fixed "now" for the twin's clock
GOOD_TRAN_NO = "23072017992029"  # the seed's example
GOOD_ICCID = "8948010010036785060"
OK = {"errorCode": None, "errorMsg": None, "success": True, "obj": None}


@dataclass
class Twin:
    client: httpx.Client
    settings: KindSettings
    state: esimaccess.EsimAccessState
    clock: FixedClock


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[TwinServer, KindSettings]]:
    settings = esimaccess.default_settings()
    with TwinServer(esimaccess.make_app(settings)) as server:
        yield server, settings


@pytest.fixture()
def twin(served) -> Iterator[Twin]:
    server, settings = served
    fresh = esimaccess.default_settings()
    for f in fields(KindSettings):
        setattr(settings, f.name, getattr(fresh, f.name))
    clock = FixedClock(T0)
    settings.clock = clock
    state = server.app[STATE_KEY]
    state.reset()
    with httpx.Client(base_url=server.url, timeout=5) as client:
        yield Twin(client, settings, state, clock)


# --------------------------------------------------------------------------- the two ways to authenticate
def header_auth(access_code: str = ACCESS_CODE, secret: str = SECRET_KEY) -> dict[str, str]:
    return {"RT-AccessCode": access_code, "RT-SecretKey": secret, "Content-Type": "application/json"}


def hmac_auth(body: bytes, *, access_code: str = ACCESS_CODE, secret: str = SECRET_KEY,
              timestamp: str | int | None = None, request_id: str | None = None, upper: bool = False) -> dict[str, str]:
    timestamp = str(timestamp if timestamp is not None else int(T0 * 1000))
    request_id = request_id or uuid.uuid4().hex
    digest = hmac.new(secret.encode(), (timestamp + request_id + access_code).encode() + body, hashlib.sha256)
    signature = digest.hexdigest().upper() if upper else digest.hexdigest()
    return {
        "RT-AccessCode": access_code,
        "RT-RequestID": request_id,
        "RT-Timestamp": timestamp,
        "RT-Signature": signature,
        "Content-Type": "application/json",
    }


def body_of(payload: Any = None) -> bytes:
    return json.dumps(payload if payload is not None else {"esimTranNo": GOOD_TRAN_NO, "message": "Your Message!"}).encode()


def post(twin: Twin, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return twin.client.post(PATH, content=body, headers=headers)


def send(twin: Twin, payload: Any = None) -> httpx.Response:
    return post(twin, body_of(payload), header_auth())


def failure(code: str, text: str, field: str = "errorMsg") -> dict[str, Any]:
    return {"errorCode": code, field: text, "success": False, "obj": None}


def assert_envelope_error(response: httpx.Response, code: str) -> None:
    """Errors still come with HTTP 200: only the envelope tells."""
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"errorCode", "errorMsg", "success", "obj"}
    assert (body["errorCode"], body["success"], body["obj"]) == (code, False, None)
    assert isinstance(body["errorMsg"], str) and body["errorMsg"]


# --------------------------------------------------------------------------- success in both modes
def test_header_mode_send_is_accepted_with_the_seed_envelope(twin: Twin) -> None:
    response = send(twin)
    assert response.status_code == 200
    assert response.json() == OK
    [sent] = twin.state.accepted
    assert (sent.access_code, sent.auth, sent.esim_tran_no, sent.message) == (ACCESS_CODE, "header", GOOD_TRAN_NO, "Your Message!")


@pytest.mark.parametrize("upper", [False, True])
def test_hmac_mode_send_is_accepted_in_either_hex_case(twin: Twin, upper: bool) -> None:
    body = body_of()
    response = post(twin, body, hmac_auth(body, upper=upper))
    assert response.json() == OK
    assert twin.state.accepted[0].auth == "hmac"


def test_both_modes_at_once_must_both_hold(twin: Twin) -> None:
    body = body_of()
    good = {**hmac_auth(body), "RT-SecretKey": SECRET_KEY}
    assert post(twin, body, good).json() == OK
    assert twin.state.accepted[0].auth == "both"
    bad_signature = {**hmac_auth(body, secret="wrong"), "RT-SecretKey": SECRET_KEY}
    assert_envelope_error(post(twin, body, bad_signature), "101003")


def test_hmac_signature_covers_the_exact_bytes_sent(twin: Twin) -> None:
    body = b'{ "message":"spaced",\n "esimTranNo":"23072017992029" }'
    assert post(twin, body, hmac_auth(body)).json() == OK


def test_iccid_may_address_the_esim(twin: Twin) -> None:
    assert send(twin, {"iccid": GOOD_ICCID, "message": "hi"}).json() == OK
    assert (twin.state.accepted[0].iccid, twin.state.accepted[0].esim_tran_no) == (GOOD_ICCID, None)


# --------------------------------------------------------------------------- authentication errors, on HTTP 200
@pytest.mark.parametrize(
    "headers",
    [
        {"RT-SecretKey": SECRET_KEY, "Content-Type": "application/json"},  # no access code
        header_auth(access_code="unknown"),
        header_auth(secret="wrong"),
        {"RT-AccessCode": ACCESS_CODE, "Content-Type": "application/json"},  # neither secret nor signature
    ],
    ids=["no-access-code", "unknown-access-code", "wrong-secret", "no-secret-no-signature"],
)
def test_bad_credentials_are_101004_in_the_envelope(twin: Twin, headers: dict[str, str]) -> None:
    response = post(twin, body_of(), headers)
    assert response.json() == failure("101004", "Invalid AccessCode or SecretKey")
    assert response.status_code == 200
    assert not twin.state.accepted


def test_unknown_access_code_is_101004_in_hmac_mode_too(twin: Twin) -> None:
    body = body_of()
    assert_envelope_error(post(twin, body, hmac_auth(body, access_code="unknown")), "101004")


@pytest.mark.parametrize(
    ("offset_ms", "accepted"),
    [(0, True), (-300_000, True), (300_000, True), (-300_001, False), (300_001, False), (-3_600_000, False)],
)
def test_hmac_timestamp_window_is_five_minutes(twin: Twin, offset_ms: int, accepted: bool) -> None:
    body = body_of()
    response = post(twin, body, hmac_auth(body, timestamp=int(T0 * 1000) + offset_ms))
    if accepted:
        assert response.json() == OK
    else:
        assert response.json() == failure("101001", "The timestamp has expired")


@pytest.mark.parametrize("timestamp", ["", "yesterday", str(int(T0))])
def test_hmac_timestamp_must_be_milliseconds(twin: Twin, timestamp: str) -> None:
    body = body_of()
    headers = hmac_auth(body, timestamp=timestamp or "0")
    headers["RT-Timestamp"] = timestamp
    assert_envelope_error(post(twin, body, headers), "101001")


def test_wrong_signature_is_101003(twin: Twin) -> None:
    body = body_of()
    response = post(twin, body, hmac_auth(body, secret="wrong"))
    assert response.json() == failure("101003", "Signature mismatch")
    assert response.status_code == 200


def test_body_changed_after_signing_is_101003(twin: Twin) -> None:
    headers = hmac_auth(body_of())
    assert_envelope_error(post(twin, body_of({"esimTranNo": GOOD_TRAN_NO, "message": "other"}), headers), "101003")


def test_missing_request_id_is_101003(twin: Twin) -> None:
    body = body_of()
    headers = hmac_auth(body)
    del headers["RT-RequestID"]
    assert_envelope_error(post(twin, body, headers), "101003")


def test_blocked_switch_answers_101002_even_with_good_credentials(twin: Twin) -> None:
    twin.settings.extra["blocked"] = True
    response = send(twin)
    assert response.json() == failure("101002", "IP is blocked")
    assert response.status_code == 200


# --------------------------------------------------------------------------- body errors and magic eSIMs
@pytest.mark.parametrize(
    ("payload", "code", "text"),
    [
        ({"message": "hi"}, "100001", "esimTranNo or iccid is required"),
        ({"esimTranNo": "", "message": "hi"}, "100001", "esimTranNo or iccid is required"),
        ({"esimTranNo": 23072017992029, "message": "hi"}, "100001", "esimTranNo or iccid is required"),
        ({"esimTranNo": GOOD_TRAN_NO}, "100002", "message is required"),
        ({"esimTranNo": GOOD_TRAN_NO, "message": ""}, "100002", "message is required"),
        ({"esimTranNo": GOOD_TRAN_NO, "message": 42}, "100002", "message is required"),
        ({"esimTranNo": GOOD_TRAN_NO, "message": "x" * 501}, "100003", "message cannot exceed 500 characters"),
        ({"esimTranNo": GOOD_TRAN_NO, "message": "😀" * 251}, "100003", "message cannot exceed 500 characters"),
        ({"esimTranNo": "23072017990002", "message": "hi"}, "200002", "This operation is not allowed"),
        ({"iccid": "8948010010036780002", "message": "hi"}, "200002", "This operation is not allowed"),
        ({"esimTranNo": "23072017990403", "message": "hi"}, "310403", "The eSIM transaction number does not exist"),
        ({"iccid": "8948010010036780403", "message": "hi"}, "310403", "The eSIM transaction number does not exist"),
        ({"esimTranNo": "2307201799202", "message": "hi"}, "310403", "The eSIM transaction number does not exist"),
        ({"esimTranNo": "2307201799202X", "message": "hi"}, "310403", "The eSIM transaction number does not exist"),
        ({"iccid": "1234567890123456789", "message": "hi"}, "310403", "The eSIM transaction number does not exist"),
    ],
)
def test_body_and_esim_errors_come_in_the_envelope_on_http_200(twin: Twin, payload: dict, code: str, text: str) -> None:
    response = send(twin, payload)
    assert response.status_code == 200
    assert response.json() == failure(code, text)
    assert not twin.state.accepted


@pytest.mark.parametrize("text", ["x" * 500, "😀" * 250])
def test_message_of_500_characters_is_accepted(twin: Twin, text: str) -> None:
    assert send(twin, {"esimTranNo": GOOD_TRAN_NO, "message": text}).json() == OK


def test_esim_tran_no_wins_over_iccid(twin: Twin) -> None:
    response = send(twin, {"esimTranNo": "23072017990002", "iccid": GOOD_ICCID, "message": "hi"})
    assert response.json()["errorCode"] == "200002"


@pytest.mark.parametrize(
    ("body", "content_type"),
    [(body_of(), "text/plain"), (b"{not json", "application/json"), (b"[1, 2]", "application/json")],
)
def test_body_must_be_a_json_object_sent_as_json(twin: Twin, body: bytes, content_type: str) -> None:
    response = post(twin, body, {**header_auth(), "Content-Type": content_type})
    assert response.json() == failure("100004", "Invalid request body")


# --------------------------------------------------------------------------- errorMessage switch
def test_error_field_can_be_named_error_message(twin: Twin) -> None:
    twin.settings.extra["error_field"] = "errorMessage"
    refused = send(twin, {"esimTranNo": "23072017990403", "message": "hi"})
    assert refused.json() == failure("310403", "The eSIM transaction number does not exist", field="errorMessage")
    accepted = send(twin)
    assert accepted.json() == {"errorCode": None, "errorMessage": None, "success": True, "obj": None}


# --------------------------------------------------------------------------- rate limit
def test_ninth_request_in_a_second_is_429_with_retry_after(twin: Twin) -> None:
    responses = [send(twin) for _ in range(9)]
    assert [r.status_code for r in responses] == [200] * 8 + [429]
    assert responses[-1].json() == failure("900001", "Too many requests")
    assert responses[-1].headers["Retry-After"] == "1"
    assert len(twin.state.accepted) == 8
    twin.clock.now = int(T0) + 1.0  # the next second
    assert send(twin).json() == OK


def test_retry_after_counts_whole_seconds_to_the_window_end(twin: Twin) -> None:
    twin.settings.rate_limit, twin.settings.rate_window = 1, 60.0
    assert send(twin).status_code == 200
    response = send(twin)
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "20"  # T0 is 40.25 s into its minute


def test_each_access_code_has_its_own_window(twin: Twin) -> None:
    twin.settings.rate_limit = 1
    twin.settings.extra["accounts"] = {"esa_other": "other_secret"}
    assert send(twin).status_code == 200
    assert send(twin).status_code == 429
    assert post(twin, body_of(), header_auth("esa_other", "other_secret")).json() == OK


# --------------------------------------------------------------------------- through the sandbox server
def test_through_the_sandbox_both_modes_work_and_errors_stay_http_200(clean_sandbox) -> None:
    creds = clean_sandbox.credentials("esimaccess")
    url = clean_sandbox.base_url("esimaccess") + PATH
    body = body_of()
    by_header = httpx.post(url, content=body, headers=header_auth(creds["access_code"], creds["secret_key"]), timeout=5)
    now_ms = int(clean_sandbox.settings("esimaccess").clock() * 1000)
    signed = hmac_auth(body, access_code=creds["access_code"], secret=creds["secret_key"], timestamp=now_ms)
    by_hmac = httpx.post(url, content=body, headers=signed, timeout=5)
    refused = httpx.post(url, content=body, headers=header_auth(creds["access_code"], "wrong"), timeout=5)
    assert by_header.json() == OK and by_hmac.json() == OK
    assert (refused.status_code, refused.json()["errorCode"]) == (200, "101004")
    logged = clean_sandbox.requests("esimaccess")
    assert [(r.path, r.status, r.response_json["success"]) for r in logged] == [
        (PATH, 200, True), (PATH, 200, True), (PATH, 200, False)]

"""The emnify twin over real HTTP: token exchange, send/list/get/cancel, limits, delivery states."""

from __future__ import annotations

import base64
import json

import httpx
import pytest

from .twins import FixedClock, fixed_clock_on

T0 = 1_800_000_000.0  # a multiple of 300: the start of a rate window
ERROR_KEYS = {"error_code", "error_token", "message"}


@pytest.fixture()
def clock(clean_sandbox) -> FixedClock:
    return fixed_clock_on(clean_sandbox, "emnify", T0)


@pytest.fixture()
def raw(clean_sandbox, clock):
    with httpx.Client(base_url=clean_sandbox.base_url("emnify")) as client:
        yield client


def authenticate(raw: httpx.Client, token: str = "sandbox-emnify-application-token") -> httpx.Response:
    return raw.post("/api/v1/authenticate", json={"application_token": token})


@pytest.fixture()
def api(raw):
    raw.headers["Authorization"] = "Bearer " + authenticate(raw).json()["auth_token"]
    return raw


def send(api: httpx.Client, endpoint: int | str = 12345, **fields) -> httpx.Response:
    body = {"source_address": 12345, "payload": "This is the message text"}
    body.update(fields)
    return api.post(f"/api/v1/endpoint/{endpoint}/sms", json={k: v for k, v in body.items() if v is not None})


def sms_path(response: httpx.Response) -> str:
    """The twin's Location carries the mount (/emnify); the client's base_url already has it."""
    return response.headers["Location"].removeprefix("/emnify")


def assert_error(response: httpx.Response, status: int, token: str) -> None:
    assert response.status_code == status
    assert set(response.json()) == ERROR_KEYS
    assert (response.json()["error_code"], response.json()["error_token"]) == (status, token)


def test_the_application_token_is_exchanged_for_a_jwt(raw, clean_sandbox):
    r = authenticate(raw)
    assert r.status_code == 200
    head, claims, signature = r.json()["auth_token"].split(".")
    decoded = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))
    assert decoded["exp"] - decoded["iat"] == 3600 and signature
    assert [e.path for e in clean_sandbox.requests("emnify")] == ["/api/v1/authenticate"]


@pytest.mark.parametrize("body", [{"application_token": "wrong"}, {}, {"application_token": ""}])
def test_a_wrong_application_token_is_401(raw, body):
    assert_error(raw.post("/api/v1/authenticate", json=body), 401, "invalid_application_token")


def test_calls_without_a_known_token_are_401(raw):
    assert_error(send(raw), 401, "invalid_token")
    assert_error(raw.get("/api/v1/endpoint/1/sms", headers={"Authorization": "Bearer abc.def.ghi"}), 401, "invalid_token")


def test_a_token_expires_after_its_ttl(api, clock, clean_sandbox):
    clean_sandbox.configure("emnify", extra={"token_ttl": 60})
    api.headers["Authorization"] = "Bearer " + authenticate(api).json()["auth_token"]
    clock.now += 59
    assert send(api).status_code == 201
    clock.now += 1
    assert_error(send(api), 401, "token_expired")


def test_a_send_is_201_with_an_empty_body_and_a_location(api):
    r = send(api, source_address="12345689")  # the seed's curl sends the address as a string
    assert r.status_code == 201 and r.content == b""
    assert r.headers["Location"].startswith("/emnify/api/v1/endpoint/12345/sms/")
    sms = api.get(sms_path(r)).json()
    assert sms["id"] == int(r.headers["Location"].rsplit("/", 1)[1])
    assert (sms["source_address"], sms["payload"], sms["udh"], sms["dcs"]) == ("12345689", "This is the message text", None, 0)
    assert set(sms) >= {"submit_date", "delivery_date", "expiry_date", "final_date", "retry_date", "retry_count", "status"}


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"source_address": None}, "source_address"),
        ({"source_address": True}, "source_address"),
        ({"source_address": "not a valid sender"}, "source_address"),
        ({"payload": None}, "payload"),
        ({"payload": "a" * 161}, "at most 160"),
        ({"payload": "€" * 81}, "at most 160"),
        ({"payload": "ж" * 71}, "at most 70"),
        ({"payload": "a" * 154, "udh": "050003CC0201"}, "at most 153"),
        ({"payload": "ж" * 68, "udh": "050003CC0201"}, "at most 67"),
        ({"udh": "05000"}, "udh"),
        ({"dcs": 4}, "dcs"),
        ({"payload": "привет", "dcs": 0}, "dcs 8"),
    ],
)
def test_invalid_sends_are_422_in_emnify_error_shape(api, fields, words):
    r = send(api, **fields)
    assert_error(r, 422, "validation_failed")
    assert words in r.json()["message"]


def test_payloads_at_the_limit_are_accepted(api):
    assert send(api, payload="a" * 160).status_code == 201
    assert send(api, payload="ж" * 70).status_code == 201
    assert send(api, payload="a" * 153, udh="050003CC0201").status_code == 201


def test_endpoint_ids_must_be_positive_integers_that_exist(api):
    assert_error(send(api, endpoint="abc"), 400, "invalid_endpoint_id")
    assert_error(send(api, endpoint=0), 400, "invalid_endpoint_id")
    assert_error(send(api, endpoint=900000), 404, "endpoint_not_found")
    assert_error(api.get("/api/v1/endpoint/12345/sms/999999"), 404, "sms_not_found")


def status_of(api: httpx.Client, path: str) -> int:
    return api.get(path).json()["status"]["id"]


def test_status_goes_pending_in_progress_delivered(api, clock):
    path = sms_path(send(api))
    assert status_of(api, path) == 1
    clock.now += 0.5
    assert status_of(api, path) == 2
    clock.now += 0.5
    sms = api.get(path).json()
    assert sms["status"] == {"id": 4, "description": "Delivered"}
    assert sms["delivery_date"] == sms["final_date"] == "2027-01-15T08:00:01.000+0000"


def test_endpoints_ending_13_fail(api, clock):
    path = sms_path(send(api, endpoint=4513))
    clock.now += 1
    assert api.get(path).json()["status"] == {"id": 5, "description": "Failed"}


def test_endpoints_ending_77_buffer_until_cancelled(api, clock):
    path = sms_path(send(api, endpoint=1077))
    assert_error(api.delete(path), 409, "sms_not_buffered")  # still pending
    clock.now += 600  # offline for ten minutes: still buffered
    assert status_of(api, path) == 3
    assert api.delete(path).status_code == 204
    assert api.get(path).json()["status"] == {"id": 7, "description": "Canceled"}
    assert_error(api.delete(path), 409, "sms_not_buffered")


def test_a_buffered_sms_expires_at_its_expiry_date(api, clock, clean_sandbox):
    clean_sandbox.configure("emnify", extra={"sms_validity": 60})
    path = sms_path(send(api, endpoint=1077))
    clock.now += 60
    sms = api.get(path).json()
    assert sms["status"]["id"] == 6 and sms["final_date"] == sms["expiry_date"]


def test_a_delivered_sms_cannot_be_cancelled(api, clock):
    path = sms_path(send(api))
    clock.now += 1
    assert_error(api.delete(path), 409, "sms_not_buffered")


def test_the_list_is_newest_first_and_per_endpoint(api):
    ids = [int(send(api, payload=f"m{i}").headers["Location"].rsplit("/", 1)[1]) for i in range(3)]
    send(api, endpoint=222)
    listed = api.get("/api/v1/endpoint/12345/sms").json()
    assert [s["id"] for s in listed] == ids[::-1]
    assert [s["id"] for s in api.get("/api/v1/endpoint/12345/sms", params={"per_page": 2, "page": 2}).json()] == [ids[0]]


def test_the_request_limit_per_source_answers_429_with_retry_after(api, clock, clean_sandbox):
    clean_sandbox.configure("emnify", rate_limit=3)  # the token exchange in `api` was the first
    clock.now = T0 + 100.2
    assert [send(api).status_code for _ in range(2)] == [201, 201]
    r = send(api)
    assert_error(r, 429, "rate_limit_exceeded")
    assert r.headers["Retry-After"] == "200"
    clock.now = T0 + 300
    assert send(api).status_code == 201


def test_authentication_has_its_own_smaller_limit(raw, clean_sandbox):
    clean_sandbox.configure("emnify", extra={"auth_rate_limit": 2})
    assert [authenticate(raw).status_code for _ in range(3)] == [200, 200, 429]
    assert raw.get("/api/v1/endpoint/1/sms").status_code == 401  # other calls are not held back


def test_faults_use_emnify_error_shape(api, clean_sandbox):
    clean_sandbox.set_faults("emnify", fail_next=1, fail_status=500)
    assert_error(send(api), 500, "injected_failure")

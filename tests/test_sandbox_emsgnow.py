"""The eMsgNow twin over real HTTP: keys, validation, rate-limit headers, delivery events (seed 004)."""

from __future__ import annotations

import re

import httpx
import pytest

from .twins import FixedClock, fixed_clock_on

KEY = "sandbox-emsgnow-key"
T0 = 1_800_000_000.0  # a window start: 1_800_000_000 % 60 == 0


@pytest.fixture()
def clock(clean_sandbox) -> FixedClock:
    return fixed_clock_on(clean_sandbox, "emsgnow", T0)


@pytest.fixture()
def api(clean_sandbox, clock):
    with httpx.Client(base_url=clean_sandbox.base_url("emsgnow"), headers={"x-api-key": KEY}) as client:
        yield client


def send(api: httpx.Client, **fields) -> httpx.Response:
    body = {"to": "+254712345678", "from": "ACME", "message": "Hello"}
    body.update(fields)
    return api.post("/sms", json={k: v for k, v in body.items() if v is not None})


def test_a_send_without_a_key_is_refused_401(api):
    r = api.post("/sms", json={"to": "+1234567890", "from": "X", "message": "hi"}, headers={"x-api-key": ""})
    assert r.status_code == 401
    assert r.json() == {"error": "API key is required"}


def test_a_wrong_key_is_refused_403_on_send_and_on_reads(api):
    assert api.post("/sms", json={}, headers={"x-api-key": "nope"}).json() == {"error": "Invalid API key"}
    assert api.get("/sms/0123456789abcdef", headers={"x-api-key": "nope"}).status_code == 403


def test_a_valid_send_returns_a_16_hex_tracking_id(api):
    r = send(api)
    assert r.status_code == 200
    assert r.json()["message"] == "SMS received successfully"
    assert re.fullmatch(r"[0-9a-f]{16}", r.json()["trackingId"])


def test_the_seed_templated_example_is_accepted_and_rendered(api):
    r = api.post("/sms", json={
        "to": "1234567890", "from": "XXXXXXXXXX", "templateId": "gPVTbWpwQHXgg8KSZ6sX",
        "clientId": "23948729438slkdfjwkfjhsdfsdf", "variables": {"name": "Jane Doe", "etor": "10:49pm"},
    })
    assert r.status_code == 200
    details = api.get(f"/sms/{r.json()['trackingId']}").json()
    assert details["message"] == "Hello Jane Doe, your appointment is at 10:49pm."
    assert details["clientId"] == "23948729438slkdfjwkfjhsdfsdf"


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"to": None}, "to"),
        ({"to": "+25471234567x"}, "to"),
        ({"to": "+254 712 345 678"}, "to"),
        ({"from": None}, "from"),
        ({"message": None}, "message or templateId"),
        ({"templateId": "gPVTbWpwQHXgg8KSZ6sX"}, "message and templateId"),
        ({"message": "x" * 161}, "message"),
        ({"clientId": "c" * 101}, "clientId"),
        ({"messageType": "mms"}, "messageType"),
        ({"notBefore": "tomorrow"}, "notBefore"),
        ({"notAfter": "2030-01-01T10:00:00+02:00"}, "notAfter"),
        ({"notBefore": "2030-01-02T00:00:00Z", "notAfter": "2030-01-01T00:00:00Z"}, "notAfter"),
        ({"message": None, "templateId": "t1", "variables": ["a"]}, "variables"),
    ],
)
def test_invalid_sends_are_refused_400_naming_the_field(api, fields, field):
    r = send(api, **fields)
    assert r.status_code == 400
    assert field in r.json()["error"]


def test_limits_at_the_boundary_are_accepted(api):
    assert send(api, message="x" * 160, clientId="c" * 100, to="1234567890").status_code == 200


def test_every_response_carries_rate_headers_and_the_limit_answers_429(api, clean_sandbox, clock):
    clean_sandbox.configure("emsgnow", rate_limit=3)
    clock.now = T0 + 15.2
    remaining = [send(api).headers["X-RateLimit-Remaining"] for _ in range(2)]
    read = api.get("/sms/0123456789abcdef")  # reads count in the same window and carry the headers
    assert remaining == ["2", "1"] and read.headers["X-RateLimit-Remaining"] == "0"
    refused = send(api)
    assert refused.status_code == 429
    assert refused.json() == {"error": "Rate limit exceeded"}
    assert refused.headers["X-RateLimit-Limit"] == "3"
    assert refused.headers["X-RateLimit-Reset"] == "45"  # whole seconds until the minute ends
    clock.now = T0 + 60.0
    assert send(api).status_code == 200


def test_the_limit_is_per_api_key(api, clean_sandbox):
    clean_sandbox.configure("emsgnow", rate_limit=1, extra={"api_keys": ["second-key"]})
    assert send(api).status_code == 200
    assert send(api).status_code == 429
    other = api.post("/sms", json={"to": "+1234567890", "from": "X", "message": "hi"}, headers={"x-api-key": "second-key"})
    assert other.status_code == 200


def statuses(api: httpx.Client, tracking_id: str) -> list[str]:
    return [e["message"]["status"] for e in api.get(f"/sms/{tracking_id}/events").json()["events"]]


def test_events_advance_with_the_clock_and_keep_their_ids(api, clock):
    step = 0.5  # the default delivery_step
    tid = send(api, clientId="c-1").json()["trackingId"]
    assert statuses(api, tid) == ["processing"]
    clock.now += step
    assert statuses(api, tid) == ["processing", "sent to provider"]
    clock.now += step
    details = api.get(f"/sms/{tid}").json()
    assert [e["message"]["status"] for e in details["events"]] == ["processing", "sent to provider", "delivered"]
    assert details["updated"] == details["events"][-1]["timestamp"]
    first = details["events"][0]
    assert re.fullmatch(r"[A-Za-z0-9]{20}", first["id"])
    assert first["message"]["trackingId"] == tid and first["message"]["clientId"] == "c-1"
    one = api.get(f"/sms/{tid}/events/{first['id']}").json()
    assert one["messageId"] == tid and one["id"] == first["id"] and one["message"]["status"] == "processing"


def test_a_number_ending_0000_ends_failed(api, clock):
    tid = send(api, to="+15550000000").json()["trackingId"]
    clock.now += 10
    assert statuses(api, tid) == ["processing", "sent to provider", "failed"]


def test_a_scheduled_message_starts_processing_at_not_before(api, clock):
    tid = send(api, notBefore="2027-01-15T08:00:10.000Z").json()["trackingId"]  # T0 = 2027-01-15T08:00:00Z
    assert statuses(api, tid) == []
    clock.now = T0 + 10
    assert statuses(api, tid) == ["processing"]


def test_not_after_passing_before_sending_expires_the_message(api, clock):
    tid = send(api, notBefore="2027-01-15T08:00:10Z", notAfter="2027-01-15T08:00:10.200Z").json()["trackingId"]
    clock.now = T0 + 20
    assert statuses(api, tid) == ["processing", "expired"]


def test_unknown_messages_and_events_are_404(api):
    assert api.get("/sms/ffffffffffffffff").json() == {"error": "SMS not found"}
    assert api.get("/sms/ffffffffffffffff/events").status_code == 404
    tid = send(api).json()["trackingId"]
    assert api.get(f"/sms/{tid}/events/AAAAAAAAAAAAAAAAAAAA").status_code == 404


def test_a_message_is_visible_only_to_its_own_key(api, clean_sandbox):
    clean_sandbox.configure("emsgnow", extra={"api_keys": ["second-key"]})
    tid = send(api).json()["trackingId"]
    assert api.get(f"/sms/{tid}", headers={"x-api-key": "second-key"}).status_code == 404


def test_reset_forgets_messages(api, clean_sandbox):
    tid = send(api).json()["trackingId"]
    clean_sandbox.reset()
    assert api.get(f"/sms/{tid}").status_code == 404

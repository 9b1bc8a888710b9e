"""The eSMS Africa twin over real HTTP: Bearer key, documented errors, scheduling, idempotency, timeline."""

from __future__ import annotations

import re

import httpx
import pytest

from .twins import FixedClock, fixed_clock_on

KEY = "esms_test_sandbox_key"
T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z, a minute boundary
SEND = "/api/messages/send"


@pytest.fixture()
def clock(clean_sandbox) -> FixedClock:
    return fixed_clock_on(clean_sandbox, "esms_africa", T0)


@pytest.fixture()
def api(clean_sandbox, clock):
    base = clean_sandbox.base_url("esms_africa")
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield client


def send(api: httpx.Client, headers: dict[str, str] | None = None, **fields) -> httpx.Response:
    body = {"to": "+256712345678", "text": "Hello from eSMS Africa!", "sender_id": "eSMSAfrica"}
    body.update(fields)
    return api.post(SEND, json={k: v for k, v in body.items() if v is not None}, headers=headers)


@pytest.mark.parametrize("auth", [None, "Bearer wrong", "Basic " + KEY, "Bearer"])
def test_missing_or_invalid_keys_are_401(api, auth):
    headers = {"Authorization": auth} if auth else {}
    r = httpx.post(str(api.base_url) + SEND, json={"to": "+256712345678", "text": "x"}, headers=headers)
    assert r.status_code == 401
    assert r.json() == {"detail": "Missing or invalid API key"}


def test_the_seed_example_answers_with_the_documented_shape(api):
    r = send(api)
    assert r.status_code == 200
    body = r.json()
    assert re.fullmatch(r"msg-[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", body["id"])
    assert {k: body[k] for k in body if k not in ("id", "balance_after")} == {
        "status": "submitted", "segments": 1, "cost": 1.2022, "cost_currency": "KES", "route_cost": 35.0,
        "route_currency": "UGX", "route": "ESMS_UG", "scheduled_at": None,
    }
    assert body["balance_after"] == pytest.approx(1_000_000.0 - 1.2022)


@pytest.mark.parametrize(
    "text, segments",
    [("a" * 160, 1), ("a" * 161, 2), ("a" * 306, 2), ("a" * 307, 3), ("€" * 80, 1), ("€" * 81, 2),
     ("ü" * 160, 1), ("ж" * 70, 1), ("ж" * 71, 2), ("😀" * 35, 1), ("😀" * 36, 2)],
)
def test_segments_follow_gsm7_and_ucs2_rules(api, text, segments):
    assert send(api, text=text).json()["segments"] == segments


def test_routes_are_detected_from_the_country_code_and_priced_per_segment(api):
    r = send(api, to="+254712345678", text="b" * 200).json()
    assert (r["route"], r["route_currency"], r["segments"], r["cost_currency"]) == ("ESMS_KE", "KES", 2, "KES")
    assert r["route_cost"] == r["cost"] == 1.6
    assert send(api, to="+255712345678", route="ESMS_TZ").json()["route"] == "ESMS_TZ"


@pytest.mark.parametrize(
    "fields, missing",
    [({"to": None}, ["to"]), ({"text": None}, ["text"]), ({"to": None, "text": None}, ["to", "text"])],
)
def test_missing_fields_are_listed_fastapi_style(api, fields, missing):
    r = send(api, **fields)
    assert r.status_code == 400
    assert [(e["loc"], e["type"]) for e in r.json()["detail"]] == [(["body", m], "missing") for m in missing]


def test_ill_typed_fields_are_listed(api):
    r = send(api, text=42, schedule_mode="later")
    assert r.status_code == 400
    assert {(tuple(e["loc"]), e["type"]) for e in r.json()["detail"]} == {
        (("body", "text"), "string_type"), (("body", "schedule_mode"), "literal_error")}


def code_of(r: httpx.Response) -> tuple[int, str]:
    return r.status_code, r.json()["detail"]["code"]


@pytest.mark.parametrize("to", ["256712345678", "+256 712 345 678", "+256-712345678", "+2567", "+2567123456789012"])
def test_numbers_not_in_e164_are_invalid_phone(api, to):
    assert code_of(send(api, to=to)) == (400, "invalid_phone")


@pytest.mark.parametrize("to, route", [("+14155550123", None), ("+201001234567", None), ("+256712345678", "ESMS_KE"),
                                       ("+256712345678", "ESMS_XX")])
def test_destinations_without_a_route_are_no_route(api, to, route):
    assert code_of(send(api, to=to, route=route)) == (400, "no_route")


def test_more_than_ten_segments_is_text_too_long(api):
    assert send(api, text="a" * 1530).status_code == 200  # 10 x 153
    assert code_of(send(api, text="a" * 1531)) == (400, "text_too_long")


def test_sender_ids_must_be_approved_for_the_country(api):
    r = send(api, sender_id="Unknown")
    assert r.status_code == 403
    assert r.json()["detail"] == "Sender ID 'Unknown' not found or not approved. Check your sender IDs at /sender-ids"
    r = send(api, sender_id="MyApp")  # to +256: Uganda
    assert r.status_code == 403
    assert r.json()["detail"] == "Sender ID 'MyApp' is not approved for UG. Approved countries: KE, TZ"
    assert send(api, sender_id="MyApp", to="+254712345678").status_code == 200


def test_a_read_only_key_may_read_but_not_send(api):
    r = send(api, headers={"Authorization": "Bearer esms_test_readonly"})
    assert code_of(r) == (403, "insufficient_scope")
    r = api.get("/api/messages/status", params={"ids": "msg-x"}, headers={"Authorization": "Bearer esms_test_readonly"})
    assert r.status_code == 200


def test_a_wallet_below_the_cost_is_insufficient_balance_and_sends_debit_it(api, clean_sandbox):
    clean_sandbox.configure("esms_africa", extra={"balance": 2.0})
    assert send(api).json()["balance_after"] == pytest.approx(0.7978)
    r = send(api)
    assert r.status_code == 422
    assert r.json()["detail"] == {"code": "insufficient_balance", "message": "Balance KES 0.80 < estimated cost KES 1.20",
                                  "balance": 0.7978, "cost": 1.2022}


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"schedule_mode": "scheduled"}, "required"),
        ({"schedule_mode": "scheduled", "scheduled_at": "2027-01-15T09:00:00+00:00"}, "YYYY-MM-DDThh:mm:ssZ"),
        ({"schedule_mode": "scheduled", "scheduled_at": "2027-01-15T09:00Z"}, "YYYY-MM-DDThh:mm:ssZ"),
        ({"schedule_mode": "scheduled", "scheduled_at": "2027-01-15T08:04:59Z"}, "at least 5 minutes"),
        ({"schedule_mode": "scheduled", "scheduled_at": "2027-01-22T08:00:01Z"}, "at most 7 days"),
        ({"scheduled_at": "2027-01-15T09:00:00Z"}, "schedule_mode"),
    ],
)
def test_bad_schedules_are_400_saying_why(api, fields, words):
    r = send(api, **fields)
    assert code_of(r) == (400, "invalid_schedule")
    assert words in r.json()["detail"]["message"]


def test_a_scheduled_message_waits_for_its_time(api, clock):
    r = send(api, schedule_mode="scheduled", scheduled_at="2027-01-15T08:05:00Z").json()
    assert (r["status"], r["scheduled_at"]) == ("scheduled", "2027-01-15T08:05:00+00:00")
    assert api.get(f"/api/messages/{r['id']}").json()["status"] == "scheduled"
    clock.now = T0 + 300 + 0.5
    msg = api.get(f"/api/messages/{r['id']}").json()
    assert [e["status"] for e in msg["timeline"]] == ["scheduled", "queued", "submitted", "sent"]
    assert msg["timeline"][1]["at"] == "2027-01-15T08:05:00+00:00"


def test_the_latest_boundaries_of_a_schedule_are_accepted(api):
    assert send(api, schedule_mode="scheduled", scheduled_at="2027-01-15T08:05:00Z").status_code == 200
    assert send(api, schedule_mode="scheduled", scheduled_at="2027-01-22T08:00:00Z").status_code == 200


def test_the_timeline_advances_to_delivered(api, clock):
    msg_id = send(api).json()["id"]
    assert api.get(f"/api/messages/{msg_id}").json()["status"] == "submitted"
    clock.now += 1.0  # two delivery steps
    msg = api.get(f"/api/messages/{msg_id}").json()
    assert [e["status"] for e in msg["timeline"]] == ["queued", "submitted", "sent", "delivered"]
    assert msg["status"] == "delivered" and msg["updated_at"] == msg["timeline"][-1]["at"]


def test_a_number_ending_0000_is_retried_twice_then_fails(api, clock):
    msg_id = send(api, to="+254700000000").json()["id"]
    clock.now += 1.0
    assert api.get(f"/api/messages/{msg_id}").json()["status"] == "retrying"
    clock.now += 5.0
    statuses = [e["status"] for e in api.get(f"/api/messages/{msg_id}").json()["timeline"]]
    assert statuses == ["queued", "submitted", "sent", "retrying", "retrying", "failed"]


def test_the_status_endpoint_lists_known_ids_and_caps_at_100(api, clock):
    first, second = send(api).json()["id"], send(api, to="+254700000000").json()["id"]
    clock.now += 1.0
    r = api.get("/api/messages/status", params={"ids": f"{second},msg-unknown,{first}"})
    assert [(m["id"], m["status"]) for m in r.json()] == [(second, "retrying"), (first, "delivered")]
    too_many = ",".join(f"msg-{i}" for i in range(101))
    assert code_of(api.get("/api/messages/status", params={"ids": too_many})) == (400, "too_many_ids")
    assert api.get("/api/messages/status").status_code == 400


def test_unknown_messages_are_404(api):
    r = api.get("/api/messages/msg-00000000-0000-4000-8000-000000000000")
    assert r.status_code == 404 and r.json() == {"detail": "Message not found"}


def test_an_idempotency_key_repeats_the_first_answer_and_sends_nothing_new(api):
    first = send(api, headers={"Idempotency-Key": "k-1"})
    again = send(api, headers={"Idempotency-Key": "k-1"}, text="different")
    other = send(api, headers={"Idempotency-Key": "k-2"})
    assert again.json() == first.json()
    assert other.json()["id"] != first.json()["id"]
    assert other.json()["balance_after"] == pytest.approx(first.json()["balance_after"] - 1.2022)


def test_the_rate_limit_answers_429_with_retry_after(api, clean_sandbox, clock):
    clean_sandbox.configure("esms_africa", rate_limit=2)
    clock.now = T0 + 50.5
    assert [send(api).status_code for _ in range(2)] == [200, 200]
    r = send(api)
    assert r.status_code == 429 and r.headers["Retry-After"] == "10"
    assert r.json() == {"detail": "Rate limit exceeded"}
    clock.now = T0 + 60
    assert send(api).status_code == 200


def test_faults_use_the_provider_error_shape(api, clean_sandbox):
    clean_sandbox.set_faults("esms_africa", fail_next=1, fail_status=503)
    r = send(api)
    assert r.status_code == 503 and r.json() == {"detail": "injected failure"}

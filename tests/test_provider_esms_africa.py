"""eSMS Africa adapter: E.164 validation, the request, scheduling, the answer tables, the sandbox."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime, timedelta, timezone

import httpx
import pytest

from dispatcher.config import ProviderAccount
from dispatcher.errors import InvalidAddress, InvalidOption, MissingField, TextTooLong
from dispatcher.providers import adapter_class
from dispatcher.providers.base import Accepted, OutboundMessage, Rejected, RetryLater
from dispatcher.providers.esms_africa import SEND_PATH, EsmsAfricaAdapter

BASE = "https://sms.esmsafrica.example"
API_KEY = "esms_live_secret_key"
NOW = datetime(2026, 5, 30, 7, 0, 0, tzinfo=timezone.utc)
SEED_ANSWER = {
    "id": "msg-a1b2c3d4-e5f6-7890-abcd-ef1234567890", "status": "submitted", "segments": 1, "cost": 1.2022,
    "cost_currency": "KES", "route_cost": 35.0, "route_currency": "UGX", "route": "ESMS_UG",
    "balance_after": 1965.0, "scheduled_at": None,
}


def make_adapter(base_url: str = BASE, api_key: str = API_KEY, clock=lambda: NOW.timestamp(),
                 **defaults) -> EsmsAfricaAdapter:
    account = ProviderAccount(name="africa", kind="esms_africa", base_url=base_url,
                              fields={"api_key": api_key, **defaults},
                              secret_fields=EsmsAfricaAdapter.secret_fields())
    return EsmsAfricaAdapter(account, clock=clock)


def make_msg(to: str = "+256712345678", text: str = "Hello from eSMS Africa!", attempt_key: str = "key-1",
             not_before: datetime | None = None, provider_ref: str | None = None, **options) -> OutboundMessage:
    return OutboundMessage(id="m1", to=to, text=text, options=options, attempt_key=attempt_key,
                           not_before=not_before, provider_ref=provider_ref)


# --------------------------------------------------------------------------- declarations and validation
def test_registry_finds_the_adapter_with_its_declarations():
    cls = adapter_class("esms_africa")
    assert cls is EsmsAfricaAdapter
    assert cls.credentials == ("api_key",)
    assert cls.defaults == cls.options == ("sender_id", "route")
    assert (cls.max_length, cls.has_status, cls.idempotent_retry) == (1530, True, True)


@pytest.mark.parametrize("to", ["+254712345678", "+256712345678", "+255712345678", "+14155550123"])
def test_validate_accepts_valid_e164_numbers(to):
    make_adapter().validate(to, "hi", {})


@pytest.mark.parametrize("to", [
    "254712345678",      # no +
    "+254 712 345678",   # spaces
    "+254-712-345678",   # dashes
    "+254(712)345678",   # brackets
    "+2547123",          # too short for Kenya
    "+99912345678",      # no such country code
    "+0712345678",
    "",
    "+25471234567890123",
])
def test_validate_refuses_what_is_not_a_valid_e164_number(to):
    with pytest.raises(InvalidAddress) as err:
        make_adapter().validate(to, "hi", {})
    assert err.value.field == "to"


def test_validate_requires_text_and_bounds_it_at_ten_segments():
    adapter = make_adapter()
    adapter.validate("+256712345678", "x" * 1530, {})
    with pytest.raises(MissingField) as err:
        adapter.validate("+256712345678", "", {})
    assert err.value.field == "text"
    with pytest.raises(TextTooLong):
        adapter.validate("+256712345678", "x" * 1531, {})


def test_validate_refuses_unknown_or_empty_options_by_name():
    with pytest.raises(InvalidOption) as err:
        make_adapter().validate("+256712345678", "hi", {"schedule_mode": "scheduled"})
    assert err.value.field == "schedule_mode"
    with pytest.raises(InvalidOption) as err:
        make_adapter().validate("+256712345678", "hi", {"sender_id": 12})
    assert err.value.field == "sender_id"


def test_the_api_key_never_shows_in_reprs():
    adapter = make_adapter()
    assert API_KEY not in repr(adapter.auth()) and API_KEY not in repr(adapter.account)


# --------------------------------------------------------------------------- the request
def signed(adapter: EsmsAfricaAdapter, msg: OutboundMessage) -> httpx.Request:
    return next(adapter.auth().sync_auth_flow(adapter.build_request(msg)))


def test_request_is_the_seed_post_with_bearer_key_and_idempotency_key():
    request = signed(make_adapter(), make_msg(sender_id="eSMSAfrica"))
    assert (request.method, str(request.url)) == ("POST", BASE + SEND_PATH)
    assert request.headers["Authorization"] == f"Bearer {API_KEY}"
    assert request.headers["Idempotency-Key"] == "key-1"
    assert request.headers["Content-Type"] == "application/json"
    assert json.loads(request.content) == {"to": "+256712345678", "text": "Hello from eSMS Africa!",
                                           "sender_id": "eSMSAfrica"}


def test_account_defaults_fill_sender_id_and_route_and_a_message_overrides_them():
    adapter = make_adapter(sender_id="ACME", route="ESMS_KE")
    merged = adapter.merged_options({"route": "ESMS_UG"})
    body = json.loads(adapter.build_request(make_msg(**merged)).content)
    assert (body["sender_id"], body["route"]) == ("ACME", "ESMS_UG")


@pytest.mark.parametrize("lead,expected", [
    (timedelta(hours=3), "2026-05-30T10:00:00Z"),
    (timedelta(minutes=6), "2026-05-30T07:06:00Z"),
    (timedelta(days=6, hours=23), "2026-06-06T06:00:00Z"),
    (timedelta(seconds=400, microseconds=250_000), "2026-05-30T07:06:41Z"),  # rounded up, never early
    (timedelta(minutes=4), None),  # too soon for the provider: sent now
    (timedelta(minutes=4, seconds=59), None),  # under the provider's 5 minutes
    (timedelta(minutes=5, seconds=1), None),  # inside the window, but within the safety margin: sent at its time
    (timedelta(days=7, minutes=1), None),  # over the provider's 7 days: the dispatcher holds it
    (timedelta(minutes=5, seconds=10), None),  # inside the safety margin
    (timedelta(days=8), None),  # too far: the dispatcher holds it
    (-timedelta(minutes=1), None),  # already due
])
def test_a_not_before_inside_the_providers_window_is_scheduled_there(lead, expected):
    body = json.loads(make_adapter().build_request(make_msg(not_before=NOW + lead)).content)
    if expected is None:
        assert "schedule_mode" not in body and "scheduled_at" not in body
    else:
        assert (body["schedule_mode"], body["scheduled_at"]) == ("scheduled", expected)


def test_scheduled_at_is_utc_whatever_the_not_before_zone():
    not_before = datetime(2026, 5, 30, 13, 0, tzinfo=timezone(timedelta(hours=3)))  # 10:00 UTC
    body = json.loads(make_adapter().build_request(make_msg(not_before=not_before)).content)
    assert body["scheduled_at"] == "2026-05-30T10:00:00Z"


# --------------------------------------------------------------------------- the answer table
def answer(status: int, body=None, headers: dict[str, str] | None = None) -> httpx.Response:
    request = httpx.Request("POST", BASE + SEND_PATH)
    if body is None:
        return httpx.Response(status, headers=headers, request=request)
    if isinstance(body, str):
        return httpx.Response(status, content=body.encode(), headers=headers, request=request)
    return httpx.Response(status, json=body, headers=headers, request=request)


ANSWERS = [
    # status, body, outcome class, code, message
    (400, {"detail": {"code": "invalid_phone", "message": "Phone number could not be parsed"}}, Rejected,
     "invalid_phone", "Phone number could not be parsed"),
    (400, {"detail": {"code": "no_route", "message": "No active route for the destination country"}}, Rejected,
     "no_route", "No active route for the destination country"),
    (400, {"detail": {"code": "text_too_long", "message": "Text too long"}}, Rejected, "text_too_long",
     "Text too long"),
    (400, {"detail": [{"loc": ["body", "to"], "msg": "value is not a valid phone number", "type": "value_error"},
                      {"loc": ["body", "text"], "msg": "field required", "type": "missing"}]},
     Rejected, "invalid_request", "to: value is not a valid phone number; text: field required"),
    (401, {"detail": "Invalid API key"}, Rejected, "invalid_api_key", "Invalid API key"),
    (403, {"detail": "Sender ID 'MyApp' not found or not approved. Check your sender IDs at /sender-ids"},
     Rejected, "sender_id_not_approved", "Sender ID 'MyApp' not found or not approved"),
    (403, {"detail": "Sender ID 'MyApp' is not approved for UG. Approved countries: KE, TZ"}, Rejected,
     "sender_id_not_approved", "not approved for UG"),
    (403, {"detail": {"code": "insufficient_scope", "message": "Key lacks sms:send"}}, Rejected,
     "insufficient_scope", "Key lacks sms:send"),
    (422, {"detail": {"code": "insufficient_balance", "message": "Balance USD 0.50 < estimated cost USD 1.20",
                      "balance": 0.5, "cost": 1.2}}, Rejected, "insufficient_balance",
     "Balance USD 0.50 < estimated cost USD 1.20 (balance=0.5, cost=1.2)"),
    (429, {"detail": "Too many requests"}, RetryLater, "rate_limited", "Too many requests"),
    (500, {"detail": "Internal error"}, RetryLater, "http_500", "Internal error"),
    (502, "<html>bad gateway</html>", RetryLater, "http_502", "bad gateway"),
    (200, {"status": "submitted"}, RetryLater, "unreadable_answer", "cannot be read"),  # ambiguous: key reused
]


@pytest.mark.parametrize("status,body,cls,code,message", ANSWERS)
def test_answers_become_one_readable_outcome(status, body, cls, code, message):
    outcome = make_adapter().parse_response(answer(status, body), make_msg())
    assert type(outcome) is cls
    assert outcome.code == code
    assert message in outcome.message


def test_success_keeps_id_segments_cost_and_the_rest_in_detail():
    outcome = make_adapter().parse_response(answer(200, SEED_ANSWER), make_msg())
    assert outcome == Accepted(
        provider_ref=SEED_ANSWER["id"], segments=1, cost=1.2022, cost_currency="KES", provider_status="submitted",
        detail={"route": "ESMS_UG", "balance_after": 1965.0, "scheduled_at": None, "route_cost": 35.0,
                "route_currency": "UGX"},
    )


def test_429_retry_after_becomes_the_retry_time_and_the_rate_signal():
    before = time.time()
    response = answer(429, {"detail": "slow down"}, {"Retry-After": "20"})
    outcome = make_adapter().parse_response(response, make_msg())
    assert before + 19 <= outcome.retry_at <= time.time() + 21
    assert make_adapter().read_rate(response).pause_until == pytest.approx(outcome.retry_at, abs=1)
    assert make_adapter().read_rate(answer(200, SEED_ANSWER)) is None


# --------------------------------------------------------------------------- status
def status_answer(body, status: int = 200) -> httpx.Response:
    return httpx.Response(status, json=body, request=httpx.Request("GET", BASE + "/api/messages/msg-1"))


def test_status_request_gets_the_message_by_id():
    request = make_adapter().build_status_request(make_msg(provider_ref="msg-1"))
    assert (request.method, str(request.url)) == ("GET", BASE + "/api/messages/msg-1")


def test_every_timeline_entry_becomes_an_event_with_a_stable_id():
    body = {"id": "msg-1", "status": "delivered", "timeline": [
        {"status": "queued", "at": "2026-05-30T07:00:00Z"},
        {"status": "submitted", "at": "2026-05-30T07:00:01Z"},
        {"status": "sent", "at": "2026-05-30T07:00:02Z"},
        {"status": "delivered", "at": "2026-05-30T07:00:05Z"},
    ]}
    events = make_adapter().parse_status(status_answer(body), make_msg(provider_ref="msg-1"))
    assert [(e.event_id, e.status, e.provider_status) for e in events] == [
        ("msg-1:0:queued", "pending", "queued"), ("msg-1:1:submitted", "accepted", "submitted"),
        ("msg-1:2:sent", "accepted", "sent"), ("msg-1:3:delivered", "delivered", "delivered")]
    assert events[-1].occurred_at == datetime(2026, 5, 30, 7, 0, 5, tzinfo=timezone.utc)


def test_a_failure_the_provider_retried_is_not_final_but_a_last_failure_is():
    body = {"id": "msg-1", "timeline": [{"status": "submitted"}, {"status": "failed"}, {"status": "retrying"},
                                        {"status": "failed"}]}
    events = make_adapter().parse_status(status_answer(body), make_msg(provider_ref="msg-1"))
    assert [e.status for e in events] == ["accepted", "pending", "pending", "failed"]


def test_a_status_error_gives_no_events():
    assert make_adapter().parse_status(status_answer({"detail": "not found"}, 404), make_msg(provider_ref="x")) == []


def test_batch_status_request_joins_up_to_100_ids():
    adapter = make_adapter()
    request = adapter.build_status_batch_request(["a", "b", "c"])
    assert request.url.path == "/api/messages/status" and request.url.params["ids"] == "a,b,c"
    adapter.build_status_batch_request([f"m{i}" for i in range(100)])
    for refs in ([], [f"m{i}" for i in range(101)]):
        with pytest.raises(ValueError):
            adapter.build_status_batch_request(refs)


def test_batch_status_answer_maps_each_id_to_its_status():
    response = httpx.Response(200, json=[{"id": "a", "status": "sent", "updated_at": "2026-05-30T07:00:00+00:00"},
                                         {"id": "b", "status": "delivered"}],
                              request=httpx.Request("GET", BASE + "/api/messages/status?ids=a,b,c"))
    assert make_adapter().parse_status_batch(response) == {"a": "sent", "b": "delivered"}


# --------------------------------------------------------------------------- against the sandbox, over HTTP
KIND = "esms_africa"


def sandbox_adapter(sb, clock=time.time, **fields) -> EsmsAfricaAdapter:
    account = ProviderAccount(name="africa", kind=KIND, base_url=sb.base_url(KIND),
                              fields={**sb.credentials(KIND), **fields},
                              secret_fields=EsmsAfricaAdapter.secret_fields())
    return EsmsAfricaAdapter(account, clock=clock)


def send_all(adapter: EsmsAfricaAdapter, *msgs: OutboundMessage):
    async def go():
        async with httpx.AsyncClient(trust_env=False) as client:
            return [await adapter.send(client, m) for m in msgs]

    return asyncio.run(go())


def fetch(adapter: EsmsAfricaAdapter, request: httpx.Request) -> httpx.Response:
    async def go():
        async with httpx.AsyncClient(trust_env=False) as client:
            response = await client.send(request, auth=adapter.auth())
            await response.aread()
            return response

    return asyncio.run(go())


def test_sandbox_send_posts_the_documented_request_and_reads_the_answer(clean_sandbox):
    sb = clean_sandbox
    adapter = sandbox_adapter(sb, sender_id="eSMSAfrica")
    msg = make_msg(attempt_key="attempt-1", **adapter.merged_options({}))
    [result] = send_all(adapter, msg)
    [seen] = sb.requests(KIND)
    assert (seen.method, seen.path) == ("POST", SEND_PATH)
    assert seen.headers["Authorization"] == f"Bearer {sb.credentials(KIND)['api_key']}"
    assert seen.headers["Idempotency-Key"] == "attempt-1"
    assert seen.json == {"to": "+256712345678", "text": "Hello from eSMS Africa!", "sender_id": "eSMSAfrica"}
    outcome = result.outcome
    assert isinstance(outcome, Accepted) and outcome.provider_ref == seen.response_json["id"]
    assert (outcome.segments, outcome.cost, outcome.cost_currency, outcome.provider_status) == (1, 1.2022, "KES",
                                                                                                "submitted")
    assert outcome.detail["route"] == "ESMS_UG" and outcome.detail["balance_after"] < 1_000_000


@pytest.mark.parametrize("options,to,code,words", [
    ({"sender_id": "MyApp"}, "+256712345678", "sender_id_not_approved", "is not approved for UG"),
    ({"sender_id": "Nobody"}, "+256712345678", "sender_id_not_approved", "not found or not approved"),
    ({"route": "ESMS_KE"}, "+256712345678", "no_route", "does not serve UG numbers"),
    ({}, "+14155550123", "no_route", "No active route"),
])
def test_sandbox_permanent_errors_are_rejected_in_the_providers_words(clean_sandbox, options, to, code, words):
    [result] = send_all(sandbox_adapter(clean_sandbox), make_msg(to=to, **options))
    assert isinstance(result.outcome, Rejected) and result.outcome.code == code
    assert words in result.outcome.message


def test_sandbox_a_wrong_or_read_only_api_key_is_rejected(clean_sandbox):
    [wrong] = send_all(sandbox_adapter(clean_sandbox, api_key="esms_live_wrong"), make_msg())
    assert wrong.outcome == Rejected("invalid_api_key", "Missing or invalid API key")
    [read_only] = send_all(sandbox_adapter(clean_sandbox, api_key="esms_test_readonly"), make_msg())
    assert isinstance(read_only.outcome, Rejected) and read_only.outcome.code == "insufficient_scope"


def test_sandbox_an_empty_wallet_is_rejected_with_balance_and_cost(clean_sandbox):
    clean_sandbox.configure(KIND, extra={"balance": 0.5})
    [result] = send_all(sandbox_adapter(clean_sandbox), make_msg())
    assert result.outcome == Rejected("insufficient_balance",
                                      "Balance KES 0.50 < estimated cost KES 1.20 (balance=0.5, cost=1.2022)")


def test_sandbox_server_error_is_retried_later(clean_sandbox):
    clean_sandbox.set_faults(KIND, fail_next=1)
    [result] = send_all(sandbox_adapter(clean_sandbox), make_msg())
    assert isinstance(result.outcome, RetryLater) and result.http_status == 500
    assert result.outcome.message == "injected failure"


def test_sandbox_429_pauses_until_retry_after(clean_sandbox):
    clean_sandbox.configure(KIND, rate_limit=1, rate_window=60)
    before = time.time()
    first, second = send_all(sandbox_adapter(clean_sandbox), make_msg(attempt_key="a"), make_msg(attempt_key="b"))
    assert isinstance(first.outcome, Accepted)
    assert isinstance(second.outcome, RetryLater) and second.outcome.code == "rate_limited"
    assert before + 1 <= second.outcome.retry_at <= time.time() + 61
    assert second.rate.pause_until == pytest.approx(second.outcome.retry_at, abs=0.5)


def test_sandbox_a_repeated_idempotency_key_creates_nothing_new(clean_sandbox):
    sb = clean_sandbox
    adapter = sandbox_adapter(sb)
    first, again, other = send_all(adapter, make_msg(attempt_key="same"), make_msg(attempt_key="same"),
                                   make_msg(attempt_key="new"))
    assert first.outcome == again.outcome  # same id, same cost, same balance_after
    assert other.outcome.provider_ref != first.outcome.provider_ref
    assert other.outcome.detail["balance_after"] == pytest.approx(first.outcome.detail["balance_after"] - 1.2022)
    assert [r.headers["Idempotency-Key"] for r in sb.requests(KIND)] == ["same", "same", "new"]


def test_sandbox_a_not_before_hours_ahead_is_scheduled_at_the_provider(clean_sandbox):
    not_before = datetime.fromtimestamp(time.time(), tz=timezone.utc) + timedelta(hours=2)
    [result] = send_all(sandbox_adapter(clean_sandbox), make_msg(not_before=not_before))
    [seen] = clean_sandbox.requests(KIND)
    assert seen.json["schedule_mode"] == "scheduled" and seen.json["scheduled_at"].endswith("Z")
    assert isinstance(result.outcome, Accepted) and result.outcome.provider_status == "scheduled"
    assert parse_iso(result.outcome.detail["scheduled_at"]) >= not_before


def parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def test_sandbox_status_timeline_becomes_events_and_the_batch_form_agrees(clean_sandbox):
    sb = clean_sandbox
    adapter = sandbox_adapter(sb)
    good, bad = send_all(adapter, make_msg(attempt_key="g"), make_msg(to="+256712340000", attempt_key="f"))
    sb.settings(KIND).clock = lambda: time.time() + 10  # past every delivery step
    good_msg = make_msg(provider_ref=good.outcome.provider_ref)
    bad_msg = make_msg(provider_ref=bad.outcome.provider_ref)
    events = adapter.parse_status(fetch(adapter, adapter.build_status_request(good_msg)), good_msg)
    ref = good.outcome.provider_ref
    assert [(e.event_id, e.status) for e in events] == [
        (f"{ref}:0:queued", "pending"), (f"{ref}:1:submitted", "accepted"), (f"{ref}:2:sent", "accepted"),
        (f"{ref}:3:delivered", "delivered")]
    failing = adapter.parse_status(fetch(adapter, adapter.build_status_request(bad_msg)), bad_msg)
    assert [e.provider_status for e in failing] == ["queued", "submitted", "sent", "retrying", "retrying", "failed"]
    assert failing[-1].status == "failed"
    batch = fetch(adapter, adapter.build_status_batch_request([good.outcome.provider_ref, bad.outcome.provider_ref,
                                                               "msg-unknown"]))
    assert adapter.parse_status_batch(batch) == {good.outcome.provider_ref: "delivered",
                                                 bad.outcome.provider_ref: "failed"}

"""emnify adapter: validation, the token Auth flow, concatenated parts, the answer tables, the sandbox."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import pytest

from dispatcher.config import ProviderAccount
from dispatcher.errors import InvalidAddress, InvalidOption, MissingField, TextTooLong
from dispatcher.providers import adapter_class
from dispatcher.providers.base import Accepted, OutboundMessage, Rejected, RetryLater
from dispatcher.providers.emnify import (
    AUTH_PATH,
    AuthenticationFailed,
    EmnifyAdapter,
    EmnifyAuth,
    TokenSlot,
    clear_token_cache,
    concat_ref,
    concat_udh,
    find_sent_sms,
    sms_id_from_location,
    split_ref,
)

BASE = "https://cdn.emnify.example"
APP_TOKEN = "app-token-secret-123"
GSM_3_PARTS = ("abcdefghij" * 16) + ("0123456789" * 15)  # 310 GSM-7 characters: 153 + 153 + 4
UCS2_3_PARTS = "Привет " * 20  # 140 UCS-2 characters: 67 + 67 + 6


def make_adapter(base_url: str = BASE, token: str = APP_TOKEN, source: str | None = "12345689") -> EmnifyAdapter:
    fields = {"application_token": token}
    if source is not None:
        fields["source_address"] = source
    account = ProviderAccount(name="iot", kind="emnify", base_url=base_url, fields=fields,
                              secret_fields=EmnifyAdapter.secret_fields())
    return EmnifyAdapter(account)


def make_msg(to: str = "12345", text: str = "This is the message text", msg_id: str = "m1",
             provider_ref: str | None = None, source: str = "12345689") -> OutboundMessage:
    return OutboundMessage(id=msg_id, to=to, text=text, options={"source_address": source}, attempt_key="k1",
                           provider_ref=provider_ref)


def reply(request: httpx.Request, status: int, body=None, headers: dict[str, str] | None = None) -> httpx.Response:
    if body is None:
        return httpx.Response(status, headers=headers, request=request)
    return httpx.Response(status, json=body, headers=headers, request=request)


@pytest.fixture(autouse=True)
def _fresh_tokens():
    clear_token_cache()
    yield
    clear_token_cache()


# --------------------------------------------------------------------------- declarations and validation
def test_registry_finds_the_adapter_with_its_declarations():
    cls = adapter_class("emnify")
    assert cls is EmnifyAdapter
    assert (cls.credentials, cls.defaults, cls.required_options) == (
        ("application_token",), ("source_address",), ("source_address",))
    assert (cls.default_rate_limit, cls.has_status, cls.max_length) == ("2000/5m", True, 1530)


@pytest.mark.parametrize("to", ["", "0", "-5", "12a", "12 345", "+12345", "1.5", "0123"])
def test_validate_refuses_a_to_that_is_not_an_endpoint_id(to):
    with pytest.raises(InvalidAddress) as err:
        make_adapter().validate(to, "hi", {})
    assert err.value.field == "to"


def test_validate_accepts_an_endpoint_id_and_takes_source_address_from_the_account():
    make_adapter().validate("12345", "hi", {})
    make_adapter(source=None).validate("12345", "hi", {"source_address": "ACME"})


@pytest.mark.parametrize("source", ["Way Too Long Sender", "+1234567890123456", "ACME!", True, 1.5])
def test_validate_refuses_a_source_address_no_handset_could_show(source):
    with pytest.raises(InvalidOption) as err:
        make_adapter(source=None).validate("12345", "hi", {"source_address": source})
    assert err.value.field == "source_address"


@pytest.mark.parametrize("source", ["12345689", "+491701234567", "ACME Alerts", 12345])
def test_validate_accepts_sender_numbers_and_short_names(source):
    make_adapter(source=None).validate("12345", "hi", {"source_address": source})


def test_validate_requires_a_source_address_from_message_or_account():
    with pytest.raises(MissingField) as err:
        make_adapter(source=None).validate("12345", "hi", {})
    assert err.value.field == "source_address"


def test_validate_refuses_a_text_of_more_than_ten_parts():
    adapter = make_adapter()
    adapter.validate("12345", "x" * 1530, {})
    adapter.validate("12345", "ж" * 670, {})
    for text in ("x" * 1531, "ж" * 671):
        with pytest.raises(TextTooLong) as err:
            adapter.validate("12345", text, {})
        assert err.value.field == "text"


def test_credentials_never_show_in_reprs():
    adapter = make_adapter()
    auth = adapter.auth()
    auth.slot.token = "jwt-secret-token"
    for shown in (repr(adapter.account), repr(auth), repr(auth.slot)):
        assert APP_TOKEN not in shown and "jwt-secret-token" not in shown


# --------------------------------------------------------------------------- requests
def test_a_short_text_is_one_post_with_source_address_and_payload():
    request = make_adapter().build_request(make_msg())
    assert (request.method, str(request.url)) == ("POST", BASE + "/api/v1/endpoint/12345/sms")
    assert json.loads(request.content) == {"source_address": "12345689", "payload": "This is the message text"}
    assert request.headers["content-type"] == "application/json"


def test_concat_udh_is_iei_00_length_03_then_ref_total_seq_in_hex():
    assert concat_udh(0xA7, 3, 1) == "050003A70301"
    assert concat_udh(0, 10, 10) == "050003000A0A"
    with pytest.raises(ValueError):
        concat_udh(256, 3, 1)


def test_a_three_part_gsm_text_becomes_three_bodies_with_one_ref_and_no_dcs():
    bodies = make_adapter().part_bodies(make_msg(text=GSM_3_PARTS, msg_id="msg-42"))
    ref = f"{concat_ref('msg-42'):02X}"
    assert [b["udh"] for b in bodies] == [f"050003{ref}0301", f"050003{ref}0302", f"050003{ref}0303"]
    assert "".join(b["payload"] for b in bodies) == GSM_3_PARTS
    assert [len(b["payload"]) for b in bodies] == [153, 153, 4]
    assert all("dcs" not in b and b["source_address"] == "12345689" for b in bodies)


def test_a_three_part_ucs2_text_carries_dcs_8_on_every_part():
    bodies = make_adapter().part_bodies(make_msg(text=UCS2_3_PARTS))
    assert [len(b["payload"]) for b in bodies] == [67, 67, 6]
    assert [b["dcs"] for b in bodies] == [8, 8, 8]
    assert [b["udh"][-4:] for b in bodies] == ["0301", "0302", "0303"]


def test_the_concatenation_ref_is_the_same_on_every_attempt_of_a_message():
    assert concat_ref("msg-42") == concat_ref("msg-42")
    assert len({concat_ref(f"m{i}") for i in range(50)}) > 20


# --------------------------------------------------------------------------- the Auth flow, driven by hand
def sms_request() -> httpx.Request:
    return make_adapter().build_request(make_msg())


def test_flow_authenticates_first_then_sends_with_the_bearer_token():
    auth = EmnifyAuth(BASE, APP_TOKEN, slot=TokenSlot())
    flow = auth.sync_auth_flow(sms_request())
    first = next(flow)
    assert (first.method, str(first.url)) == ("POST", BASE + AUTH_PATH)
    assert json.loads(first.content) == {"application_token": APP_TOKEN}
    second = flow.send(reply(first, 200, {"auth_token": "jwt-1"}))
    assert second.url.path == "/api/v1/endpoint/12345/sms"
    assert second.headers["Authorization"] == "Bearer jwt-1"
    with pytest.raises(StopIteration):
        flow.send(reply(second, 201, headers={"Location": "/api/v1/endpoint/12345/sms/9"}))
    assert auth.slot.token == "jwt-1"


def test_flow_reuses_a_cached_token_without_authenticating():
    slot = TokenSlot()
    slot.token = "jwt-cached"
    flow = EmnifyAuth(BASE, APP_TOKEN, slot=slot).sync_auth_flow(sms_request())
    first = next(flow)
    assert first.url.path == "/api/v1/endpoint/12345/sms"
    assert first.headers["Authorization"] == "Bearer jwt-cached"


def test_flow_renews_once_on_401_retries_then_gives_up_on_a_second_401():
    slot = TokenSlot()
    slot.token = "jwt-expired"
    flow = EmnifyAuth(BASE, APP_TOKEN, slot=slot).sync_auth_flow(sms_request())
    sent = next(flow)
    renew = flow.send(reply(sent, 401, {"message": "token expired"}))
    assert renew.url.path == AUTH_PATH
    retried = flow.send(reply(renew, 200, {"auth_token": "jwt-2"}))
    assert retried.headers["Authorization"] == "Bearer jwt-2"
    with pytest.raises(StopIteration):
        flow.send(reply(retried, 401, {"message": "still no"}))
    assert (slot.token, slot.renewals) == ("jwt-2", 1)


def test_flow_skips_renewal_when_another_request_already_renewed_the_token():
    slot = TokenSlot()
    slot.token = "jwt-old"
    flow = EmnifyAuth(BASE, APP_TOKEN, slot=slot).sync_auth_flow(sms_request())
    sent = next(flow)
    slot.token = "jwt-new"  # renewed by a concurrent request meanwhile
    retried = flow.send(reply(sent, 401))
    assert retried.url.path != AUTH_PATH and retried.headers["Authorization"] == "Bearer jwt-new"


def test_flow_ends_with_the_authenticate_answer_when_authentication_fails():
    flow = EmnifyAuth(BASE, APP_TOKEN, slot=TokenSlot()).sync_auth_flow(sms_request())
    first = next(flow)
    with pytest.raises(StopIteration):
        flow.send(reply(first, 401, {"error_code": 1001, "error_token": "invalid_token", "message": "bad"}))


def test_async_flow_is_the_same_flow_and_survives_a_new_event_loop():
    slot = TokenSlot()
    auth = EmnifyAuth(BASE, APP_TOKEN, slot=slot)

    async def drive(auth_reply: str | None) -> list[str]:
        flow = auth.async_auth_flow(sms_request())
        seen = []
        request = await flow.__anext__()
        while True:
            seen.append(request.url.path)
            answer = (reply(request, 200, {"auth_token": auth_reply}) if request.url.path == AUTH_PATH
                      else reply(request, 201, headers={"Location": "/x/sms/1"}))
            try:
                request = await flow.asend(answer)
            except StopAsyncIteration:
                return seen

    assert asyncio.run(drive("jwt-a")) == [AUTH_PATH, "/api/v1/endpoint/12345/sms"]
    slot.token = None  # a second loop (a new asyncio.run) must not trip over the first loop's lock
    assert asyncio.run(drive("jwt-b")) == [AUTH_PATH, "/api/v1/endpoint/12345/sms"]
    assert slot.token == "jwt-b"


def test_each_event_loop_gets_its_own_lock_so_a_finished_loop_breaks_nothing():
    slot = TokenSlot()

    async def contend() -> asyncio.Lock:
        lock = slot.loop_lock()
        async with lock:
            waiter = asyncio.create_task(lock.acquire())  # contention binds the lock to this loop
            await asyncio.sleep(0)
        await waiter
        lock.release()
        return lock

    first, second = asyncio.run(contend()), asyncio.run(contend())
    assert first is not second


def test_requests_queued_behind_a_failed_authentication_give_up_with_its_outcome():
    async def main():
        slot = TokenSlot()
        auth = EmnifyAuth(BASE, APP_TOKEN, slot=slot)
        first, second = auth.async_auth_flow(sms_request()), auth.async_auth_flow(sms_request())
        authenticate = await first.__anext__()  # holds the lock while its exchange is in flight
        waiting = asyncio.create_task(second.__anext__())
        await asyncio.sleep(0)  # the second flow now waits on the lock
        with pytest.raises(StopAsyncIteration):
            await first.asend(reply(authenticate, 401, err("invalid_application_token", "revoked")))
        with pytest.raises(AuthenticationFailed) as failed:
            await waiting
        return failed.value.outcome, slot

    outcome, slot = asyncio.run(main())
    assert isinstance(outcome, Rejected) and outcome.code == "auth_failed" and "revoked" in outcome.message
    assert (slot.token, slot.failures) == (None, 1)


# --------------------------------------------------------------------------- the answer table
SMS_URL = BASE + "/api/v1/endpoint/12345/sms"


def sms_answer(status: int, body=None, headers=None, url: str = SMS_URL) -> httpx.Response:
    return reply(httpx.Request("POST", url), status, body, headers)


def err(token: str, message: str, code: int = 1000) -> dict:
    return {"error_code": code, "error_token": token, "message": message}


ANSWERS = [
    # response, outcome class, code, words in the message
    (sms_answer(201, headers={"Location": f"{SMS_URL}/678"}), Accepted, None, None),
    (sms_answer(400, err("invalid_payload", "payload must not be empty")), Rejected, "invalid_payload",
     "payload must not be empty"),
    (sms_answer(422, err("invalid_source_address", "source_address invalid")), Rejected, "invalid_source_address",
     "source_address"),
    (sms_answer(404, {"message": "Endpoint not found"}), Rejected, "endpoint_not_found", "Endpoint not found"),
    (sms_answer(401, {"message": "Unauthorized"}), Rejected, "auth_failed", "renewed"),
    (sms_answer(429, {"message": "Too many"}, {"Retry-After": "30"}), RetryLater, "rate_limited", "Too many"),
    (sms_answer(500, {"message": "boom"}), RetryLater, "http_500", "boom"),
    (sms_answer(503, None), RetryLater, "http_503", ""),
    (sms_answer(401, err("invalid_token", "Invalid application token"), url=BASE + AUTH_PATH), Rejected,
     "auth_failed", "Invalid application token"),
    (sms_answer(429, {"message": "slow down"}, {"Retry-After": "60"}, url=BASE + AUTH_PATH), RetryLater,
     "rate_limited", "authentication"),
    (sms_answer(502, None, url=BASE + AUTH_PATH), RetryLater, "http_502", "authentication"),
]


@pytest.mark.parametrize("response,cls,code,words", ANSWERS)
def test_answers_become_one_typed_outcome(response, cls, code, words):
    outcome = make_adapter().parse_response(response, make_msg())
    assert type(outcome) is cls
    if code is not None:
        assert outcome.code == code
    if words:
        assert words in outcome.message


def test_201_gives_the_endpoint_and_sms_id_from_location_as_provider_ref():
    outcome = make_adapter().parse_response(sms_answer(201, headers={"Location": f"{SMS_URL}/678"}), make_msg())
    assert outcome.provider_ref == "12345/678"
    no_location = make_adapter().parse_response(sms_answer(201), make_msg())
    assert isinstance(no_location, Accepted) and no_location.provider_ref is None


def test_429_carries_the_retry_after_time():
    before = time.time()
    outcome = make_adapter().parse_response(sms_answer(429, {}, {"Retry-After": "30"}), make_msg())
    assert before + 29 <= outcome.retry_at <= time.time() + 31


@pytest.mark.parametrize("location,sms_id", [
    ("https://cdn.emnify.net/api/v1/endpoint/12345/sms/678", "678"), ("/api/v1/endpoint/1/sms/9/", "9"),
    ("/api/v1/endpoint/1/sms", None), ("", None), (None, None)])
def test_sms_id_is_read_from_the_location_header(location, sms_id):
    assert sms_id_from_location(location) == sms_id


def test_the_newest_matching_sms_is_found_in_a_listing_when_location_is_missing():
    listing = [
        {"id": 10, "payload": "hello", "submit_date": "2024-05-01T10:00:00Z"},
        {"id": 12, "payload": "hello", "submit_date": "2024-05-01T10:05:00Z"},
        {"id": 13, "payload": "other", "submit_date": "2024-05-01T10:06:00Z"},
        {"id": 14, "payload": "hello", "udh": "0500030A0201", "submit_date": "2024-05-01T10:07:00Z"},
    ]
    assert find_sent_sms(listing, "hello") == "14"
    assert find_sent_sms(listing, "hello", "0500030a0201") == "14"
    assert find_sent_sms(listing[:3], "hello") == "12"
    assert find_sent_sms(listing, "absent") is None and find_sent_sms({"oops": 1}, "hello") is None


def test_provider_refs_split_into_endpoint_and_sms_ids():
    assert split_ref("12345/678") == ("12345", ["678"])
    assert split_ref("12345/7,8,9") == ("12345", ["7", "8", "9"])
    assert split_ref(None) == ("", []) and split_ref("garbage") == ("", [])


# --------------------------------------------------------------------------- status
def status_answer(status_id: int, description: str, sms_id: int = 678, **dates) -> httpx.Response:
    body = {"id": sms_id, "payload": "x", "status": {"id": status_id, "description": description}, **dates}
    return reply(httpx.Request("GET", SMS_URL + f"/{sms_id}"), 200, body)


@pytest.mark.parametrize("status_id,description,normalized", [
    (1, "DELIVERY ATTEMPT PENDING", "pending"), (2, "IN PROGRESS", "accepted"), (3, "BUFFERED", "pending"),
    (4, "DELIVERED", "delivered"), (5, "FAILED", "failed"), (6, "EXPIRED", "expired"), (7, "CANCELED", "cancelled")])
def test_status_ids_map_to_normalized_events_with_stable_ids(status_id, description, normalized):
    adapter, msg = make_adapter(), make_msg(provider_ref="12345/678")
    events = adapter.parse_status(status_answer(status_id, description, submit_date="2024-05-01T10:00:00Z",
                                                final_date="2024-05-01T10:01:00Z"), msg)
    assert [(e.event_id, e.status, e.provider_status) for e in events] == [
        (f"678:{status_id}", normalized, description)]
    assert events[0].occurred_at is not None


def test_status_request_asks_for_the_last_part_of_the_message():
    request = make_adapter().build_status_request(make_msg(provider_ref="12345/7,8,9"))
    assert (request.method, str(request.url)) == ("GET", BASE + "/api/v1/endpoint/12345/sms/9")
    with pytest.raises(ValueError):
        make_adapter().build_status_request(make_msg(provider_ref=None))


def test_a_status_answer_that_is_not_an_sms_gives_no_events():
    request = httpx.Request("GET", SMS_URL + "/678")
    msg = make_msg(provider_ref="12345/678")
    assert make_adapter().parse_status(reply(request, 404, {"message": "nope"}), msg) == []
    assert make_adapter().parse_status(reply(request, 200, {"id": 678}), msg) == []


# --------------------------------------------------------------------------- against the sandbox, over HTTP
KIND = "emnify"


def sandbox_adapter(sb, **fields) -> EmnifyAdapter:
    values = {**sb.credentials(KIND), "source_address": "12345689", **fields}
    account = ProviderAccount(name="iot", kind=KIND, base_url=sb.base_url(KIND), fields=values,
                              secret_fields=EmnifyAdapter.secret_fields())
    return EmnifyAdapter(account)


def send_all(adapter: EmnifyAdapter, *msgs: OutboundMessage, make_client=lambda: httpx.AsyncClient(trust_env=False)):
    async def go():
        async with make_client() as client:
            return await asyncio.gather(*(adapter.send(client, m) for m in msgs))

    return asyncio.run(go())


def status_of(adapter: EmnifyAdapter, msg: OutboundMessage):
    async def go():
        async with httpx.AsyncClient(trust_env=False) as client:
            response = await client.send(adapter.build_status_request(msg), auth=adapter.auth())
            await response.aread()
            return adapter.parse_status(response, msg)

    return asyncio.run(go())


def cancel(adapter: EmnifyAdapter, msg: OutboundMessage) -> bool:
    async def go():
        async with httpx.AsyncClient(trust_env=False) as client:
            return await adapter.cancel(client, msg)

    return asyncio.run(go())


def shift_twin_clock(sb, seconds: float) -> None:
    sb.settings(KIND).clock = lambda: time.time() + seconds


def authentications(sb) -> int:
    return sum(1 for r in sb.requests(KIND) if r.path == AUTH_PATH)


def test_sandbox_send_authenticates_then_posts_the_sms_with_the_token(clean_sandbox):
    sb = clean_sandbox
    [result] = send_all(sandbox_adapter(sb), make_msg())
    auth_call, sms_call = sb.requests(KIND)
    assert (auth_call.method, auth_call.path, auth_call.json) == (
        "POST", AUTH_PATH, {"application_token": sb.credentials(KIND)["application_token"]})
    token = auth_call.response_json["auth_token"]
    assert (sms_call.method, sms_call.path) == ("POST", "/api/v1/endpoint/12345/sms")
    assert sms_call.headers["Authorization"] == f"Bearer {token}"
    assert sms_call.json == {"source_address": "12345689", "payload": "This is the message text"}
    assert sms_call.status == 201
    assert isinstance(result.outcome, Accepted) and result.http_status == 201 and result.requests == 2
    endpoint_id, [sms_id] = split_ref(result.outcome.provider_ref)
    assert endpoint_id == "12345" and sms_id.isdigit()


def test_sandbox_unknown_endpoint_and_bad_source_address_are_rejected(clean_sandbox):
    adapter = sandbox_adapter(clean_sandbox)
    missing, bad_source = send_all(adapter, make_msg(to="900001"), make_msg(source="Way Too Long Sender"))
    assert missing.outcome == Rejected("endpoint_not_found", "Endpoint 900001 not found (error_code 404)")
    assert isinstance(bad_source.outcome, Rejected) and bad_source.outcome.code == "validation_failed"
    assert "source_address" in bad_source.outcome.message


def test_sandbox_wrong_application_token_is_rejected_after_one_call(clean_sandbox):
    [result] = send_all(sandbox_adapter(clean_sandbox, application_token="revoked"), make_msg())
    assert isinstance(result.outcome, Rejected) and result.outcome.code == "auth_failed"
    assert "application token" in result.outcome.message
    assert [r.path for r in clean_sandbox.requests(KIND)] == [AUTH_PATH]


def test_sandbox_concurrent_sends_with_a_revoked_token_cost_one_authentication(clean_sandbox):
    adapter = sandbox_adapter(clean_sandbox, application_token="revoked")
    results = send_all(adapter, *(make_msg(msg_id=f"m{i}") for i in range(20)))
    assert {(type(r.outcome), r.outcome.code) for r in results} == {(Rejected, "auth_failed")}
    assert authentications(clean_sandbox) == 1


def test_sandbox_a_dropped_authentication_is_retried_and_marked_not_sent(clean_sandbox):
    clean_sandbox.set_faults(KIND, drop_next=1)
    results = send_all(sandbox_adapter(clean_sandbox), *(make_msg(msg_id=f"m{i}") for i in range(10)))
    assert {(type(r.outcome), r.outcome.code, r.outcome.ambiguous) for r in results} == {
        (RetryLater, "auth_unreachable", False)}
    assert [r.path for r in clean_sandbox.requests(KIND)] == [AUTH_PATH]


def test_sandbox_server_error_is_retried_later(clean_sandbox):
    sb, adapter = clean_sandbox, sandbox_adapter(clean_sandbox)
    send_all(adapter, make_msg())  # authenticated: the fault hits the SMS request itself
    sb.set_faults(KIND, fail_next=1)
    [result] = send_all(adapter, make_msg())
    assert isinstance(result.outcome, RetryLater) and result.http_status == 500
    assert result.outcome.code == "injected_failure"


def test_sandbox_429_is_retried_no_sooner_than_retry_after(clean_sandbox):
    sb = clean_sandbox
    sb.configure(KIND, rate_limit=1)  # the authentication uses the one request of the window
    before = time.time()
    [result] = send_all(sandbox_adapter(sb), make_msg())
    assert isinstance(result.outcome, RetryLater) and result.outcome.code == "rate_limit_exceeded"
    assert before + 1 <= result.outcome.retry_at <= time.time() + 301  # the window's end, at most 300 s on
    assert result.rate is not None and result.rate.pause_until == pytest.approx(result.outcome.retry_at, abs=0.5)


@pytest.mark.parametrize("client", ["httpx", "aiohttp"])
def test_sandbox_fifty_concurrent_sends_authenticate_once(clean_sandbox, client):
    from dispatcher.transport import make_client

    factory = (lambda: make_client(64)) if client == "aiohttp" else (lambda: httpx.AsyncClient(trust_env=False))
    results = send_all(sandbox_adapter(clean_sandbox), *(make_msg(msg_id=f"m{i}") for i in range(50)),
                       make_client=factory)
    assert all(isinstance(r.outcome, Accepted) for r in results)
    assert len({r.outcome.provider_ref for r in results}) == 50
    assert authentications(clean_sandbox) == 1


def test_sandbox_expired_token_is_renewed_once_for_all_requests_in_flight(clean_sandbox):
    sb, adapter = clean_sandbox, sandbox_adapter(clean_sandbox)
    send_all(adapter, make_msg())
    shift_twin_clock(sb, 2 * 3600)  # past the token's 1 h lifetime
    since = sb.last_seq
    results = send_all(adapter, *(make_msg(msg_id=f"m{i}") for i in range(10)))
    assert all(isinstance(r.outcome, Accepted) for r in results)
    later = sb.requests(KIND, since=since)
    assert sum(1 for r in later if r.path == AUTH_PATH) == 1
    assert sum(1 for r in later if r.status == 401 and r.response_json["error_token"] == "token_expired") == 10
    assert sum(1 for r in later if r.status == 201) == 10


def test_sandbox_a_token_refused_twice_gives_up_with_auth_failed(clean_sandbox):
    sb = clean_sandbox
    sb.configure(KIND, extra={"token_ttl": 0})  # every token is born expired
    [result] = send_all(sandbox_adapter(sb), make_msg())
    assert isinstance(result.outcome, Rejected) and result.outcome.code == "auth_failed"
    assert [(r.path, r.status) for r in sb.requests(KIND)] == [
        (AUTH_PATH, 200), ("/api/v1/endpoint/12345/sms", 401), (AUTH_PATH, 200), ("/api/v1/endpoint/12345/sms", 401)]
    assert result.requests == 4


def test_sandbox_a_three_part_text_arrives_as_three_requests_with_udhs(clean_sandbox):
    sb = clean_sandbox
    [result] = send_all(sandbox_adapter(sb), make_msg(text=GSM_3_PARTS, msg_id="long-1"))
    parts = [r for r in sb.requests(KIND) if r.path == "/api/v1/endpoint/12345/sms"]
    ref = f"{concat_ref('long-1'):02X}"
    assert [p.json["udh"] for p in parts] == [f"050003{ref}0301", f"050003{ref}0302", f"050003{ref}0303"]
    assert "".join(p.json["payload"] for p in parts) == GSM_3_PARTS
    assert all(p.status == 201 for p in parts)
    outcome = result.outcome
    assert isinstance(outcome, Accepted) and outcome.segments == 3
    endpoint_id, sms_ids = split_ref(outcome.provider_ref)
    assert endpoint_id == "12345" and sms_ids == outcome.detail["sms_ids"]
    assert len(sms_ids) == 3 and sms_ids == sorted(sms_ids, key=int)


def test_sandbox_a_ucs2_long_text_is_accepted_part_by_part_with_dcs_8(clean_sandbox):
    [result] = send_all(sandbox_adapter(clean_sandbox), make_msg(text=UCS2_3_PARTS))
    assert isinstance(result.outcome, Accepted) and result.outcome.segments == 3
    parts = [r for r in clean_sandbox.requests(KIND) if r.method == "POST" and r.path != AUTH_PATH]
    assert [p.json["dcs"] for p in parts] == [8, 8, 8]


def test_sandbox_a_failure_after_the_first_part_is_rejected_and_names_the_sent_parts(clean_sandbox):
    sb = clean_sandbox
    sb.configure(KIND, rate_limit=2)  # authenticate, part 1, then part 2 meets a 429
    [result] = send_all(sandbox_adapter(sb), make_msg(text=GSM_3_PARTS))
    outcome = result.outcome
    assert isinstance(outcome, Rejected) and outcome.code == "partial_send"
    assert re.search(r"part 1 was accepted of 3 \(endpoint 12345, sms ids \d+\)", outcome.message)
    assert "part 2 failed (rate_limit_exceeded" in outcome.message
    assert len([r for r in sb.requests(KIND) if r.path.endswith("/sms")]) == 2  # part 3 never sent


def test_sandbox_status_follows_the_sms_to_delivered(clean_sandbox):
    sb, adapter = clean_sandbox, sandbox_adapter(clean_sandbox)
    msg = make_msg()
    [result] = send_all(adapter, msg)
    sent = OutboundMessage(id=msg.id, to=msg.to, text=msg.text, provider_ref=result.outcome.provider_ref)
    first = status_of(adapter, sent)
    assert [e.status for e in first] == ["pending"]
    shift_twin_clock(sb, 5)
    [event] = status_of(adapter, sent)
    sms_id = split_ref(sent.provider_ref)[1][0]
    assert (event.event_id, event.status, event.provider_status) == (f"{sms_id}:4", "delivered", "Delivered")


def test_sandbox_cancel_deletes_a_buffered_sms_and_refuses_a_delivered_one(clean_sandbox):
    sb, adapter = clean_sandbox, sandbox_adapter(clean_sandbox)
    offline, online = make_msg(to="12377", msg_id="a"), make_msg(to="12345", msg_id="b")
    buffered, delivered = send_all(adapter, offline, online)
    shift_twin_clock(sb, 5)
    offline = OutboundMessage(id="a", to="12377", text="x", provider_ref=buffered.outcome.provider_ref)
    online = OutboundMessage(id="b", to="12345", text="x", provider_ref=delivered.outcome.provider_ref)
    assert [e.status for e in status_of(adapter, offline)] == ["pending"]  # buffered at the network
    assert cancel(adapter, offline) is True
    deletes = [r for r in sb.requests(KIND) if r.method == "DELETE"]
    assert [(d.path, d.status) for d in deletes] == [
        (f"/api/v1/endpoint/12377/sms/{split_ref(offline.provider_ref)[1][0]}", 204)]
    assert [e.status for e in status_of(adapter, offline)] == ["cancelled"]
    assert cancel(adapter, online) is False

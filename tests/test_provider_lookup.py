"""Settling a send whose answer was lost (a crash, a reset, a timeout), over the sandbox.

emnify is asked (`lookup`: its endpoint SMS list); esimfly and eSMS Africa need no asking (a
resend with the same attempt key is harmless and says whether the first arrived); eMsgNow and
eSIM Access cannot tell.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import datetime, timezone

import httpx
import pytest

from dispatcher.providers import emnify as emnify_module
from dispatcher.providers.base import ABSENT, CANNOT_TELL, FOUND, Accepted, OutboundMessage, RetryLater
from dispatcher.providers.emnify import clear_token_cache, split_ref
from dispatcher.transport import make_client

from .conftest import wait_for
from .test_provider_faults import KINDS, adapter_for, message, send

LONG_TEXT = ("abcdefghij" * 16) + ("0123456789" * 15)  # 310 GSM-7 characters: three parts


@pytest.fixture()
def sb(clean_sandbox):
    clear_token_cache()
    yield clean_sandbox
    clear_token_cache()


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def lookup(adapter, msg: OutboundMessage, since: datetime):
    async def go():
        client = make_client(in_flight=4, timeout=2.0)
        try:
            return await adapter.lookup(client, msg, since)
        finally:
            await client.aclose()

    return asyncio.run(go())


def emnify_msg(text: str = "hello", to: str = "12345") -> OutboundMessage:
    return OutboundMessage(id=uuid.uuid4().hex, to=to, text=text, options={"source_address": "12345689"},
                           attempt_key=str(uuid.uuid4()))


def warmed_emnify(sb):
    """An emnify adapter holding a token already, so that the next request is the SMS itself."""
    adapter = adapter_for(sb, "emnify")
    assert isinstance(send(adapter, emnify_msg("warm-up", to="999")).outcome, Accepted)
    return adapter


def twin_sms_ids(sb, endpoint: str = "12345") -> list[str]:
    """The ids of the SMS the emnify twin holds for an endpoint, newest first (read over HTTP)."""
    base = sb.base_url("emnify")
    token = httpx.post(base + "/api/v1/authenticate", json=sb.credentials("emnify")).json()["auth_token"]
    listing = httpx.get(f"{base}/api/v1/endpoint/{endpoint}/sms", headers={"Authorization": f"Bearer {token}"})
    return [str(item["id"]) for item in listing.json() if item["sms_type"]["description"] == "MT"]


# --------------------------------------------------------------------------- emnify: found
@pytest.mark.parametrize("fault", [{"lose_next": 1}, {"reset_processed_next": 1}, {"drip_next": 1, "drip_ms": 1500},
                                   {"hang_next": 1, "hang_ms": 1500}])
def test_an_sms_the_provider_took_is_found_with_the_ref_a_send_would_have_recorded(sb, fault):
    adapter, msg = warmed_emnify(sb), emnify_msg()
    since = utcnow()
    sb.set_faults("emnify", **fault)
    lost = send(adapter, msg)
    assert isinstance(lost.outcome, RetryLater) and lost.outcome.ambiguous
    # a hung request is taken after our timeout: look only once the provider is done with it
    wait_for(lambda: sb.requests("emnify")[-1].status is not None)
    [sms_id] = twin_sms_ids(sb)
    result = lookup(adapter, msg, since)
    assert result.state == FOUND, result.reason
    assert result.accepted.provider_ref == f"12345/{sms_id}" and result.accepted.segments == 1
    assert result.accepted.provider_status  # emnify's own status word, e.g. "Delivery attempt pending"


def test_a_long_text_sent_whole_is_found_part_by_part_in_order(sb):
    adapter, msg = warmed_emnify(sb), emnify_msg(LONG_TEXT)
    since = utcnow()
    sent = send(adapter, msg)  # as if the worker died right after the answers, before recording them
    assert isinstance(sent.outcome, Accepted) and sent.outcome.segments == 3
    result = lookup(adapter, msg, since)
    assert result.state == FOUND and result.accepted.provider_ref == sent.outcome.provider_ref
    assert result.accepted.segments == 3 and len(split_ref(result.accepted.provider_ref)[1]) == 3


def test_paging_is_followed_to_the_sms_sent_first(sb, monkeypatch):
    monkeypatch.setattr(emnify_module, "LOOKUP_PAGE", 2)
    adapter = warmed_emnify(sb)
    since = utcnow()
    msgs = [emnify_msg(f"text {n}") for n in range(5)]
    results = send(adapter, *msgs)
    result = lookup(adapter, msgs[0], since)  # the oldest: on the third page, newest first
    assert result.state == FOUND and result.accepted.provider_ref == results[0].outcome.provider_ref
    pages = [r.query.get("page") for r in sb.requests("emnify") if r.method == "GET"]
    assert pages == ["1", "2", "3"]


# --------------------------------------------------------------------------- emnify: absent
@pytest.mark.parametrize("fault", [{"drop_next": 1}, {"reset_next": 1}])
def test_an_sms_the_provider_never_took_is_absent(sb, fault):
    adapter, msg = warmed_emnify(sb), emnify_msg()
    since = utcnow()
    sb.set_faults("emnify", **fault)
    lost = send(adapter, msg)
    assert isinstance(lost.outcome, RetryLater) and lost.outcome.ambiguous  # the client cannot tell...
    result = lookup(adapter, msg, since)
    assert result.state == ABSENT, result.reason  # ...the provider's list can
    assert twin_sms_ids(sb) == []


def test_an_identical_sms_sent_before_the_attempt_does_not_count(sb):
    adapter = warmed_emnify(sb)
    sb.settings("emnify").clock = lambda: time.time() - 60  # an earlier message with the same text
    earlier = send(adapter, emnify_msg("same words"))
    sb.settings("emnify").clock = time.time
    msg = emnify_msg("same words")
    since = utcnow()
    assert lookup(adapter, msg, since).state == ABSENT
    sb.set_faults("emnify", lose_next=1)
    send(adapter, msg)
    result = lookup(adapter, msg, since)
    assert result.state == FOUND and result.accepted.provider_ref != earlier.outcome.provider_ref


def test_an_sms_the_device_sent_with_the_same_words_is_not_ours(sb):
    adapter, msg = warmed_emnify(sb), emnify_msg("ping")
    since = utcnow()
    sb.configure("emnify", extra={"received_sms": [{"endpoint_id": 12345, "payload": "ping"}]})
    assert lookup(adapter, msg, since).state == ABSENT


# --------------------------------------------------------------------------- emnify: cannot tell
def test_two_sms_with_the_same_words_since_the_attempt_cannot_be_told_apart(sb):
    adapter = warmed_emnify(sb)
    since = utcnow()
    send(adapter, emnify_msg("same words"), emnify_msg("same words"))
    result = lookup(adapter, emnify_msg("same words"), since)
    assert result.state == CANNOT_TELL and "2 SMS" in result.reason


def test_a_long_text_cut_short_by_a_crash_cannot_be_told_and_names_the_parts_that_went(sb):
    adapter, msg = warmed_emnify(sb), emnify_msg(LONG_TEXT)
    since = utcnow()
    mark = sb.last_seq
    results = []  # parts 1 and 2 go, part 3 is lost before the provider took it

    async def go():
        client = make_client(in_flight=4, timeout=2.0)
        try:
            for n, request in enumerate(adapter.build_part_requests(msg), 1):
                if n == 3:
                    sb.set_faults("emnify", reset_next=1)
                try:
                    response = await client.send(request, auth=adapter.auth())
                    results.append(response.status_code)
                except httpx.HTTPError:
                    results.append(None)
        finally:
            await client.aclose()

    asyncio.run(go())
    assert results == [201, 201, None] and len(sb.requests("emnify", since=mark)) == 3
    result = lookup(adapter, msg, since)
    assert result.state == CANNOT_TELL and "only part(s) 1, 2 of 3" in result.reason


def test_a_list_that_cannot_be_read_cannot_tell(sb):
    adapter, msg = warmed_emnify(sb), emnify_msg()
    since = utcnow()
    sb.set_faults("emnify", down=True)
    result = lookup(adapter, msg, since)
    assert result.state == CANNOT_TELL and "503" in result.reason


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "emnify"])
def test_the_other_kinds_cannot_tell_and_say_why_without_asking(sb, kind):
    result = lookup(adapter_for(sb, kind), message(kind), utcnow())
    assert result.state == CANNOT_TELL and result.accepted is None
    assert result.reason.startswith(kind) and len(result.reason) > len(kind) + 10
    assert sb.requests(kind) == []


# --------------------------------------------------------------------------- idempotent kinds: resend with the key
TOOK_IT = [{"lose_next": 1}, {"reset_processed_next": 1}, {"malformed_next": 1}, {"drip_next": 1, "drip_ms": 1500}]


@pytest.mark.parametrize("fault", TOOK_IT, ids=lambda f: next(iter(f)))
def test_esimfly_reads_duplicate_request_for_a_resent_request_id_as_accepted(sb, fault):
    adapter, msg = adapter_for(sb, "esimfly"), message("esimfly")
    sb.set_faults("esimfly", **fault)
    first = send(adapter, msg)
    assert isinstance(first.outcome, RetryLater) and first.outcome.ambiguous  # so the key is kept
    again = send(adapter, msg)  # the same RT-RequestID
    assert isinstance(again.outcome, Accepted) and again.outcome.detail["proven_by"] == "DUPLICATE_REQUEST"
    answers = [(r.status, (r.response_json or {}).get("code")) for r in sb.requests("esimfly")]
    assert answers == [(200, None), (409, "DUPLICATE_REQUEST")]  # one SMS


def test_esimfly_sends_a_resent_request_id_the_first_attempt_never_delivered(sb):
    adapter, msg = adapter_for(sb, "esimfly"), message("esimfly")
    sb.set_faults("esimfly", reset_next=1)
    assert send(adapter, msg).outcome.ambiguous
    again = send(adapter, msg)
    assert isinstance(again.outcome, Accepted) and "proven_by" not in again.outcome.detail
    assert [r.status for r in sb.requests("esimfly")] == [None, 200]


@pytest.mark.parametrize("fault", TOOK_IT, ids=lambda f: next(iter(f)))
def test_esms_africa_answers_a_reused_idempotency_key_with_the_original_message(sb, fault):
    adapter, msg = adapter_for(sb, "esms_africa"), message("esms_africa")
    sb.set_faults("esms_africa", **fault)
    first = send(adapter, msg)
    assert isinstance(first.outcome, RetryLater) and first.outcome.ambiguous
    [taken] = sb.requests("esms_africa")
    original = taken.response_json  # what the twin answered the first time, unheard
    again = send(adapter, msg)  # the same Idempotency-Key
    assert isinstance(again.outcome, Accepted) and again.outcome.provider_ref == original["id"]
    assert again.outcome.detail["balance_after"] == original["balance_after"]  # charged once
    other = send(adapter, message("esms_africa"))
    assert other.outcome.provider_ref != original["id"]
    assert other.outcome.detail["balance_after"] < original["balance_after"]

"""What a provider says is bounded before it is stored: times (Retry-After: nan, inf, a year ahead)
and strings (codes, statuses, refs, currencies, event ids wider than their columns)."""

from __future__ import annotations

import json
import math
import time
import uuid

import httpx
import pytest

import dispatcher
from dispatcher.config import ProviderAccount
from dispatcher.providers import adapter_class
from dispatcher.providers import base
from dispatcher.providers.base import (
    MAX_AHEAD,
    Accepted,
    DeliveryEvent,
    OutboundMessage,
    Rejected,
    RetryLater,
    parse_time,
)
from dispatcher.store import models

from .conftest import wait_for

NOW = 1_800_000_000.0


# --------------------------------------------------------------------------- times
@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "Infinity", "1e400", float("nan"), float("inf")])
def test_a_time_that_is_not_a_number_reads_as_absent(value):
    assert parse_time(value, NOW) is None


@pytest.mark.parametrize("value", ["1e300", "99999999999999999", str(NOW + 400 * 86400), "9999-12-31T23:59:59Z",
                                   "Fri, 31 Dec 9999 23:59:59 GMT", str(int((NOW + 30 * 86400) * 1000))])
def test_a_time_absurdly_far_ahead_is_read_as_a_day_ahead(value):
    assert parse_time(value, NOW) == NOW + MAX_AHEAD == NOW + 86400


def test_ordinary_times_are_unchanged():
    soon = NOW + 3600
    assert parse_time("30", NOW) == NOW + 30
    assert parse_time(str(soon), NOW) == parse_time(str(int(soon * 1000)), NOW) == soon
    assert parse_time(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(soon)), NOW) == soon
    assert parse_time(str(NOW - 10), NOW) == NOW - 10  # a time past is kept: nothing to wait for


def make(kind: str):
    cls = adapter_class(kind)
    fields = {"emsgnow": {"api_key": "k", "from": "ACME"}, "esimfly": {"access_code": "a", "secret_key": "s"},
              "esimaccess": {"access_code": "a", "secret_key": "s"}, "emnify": {"application_token": "t"},
              "esms_africa": {"api_key": "k"}}[kind]
    account = ProviderAccount(name="x", kind=kind, base_url="https://provider.example", fields=fields,
                              secret_fields=cls.secret_fields())
    return cls(account)


def msg(kind: str) -> OutboundMessage:
    to = {"emsgnow": "+14155550123", "esimfly": "8948010010036785060", "esimaccess": "23072017992029",
          "emnify": "12345", "esms_africa": "+256712345678"}[kind]
    return OutboundMessage(id="m1", to=to, text="hi", options={"from": "ACME", "source_address": "1"},
                           attempt_key="k1")


def answer(status: int, body, headers: dict[str, str] | None = None, path: str = "/send") -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.Response(status, content=content, headers={"content-type": "application/json", **(headers or {})},
                          request=httpx.Request("POST", "https://provider.example" + path))


KINDS = ("emsgnow", "esimfly", "esimaccess", "emnify", "esms_africa")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("header,value", [("Retry-After", "nan"), ("Retry-After", "inf"), ("Retry-After", "1e300"),
                                          ("X-RateLimit-Reset", "nan"), ("X-RateLimit-Reset", "-inf")])
def test_a_429_with_a_senseless_time_still_gives_a_usable_retry_and_pause(kind, header, value):
    headers = {header: value, "X-RateLimit-Remaining": "0"}
    before = time.time()
    response = answer(429, {"error": "Rate limit exceeded"}, headers)
    adapter = make(kind)
    outcome = adapter.parse_response(response, msg(kind))
    assert isinstance(outcome, RetryLater)
    rate = adapter.read_rate(response)
    for at in (outcome.retry_at, rate.pause_until if rate else None, rate.reset_at if rate else None):
        assert at is None or (math.isfinite(at) and at <= time.time() + MAX_AHEAD), at
    assert rate is not None and rate.pause_until is not None and before <= rate.pause_until  # a 429 still pauses


# --------------------------------------------------------------------------- strings
def test_the_bounds_are_the_columns_widths():
    def width(model, name):
        return getattr(model, "__table__").c[name].type.length

    assert base.PROVIDER_REF_MAX == width(models.Message, "provider_ref")
    assert base.PROVIDER_STATUS_MAX == width(models.Message, "provider_status") == width(models.Event, "provider_status")
    assert base.CODE_MAX == width(models.Message, "error_code") == width(models.Attempt, "provider_code")
    assert base.CURRENCY_MAX == width(models.Message, "cost_currency")
    assert base.EVENT_ID_MAX == width(models.Event, "event_id")


LONG = "X" * 500


def within_columns(outcome) -> None:
    if isinstance(outcome, Accepted):
        assert outcome.provider_ref is None or len(outcome.provider_ref) <= 200
        assert outcome.provider_status is None or len(outcome.provider_status) <= 64
        assert outcome.cost_currency is None or len(outcome.cost_currency) <= 8
    else:
        assert len(outcome.code) <= 100


LONG_ANSWERS = {
    "emsgnow": [answer(200, {"trackingId": LONG}), answer(429, {"error": LONG})],
    "esimfly": [answer(400, {"success": False, "code": LONG, "message": LONG}),
                answer(409, {"success": False, "code": "DUPLICATE_REQUEST"})],
    "esimaccess": [answer(200, {"success": False, "errorCode": LONG, "errorMsg": LONG}),
                   answer(500, {"success": False, "errorCode": LONG})],
    "emnify": [answer(422, {"error_code": 422, "error_token": LONG, "message": LONG}),
               answer(201, b"", {"Location": "/api/v1/endpoint/12345/sms/" + "9" * 300})],
    "esms_africa": [answer(200, {"id": LONG, "status": LONG, "cost": 1, "cost_currency": "KES" * 10}),
                    answer(200, {"id": "msg-1", "status": LONG, "cost_currency": {"code": "KES"}}),
                    answer(403, {"detail": {"code": LONG, "message": "m"}})],
}


@pytest.mark.parametrize("kind,index", [(k, i) for k, answers in LONG_ANSWERS.items() for i in range(len(answers))])
def test_no_provider_string_is_wider_than_its_column(kind, index):
    within_columns(make(kind).parse_response(LONG_ANSWERS[kind][index], msg(kind)))


def test_a_ref_too_long_to_store_is_not_cut_into_another_messages_ref():
    outcome = Accepted(provider_ref=LONG, cost_currency="KESKESKES", provider_status=LONG)
    assert outcome.provider_ref is None and outcome.detail["provider_ref_too_long"] == LONG
    assert (outcome.cost_currency, len(outcome.provider_status)) == ("KESKESKE", 64)
    assert Accepted(provider_ref="r" * 200).provider_ref == "r" * 200  # what fits is kept whole


def test_codes_and_event_ids_are_bounded_and_long_event_ids_stay_distinct():
    assert len(RetryLater(LONG).code) == len(Rejected(LONG).code) == 100
    first = DeliveryEvent(event_id=LONG + "1", status="delivered", provider_status=LONG)
    second = DeliveryEvent(event_id=LONG + "2", status="delivered", provider_status="ok")
    assert len(first.event_id) == len(second.event_id) == 200 and first.event_id != second.event_id
    assert len(first.provider_status) == 64
    assert DeliveryEvent(event_id="e-1", status="accepted", provider_status="x").event_id == "e-1"


def test_status_words_of_a_batched_check_fit_their_column():
    response = httpx.Response(200, json=[{"id": "msg-1", "status": LONG}],
                              request=httpx.Request("GET", "https://provider.example/api/messages/status"))
    assert make("esms_africa").parse_status_batch(response) == {"msg-1": LONG[:64]}


# --------------------------------------------------------------------------- through the pipeline
def test_a_429_saying_retry_after_nan_is_recorded_and_the_message_still_goes(dispatcher_env, celery_worker_thread,
                                                                               sandbox):
    sandbox.set_faults("emsgnow", fail_next=1, fail_status=429, fail_headers={"Retry-After": "nan"})
    sent = dispatcher.send("alerts", "+14155550123", f"nan {uuid.uuid4().hex[:6]}")
    done = wait_for(lambda: (m := dispatcher.get(sent.id)).status not in ("queued", "sending", "scheduled") and m)
    assert done.status == "accepted", (done.status, done.error_code, done.error)
    assert [a.http_status for a in done.attempt_log] == [429, 200]

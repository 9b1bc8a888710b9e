"""Delivery-status polling: events stored once, final statuses kept, polls inside the rate limit."""

from __future__ import annotations

import time
from datetime import timedelta

import redis

import dispatcher
from dispatcher import keys, runtime
from dispatcher.dispatch import dispatch_batch
from dispatcher.status import poll
from dispatcher.store.models import utcnow

from .conftest import send_out, wait_for


def later(seconds: float):
    return lambda: utcnow() + timedelta(seconds=seconds)


def test_polling_reaches_the_final_status_and_stores_each_event_once(dispatcher_env, sandbox, broker_down):
    sandbox.configure("emsgnow", delivery_step=0.01)
    msg = dispatcher.send("alerts", "+14155550123", "poll me")
    send_out(msg.id)

    def delivered():
        poll(clock=later(5))
        return dispatcher.get(msg.id).status == "delivered"

    wait_for(delivered)
    poll(clock=later(3600))  # polled again: nothing changes, nothing is stored twice
    events = dispatcher.get(msg.id).events
    assert [e.provider_status for e in events] == ["processing", "sent to provider", "delivered"]
    assert dispatcher.get(msg.id).status == "delivered"


def test_polls_wait_while_the_provider_has_paused_the_account(dispatcher_env, sandbox, broker_down):
    msg = dispatcher.send("alerts", "+14155550123", "paused")
    send_out(msg.id)
    gets_before = len([r for r in sandbox.requests("emsgnow") if r.method == "GET"])
    runtime.limiter().pause("alerts", time.time() + 60)
    try:
        assert poll(clock=later(5)).polled == 0
        assert len([r for r in sandbox.requests("emsgnow") if r.method == "GET"]) == gets_before
    finally:
        redis.Redis.from_url(runtime.settings().redis_url).delete(keys.rate_pause("alerts"))
    assert poll(clock=later(5)).polled == 1  # the pause is over: it is polled


def _with_africa(dispatcher_env, sandbox, monkeypatch):
    from .conftest import write_config

    c = sandbox.credentials("esms_africa")
    extra = f"""
[providers.africa]
kind = "esms_africa"
base_url = "{sandbox.base_url('esms_africa')}"
api_key = "{c['api_key']}"
sender_id = "eSMSAfrica"
rate_limit = "1000/s"
"""
    monkeypatch.setenv("DISPATCHER_CONFIG", write_config(dispatcher_env / "dispatcher.toml", sandbox, extra))
    runtime.configure(None)


def test_esms_africa_is_checked_100_ids_per_request_and_fetched_in_full_once_at_its_end(
        dispatcher_env, sandbox, broker_down, monkeypatch):
    _with_africa(dispatcher_env, sandbox, monkeypatch)
    sandbox.configure("esms_africa", delivery_step=0.05, rate_limit=None)
    ids = dispatcher.send_many([{"provider": "africa", "to": "+254712345678", "text": f"m{i}"} for i in range(150)])

    def all_accepted():  # no broker here: dispatch again what the rate limit put back
        dispatch_batch([i for i in ids if dispatcher.get(i).status == "queued"])
        return {dispatcher.get(i).status for i in ids} == {"accepted"}

    wait_for(all_accepted)
    seq = sandbox.last_seq

    def all_final():
        poll(clock=later(5))
        return {dispatcher.get(i).status for i in ids} == {"delivered"}

    wait_for(all_final, timeout=30)
    gets = [r for r in sandbox.requests("esms_africa", since=seq) if r.method == "GET"]
    checks = [r for r in gets if r.path == "/api/messages/status"]
    singles = [r.path for r in gets if r.path != "/api/messages/status"]
    assert checks and all(len(r.query["ids"].split(",")) <= 100 for r in checks)
    assert len(singles) == len(set(singles)) == 150  # each message's full story fetched once, at its end
    for i in ids[:3]:
        assert [e.provider_status for e in dispatcher.get(i).events] == ["queued", "submitted", "sent", "delivered"]


def test_esms_africa_message_still_on_its_way_only_has_its_word_noted(dispatcher_env, sandbox, broker_down,
                                                                      monkeypatch):
    _with_africa(dispatcher_env, sandbox, monkeypatch)
    sandbox.configure("esms_africa", delivery_step=3600, rate_limit=None)  # stays "sent" for an hour
    msg = dispatcher.send("africa", "+254712345678", "slow")
    assert send_out(msg.id) == {msg.id: "accepted"}
    seq = sandbox.last_seq
    report = poll(clock=later(5))
    assert (report.polled, report.requests, report.new_events) == (1, 1, 0)
    assert [r.path for r in sandbox.requests("esms_africa", since=seq)] == ["/api/messages/status"]
    after = dispatcher.get(msg.id)
    assert (after.status, after.provider_status) == ("accepted", "submitted")


def test_a_failed_batched_check_falls_back_to_nothing_and_is_tried_at_the_next_poll(
        dispatcher_env, sandbox, broker_down, monkeypatch):
    _with_africa(dispatcher_env, sandbox, monkeypatch)
    sandbox.configure("esms_africa", delivery_step=0.01, rate_limit=None)
    msg = dispatcher.send("africa", "+254712345678", "flaky status")
    # accepted first (a send that met a keep-alive connection the sandbox had just closed is retried)
    wait_for(lambda: dispatch_batch([msg.id]) and dispatcher.get(msg.id).status == "accepted", timeout=10)
    seq = sandbox.last_seq
    sandbox.set_faults("esms_africa", fail_next=1, fail_status=503)
    assert poll(clock=later(5)).new_events == 0
    assert [r.path for r in sandbox.requests("esms_africa", since=seq)] == ["/api/messages/status"]  # no flood
    assert dispatcher.get(msg.id).status == "accepted"
    hours = iter(range(1, 1000))  # each poll an hour after the last, so the message is always due again
    wait_for(lambda: poll(clock=later(3600 * next(hours))).finished == 1)  # checked again, then fetched in full
    assert dispatcher.get(msg.id).status == "delivered"

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

from .conftest import wait_for


def later(seconds: float):
    return lambda: utcnow() + timedelta(seconds=seconds)


def test_polling_reaches_the_final_status_and_stores_each_event_once(dispatcher_env, sandbox, broker_down):
    sandbox.configure("emsgnow", delivery_step=0.01)
    msg = dispatcher.send("alerts", "+14155550123", "poll me")
    dispatch_batch([msg.id])

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
    dispatch_batch([msg.id])
    gets_before = len([r for r in sandbox.requests("emsgnow") if r.method == "GET"])
    runtime.limiter().pause("alerts", time.time() + 60)
    try:
        assert poll(clock=later(5)).polled == 0
        assert len([r for r in sandbox.requests("emsgnow") if r.method == "GET"]) == gets_before
    finally:
        redis.Redis.from_url(runtime.settings().redis_url).delete(keys.rate_pause("alerts"))
    assert poll(clock=later(5)).polled == 1  # the pause is over: it is polled

"""Redis (the rate limiter's store) unreachable: messages wait, nothing is lost or sent twice."""

from __future__ import annotations

from datetime import timedelta

import dispatcher
from dispatcher import runtime
from dispatcher.dispatch import REDIS_DOWN_WAIT, dispatch_batch
from dispatcher.ratelimit import RateLimiter
from dispatcher.store.models import utcnow


class Enqueued(list):
    def __call__(self, ids, countdown):
        self.append((list(ids), countdown))


def test_messages_wait_while_the_limiter_is_unreachable_and_go_once_it_is_back(dispatcher_env, sandbox, monkeypatch,
                                                                                broker_down):
    msg = dispatcher.send("alerts", "+14155550123", "through an outage")
    unreachable = RateLimiter.from_url("redis://127.0.0.1:1/0", timeout=0.5)  # nothing listens there
    reachable = runtime.limiter
    monkeypatch.setattr(runtime, "limiter", lambda: unreachable)
    later = Enqueued()
    report = dispatch_batch([msg.id], enqueue=later)
    assert report.claimed == 0
    assert later == [([msg.id], REDIS_DOWN_WAIT + 0.1)]  # tried again shortly, by the broker
    waiting = dispatcher.get(msg.id)
    assert (waiting.status, waiting.attempts) == ("queued", 0)  # no attempt spent
    assert sandbox.requests("emsgnow") == []

    monkeypatch.setattr(runtime, "limiter", reachable)  # Redis is back
    report = dispatch_batch([msg.id], clock=lambda: utcnow() + timedelta(seconds=REDIS_DOWN_WAIT + 1))
    assert report.statuses == {msg.id: "accepted"}
    assert len(sandbox.requests("emsgnow")) == 1

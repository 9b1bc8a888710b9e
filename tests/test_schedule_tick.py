"""The beat tick, driven by an injected clock: release, lost tasks, and claims abandoned mid-send."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import dispatcher
from dispatcher import runtime
from dispatcher.schedule import tick
from dispatcher.store import queries
from dispatcher.store.db import session_scope
from dispatcher.store.models import utcnow


class Enqueued(list):
    def __call__(self, ids, countdown):
        self.extend(ids)


def test_a_claim_past_the_lease_is_settled_even_while_its_worker_still_beats(dispatcher_env, sandbox, broker_down):
    """The lease is the backstop behind heartbeats: a live worker that never recorded its result."""
    from dispatcher import liveness

    msg = dispatcher.send("alerts", "+14155550123", "worker claims, starts, then never records")
    liveness.ensure_alive(runtime.settings().database_url, 3600)  # this process beats: it is alive
    with session_scope(runtime.settings().database_url) as db:
        queries.claim(db, [msg.id], utcnow(), "stuck-claim", liveness.worker_id())
        queries.mark_started(db, [msg.id], "stuck-claim", utcnow())
    lease = runtime.settings().lease_seconds
    sent, start = Enqueued(), utcnow()
    for later in (lease / 2, lease + 1):  # the worker beats all along
        liveness.beat(runtime.settings().database_url, start + timedelta(seconds=later))
        report = tick(clock=lambda: start + timedelta(seconds=later), enqueue=sent)
        assert report.reaped_unknown == (0 if later < lease else 1)
    assert sent == []
    after = dispatcher.get(msg.id)
    assert after.status == "unknown" and after.error_code == "worker_lost" and "lease" in after.error
    assert sandbox.requests("emsgnow") == []


def test_due_scheduled_messages_are_released_once_by_two_beats(dispatcher_env):
    at = datetime.now(timezone.utc) + timedelta(days=3)
    msg = dispatcher.send("alerts", "+14155550123", "in three days", not_before=at)
    first, second = Enqueued(), Enqueued()
    assert tick(clock=lambda: at - timedelta(seconds=1), enqueue=first).released == 0
    tick(clock=lambda: at, enqueue=first)
    tick(clock=lambda: at, enqueue=second)
    assert first == [msg.id] and second == []
    assert dispatcher.get(msg.id).status == "queued"


def test_a_queued_message_whose_task_was_lost_is_enqueued_again(dispatcher_env, broker_down):
    msg = dispatcher.send("alerts", "+14155550123", "the broker lost my task")
    sent = Enqueued()
    tick(clock=lambda: utcnow() + timedelta(minutes=10), enqueue=sent)
    assert sent == [msg.id]


def test_messages_ahead_of_time_wait_in_the_store_and_go_at_their_time(dispatcher_env, sandbox):
    now = datetime.now(timezone.utc)
    leads = [timedelta(minutes=4, seconds=59), timedelta(minutes=5, seconds=1),
             timedelta(days=6, hours=23), timedelta(days=7, minutes=1)]
    msgs = [dispatcher.send("alerts", "+14155550123", "later", not_before=now + lead) for lead in leads]
    assert {m.status for m in msgs} == {"scheduled"}
    for m, lead in zip(msgs, leads):
        sent = Enqueued()
        tick(clock=lambda: now + lead - timedelta(seconds=1), enqueue=sent)  # nothing early
        assert m.id not in sent
        tick(clock=lambda: now + lead, enqueue=sent)
        assert m.id in sent  # (earlier ones, released but never sent here, are swept again)
    # none of them went early (the session's worker may still be sending an earlier test's message)
    assert [r for r in sandbox.requests("emsgnow") if r.json and r.json.get("message") == "later"] == []


def test_not_after_expires_a_message_in_every_waiting_state(dispatcher_env, sandbox, broker_down):
    from dispatcher.dispatch import dispatch_batch

    now = datetime.now(timezone.utc)
    deadline = now + timedelta(hours=1)
    held = dispatcher.send("alerts", "+14155550123", "held", not_before=now + timedelta(minutes=30), not_after=deadline)
    queued = dispatcher.send("alerts", "+14155550124", "queued", not_after=deadline)
    retrying = dispatcher.send("alerts", "+14155550125", "retrying", not_after=deadline)
    sandbox.set_faults("emsgnow", fail_next=1, fail_status=503)
    assert dispatch_batch([retrying.id], enqueue=Enqueued()).statuses == {retrying.id: "queued"}  # waits to retry
    report = tick(clock=lambda: deadline + timedelta(seconds=1), enqueue=Enqueued())
    assert report.expired == 3
    for m in (held, queued, retrying):
        after = dispatcher.get(m.id)
        assert (after.status, after.error_code) == ("expired", "expired")
    assert dispatch_batch([held.id, queued.id, retrying.id]).claimed == 0  # and none goes out afterwards
    assert len(sandbox.requests("emsgnow")) == 1  # only the failed first attempt


def test_a_throttled_message_expires_rather_than_waiting_past_not_after(dispatcher_env, sandbox, broker_down):
    from dispatcher.dispatch import dispatch_batch

    now = datetime.now(timezone.utc)
    msg = dispatcher.send("alerts", "+14155550123", "throttled", not_after=now + timedelta(minutes=5))
    runtime.limiter().pause("alerts", now.timestamp() + 600)  # the provider asked for ten minutes
    try:
        assert dispatch_batch([msg.id], enqueue=Enqueued()).claimed == 0
        assert dispatcher.get(msg.id).status in ("queued", "scheduled")  # waiting for its turn
        tick(clock=lambda: now + timedelta(minutes=5, seconds=1), enqueue=Enqueued())
    finally:
        import redis

        from dispatcher import keys

        redis.Redis.from_url(runtime.settings().redis_url).delete(keys.rate_pause("alerts"))
    assert dispatcher.get(msg.id).status == "expired"
    assert sandbox.requests("emsgnow") == []

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


def test_a_claim_abandoned_mid_send_becomes_unknown_and_is_never_resent(dispatcher_env, sandbox):
    msg = dispatcher.send("alerts", "+14155550123", "worker dies after claiming")
    with session_scope(runtime.settings().database_url) as db:  # a worker claims it, then is killed
        [claimed] = queries.claim(db, [msg.id], utcnow())
    lease = runtime.settings().lease_seconds
    sent = Enqueued()
    assert tick(clock=lambda: utcnow() + timedelta(seconds=lease / 2), enqueue=sent).reaped_unknown == 0
    report = tick(clock=lambda: utcnow() + timedelta(seconds=lease + 1), enqueue=sent)
    assert report.reaped_unknown == 1 and sent == []
    after = dispatcher.get(msg.id)
    assert after.status == "unknown" and after.error_code == "lease_lost"
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


def test_a_queued_message_whose_task_was_lost_is_enqueued_again(dispatcher_env):
    msg = dispatcher.send("alerts", "+14155550123", "the broker lost my task")
    sent = Enqueued()
    tick(clock=lambda: utcnow() + timedelta(minutes=10), enqueue=sent)
    assert sent == [msg.id]

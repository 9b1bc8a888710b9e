"""Campaigns through the whole pipeline: two worker processes and a beat (whose tick runs the
feeder), a sandbox process counting what reaches the provider. Pause, resume and cancel take
hold within a second on every worker; a single send overtakes a running campaign."""

from __future__ import annotations

import os
import time
from datetime import datetime, timedelta, timezone

import pytest

import dispatcher
from dispatcher import runtime
from dispatcher.store import campaign_queries as cq
from dispatcher.testing import SandboxProcess, WorkerProcesses, most_in_window

from .conftest import wait_for, write_config

ACCOUNTS = """
[providers.bulk]
kind = "emsgnow"
base_url = "{url}"
api_key = "{key}"
from = "ACME"
rate_limit = "10/s"

[providers.reserved]
kind = "emsgnow"
base_url = "{url}"
api_key = "{key}"
from = "ACME"
rate_limit = "10/s"

[providers.slow]
kind = "emsgnow"
base_url = "{url}"
api_key = "{key}"
from = "ACME"
rate_limit = "4/s"
"""


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, redis_url, redis_prefix):
    import redis

    work = tmp_path_factory.mktemp("campaign-pipeline")
    prefix = f"{redis_prefix}-cmp"
    with SandboxProcess() as provider, pytest.MonkeyPatch.context() as mp:
        provider.configure("emsgnow", rate_limit=100000)
        extra = ACCOUNTS.format(url=provider.base_url("emsgnow"), key=provider.credentials("emsgnow")["api_key"])
        mp.setenv("DISPATCHER_CONFIG", write_config(work / "dispatcher.toml", provider, extra))
        mp.setenv("DISPATCHER_DATABASE_URL", f"sqlite:///{work / 'dispatcher.db'}")
        runtime.configure(None)
        dispatcher.list_campaigns()  # the schema, before the workers start
        # queues and limiter keys of their own: the session's in-process worker never takes a task
        env = dict(os.environ, DISPATCHER_REDIS_PREFIX=prefix)
        try:
            with WorkerProcesses(count=2, env=env, concurrency=8, beat=True) as workers:
                workers.wait_ready()
                yield provider, workers
        finally:
            runtime.configure(None)
            client = redis.Redis.from_url(redis_url)
            for key in client.scan_iter(f"{prefix}*", count=1000):
                client.delete(key)


def arrivals(provider: SandboxProcess, marker: str) -> list[float]:
    return sorted(r["received_at"] for r in provider.requests("emsgnow")
                  if r["method"] == "POST" and str((r.get("json") or {}).get("message", "")).startswith(marker))


def observe(seconds: float) -> None:
    """A deliberate observation window: that nothing more is sent can only be seen over time."""
    time.sleep(seconds)


def test_pause_resume_and_cancel_hold_within_a_second_on_every_worker(pipeline):
    provider, _ = pipeline
    c = dispatcher.campaign("bulk", [{"to": f"+1415555{i:04d}", "n": str(i)} for i in range(80)], "pause test {n}")
    wait_for(lambda: len(arrivals(provider, "pause test")) >= 10, timeout=30)

    assert dispatcher.pause_campaign(c.id).state == "paused"
    paused_at = time.time()
    observe(3.0)  # 30 of the account's slots
    assert [t for t in arrivals(provider, "pause test") if t > paused_at + 1.0] == []
    sent_before_resume = len(arrivals(provider, "pause test"))
    assert dispatcher.campaign_status(c.id).counts.get("pending", 0) >= 80 - sent_before_resume - 2

    assert dispatcher.resume_campaign(c.id).state == "running"
    wait_for(lambda: len(arrivals(provider, "pause test")) >= sent_before_resume + 10, timeout=30)

    assert dispatcher.cancel_campaign(c.id).state == "cancelled"
    cancelled_at = time.time()
    observe(3.0)
    sent = arrivals(provider, "pause test")
    assert [t for t in sent if t > cancelled_at + 1.0] == []

    def settled():  # nothing waiting or being sent (the sandbox reports some deliveries as failed)
        status = dispatcher.campaign_status(c.id)
        return None if set(status.counts) & {"pending", "scheduled", "queued", "sending"} else status

    try:
        final = wait_for(settled, timeout=30)
    except AssertionError:
        raise AssertionError(f"not settled: {dispatcher.campaign_status(c.id).counts}") from None
    delivered = 80 - final.counts["cancelled"]
    assert set(final.counts) <= {"accepted", "delivered", "failed", "cancelled"}
    assert delivered == len(sent)  # every one that went, went once
    assert final.counts["cancelled"] == 80 - delivered > 0
    assert final.state == "cancelled"


def test_a_single_send_overtakes_a_running_campaign_within_two_slots(pipeline, broker_down):
    provider, workers = pipeline
    c = dispatcher.campaign("slow", [{"to": f"+1415555{i:04d}", "n": str(i)} for i in range(40)], "bulk {n}")
    wait_for(lambda: len(arrivals(provider, "bulk ")) >= 4, timeout=30)  # the account is busy with it

    single = dispatcher.send("slow", "+14155550999", "your code is 482910")  # stored (broker_down)...
    published = time.time()
    workers.publish([single.id])  # ...and handed to the workers' broker now
    wait_for(lambda: arrivals(provider, "your code is"), timeout=20)
    [single_at] = arrivals(provider, "your code is")
    ahead = [t for t in arrivals(provider, "bulk ") if published < t < single_at]
    assert len(ahead) <= 2, f"{len(ahead)} campaign messages went first ({single_at - published:.2f}s)"
    assert dispatcher.campaign_status(c.id).counts.get("pending", 0) >= 20  # it did not wait for the campaign

    dispatcher.cancel_campaign(c.id)
    observe(1.5)
    everything = arrivals(provider, "bulk ") + [single_at]
    assert most_in_window(everything, 1.0) <= 4  # the account's limit held throughout


def test_a_single_send_takes_a_slot_ahead_of_campaign_messages_already_holding_the_next_seconds(pipeline, broker_down):
    provider, workers = pipeline
    start = datetime.now(timezone.utc) + timedelta(hours=1)  # the feeder leaves this campaign alone...
    c = dispatcher.campaign("reserved", [{"to": f"+1415555{i:04d}", "n": str(i)} for i in range(30)], "held {n}",
                            not_before=start)
    with runtime.session() as db:  # ...and its 30 messages go to the workers at once, as a burst would
        ids = cq.release(db, [row.id for row in cq.due_pending(db, c.id, start, 30)], datetime.now(timezone.utc))
    workers.publish(ids)  # at 10/s the workers now hold the account's next 2 s of slots for them
    wait_for(lambda: len(arrivals(provider, "held ")) >= 3, timeout=20)

    single = dispatcher.send("reserved", "+14155550998", "your code is 111222")
    published = time.time()
    workers.publish([single.id])
    wait_for(lambda: arrivals(provider, "your code is 111222"), timeout=20)
    [single_at] = arrivals(provider, "your code is 111222")
    ahead = [t for t in arrivals(provider, "held ") if published < t < single_at]
    assert len(ahead) <= 2, f"{len(ahead)} campaign messages went first ({single_at - published:.2f}s)"

    wait_for(lambda: len(arrivals(provider, "held ")) >= 30, timeout=30)  # the one it displaced went later
    observe(0.5)
    held = arrivals(provider, "held ")
    assert len(held) == 30  # each once
    assert most_in_window(held + [single_at], 1.0) <= 10  # the account's limit held throughout

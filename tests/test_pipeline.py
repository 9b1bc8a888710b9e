"""End to end: send() -> store -> Redis -> Celery worker -> eMsgNow sandbox over HTTP -> store."""

from __future__ import annotations

import json

import pytest

import dispatcher
from dispatcher.store.models import FINAL

from .conftest import wait_for


def final(message_id: str) -> dispatcher.Message:
    msg = dispatcher.get(message_id)
    return msg if msg.status in FINAL or msg.status == "accepted" else None


def test_a_message_reaches_the_provider_and_is_accepted(dispatcher_env, celery_worker_thread, sandbox):
    msg = dispatcher.send("alerts", "+14155550123", "Your code is 482910", client_id="order-17")
    assert msg.status == "queued"

    done = wait_for(lambda: final(msg.id))
    assert done.status == "accepted"
    assert done.provider_ref and len(done.provider_ref) == 16
    assert done.segments == 1
    [req] = sandbox.requests("emsgnow")
    assert (req.method, req.path) == ("POST", "/sms")
    assert req.headers["x-api-key"] == sandbox.credentials("emsgnow")["api_key"]
    assert json.loads(req.body) == {"to": "+14155550123", "from": "ACME", "message": "Your code is 482910",
                                    "clientId": "order-17"}
    [attempt] = done.attempt_log
    assert (attempt.number, attempt.http_status, attempt.outcome) == (1, 200, "accepted")


def test_a_task_delivered_twice_sends_once(dispatcher_env, celery_worker_thread, sandbox):
    from dispatcher.queue import enqueue

    msg = dispatcher.send("alerts", "+14155550123", "once only")
    enqueue([msg.id])  # the broker hands the same id out again
    enqueue([msg.id])
    wait_for(lambda: final(msg.id))
    wait_for(lambda: dispatcher.get(msg.id).status == "accepted")
    # let every duplicate task run: they all find the message claimed already
    from dispatcher.dispatch import dispatch_batch

    assert dispatch_batch([msg.id]).claimed == 0
    assert len([r for r in sandbox.requests("emsgnow") if r.method == "POST"]) == 1
    assert len(dispatcher.get(msg.id).attempt_log) == 1


def test_transient_failures_retry_then_succeed(dispatcher_env, celery_worker_thread, sandbox):
    sandbox.set_faults("emsgnow", fail_next=2, fail_status=500)
    msg = dispatcher.send("alerts", "+14155550123", "retry me")
    done = wait_for(lambda: final(msg.id))
    assert done.status == "accepted"
    assert [a.outcome for a in done.attempt_log] == ["retry", "retry", "accepted"]
    assert [a.http_status for a in done.attempt_log] == [500, 500, 200]
    assert len(sandbox.requests("emsgnow")) == 3


def test_retries_are_bounded_and_end_failed(dispatcher_env, celery_worker_thread, sandbox):
    sandbox.set_faults("emsgnow", fail_next=10, fail_status=503)
    msg = dispatcher.send("alerts", "+14155550123", "never gets through")
    done = wait_for(lambda: final(msg.id))
    assert done.status == "failed"
    assert len(done.attempt_log) == 4  # max_attempts in the test config
    assert "gave up after 4 attempts" in done.error
    assert len(sandbox.requests("emsgnow")) == 4


def test_the_providers_own_429s_spend_no_attempt(dispatcher_env, celery_worker_thread, sandbox):
    sandbox.set_faults("emsgnow", fail_next=5, fail_status=429)  # more 429s than max_attempts (4)
    msg = dispatcher.send("alerts", "+14155550123", "waits its turn")
    done = wait_for(lambda: final(msg.id), timeout=30)
    assert done.status == "accepted"
    assert [a.outcome for a in done.attempt_log] == ["throttled"] * 5 + ["accepted"]
    assert done.attempts == 1
    assert len(sandbox.requests("emsgnow")) == 6


def test_a_permanent_error_ends_rejected_with_the_providers_words(dispatcher_env, celery_worker_thread, sandbox):
    msg = dispatcher.send("badkey", "+14155550123", "refused")
    done = wait_for(lambda: final(msg.id))
    assert done.status == "rejected"
    assert done.error_code == "invalid_api_key"
    assert done.error == "Invalid API key"
    assert len(sandbox.requests("emsgnow")) == 1  # never retried


def test_a_templated_message_carries_template_and_variables(dispatcher_env, celery_worker_thread, sandbox):
    msg = dispatcher.send("alerts", "14155550123", template_id="gPVTbWpwQHXgg8KSZ6sX",
                          variables={"name": "Jane Doe"}, **{"from": "SHORT1"})
    assert wait_for(lambda: final(msg.id)).status == "accepted"
    body = sandbox.requests("emsgnow")[0].json
    assert body == {"to": "14155550123", "from": "SHORT1", "templateId": "gPVTbWpwQHXgg8KSZ6sX",
                    "variables": {"name": "Jane Doe"}}


def test_same_idempotency_key_returns_the_first_message_and_sends_once(dispatcher_env, celery_worker_thread, sandbox):
    first = dispatcher.send("alerts", "+14155550123", "hello", idempotency_key="k-1")
    second = dispatcher.send("alerts", "+14155550123", "hello", idempotency_key="k-1")
    assert second.id == first.id
    wait_for(lambda: final(first.id))
    assert len(sandbox.requests("emsgnow")) == 1


def test_cancelled_before_sending_never_goes_out(dispatcher_env, sandbox, broker_down):
    # no task for it: the message waits in the store, then is cancelled
    msg = dispatcher.send("alerts", "+14155550123", "cancel me")
    assert dispatcher.cancel(msg.id).status == "cancelled"
    from dispatcher.dispatch import dispatch_batch

    assert dispatch_batch([msg.id]).claimed == 0
    assert sandbox.requests("emsgnow") == []
    with pytest.raises(dispatcher.TooLate):
        _accepted = dispatcher.send("alerts", "+14155550123", "too late")
        dispatch_batch([_accepted.id])
        dispatcher.cancel(_accepted.id)


CAREFUL = """
[providers.careful]
kind = "emsgnow"
base_url = "{url}"
api_key = "{key}"
from = "ACME"
on_timeout = "unknown"
"""


@pytest.mark.parametrize("account, status, posts", [("alerts", "accepted", 2), ("careful", "unknown", 1)])
def test_a_send_whose_answer_is_lost_is_retried_or_left_unknown_as_the_account_says(
        dispatcher_env, sandbox, broker_down, monkeypatch, account, status, posts):
    from dispatcher import runtime
    from dispatcher.dispatch import dispatch_batch

    from .conftest import write_config

    extra = CAREFUL.format(url=sandbox.base_url("emsgnow"), key=sandbox.credentials("emsgnow")["api_key"])
    monkeypatch.setenv("DISPATCHER_CONFIG", write_config(dispatcher_env / "dispatcher.toml", sandbox, extra))
    runtime.configure(None)
    sandbox.set_faults("emsgnow", lose_next=1)  # the provider takes the SMS; its answer never comes back
    msg = dispatcher.send(account, "+14155550123", "did it go?")
    dispatch_batch([msg.id])
    wait_for(lambda: dispatcher.get(msg.id).status != "sending")
    if status == "accepted":  # "retry" (the default): sent again, so the provider has it twice
        wait_for(lambda: dispatch_batch([msg.id]) and dispatcher.get(msg.id).status == "accepted")
    done = dispatcher.get(msg.id)
    assert done.status == status
    assert len([r for r in sandbox.requests("emsgnow") if r.method == "POST"]) == posts
    if status == "unknown":
        assert "may have reached the provider" in done.error


def test_a_batch_claims_only_what_fits_in_flight_and_leaves_the_rest_queued_untouched(dispatcher_env, sandbox,
                                                                                    broker_down, monkeypatch):
    from dispatcher import dispatch, runtime, transport

    monkeypatch.setattr(dispatch, "BUSY_WAIT_MAX", 0.1)
    ids = dispatcher.send_many([{"provider": "alerts", "to": "+14155550123", "text": f"m{i}"} for i in range(5)])
    before = {mid: dispatcher.get(mid) for mid in ids}
    loop = transport.process_loop(runtime.settings().in_flight)
    requeued: dict[str, float] = {}
    with loop.room({"alerts": loop.in_flight - 2 - loop.busy("alerts")}, 0):  # room for two more only
        report = dispatch.dispatch_batch(ids, enqueue=lambda mids, delay: requeued.update(dict.fromkeys(mids, delay)))
    sent = sorted(report.statuses)
    assert report.claimed == 2 and set(report.statuses.values()) == {"accepted"}
    assert sorted(requeued) == sorted(set(ids) - set(sent)) and all(dispatch.BUSY_WAIT <= d < 1 for d in requeued.values())
    for mid in requeued:  # never claimed, never written: still queued as it was, no attempt counted
        msg, was = dispatcher.get(mid), before[mid]
        assert (msg.status, msg.attempts, len(msg.attempt_log)) == ("queued", 0, 0)
        assert msg.updated_at == was.updated_at
    assert len(sandbox.requests("emsgnow")) == 2

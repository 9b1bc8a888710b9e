"""What happens to a dead worker's claims, late results, exposed keys, lost tasks and leaked room.

Driven in-process against the sandbox with an injected clock: a "dead worker" is a claim made
in its name whose heartbeat row is missing or old. The real SIGKILL runs are tests/test_kills.py.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

import dispatcher
from dispatcher import runtime
from dispatcher.dispatch import dispatch_batch
from dispatcher.schedule import tick
from dispatcher.store import queries
from dispatcher.store.db import session_scope
from dispatcher.store.models import Worker, utcnow


class Enqueued(list):
    def __call__(self, ids, countdown):
        self.extend(ids)


def _claim_as(worker: str, ids: list[str], *, started: bool, token: str = "claim-of-the-dead", last_seen=None):
    """A worker claims `ids` (and starts their requests, if `started`); its last heartbeat was at `last_seen`."""
    now = utcnow()
    with session_scope(runtime.settings().database_url) as db:
        if last_seen is not None:
            db.add(Worker(id=worker, host="elsewhere", pid=1, started_at=last_seen, last_seen=last_seen))
        claimed = queries.claim(db, ids, now, token, worker)
        if started:
            queries.mark_started(db, ids, token, now)
    assert len(claimed) == len(ids)


def _emsgnow_requests(sandbox, text: str) -> list:
    return [r for r in sandbox.requests("emsgnow") if r.json and r.json.get("message") == text]


def test_a_dead_workers_claim_that_never_started_is_sent_not_written_off(dispatcher_env, sandbox, broker_down):
    msg = dispatcher.send("alerts", "+14155550123", "claimed, then the worker was killed")
    _claim_as("ghost-1", [msg.id], started=False)  # no heartbeat at all: dead
    sent = Enqueued()
    report = tick(enqueue=sent)
    assert report.reaped_retry == 1 and report.reaped_unknown == 0 and msg.id in sent
    after = dispatcher.get(msg.id)
    assert (after.status, after.attempts) == ("queued", 0)  # no attempt counted: none was made
    assert dispatch_batch([msg.id]).statuses == {msg.id: "accepted"}
    assert len(_emsgnow_requests(sandbox, "claimed, then the worker was killed")) == 1


def test_a_dead_workers_started_claim_without_a_harmless_resend_becomes_unknown(dispatcher_env, sandbox, broker_down):
    msg = dispatcher.send("alerts", "+14155550123", "in flight when the worker died")
    _claim_as("ghost-2", [msg.id], started=True)
    sent = Enqueued()
    report = tick(enqueue=sent)
    assert report.reaped_unknown == 1 and sent == []
    after = dispatcher.get(msg.id)
    assert (after.status, after.error_code) == ("unknown", "worker_lost")
    assert "may have reached the provider" in after.error
    [lost] = after.attempt_log
    assert lost.outcome == "worker_lost"
    assert dispatch_batch([msg.id]).claimed == 0 and _emsgnow_requests(sandbox, "in flight when the worker died") == []


def test_a_live_workers_claims_are_left_alone_until_its_heartbeat_stops(dispatcher_env, sandbox, broker_down):
    msg = dispatcher.send("alerts", "+14155550123", "slow provider, live worker")
    now = utcnow()
    _claim_as("busy-worker", [msg.id], started=True, last_seen=now)
    timeout = runtime.settings().worker_timeout
    assert tick(clock=lambda: now + timedelta(seconds=timeout - 1), enqueue=Enqueued()).reaped_unknown == 0
    assert dispatcher.get(msg.id).status == "sending"
    assert tick(clock=lambda: now + timedelta(seconds=timeout + 1), enqueue=Enqueued()).reaped_unknown == 1


def test_a_started_esimfly_claim_is_resent_with_its_key_and_the_duplicate_proves_it_arrived(
        dispatcher_env, sandbox, broker_down, tmp_path, monkeypatch):
    from dispatcher import transport
    from dispatcher.dispatch import outbound

    _add_account(tmp_path, monkeypatch, sandbox, "esimfly")
    msg = dispatcher.send("fly", "8901234567890123456", "sent just before the kill")
    _claim_as("ghost-3", [msg.id], started=True)
    with session_scope(runtime.settings().database_url) as db:  # the dead worker's request did arrive
        row = queries.get_message(db, msg.id)
    first = transport.run(lambda: runtime.adapter_for("fly").send(transport.process_loop().client(), outbound(row)))
    assert type(first.outcome).__name__ == "Accepted"
    sent = Enqueued()
    assert tick(enqueue=sent).reaped_retry == 1 and sent == [msg.id]
    assert _row(msg.id).attempt_key == row.attempt_key  # the same key: never replaced once exposed
    assert dispatch_batch([msg.id]).statuses == {msg.id: "accepted"}
    answers = [r.status for r in sandbox.requests("esimfly")]
    assert answers == [200, 409]  # one SMS; the resend was refused as DUPLICATE_REQUEST


@pytest.mark.parametrize("arrived", [True, False], ids=["arrived", "never-arrived"])
def test_a_started_emnify_claim_is_settled_by_the_endpoints_sms_list(dispatcher_env, sandbox, broker_down, tmp_path,
                                                                    monkeypatch, arrived):
    from dispatcher import transport
    from dispatcher.dispatch import outbound

    _add_account(tmp_path, monkeypatch, sandbox, "emnify", source_address="12345")
    msg = dispatcher.send("iot", "4711", "lost answer, endpoint list knows")
    _claim_as("ghost-4", [msg.id], started=True)
    if arrived:  # the dead worker's request reached emnify; its answer was lost with the worker
        result = transport.run(lambda: runtime.adapter_for("iot").send(transport.process_loop().client(),
                                                                      outbound(_row(msg.id))))
        assert type(result.outcome).__name__ == "Accepted"
    after_timeout = utcnow() + timedelta(seconds=runtime.settings().providers["iot"].timeout + 2)
    sent = Enqueued()
    report = tick(clock=lambda: after_timeout, enqueue=sent)
    sms = [r for r in sandbox.requests("emnify") if r.method == "POST" and r.path.endswith("/sms")]
    if arrived:
        assert report.reaped_found == 1 and sent == []
        after = dispatcher.get(msg.id)
        assert after.status == "accepted" and after.provider_ref  # found, with the provider's id
        assert len(sms) == 1
    else:
        assert report.reaped_retry == 1 and sent == [msg.id]  # provably absent: sent after all
        _due_now(msg.id)
        assert dispatch_batch([msg.id]).statuses == {msg.id: "accepted"}
        assert len([r for r in sandbox.requests("emnify") if r.method == "POST" and r.path.endswith("/sms")]) == 1


@pytest.mark.parametrize("fault, arrived", [("reset_processed_next", True), ("reset_next", False)],
                         ids=["provider-took-it", "provider-never-saw-it"])
def test_a_lost_emnify_answer_is_settled_by_asking_the_provider_not_by_a_blind_resend(
        dispatcher_env, sandbox, broker_down, tmp_path, monkeypatch, fault, arrived):
    _add_account(tmp_path, monkeypatch, sandbox, "emnify", source_address="12345")
    warm = dispatcher.send("iot", "4712", "warm-up: the token exchange is done before the fault")
    assert dispatch_batch([warm.id]).statuses == {warm.id: "accepted"}
    msg = dispatcher.send("iot", "4711", "answer lost on the way back")
    sandbox.set_faults("emnify", **{fault: 1})
    report = dispatch_batch([msg.id], enqueue=Enqueued())
    assert report.statuses == {msg.id: "sending"}  # not resent, not written off: the provider is asked
    assert dispatcher.get(msg.id).attempt_log[-1].outcome == "ambiguous"
    sent = Enqueued()
    after_timeout = utcnow() + timedelta(seconds=runtime.settings().providers["iot"].timeout + 2)
    tick(clock=lambda: after_timeout, enqueue=sent)
    after = dispatcher.get(msg.id)
    if arrived:
        assert after.status == "accepted" and after.provider_ref and sent == []
    else:
        assert after.status == "queued" and sent == [msg.id]  # provably absent: sent again
        _due_now(msg.id)
        assert dispatch_batch([msg.id]).statuses == {msg.id: "accepted"}
    created = [r for r in sandbox.requests("emnify") if r.method == "POST" and r.path.endswith("/4711/sms")
               and (r.status == 201 or r.fault == "reset_processed")]
    assert len(created) == 1  # one SMS at the provider either way


def test_a_late_result_never_lands_on_a_later_claim(dispatcher_env, broker_down):
    msg = dispatcher.send("alerts", "+14155550123", "reaped, then claimed again")
    now = utcnow()
    with session_scope(runtime.settings().database_url) as db:
        queries.claim(db, [msg.id], now, "old-claim", "w-old")
        queries.hand_back(db, [msg.id], "old-claim", now, now)  # the reaper gave it back
        queries.claim(db, [msg.id], now, "new-claim", "w-new")
    late = queries.Settlement(msg.id, _values(status="accepted", provider_ref="late"), None, "old-claim")
    with session_scope(runtime.settings().database_url) as db:
        assert queries.record(db, [late]) == 0
    assert dispatcher.get(msg.id).status == "sending"  # still the new claim's to settle


def test_after_an_ambiguous_attempt_a_later_definite_failure_keeps_the_key(dispatcher_env, sandbox, broker_down):
    msg = dispatcher.send("alerts", "+14155550123", "timeout, then a 500")
    key = _row(msg.id).attempt_key
    sandbox.set_faults("emsgnow", hang_next=1, hang_ms=3000)
    _with_timeout(0.5)
    assert dispatch_batch([msg.id], enqueue=Enqueued()).statuses == {msg.id: "queued"}
    assert _row(msg.id).attempt_key == key
    sandbox.set_faults("emsgnow", fail_next=1, fail_status=500)
    _due_now(msg.id)
    assert dispatch_batch([msg.id], enqueue=Enqueued()).statuses == {msg.id: "queued"}
    assert _row(msg.id).attempt_key == key  # it may be at the provider under that key


def test_after_a_definite_failure_alone_a_fresh_key_is_used(dispatcher_env, sandbox, broker_down):
    msg = dispatcher.send("alerts", "+14155550123", "a plain 500")
    key = _row(msg.id).attempt_key
    sandbox.set_faults("emsgnow", fail_next=1, fail_status=500)
    assert dispatch_batch([msg.id], enqueue=Enqueued()).statuses == {msg.id: "queued"}
    assert _row(msg.id).attempt_key != key


def test_room_taken_for_a_batch_is_given_back_when_a_step_before_the_send_fails(dispatcher_env, broker_down,
                                                                                monkeypatch):
    from dispatcher import dispatch, transport

    ids = dispatcher.send_many([{"provider": "alerts", "to": "+14155550123", "text": f"r{i}"} for i in range(3)])
    loop = transport.process_loop(runtime.settings().in_flight)
    before = loop.busy("alerts")

    def broken(*args, **kwargs):
        raise RuntimeError("the limiter blew up")

    monkeypatch.setattr(dispatch, "admit", broken)
    for _ in range(3):
        with pytest.raises(RuntimeError):
            dispatch_batch(ids, enqueue=Enqueued())
        assert {dispatcher.get(i).status for i in ids} == {"queued"}  # handed back, not stuck `sending`
        for mid in ids:
            _due_now(mid)
    assert loop.busy("alerts") == before  # nothing leaked, however often it fails


def test_a_hand_back_the_store_refuses_is_retried_not_left_sending_until_the_lease(dispatcher_env, broker_down,
                                                                                   monkeypatch, caplog):
    from sqlalchemy.exc import OperationalError

    from dispatcher import dispatch, transport

    ids = dispatcher.send_many([{"provider": "alerts", "to": "+14155550123", "text": f"hb{i}"} for i in range(3)])
    real, failures = queries.hand_back, []

    def flaky(*args, **kwargs):
        if len(failures) < 2:
            failures.append(1)
            raise OperationalError("UPDATE messages", {}, Exception("database is locked"))
        return real(*args, **kwargs)

    def broken(*args, **kwargs):
        raise RuntimeError("the limiter blew up")

    monkeypatch.setattr(queries, "hand_back", flaky)
    monkeypatch.setattr(dispatch, "admit", broken)
    with pytest.raises(RuntimeError):
        dispatch_batch(ids, enqueue=Enqueued())
    transport.process_loop().drain(timeout=10)  # the background retry
    assert {dispatcher.get(i).status for i in ids} == {"queued"}  # handed back, not `sending` for 5 minutes
    assert len(failures) == 2
    assert any(ids[0] in r.getMessage() for r in caplog.records if "hand back" in r.getMessage())


def test_sends_that_cannot_be_started_in_the_background_are_handed_back_with_their_room(dispatcher_env, broker_down,
                                                                                          monkeypatch):
    from dispatcher import transport

    ids = dispatcher.send_many([{"provider": "alerts", "to": "+14155550123", "text": f"sb{i}"} for i in range(3)])
    loop = transport.process_loop(runtime.settings().in_flight)
    before = loop.busy("alerts")

    def shut(factory):
        raise RuntimeError("Event loop is closed")

    monkeypatch.setattr(loop, "submit", shut)
    with pytest.raises(RuntimeError):
        dispatch_batch(ids, enqueue=Enqueued(), wait=False)
    assert {dispatcher.get(i).status for i in ids} == {"queued"}  # not `sending` until the lease
    assert loop.busy("alerts") == before  # and the room came back


def test_a_store_that_refuses_the_record_for_a_while_delays_it_but_loses_nothing(dispatcher_env, sandbox, broker_down,
                                                                                 monkeypatch, caplog):
    from sqlalchemy.exc import OperationalError

    ids = dispatcher.send_many([{"provider": "alerts", "to": "+14155550123", "text": f"busy db {i}"} for i in range(4)])
    real, failures = queries.record, []

    def flaky(db, settlements):
        if len(failures) < 2:
            failures.append(1)
            raise OperationalError("UPDATE messages", {}, Exception("database is locked"))
        return real(db, settlements)

    monkeypatch.setattr(queries, "record", flaky)
    report = dispatch_batch(ids)
    assert set(report.statuses.values()) == {"accepted"} and len(failures) == 2
    assert {dispatcher.get(i).status for i in ids} == {"accepted"}
    assert any(ids[0] in r.getMessage() for r in caplog.records if "recording" in r.getMessage())


def test_one_unstorable_outcome_does_not_drop_the_others(dispatcher_env, sandbox, broker_down, monkeypatch):
    from dispatcher.providers import emsgnow
    from dispatcher.providers.base import Accepted

    ids = dispatcher.send_many([{"provider": "alerts", "to": "+14155550123", "text": f"odd ref {i}"} for i in range(3)])
    real = emsgnow.EmsgnowAdapter.parse_response

    def odd(self, response, msg):
        outcome = real(self, response, msg)
        if msg.text == "odd ref 1":
            return Accepted(provider_ref="x" * 5000, cost=float("nan"))
        if msg.text == "odd ref 2":  # what no driver stores as it is: a lone surrogate, a NUL, a huge count
            return Accepted(provider_ref="ref-\ud800-\x00", provider_status="\udfff", segments=10**20)
        return outcome

    monkeypatch.setattr(emsgnow.EmsgnowAdapter, "parse_response", odd)
    report = dispatch_batch(ids)
    assert set(report.statuses.values()) == {"accepted"}
    assert {dispatcher.get(i).status for i in ids} == {"accepted"}


def test_the_reaper_never_hands_back_a_claim_whose_start_was_recorded_meanwhile(dispatcher_env, broker_down):
    """The reaper reads a claim as unstarted; its worker (alive after all) then records the start
    and writes the request: the hand-back must not match, or a second worker sends it again."""
    msg = dispatcher.send("alerts", "+14155550123", "started while the reaper looked away")
    _claim_as("slow-beater", [msg.id], started=False)
    with session_scope(runtime.settings().database_url) as db:  # the worker records its start now
        assert queries.mark_started(db, [msg.id], "claim-of-the-dead", utcnow()) == {msg.id}
    with session_scope(runtime.settings().database_url) as db:  # the reaper's hand-back, a moment late
        assert queries.hand_back(db, [msg.id], "claim-of-the-dead", utcnow(), utcnow(), unstarted_only=True) == []
    assert dispatcher.get(msg.id).status == "sending"


def test_a_message_of_an_account_removed_from_the_config_never_holds_up_its_batch(dispatcher_env, sandbox,
                                                                                 broker_down, tmp_path, monkeypatch):
    _add_account(tmp_path, monkeypatch, sandbox, "esimfly")
    gone = dispatcher.send("fly", "8901234567890123456", "its account will be removed")
    kept = dispatcher.send("alerts", "+14155550123", "its account stays")
    from tests.conftest import write_config

    monkeypatch.setenv("DISPATCHER_CONFIG", write_config(tmp_path / "without-fly.toml", sandbox))
    runtime.configure(None)
    assert dispatch_batch([gone.id, kept.id]).statuses == {kept.id: "accepted"}
    assert dispatcher.get(gone.id).status == "queued"  # left waiting for its account, never claimed


def test_a_provider_dripping_its_answer_is_cut_off_at_the_timeout_not_waited_for(dispatcher_env, sandbox,
                                                                                   broker_down):
    """Each byte within the per-read timeout, the whole far beyond it: the send ends at the
    account's timeout (ambiguous), so one slow answer never holds its batch's record for minutes."""
    import time

    ids = dispatcher.send_many([{"provider": "alerts", "to": "+14155550123", "text": f"drip {i}"} for i in range(3)])
    _with_timeout(0.6)
    sandbox.set_faults("emsgnow", drip_next=1, drip_ms=400)
    started = time.monotonic()
    report = dispatch_batch(ids, enqueue=Enqueued())
    assert time.monotonic() - started < 10
    assert sorted(report.statuses.values()) == ["accepted", "accepted", "queued"]  # the dripped one: retried


def test_a_lost_backlog_is_published_again_once_per_interval_not_every_tick(dispatcher_env, broker_down):
    import redis

    from dispatcher import keys

    ids = dispatcher.send_many([{"provider": "alerts", "to": "+14155550123", "text": f"lost {i}"} for i in range(5)])
    redis.Redis.from_url(runtime.settings().redis_url).set(keys.broker_epoch(), "kept")  # Redis kept its data
    lost_after = runtime.settings().lost_after
    start = utcnow()
    early, first, second, third = Enqueued(), Enqueued(), Enqueued(), Enqueued()
    tick(clock=lambda: start + timedelta(seconds=lost_after - 5), enqueue=early)
    tick(clock=lambda: start + timedelta(seconds=lost_after + 1), enqueue=first)
    tick(clock=lambda: start + timedelta(seconds=lost_after + 2), enqueue=second)
    tick(clock=lambda: start + timedelta(seconds=2 * lost_after + 5), enqueue=third)
    assert early == []  # a task is not taken for lost before lost_after
    assert sorted(first) == sorted(ids) and second == []  # once per lost_after, not on every tick
    assert sorted(third) == sorted(ids)


def test_when_redis_loses_its_data_every_queued_message_is_published_again_at_once(dispatcher_env, broker_down):
    import redis

    from dispatcher import keys

    ids = dispatcher.send_many([{"provider": "alerts", "to": "+14155550123", "text": f"q {i}"} for i in range(3)])
    client = redis.Redis.from_url(runtime.settings().redis_url)
    client.delete(keys.broker_epoch())  # what a restart without persistence does to every key
    sent = Enqueued()
    tick(enqueue=sent)
    assert sorted(sent) == sorted(ids)  # not after lost_after: now
    again = Enqueued()
    tick(enqueue=again)
    assert again == []  # once


# --------------------------------------------------------------------------- helpers
def _row(mid: str):
    with session_scope(runtime.settings().database_url) as db:
        return queries.get_message(db, mid)


def _values(**changes):
    v = {c: None for c in queries._SETTLE_COLUMNS}
    v.update(attempts=1, segments=1, key_exposed=False, updated_at=utcnow())
    v.update(changes)
    return v


def _due_now(mid: str) -> None:
    from sqlalchemy import update

    from dispatcher.store.models import Message

    with session_scope(runtime.settings().database_url) as db:
        db.execute(update(Message).where(Message.id == mid).values(due_at=utcnow() - timedelta(seconds=1)))


def _with_timeout(seconds: float) -> None:
    import dataclasses

    s = runtime.settings()
    acct = dataclasses.replace(s.providers["alerts"], timeout=seconds)
    runtime.configure(dataclasses.replace(s, providers={**s.providers, "alerts": acct}))


ACCOUNT = {"esimfly": "fly", "emnify": "iot"}  # one name per kind: rate-limit state is kept per name


def _add_account(tmp_path, monkeypatch, sandbox, kind: str, **fields) -> None:
    """An account of `kind` on the sandbox (named as ACCOUNT says), beside the usual ones."""
    from tests.conftest import write_config

    values = {**sandbox.credentials(kind), **fields}
    extra = f"\n[providers.{ACCOUNT[kind]}]\n" + f'kind = "{kind}"\nbase_url = "{sandbox.base_url(kind)}"\n' + "".join(
        f'{k} = "{v}"\n' for k, v in values.items())
    monkeypatch.setenv("DISPATCHER_CONFIG", write_config(tmp_path / "with-fly.toml", sandbox, extra))
    runtime.configure(None)

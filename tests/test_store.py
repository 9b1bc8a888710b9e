"""The store's state machine on SQLite and PostgreSQL: compare-and-set claims, release, expiry, events."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
from datetime import datetime, timedelta, timezone

import pytest

from dispatcher.store import queries
from dispatcher.store.db import session_scope, upgrade
from dispatcher.store.models import Message, utcnow


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'store.db'}"
    else:
        url = request.getfixturevalue("pg_url")
        from sqlalchemy import create_engine

        engine = create_engine(url)
        with engine.begin() as conn:  # a clean slate inside this session's schema
            tables = conn.exec_driver_sql("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
            for (table,) in list(tables):
                conn.exec_driver_sql(f'DROP TABLE IF EXISTS "{table}" CASCADE')
        engine.dispose()
    upgrade(url)
    return url


def _add(url: str, n: int, **fields) -> list[str]:
    now = utcnow()
    rows = []
    for i in range(n):
        m = Message(provider="alerts", kind="emsgnow", to=f"+1415555{i:04d}", text="hi", status=fields.get("status", "queued"),
                    due_at=fields.get("due_at", now), not_after=fields.get("not_after"), attempt_key=f"k{i}")
        rows.append({c: getattr(m, c) for c in Message.__table__.columns.keys()})
    with session_scope(url) as db:
        queries.add_messages(db, rows)
    return [r["id"] for r in rows]


TOKEN = "claim-1"


def _status(url: str, mid: str) -> str:
    with session_scope(url) as db:
        return queries.get_message(db, mid).status


def test_claim_moves_queued_to_sending_once(store_url):
    ids = _add(store_url, 3)
    with session_scope(store_url) as db:
        first = queries.claim(db, ids, utcnow(), TOKEN, "worker-1")
    with session_scope(store_url) as db:
        second = queries.claim(db, ids, utcnow(), TOKEN, "worker-1")
    assert sorted(m.id for m in first) == sorted(ids)
    assert all(m.status == "sending" and m.attempts == 1 for m in first)
    assert second == []


def test_claim_skips_messages_not_yet_due(store_url):
    [mid] = _add(store_url, 1, due_at=utcnow() + timedelta(minutes=5))
    with session_scope(store_url) as db:
        assert queries.claim(db, [mid], utcnow(), TOKEN, "worker-1") == []
    assert _status(store_url, mid) == "queued"


def _claim_in_child(url: str, ids: list[str], out) -> None:  # type: ignore[no-untyped-def]
    from dispatcher.store.db import dispose_all

    dispose_all()
    claimed = []
    for mid in ids:  # one claim per message, racing the other processes
        with session_scope(url) as db:
            claimed += [m.id for m in queries.claim(db, [mid], utcnow(), TOKEN, "worker-1")]
    out.put(claimed)


def test_concurrent_processes_claim_each_message_exactly_once(store_url):
    ids = _add(store_url, 60)
    ctx = multiprocessing.get_context("spawn")  # a forked child could inherit a lock another thread held
    out = ctx.Queue()
    procs = [ctx.Process(target=_claim_in_child, args=(store_url, ids, out)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    claimed = [mid for r in results for mid in r]
    assert sorted(claimed) == sorted(ids)  # every message once, none twice


def test_release_of_due_scheduled_messages_happens_once(store_url):
    now = utcnow()
    ids = _add(store_url, 5, status="scheduled", due_at=now - timedelta(seconds=1))
    later = _add(store_url, 1, status="scheduled", due_at=now + timedelta(hours=1))
    with session_scope(store_url) as db:
        due = queries.due_ids(db, "scheduled", now, 100)
    with session_scope(store_url) as db:
        a = queries.release(db, due, now)
    with session_scope(store_url) as db:  # a second beat with the same list
        b = queries.release(db, due, now)
    assert sorted(a) == sorted(ids) and b == []
    assert _status(store_url, later[0]) == "scheduled"


def test_waiting_messages_past_not_after_expire(store_url):
    now = utcnow()
    [gone] = _add(store_url, 1, due_at=now, not_after=now - timedelta(seconds=1))
    [fine] = _add(store_url, 1, due_at=now, not_after=now + timedelta(hours=1))
    with session_scope(store_url) as db:
        assert queries.expire_overdue(db, None, now) == [gone]
    with session_scope(store_url) as db:
        assert queries.claim(db, [gone, fine], now, TOKEN, "worker-1")[0].id == fine
    assert _status(store_url, gone) == "expired"


def test_final_status_never_moves_back(store_url):
    [mid] = _add(store_url, 1, status="delivered")
    with session_scope(store_url) as db:
        assert not queries.set_status(db, mid, ["accepted"], {"status": "failed"})
        assert queries.claim(db, [mid], utcnow(), TOKEN, "worker-1") == []
    assert _status(store_url, mid) == "delivered"


def test_events_are_stored_once_each(store_url):
    [mid] = _add(store_url, 1, status="accepted")
    events = [{"event_id": "e1", "status": "accepted", "provider_status": "processing", "occurred_at": utcnow(),
               "recorded_at": utcnow(), "detail": {}}]
    with session_scope(store_url) as db:
        assert queries.add_events(db, mid, events) == 1
    with session_scope(store_url) as db:
        assert queries.add_events(db, mid, events) == 0
        assert [e.event_id for e in queries.get_events(db, mid)] == ["e1"]


def test_times_come_back_timezone_aware(store_url):
    [mid] = _add(store_url, 1)
    with session_scope(store_url) as db:
        m = queries.get_message(db, mid)
    assert m.created_at.tzinfo is not None and m.due_at.utcoffset() == timedelta(0)


def _settlement(mid: str, now, **values) -> queries.Settlement:
    unchanged = {c: None for c in queries._SETTLE_COLUMNS}
    unchanged.update(claimed_at=None, updated_at=now, segments=0, attempts=1, key_exposed=False)
    unchanged.update(values)
    attempt = {"message_id": mid, "number": 1, "started_at": now, "http_status": values.get("http_status_", 200),
               "outcome": values["status"], "provider_code": values.get("error_code"), "detail": None, "latency_ms": 1.5}
    unchanged.pop("http_status_", None)
    return queries.Settlement(mid, unchanged, attempt, TOKEN)


def test_record_applies_each_message_its_own_outcome_in_one_batch(store_url):
    now = utcnow()
    ids = _add(store_url, 5, due_at=now)
    accepted, retried, rejected, cancelled, reaped = ids
    with session_scope(store_url) as db:
        assert len(queries.claim(db, ids, now, TOKEN, "worker-1")) == 5
    with session_scope(store_url) as db:  # meanwhile: one cancelled, one settled by the reaper
        assert queries.set_status(db, cancelled, ["sending"], {"status": "cancelled", "finished_at": now})
        assert queries.set_status(db, reaped, ["sending"], {"status": "unknown", "error_code": "lease_lost"})
    due = now + timedelta(seconds=30)
    batch = [
        _settlement(accepted, now, status="accepted", provider_ref="ref-1", accepted_at=now, segments=2, cost=0.0075,
                    cost_currency="EUR"),
        _settlement(retried, now, status="queued", due_at=due, attempt_key="key-2", error_code="busy", error="try later"),
        _settlement(rejected, now, status="rejected", error_code="bad_number", error="no such number", finished_at=now),
        _settlement(cancelled, now, status="accepted", provider_ref="ref-4", accepted_at=now),
        _settlement(reaped, now, status="accepted", provider_ref="ref-5", accepted_at=now),
    ]
    with session_scope(store_url) as db:
        assert queries.record(db, batch) == 3  # only the three still `sending` moved
    with session_scope(store_url) as db:
        got = {mid: queries.get_message(db, mid) for mid in ids}
        attempts = {mid: queries.get_attempts(db, mid) for mid in ids}
    a, q, r, c, u = (got[i] for i in ids)
    assert (a.status, a.provider_ref, a.segments, a.cost, a.cost_currency, a.error_code) == (
        "accepted", "ref-1", 2, 0.0075, "EUR", None)
    assert a.accepted_at == now and a.finished_at is None and a.due_at is None and a.claimed_at is None
    assert (q.status, q.due_at, q.attempt_key, q.error_code, q.error, q.provider_ref) == (
        "queued", due, "key-2", "busy", "try later", None)
    assert (r.status, r.error_code, r.error, r.finished_at, r.provider_ref) == (
        "rejected", "bad_number", "no such number", now, None)
    assert (c.status, c.provider_ref, c.accepted_at) == ("cancelled", None, None)  # a final status never moves
    assert (u.status, u.error_code, u.provider_ref) == ("unknown", "lease_lost", None)
    assert [(x.outcome, x.latency_ms) for x in attempts[accepted]] == [("accepted", 1.5)]
    assert [x.outcome for x in attempts[retried]] == ["queued"]
    assert all(len(attempts[i]) == 1 for i in ids)  # every attempt made is kept, settled or not


def test_record_of_a_larger_batch_keeps_each_outcome_with_its_message(store_url):
    now = utcnow()
    ids = _add(store_url, 30, due_at=now)
    with session_scope(store_url) as db:
        queries.claim(db, ids, now, TOKEN, "worker-1")
    batch = [_settlement(mid, now, status="accepted" if i % 2 else "rejected", provider_ref=f"r{i}")
             for i, mid in enumerate(ids)]
    with session_scope(store_url) as db:
        assert queries.record(db, batch) == 30
    with session_scope(store_url) as db:
        got = [queries.get_message(db, mid) for mid in ids]
    assert [(m.status, m.provider_ref) for m in got] == [("accepted" if i % 2 else "rejected", f"r{i}") for i in range(30)]


def test_record_stores_each_instant_of_a_batch_as_given_across_a_clock_change(store_url):
    """A batch's times are converted once per instant: two wall times that read the same in a
    zone (01:30 before and after New York's clocks go back) are still two instants."""
    from zoneinfo import ZoneInfo

    now = utcnow()
    ids = _add(store_url, 3, due_at=now)
    with session_scope(store_url) as db:
        queries.claim(db, ids, now, TOKEN, "worker-1")
    first = datetime(2026, 11, 1, 1, 30, tzinfo=ZoneInfo("America/New_York"))
    second = first.replace(fold=1)  # an hour later
    assert first == second  # as Python compares them: same zone, same wall time
    due = [first, second, first.astimezone(timezone.utc)]
    batch = [_settlement(mid, now, status="queued", due_at=d) for mid, d in zip(ids, due)]
    with session_scope(store_url) as db:
        assert queries.record(db, batch) == 3
    with session_scope(store_url) as db:
        got = [queries.get_message(db, mid).due_at for mid in ids]
    assert [g.timestamp() for g in got] == [d.timestamp() for d in due]
    assert got[1] - got[0] == timedelta(hours=1)


def test_claim_takes_only_what_is_due_and_not_overdue_and_returns_the_rows(store_url):
    now = utcnow()
    [due] = _add(store_url, 1, due_at=now - timedelta(seconds=1), not_after=now + timedelta(hours=1))
    [later] = _add(store_url, 1, due_at=now + timedelta(minutes=5))
    [overdue] = _add(store_url, 1, due_at=now, not_after=now - timedelta(seconds=1))
    [held] = _add(store_url, 1, status="scheduled", due_at=now)
    with session_scope(store_url) as db:
        waiting = queries.waiting(db, [due, later, overdue, held, "no-such-id"])
        claimed = queries.claim(db, [due, later, overdue, held], now, TOKEN, "worker-1")
    assert sorted(w.id for w in waiting) == sorted([due, later, overdue, held])
    assert [(m.id, m.status, m.attempts, m.claimed_at, m.to) for m in claimed] == [(due, "sending", 1, now, "+14155550000")]
    assert [_status(store_url, i) for i in (later, overdue, held)] == ["queued", "queued", "scheduled"]


def test_the_campaign_loader_migration_finds_the_line_a_load_still_loading_reached(store_url):
    """0007: a campaign `loading` when the store is upgraded (its loader maybe dead) gets the last
    line its chunks committed, so that resuming it stores nothing twice; a loaded one keeps 0."""
    import sqlalchemy as sa
    from alembic import command

    from dispatcher.store.db import alembic_config, dispose_all
    from dispatcher.store.models import Campaign

    command.downgrade(alembic_config(store_url), "0006")
    dispose_all()
    now = utcnow()
    campaigns = sa.table("campaigns", *(sa.column(c) for c in (
        "id", "provider", "template", "options", "to_field", "state", "total", "invalid_count", "segments",
        "created_at", "updated_at", "loaded_at")), sa.column("options", sa.JSON))
    errors = sa.table("campaign_errors", sa.column("campaign_id"), sa.column("line"), sa.column("reason"))
    with session_scope(store_url) as db:
        for cid, state, loaded in (("c-loading", "loading", None), ("c-errors-last", "loading", None),
                                   ("c-loaded", "running", now)):
            db.execute(sa.insert(campaigns).values(id=cid, provider="alerts", template="hi", options={}, to_field="to",
                                                   state=state, total=0, invalid_count=0, segments=0, created_at=now,
                                                   updated_at=now, loaded_at=loaded))
    for cid, lines in (("c-loading", range(2, 12)), ("c-errors-last", range(2, 5)), ("c-loaded", range(2, 9))):
        ids = _add(store_url, len(lines), status="pending")
        with session_scope(store_url) as db:
            for mid, line in zip(ids, lines):
                db.execute(sa.update(Message.__table__).where(Message.__table__.c.id == mid)
                           .values(campaign_id=cid, campaign_line=line))
    with session_scope(store_url) as db:
        db.execute(sa.insert(errors), [{"campaign_id": "c-loading", "line": 7, "reason": "bad"},
                                       {"campaign_id": "c-errors-last", "line": 6, "reason": "bad"}])
    upgrade(store_url)
    with session_scope(store_url) as db:
        got = {c.id: (c.last_line, c.loader) for c in db.execute(sa.select(Campaign)).scalars()}
    assert got == {"c-loading": (11, None), "c-errors-last": (6, None), "c-loaded": (0, None)}


def test_a_start_written_from_the_send_loop_holds_only_for_its_own_claim(request):
    """On PostgreSQL the worker records starts from its event loop (store/loopstarts.py): the
    same compare-and-set as mark_started, so a claim taken over meanwhile is not started, and an
    unreachable database raises (the send is then not made)."""
    import asyncio

    from sqlalchemy.engine import make_url

    from dispatcher.store import loopstarts

    url = request.getfixturevalue("pg_url")
    upgrade(url)
    mine, taken = _add(url, 2)
    now = utcnow()
    with session_scope(url) as db:
        queries.claim(db, [mine], now, TOKEN, "worker-1")
        queries.claim(db, [taken], now, "someone-else", "worker-2")

    async def write() -> tuple[set[str], set[str]]:
        writer = loopstarts.LoopStarts(url)
        try:
            started = await writer.mark_started([mine, taken], TOKEN, now)
            with session_scope(url) as db:
                assert queries.get_message(db, mine).started_at == now
            taken_back = await writer.mark_started([mine], TOKEN, None)
        finally:
            await writer.aclose()
        return started, taken_back

    started, taken_back = asyncio.run(write())
    assert started == {mine} and taken_back == {mine}
    with session_scope(url) as db:
        assert queries.get_message(db, mine).started_at is None  # taken back
        assert queries.get_message(db, taken).started_at is None  # another claim's: untouched

    unreachable = make_url(url).set(port=1).render_as_string(hide_password=False)

    async def write_away() -> None:
        await loopstarts.LoopStarts(unreachable).mark_started([mine], TOKEN, now)

    with pytest.raises(Exception):
        asyncio.run(write_away())


def test_a_record_held_up_by_a_lock_is_retried_whole_not_stored_reduced(pg_url, monkeypatch):
    """A record waiting on a locked row past lock_timeout fails as the store being busy: the whole
    outcome is stored once the lock goes, never the row reduced to its status (cost, currency and
    provider status dropped), which is only for a value the store refuses."""
    import psycopg
    from sqlalchemy.engine import make_url

    from dispatcher import dispatch

    url = pg_url + "%20-clock_timeout%3D300"
    upgrade(url)
    [mid] = _add(url, 1)
    now = utcnow()
    with session_scope(url) as db:
        queries.claim(db, [mid], now, TOKEN, "w1")
    locker = psycopg.connect(make_url(pg_url).set(drivername="postgresql").render_as_string(hide_password=False))
    locker.execute("SELECT id FROM messages WHERE id = %s FOR UPDATE", [mid])  # someone holds the row a while
    reduced = dispatch._reduced

    def lock_gone_then_reduce(st):  # type: ignore[no-untyped-def]
        locker.rollback()
        return reduced(st)

    monkeypatch.setattr(dispatch, "_reduced", lock_gone_then_reduce)
    values = {"status": "accepted", "attempts": 1, "due_at": None, "attempt_key": "k", "key_exposed": False,
              "provider_ref": "ref-1", "provider_status": "sent", "segments": 1, "cost": 0.05,
              "cost_currency": "EUR", "error_code": None, "error": None, "accepted_at": now, "finished_at": None,
              "claimed_at": now, "claimed_by": "w1", "updated_at": now}
    st = queries.Settlement(mid, values, None, TOKEN)
    for _ in range(3):  # record_durably's loop
        try:
            dispatch._store(url, TOKEN, {}, now, [st])
            break
        except Exception:  # noqa: BLE001 - the store was busy: tried again
            locker.rollback()
    locker.close()
    with session_scope(url) as db:
        m = queries.get_message(db, mid)
    assert (m.status, m.provider_ref, m.cost, m.cost_currency, m.provider_status) == ("accepted", "ref-1", 0.05, "EUR", "sent")


def test_a_start_after_the_server_dropped_its_idle_connection_still_goes(pg_url):
    """PostgreSQL restarted (or idle_session_timeout) dropped the send loop's idle start
    connection: the next start is written on a new one, not refused while the database is up."""
    import uuid

    import psycopg
    from sqlalchemy.engine import make_url

    from dispatcher import dispatch, transport

    app = f"starts-{uuid.uuid4().hex[:8]}"
    url = pg_url + f"&application_name={app}"
    upgrade(url)
    first, second = _add(url, 2)
    with session_scope(url) as db:
        queries.claim(db, [first, second], utcnow(), TOKEN, "w1")
    loop = transport.process_loop()
    starts = dispatch.Starts(url, TOKEN, utcnow)

    async def start(mid):  # type: ignore[no-untyped-def]
        return await starts.start(mid)

    assert loop.run(lambda: start(first)) is dispatch.STARTED
    admin_url = make_url(pg_url).set(drivername="postgresql", query={}).render_as_string(hide_password=False)
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s", [app])
    assert loop.run(lambda: start(second)) is dispatch.STARTED


def test_a_start_write_left_unanswered_fails_in_bounded_time_and_starts_nothing(pg_url, monkeypatch):
    """A start write that hangs (here: its row locked by another transaction) gives up after
    WRITE_TIMEOUT: the message is then not sent, rather than every start of the process waiting."""
    import asyncio

    import psycopg
    from sqlalchemy.engine import make_url

    from dispatcher.store import loopstarts

    upgrade(pg_url)
    [mid] = _add(pg_url, 1)
    with session_scope(pg_url) as db:
        queries.claim(db, [mid], utcnow(), TOKEN, "w1")
    monkeypatch.setattr(loopstarts, "WRITE_TIMEOUT", 0.5)
    locker = psycopg.connect(make_url(pg_url).set(drivername="postgresql").render_as_string(hide_password=False))
    locker.execute("SELECT id FROM messages WHERE id = %s FOR UPDATE", [mid])

    async def write() -> None:
        writer = loopstarts.LoopStarts(pg_url)
        try:
            await writer.mark_started([mid], TOKEN, utcnow())
        finally:
            await writer.aclose()

    try:
        with pytest.raises(TimeoutError):
            asyncio.run(write())
    finally:
        locker.rollback()
        locker.close()
    with session_scope(pg_url) as db:
        assert queries.get_message(db, mid).started_at is None


def test_a_start_refused_for_a_paused_campaign_hands_that_message_back_and_starts_the_one_beside_it(store_url):
    """Starts that come due together are written together: a campaign paused after its message
    was claimed has that message handed back at once, while a single send in the same write
    still starts (the write does not fail as a whole and send neither)."""
    import asyncio

    from dispatcher import dispatch, transport
    from dispatcher.store.models import Campaign

    with session_scope(store_url) as db:
        campaign = Campaign(provider="alerts", template="hi", state="paused")
        db.add(campaign)
        db.flush()
        campaign_id = campaign.id
    single, of_campaign = _add(store_url, 2)
    with session_scope(store_url) as db:
        db.get(Message, of_campaign).campaign_id = campaign_id
    with session_scope(store_url) as db:
        queries.claim(db, [single, of_campaign], utcnow(), TOKEN, "w1")
    starts = dispatch.Starts(store_url, TOKEN, utcnow)

    async def both():  # type: ignore[no-untyped-def]
        return await asyncio.gather(starts.start(single), starts.start(of_campaign))

    assert transport.process_loop().run(both) == [dispatch.STARTED, dispatch.NOT_OURS]
    assert (_status(store_url, single), _status(store_url, of_campaign)) == ("sending", "queued")


def test_a_start_whose_write_waited_past_the_slot_is_not_recorded_at_all(tmp_path):
    """The start write waited for SQLite's lock until its request's slot had passed: no start is
    recorded (the message is handed back as never started, and a kill meanwhile cannot leave it
    "may have started"), rather than recorded and then taken back by a second write."""
    import sqlite3
    import threading
    import time

    from dispatcher import dispatch, transport

    url = f"sqlite:///{tmp_path / 'store.db'}"
    upgrade(url)
    [mid] = _add(url, 1)
    with session_scope(url) as db:
        queries.claim(db, [mid], utcnow(), TOKEN, "w1")
    starts = dispatch.Starts(url, TOKEN, utcnow)
    locker = sqlite3.connect(tmp_path / "store.db", isolation_level=None, check_same_thread=False)
    locker.execute("BEGIN IMMEDIATE")  # another writer holds the lock
    deadline = time.monotonic() + 0.2

    def release_after_the_deadline() -> None:
        while time.monotonic() <= deadline + 0.05:
            time.sleep(0.01)
        locker.execute("COMMIT")

    releaser = threading.Thread(target=release_after_the_deadline)
    releaser.start()

    async def start():  # type: ignore[no-untyped-def]
        return await starts.start(mid, deadline)

    try:
        assert transport.process_loop().run(start) is dispatch.MISSED_SLOT
    finally:
        releaser.join()
        locker.close()
    with session_scope(url) as db:
        m = queries.get_message(db, mid)
    assert (m.status, m.started_at) == ("sending", None)  # still this claim's, never started: handed back by the record



@pytest.mark.parametrize("sends", ["single sends", "a campaign's sends"])
def test_rate_limited_sends_keep_their_slots_when_the_store_is_slower_than_a_slot_allows(sends, pg_url, monkeypatch):
    """Every start write here takes 60 ms more (a store across a network), more than the 20 ms
    a send may be late for its rate-limit slot. Begun at the slot, each start was recorded too
    late, taken back, and its message went round again, for ever; begun ahead of the slot by
    what start writes have taken lately, the sends go in their slots, never before them, even
    for a kind whose resend is not harmless (eMsgNow). A campaign's slot, which a single send
    may take until it is confirmed, is confirmed before that write begins."""
    import asyncio
    import time
    from types import SimpleNamespace

    from dispatcher import dispatch, transport
    from dispatcher.store import loopstarts

    upgrade(pg_url)
    ids = _add(pg_url, 16)
    with session_scope(pg_url) as db:
        messages = sorted(queries.claim(db, ids, utcnow(), TOKEN, "w1"), key=lambda m: ids.index(m.id))
    write = loopstarts._run

    async def far_write(conn, sql, params):  # type: ignore[no-untyped-def]
        await asyncio.sleep(0.06)
        return await write(conn, sql, params)

    gone: dict[str, float] = {}

    class Adapter:
        idempotent_retry = False  # eMsgNow's kind: its start is recorded no earlier than it must be

        def merged_options(self, options: dict) -> dict:
            return options

        async def send(self, client, msg):  # type: ignore[no-untyped-def]
            gone[msg.id] = time.monotonic()
            return "sent"

    monkeypatch.setattr(loopstarts, "_run", far_write)
    monkeypatch.setattr(dispatch.runtime, "adapter_for", lambda account: Adapter())
    monkeypatch.setattr(dispatch, "start_times", dispatch.StartTimes())  # nothing learnt from other tests
    confirmed: dict[str, float] = {}  # ticket -> when its slot was confirmed

    def confirm(account, tickets):  # type: ignore[no-untyped-def]
        confirmed.update((t, time.monotonic()) for t in tickets)
        return [True] * len(tickets)

    monkeypatch.setattr(dispatch.runtime, "limiter", lambda: SimpleNamespace(confirm=confirm))
    campaign = sends == "a campaign's sends"
    starts = dispatch.Starts(pg_url, TOKEN, utcnow)
    first = time.monotonic() + 0.1
    send_at = {m.id: dispatch.Slot(first + n * 0.1, slack=0.02, ticket=f"t{n}" if campaign else None)
               for n, m in enumerate(messages)}

    async def send_all():  # type: ignore[no-untyped-def]
        return await dispatch.send_all(messages, send_at, starts, bulk_slots=dispatch.BulkSlots(SimpleNamespace()))

    results = transport.process_loop().run(send_all)
    learnt = messages[10:]  # the first eight sends teach it how long a start write takes
    assert [results[messages.index(m)] for m in learnt] == ["sent"] * len(learnt)
    assert all(0 <= gone[m.id] - send_at[m.id].at <= 0.02 for m in messages if m.id in gone)


@contextlib.contextmanager
def _plans(db):  # type: ignore[no-untyped-def]
    """The plans PostgreSQL runs for the statements sent inside, as it runs them in a long-lived
    worker: generic plans, made once per prepared statement for any ids (auto_explain reports them)."""
    raw = db.connection().connection.driver_connection
    plans: list[dict] = []

    def keep(diag) -> None:  # type: ignore[no-untyped-def]
        if diag.message_primary and "plan:" in diag.message_primary:
            plans.append(json.loads(diag.message_primary.split("plan:", 1)[1])["Plan"])

    raw.add_notice_handler(keep)
    for setting in ("plan_cache_mode = force_generic_plan", "auto_explain.log_min_duration = 0",
                    "auto_explain.log_analyze = on", "auto_explain.log_format = json", "auto_explain.log_level = notice"):
        db.connection().exec_driver_sql(f"SET LOCAL {setting}")
    yield plans
    db.connection().exec_driver_sql("SELECT 1")  # a statement's plan comes when its portal closes, at the next


def _rows_read(node: dict) -> int:
    """How many rows of `messages` a plan read (kept or filtered out) to do its work."""
    here = 0
    if node.get("Relation Name") == "messages" and "Scan" in node["Node Type"]:
        here = (node["Actual Rows"] + node.get("Rows Removed by Filter", 0)) * node["Actual Loops"]
    return here + sum(_rows_read(child) for child in node.get("Plans", []))


@pytest.mark.parametrize("statement", ["waiting", "claim", "mark_started", "record"])
def test_the_send_path_finds_a_batch_by_id_not_by_reading_the_queue(store_url, statement):
    """30,000 messages queued, 5,000 in flight, and a batch of 200 in a table no statistics describe
    yet: the send path's statements read about the batch's rows, not the queue's. Through the
    status index they read every queued (or sending) row for every batch: 50 ms of database
    CPU per 200 messages behind 10,000."""
    now = utcnow()
    rows = [{**_ROW, "id": f"q{i:08d}", "attempt_key": f"k{i}", "due_at": now, "created_at": now, "updated_at": now}
            for i in range(30_000)]
    with session_scope(store_url) as db:
        queries.add_messages(db, rows)
    batch = [r["id"] for r in rows[10_000:10_200]]
    with session_scope(store_url) as db:
        queries.claim(db, [r["id"] for r in rows[:5_000]], now, "earlier", "worker-1")
        if statement in ("mark_started", "record"):
            queries.claim(db, batch, now, TOKEN, "worker-1")
    outcomes = [_settlement(mid, now, status="accepted", provider_ref=f"ref-{mid}", accepted_at=now) for mid in batch]
    run = {"waiting": lambda db: queries.waiting(db, batch),
           "claim": lambda db: queries.claim(db, batch, now, TOKEN, "worker-1"),
           "mark_started": lambda db: queries.mark_started(db, batch, TOKEN, now),
           "record": lambda db: [1] * queries.record(db, outcomes)}[statement]
    with session_scope(store_url) as db:
        if db.get_bind().dialect.name == "postgresql":
            db.connection().exec_driver_sql("LOAD 'auto_explain'")
            with _plans(db) as plans:
                assert len(run(db)) == len(batch)
            assert plans and _rows_read(plans[0]) <= 2 * len(batch)
        else:  # SQLite tells its plan, not what it read: messages must be searched by id
            stmt = {"waiting": queries._waiting, "claim": queries._claim, "mark_started": queries._mark_started,
                    "record": lambda _: queries._RECORD}[statement]("sqlite")
            compiled = stmt.compile(dialect=db.get_bind().dialect)
            params = {"ids": queries._id_list_value("sqlite", batch), "now": now, "token": TOKEN, "worker": "worker-1",
                      "b_id": batch[0], "b_claim": TOKEN, **{f"b_{c}": v for c, v in outcomes[0].values.items()}}
            args = tuple(compiled.construct_params(params)[name] for name in compiled.positiontup)
            plan = [row[3] for row in db.connection().exec_driver_sql("EXPLAIN QUERY PLAN " + compiled.string, args)]
            on_messages = [step for step in plan if " messages " in f" {step} "]
            assert on_messages and all("(id=?)" in step for step in on_messages), plan
            assert len(run(db)) == len(batch)


_ROW = {c.name: None for c in Message.__table__.columns} | {
    "provider": "alerts", "kind": "emsgnow", "to": "+14155550100", "text": "hi", "options": {}, "status": "queued",
    "segments": 1, "attempts": 0, "key_exposed": False}

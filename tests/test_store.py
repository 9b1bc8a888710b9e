"""The store's state machine on SQLite and PostgreSQL: compare-and-set claims, release, expiry, events."""

from __future__ import annotations

import multiprocessing
from datetime import timedelta

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


def _status(url: str, mid: str) -> str:
    with session_scope(url) as db:
        return queries.get_message(db, mid).status


def test_claim_moves_queued_to_sending_once(store_url):
    ids = _add(store_url, 3)
    with session_scope(store_url) as db:
        first = queries.claim(db, ids, utcnow())
    with session_scope(store_url) as db:
        second = queries.claim(db, ids, utcnow())
    assert sorted(m.id for m in first) == sorted(ids)
    assert all(m.status == "sending" and m.attempts == 1 for m in first)
    assert second == []


def test_claim_skips_messages_not_yet_due(store_url):
    [mid] = _add(store_url, 1, due_at=utcnow() + timedelta(minutes=5))
    with session_scope(store_url) as db:
        assert queries.claim(db, [mid], utcnow()) == []
    assert _status(store_url, mid) == "queued"


def _claim_in_child(url: str, ids: list[str], out) -> None:  # type: ignore[no-untyped-def]
    from dispatcher.store.db import dispose_all

    dispose_all()
    claimed = []
    for mid in ids:  # one claim per message, racing the other processes
        with session_scope(url) as db:
            claimed += [m.id for m in queries.claim(db, [mid], utcnow())]
    out.put(claimed)


def test_concurrent_processes_claim_each_message_exactly_once(store_url):
    ids = _add(store_url, 60)
    ctx = multiprocessing.get_context("fork")
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
        assert queries.claim(db, [gone, fine], now)[0].id == fine
    assert _status(store_url, gone) == "expired"


def test_final_status_never_moves_back(store_url):
    [mid] = _add(store_url, 1, status="delivered")
    with session_scope(store_url) as db:
        assert not queries.set_status(db, mid, ["accepted"], {"status": "failed"})
        assert queries.claim(db, [mid], utcnow()) == []
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

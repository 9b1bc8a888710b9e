"""Idempotency keys in bulk and under races: every position gets the id it stands for, every key one row.

* send_many() returns, at each input position, the id of the message that position stands for:
  the stored message for a key already used, the first of a key repeated in the batch;
* two producers sending overlapping keys at once (PostgreSQL: really concurrent transactions)
  both succeed, get the same ids for the shared keys, and each key is stored and enqueued once;
* send() racing another producer's uncommitted row with its key waits for it and returns it.
"""

from __future__ import annotations

import threading
from collections import Counter

import pytest
from sqlalchemy import func, insert, select, text

import dispatcher
from dispatcher import queue, runtime
from dispatcher.store.db import get_engine, session_scope
from dispatcher.store.models import Message

from .conftest import wait_for


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, dispatcher_env, monkeypatch):
    """The store on SQLite or PostgreSQL; enqueue() records the ids it is given instead of publishing."""
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_url")
        from dispatcher.store.db import upgrade

        upgrade(url)
        with session_scope(url) as db:
            for table in ("events", "attempts", "messages"):
                db.execute(text(f"DELETE FROM {table}"))
        monkeypatch.setenv("DISPATCHER_DATABASE_URL", url)
        runtime.configure(None)
    enqueued: list[str] = []
    lock = threading.Lock()

    def record(ids, countdown=0.0, batch_size=None, priority=False):
        with lock:
            enqueued.extend(ids)

    monkeypatch.setattr(queue, "enqueue", record)
    return request.param, enqueued


def item(i: int, key: str | None) -> dict:
    return {"provider": "alerts", "to": "+14155550123", "text": f"m{i}", "idempotency_key": key}


def rows_by_key() -> Counter:
    with runtime.session() as db:
        return Counter(k for (k,) in db.execute(select(Message.idempotency_key)))


def test_positions_line_up_with_known_and_repeated_keys(store):
    _, enqueued = store
    first = dispatcher.send("alerts", "+14155550123", "earlier", idempotency_key="known")
    enqueued.clear()
    ids = dispatcher.send_many([item(0, None), item(1, "known"), item(2, "new"), item(3, "new"), item(4, None),
                                item(5, "other"), item(6, "known")])
    assert len(ids) == 7
    assert ids[1] == ids[6] == first.id
    assert ids[2] == ids[3] != first.id
    assert len({ids[0], ids[2], ids[4], ids[5], first.id}) == 5
    assert [dispatcher.get(i).text for i in ids] == ["m0", "earlier", "m2", "m2", "m4", "m5", "earlier"]
    assert sorted(enqueued) == sorted([ids[0], ids[2], ids[4], ids[5]])  # nothing known enqueued again
    assert rows_by_key() == Counter({None: 2, "known": 1, "new": 1, "other": 1})


def _waiting_on_a_lock(url: str) -> bool:
    """True when some other backend of this database waits for a row lock (PostgreSQL)."""
    with get_engine(url).connect() as conn:
        return bool(conn.exec_driver_sql(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
        ).scalar())


def _hold_uncommitted(url: str, key: str):
    """Another producer's transaction holding an inserted, not yet committed row with `key`."""
    from dispatcher.api import _COLUMN_DEFAULTS, row_values

    row = {**_COLUMN_DEFAULTS, **row_values("alerts", "+14155550123", "the other producer", idempotency_key=key)}
    conn = get_engine(url).connect()
    tx = conn.begin()
    conn.execute(insert(Message.__table__), [row])
    return conn, tx, row["id"]


def _run(target):
    result: dict = {}

    def go():
        try:
            result["value"] = target()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            result["error"] = exc

    t = threading.Thread(target=go)
    t.start()
    return t, result


def test_send_many_waits_for_another_producer_holding_a_shared_key(store):
    kind, enqueued = store
    if kind != "postgresql":
        pytest.skip("SQLite writers queue on the database lock (BEGIN IMMEDIATE): no insert can overlap")
    url = runtime.settings().database_url
    conn, tx, theirs = _hold_uncommitted(url, "shared")
    try:
        t, result = _run(lambda: dispatcher.send_many([item(0, "mine"), item(1, "shared"), item(2, "mine2")]))
        wait_for(lambda: _waiting_on_a_lock(url) or not t.is_alive())
        tx.commit()
    finally:
        conn.close()
    t.join(30)
    assert "error" not in result, repr(result.get("error"))
    ids = result["value"]
    assert ids[1] == theirs
    assert theirs not in enqueued and ids[0] in enqueued and ids[2] in enqueued
    assert rows_by_key() == Counter({"shared": 1, "mine": 1, "mine2": 1})


def test_send_waits_for_another_producer_holding_its_key(store):
    kind, enqueued = store
    if kind != "postgresql":
        pytest.skip("SQLite writers queue on the database lock (BEGIN IMMEDIATE): no insert can overlap")
    url = runtime.settings().database_url
    conn, tx, theirs = _hold_uncommitted(url, "single")
    try:
        t, result = _run(lambda: dispatcher.send("alerts", "+14155550123", "mine", idempotency_key="single"))
        wait_for(lambda: _waiting_on_a_lock(url) or not t.is_alive())
        tx.commit()
    finally:
        conn.close()
    t.join(30)
    assert "error" not in result, repr(result.get("error"))
    assert result["value"].id == theirs and result["value"].text == "the other producer"
    assert enqueued == []
    assert rows_by_key() == Counter({"single": 1})


def test_two_producers_with_overlapping_keys_at_once(store):
    """Both calls succeed, agree on the shared keys' ids, and each key is stored and enqueued once."""
    _, enqueued = store
    rounds = 5
    for r in range(rounds):
        a = [item(i, f"r{r}-k{i}") for i in range(0, 60)]
        b = [item(i, f"r{r}-k{i}") for i in range(30, 90)][::-1]  # the shared keys, in the other order
        barrier = threading.Barrier(2)

        def call(batch):
            barrier.wait()
            return dispatcher.send_many(batch)

        ta, ra = _run(lambda: call(a))
        tb, rb = _run(lambda: call(b))
        ta.join(60)
        tb.join(60)
        assert "error" not in ra and "error" not in rb, (ra.get("error"), rb.get("error"))
        by_key_a = {m["idempotency_key"]: i for m, i in zip(a, ra["value"])}
        by_key_b = {m["idempotency_key"]: i for m, i in zip(b, rb["value"])}
        for k in range(30, 60):
            assert by_key_a[f"r{r}-k{k}"] == by_key_b[f"r{r}-k{k}"]
    counts = rows_by_key()
    assert len(counts) == rounds * 90 and set(counts.values()) == {1}
    assert len(enqueued) == len(set(enqueued)) == rounds * 90
    with runtime.session() as db:
        assert db.execute(select(func.count()).select_from(Message)).scalar_one() == rounds * 90


def test_messages_stored_in_bulk_read_back_as_given(store):
    """send_many's bulk insert (COPY on PostgreSQL, the driver's executemany on SQLite) keeps
    every value: text, options, the times (aware, UTC) and the status a time gives."""
    from datetime import datetime, timedelta, timezone

    now = datetime.now(timezone.utc).replace(microsecond=123456)
    later = now + timedelta(hours=2)
    ids = dispatcher.send_many([
        {"provider": "alerts", "to": "+14155550123", "text": "plain ünïcode, 'quoted'\ttab\\slash"},
        {"provider": "alerts", "to": "+14155550124", "text": "held", "not_before": later.astimezone(timezone(timedelta(hours=5))),
         "not_after": later + timedelta(hours=1), "options": {"client_id": "c-1"}},
    ])
    first, held = dispatcher.get(ids[0]), dispatcher.get(ids[1])
    assert first.text == "plain ünïcode, 'quoted'\ttab\\slash" and first.status == "queued" and first.options == {}
    assert held.status == "scheduled" and held.options == {"client_id": "c-1"}
    assert held.not_before == later and held.not_before.utcoffset() == timedelta(0)
    assert held.not_after == later + timedelta(hours=1)
    assert first.created_at.tzinfo is not None and abs(first.created_at - now) < timedelta(minutes=1)


def test_every_column_of_a_bulk_row_reads_back_as_built(store):
    """Columns send_many() fills that get() does not show: the attempt key (a UUID the provider
    may see as a request id), the release times, the counters and flags a send starts from."""
    import uuid
    from datetime import timedelta

    ids = dispatcher.send_many([
        {"provider": "alerts", "to": "+14155550123", "text": "€" * 81},
        {"provider": "alerts", "to": "+14155550124", "text": "😀" * 40, "client_id": "c-2",
         "variables": {"a": [1, 2.5, None, True]}, "template_id": None},
    ])
    with runtime.session() as db:
        rows = {r.id: r for r in db.execute(select(Message).where(Message.id.in_(ids))).scalars()}
    for mid in ids:
        row = rows[mid]
        assert uuid.UUID(hex=mid).version == 4 and uuid.UUID(hex=mid).hex == mid
        assert str(uuid.UUID(row.attempt_key)) == row.attempt_key and uuid.UUID(row.attempt_key).version == 4
        assert row.status == "queued" and row.attempts == 0 and row.key_exposed is False
        assert row.created_at == row.updated_at == row.enqueued_at == row.due_at
        assert row.created_at.utcoffset() == timedelta(0)
        assert row.claimed_by is None and row.started_at is None and row.cost is None and row.campaign_id is None
    assert rows[ids[0]].segments == 2 and rows[ids[0]].options == {}  # 162 septets: two parts of 153
    assert rows[ids[1]].segments == 2  # 80 UTF-16 units: two parts of 67
    assert rows[ids[1]].options == {"client_id": "c-2", "variables": {"a": [1, 2.5, None, True]}}

"""What send_many() hands the broker: tasks of `batch_size` ids in input order, each shown
short in Celery's logs and monitors (its first id and how many it carries)."""

from __future__ import annotations

import asyncio
import uuid

import pytest

import dispatcher
from dispatcher.keys import TASK_DISPATCH


@pytest.fixture()
def published(dispatcher_env, monkeypatch):
    """The dispatch tasks the producer hands Celery, as Celery would write them (args and the
    argsrepr header), kept here rather than sent: the session's in-process worker would take
    them off the broker before the test could read them."""
    from dispatcher.celery_app import app

    tasks: list[dict] = []

    def send_task(name, args=None, argsrepr=None, **options):
        message = app.amqp.create_task_message(uuid.uuid4().hex, name, args, {}, argsrepr=argsrepr)
        if name == TASK_DISPATCH:
            tasks.append({"ids": message.body[0][0], "argsrepr": message.headers["argsrepr"]})

    monkeypatch.setattr(app, "send_task", send_task)
    return tasks


def test_send_many_publishes_tasks_of_200_ids_shown_by_their_first_id_and_count(published):
    ids = dispatcher.send_many([{"provider": "alerts", "to": "+14155550123", "text": f"m{i}"} for i in range(450)])
    assert [len(t["ids"]) for t in published] == [200, 200, 50]
    assert [mid for t in published for mid in t["ids"]] == ids
    for t in published:
        assert t["argsrepr"] == f"[[{t['ids'][0]!r}, ...]] ({len(t['ids'])} ids)"


def test_a_task_of_one_id_shows_it_whole(published):
    msg = dispatcher.send("alerts", "+14155550123", "one")
    assert published == [{"ids": [msg.id], "argsrepr": repr([[msg.id]])}]


def test_every_publisher_uses_the_configured_batch_size(published):
    """Retries, sweeps and recovery publish through queue.enqueue without a size of their own:
    they follow `batch_size` from the configuration too."""
    import dataclasses

    from dispatcher import queue, runtime

    runtime.configure(dataclasses.replace(runtime.settings(), batch_size=50))
    queue.enqueue([f"{i:032x}" for i in range(120)], countdown=1.0)
    assert [len(t["ids"]) for t in published] == [50, 50, 20]


@pytest.mark.parametrize("backlog, publish", [
    ("a bulk send", "a single send()"), ("a bulk send", "a single send over HTTP"), ("a bulk send", "a retry's countdown"),
    ("a bulk send's retries", "a single send()"),
])
def test_a_single_send_or_a_retry_is_taken_before_a_backlog_queued_ahead_of_it(backlog, publish, dispatcher_env,
                                                                                redis_prefix, monkeypatch):
    """A one-time code, a retry or a rate-limited account's next turn reaches a worker (which
    holds a countdown task until it is due) at once, not after every task of a bulk send, or
    of a failing bulk send's retries, published before it: a worker takes from its queues in
    turn, as the worker's own consumer does here."""
    from kombu import Consumer, Queue

    from dispatcher import celery_app, keys, queue

    app = celery_app.create_app(prefix=f"{redis_prefix}lane")  # out of the session worker's reach
    monkeypatch.setattr(celery_app, "app", app)
    queue.enqueue([f"{i:032x}" for i in range(30 * 200)], countdown=1.0 if backlog == "a bulk send's retries" else 0.0)
    if publish == "a single send()":
        wanted = [dispatcher.send("alerts", "+14155550123", "your code is 1234").id]
    elif publish == "a single send over HTTP":  # POST /v1/messages stores it through a GroupCommit
        from dispatcher.api import row_values
        from dispatcher.httpapi.group_commit import GroupCommit

        values = row_values("alerts", "+14155550123", "your code is 1234")
        asyncio.run(GroupCommit().add(values))
        wanted = [values["id"]]
    else:
        wanted = ["f" * 32]
        queue.enqueue(wanted, countdown=0.5)
    taken: list[list[str]] = []

    def take(body, message):
        taken.append(body[0][0])
        message.ack()

    with app.connection_for_read() as conn:
        with Consumer(conn, queues=[Queue(name) for name in keys.WORKER_QUEUES], prefetch_count=1,
                      accept=["json"], callbacks=[take]):
            for _ in range(4):
                conn.drain_events(timeout=5)
        with conn.channel() as channel:  # the bulk tasks left: out of Redis
            for name in keys.WORKER_QUEUES:
                Queue(name, channel=channel).purge()
    assert wanted in taken[:3]

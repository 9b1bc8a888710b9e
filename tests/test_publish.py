"""What send_many() hands the broker: tasks of `batch_size` ids in input order, each shown
short in Celery's logs and monitors (its first id and how many it carries)."""

from __future__ import annotations

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

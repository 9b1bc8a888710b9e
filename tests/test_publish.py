"""What send_many() hands the broker: tasks of `batch_size` ids in input order, each shown
short in Celery's logs and monitors (its first id and how many it carries)."""

from __future__ import annotations

import base64
import json

import dispatcher
from dispatcher.keys import TASK_DISPATCH


def published(redis_client, redis_prefix: str) -> list[dict]:
    """The dispatch tasks waiting in the broker (kombu's Redis lists under the test's prefix)."""
    tasks = []
    for key in redis_client.scan_iter(f"{redis_prefix}*"):
        if redis_client.type(key) != b"list":
            continue
        for raw in redis_client.lrange(key, 0, -1):
            message = json.loads(raw)
            if message["headers"].get("task") == TASK_DISPATCH:
                args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
                tasks.append({"ids": args[0], "argsrepr": message["headers"]["argsrepr"]})
    return tasks


def test_send_many_publishes_tasks_of_200_ids_shown_by_their_first_id_and_count(dispatcher_env, redis_client,
                                                                                  redis_prefix):
    ids = dispatcher.send_many([{"provider": "alerts", "to": "+14155550123", "text": f"m{i}"} for i in range(450)])
    tasks = published(redis_client, redis_prefix)
    assert sorted(len(t["ids"]) for t in tasks) == [50, 200, 200]
    assert sorted(mid for t in tasks for mid in t["ids"]) == sorted(ids)
    for t in tasks:
        assert t["argsrepr"] == f"[[{t['ids'][0]!r}, ...]] ({len(t['ids'])} ids)"


def test_a_task_of_one_id_shows_it_whole(dispatcher_env, redis_client, redis_prefix):
    msg = dispatcher.send("alerts", "+14155550123", "one")
    assert published(redis_client, redis_prefix) == [{"ids": [msg.id], "argsrepr": repr([[msg.id]])}]

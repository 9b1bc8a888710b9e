"""The Celery app and its settings, in one place; tasks are defined in worker.py.

Producers (queue.py) publish through this app without importing the tasks, so the import
graph follows the data: api -> queue -> celery_app, and worker -> dispatch -> ... -> queue.

* Tasks carry message ids only; the store holds the truth.
* acks_late + reject_on_worker_lost: a task whose worker died is delivered again, and the
  compare-and-set claim makes the second delivery send nothing twice.
* The default pool is threads: every task of a process shares one event loop and one HTTP
  connection pool (transport.py), so a process keeps many requests in flight.
* Nothing waits long inside the broker: retry countdowns are capped (retry_cap, 60 s default)
  and anything later waits in the store, released by the beat tick.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from . import keys, runtime
from .keys import TASK_POLL, TASK_TICK


def create_app(prefix: str | None = None) -> Celery:
    """The Celery app for the configured Redis; `prefix` overrides DISPATCHER_REDIS_PREFIX."""
    s = runtime.settings()
    celery = Celery("dispatcher", broker=s.redis_url, set_as_current=False)
    celery.conf.update(
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_default_queue=keys.QUEUE_SEND,
        task_queues=(Queue(keys.QUEUE_SEND), Queue(keys.QUEUE_BEAT)),
        task_routes={TASK_TICK: {"queue": keys.QUEUE_BEAT}, TASK_POLL: {"queue": keys.QUEUE_BEAT}},
        task_serializer="json",
        accept_content=["json"],
        worker_pool="threads",
        worker_concurrency=16,
        worker_prefetch_multiplier=2,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=3,
        broker_transport_options={
            "visibility_timeout": 3600,
            "global_keyprefix": f"{prefix or keys.prefix()}:",
            "socket_connect_timeout": 3,
            "socket_timeout": 10,
        },
        task_publish_retry_policy={"max_retries": 3, "interval_start": 0, "interval_step": 0.5, "interval_max": 1},
        beat_schedule={
            "dispatcher-tick": {"task": TASK_TICK, "schedule": s.tick_seconds, "options": {"expires": 30}},
            "dispatcher-poll": {"task": TASK_POLL, "schedule": s.poll_seconds, "options": {"expires": 60}},
        },
        timezone="UTC",
    )
    return celery


app = create_app()

"""The Celery app and its settings, in one place; tasks are defined in worker.py.

Producers (queue.py) publish through this app without importing the tasks, so the import
graph follows the data: api -> queue -> celery_app, and worker -> dispatch -> ... -> queue.

* Tasks carry message ids only; the store holds the truth.
* acks_late + reject_on_worker_lost: a task whose worker died is delivered again, and the
  compare-and-set claim makes the second delivery send nothing twice.
* The default pool is threads: every task of a process shares one event loop and one HTTP
  connection pool (transport.py), so a process keeps many requests in flight.
* The broker is the Redis at DISPATCHER_REDIS_URL unless DISPATCHER_BROKER_URL names another
  (amqp://... for RabbitMQ); Redis stays the rate limiter's store either way.
* Nothing waits long inside the broker: retry countdowns are capped (retry_cap, 60 s default)
  and anything later waits in the store, released by the beat tick.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from . import beatlock, keys, logs, runtime
from .keys import TASK_POLL, TASK_TICK


def create_app(prefix: str | None = None) -> Celery:
    """The Celery app for the configured Redis; `prefix` overrides DISPATCHER_REDIS_PREFIX."""
    s = runtime.settings()
    broker = s.broker_url or s.redis_url
    celery = Celery("dispatcher", broker=broker, set_as_current=False)
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
        broker_transport_options=_transport_options(broker, prefix or keys.prefix()),
        task_publish_retry_policy={"max_retries": 3, "interval_start": 0, "interval_step": 0.5, "interval_max": 1},
        beat_schedule={
            "dispatcher-tick": {"task": TASK_TICK, "schedule": s.tick_seconds, "options": {"expires": 30}},
            "dispatcher-poll": {"task": TASK_POLL, "schedule": s.poll_seconds, "options": {"expires": 60}},
        },
        timezone="UTC",
    )
    return celery


def _transport_options(broker: str, prefix: str) -> dict:
    """Redis: every broker key under the deployment's prefix, short socket timeouts. RabbitMQ
    separates deployments by virtual host (the URL's path), and needs no options here."""
    if not broker.startswith(("redis://", "rediss://", "unix://")):
        return {}
    return {"visibility_timeout": 3600, "global_keyprefix": f"{prefix}:", "socket_connect_timeout": 3,
            "socket_timeout": 10}


app = create_app()
logs.celery_hooks()  # DISPATCHER_LOG_FORMAT=json for the worker's and beat's own handlers
beatlock.celery_hooks()  # exactly one beat publishes ticks

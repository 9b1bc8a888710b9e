"""The Celery app and its settings, in one place; tasks are defined in worker.py.

Producers (queue.py) publish through this app without importing the tasks, so the import
graph follows the data: api -> queue -> celery_app, and worker -> dispatch -> ... -> queue.

The settings below are chosen together; the store, not the broker, is what guarantees
"never twice, never lost" (recovery.py), so each setting only has to keep the broker's
duplicates cheap and its losses short:

* Tasks carry message ids only (task arguments never hold a body or a secret). A dispatch
  task claims its messages and returns; the sends go on in the background (dispatch.py).
* task_acks_late: a task is acknowledged when it returns, i.e. after its claim is committed.
  A worker killed before that leaves the task unacknowledged; its messages are still `queued`.
* task_reject_on_worker_lost: a task whose process died is rejected back to the queue rather
  than acknowledged. Redelivery is harmless: the claim is a compare-and-set.
* visibility_timeout (1 h) must exceed the longest countdown a task may carry, or the Redis
  transport redelivers a waiting ETA task while its worker still holds it. Countdowns are capped
  at 60 s (dispatch.BROKER_WAIT_MAX); longer waits are `scheduled` rows the beat releases. A
  dead worker's unacknowledged tasks come back only after this hour; the store does not wait
  for them: the reaper publishes that worker's queued messages again as soon as its heartbeat
  stops (recovery.py), and the second delivery claims nothing.
* worker_prefetch_multiplier 1 (x 8 threads): a worker holds no task it has no thread for.
  The threads pool queues what it prefetched, and a thread waits up to 2 s for its account to
  have room, so a task due now (a paced account's next turn) waited behind up to 8 of a bulk
  send's: with 2, 100 messages to a 20/s account beside a bulk send took 7.5-9.4 s instead of
  5 s; with 1, 5.9-6.6 s, and the bulk send no slower (bench/paced_beside_bulk.py,
  bench/throughput.py). What a killed worker had prefetched is published again as above.
* Four queues, read in turn: dispatcher.priority (single sends), dispatcher.later (retries and
  rate-limited turns, held until due), dispatcher.send (bulk: send_many(), campaigns,
  releases) and dispatcher.beat; so none of the first three waits behind another (queue.py).
* worker_concurrency 8: a task only claims and hands its sends to the process's event loop,
  so a few threads keep it fed; more only contend for the GIL with the loop. Against 16, one
  worker sent 3-12 % more per second with 10-20 % less CPU a message (bench/throughput.py with
  BENCH_CONCURRENCY, docs/throughput.md). `dispatcher worker -c N` sets another.
* Time limits: none. The threads pool cannot enforce them; instead every wait inside a task is
  bounded: room in the process (2 s), rate-limit slots (`throttle_wait`), each request (the
  account's `timeout`), the record (dispatch.RECORD_PATIENCE).
* Redis lost its data (restart without persistence): the queues are gone; the beat notices the
  missing marker key and publishes every queued message again (recovery.resync_if_broker_lost).
* The default pool is threads: every task of a process shares one event loop and one HTTP
  connection pool (transport.py), so a process keeps many requests in flight.
* The broker is the Redis at DISPATCHER_REDIS_URL unless DISPATCHER_BROKER_URL names another
  (amqp://... for RabbitMQ); Redis stays the rate limiter's store either way.
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
        task_queues=tuple(Queue(name) for name in keys.WORKER_QUEUES),
        task_routes={TASK_TICK: {"queue": keys.QUEUE_BEAT}, TASK_POLL: {"queue": keys.QUEUE_BEAT}},
        task_serializer="json",
        accept_content=["json"],
        worker_pool="threads",
        worker_concurrency=8,
        worker_prefetch_multiplier=1,
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

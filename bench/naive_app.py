"""The naive baseline for bench/throughput.py: one Celery task per message, one blocking httpx
request per task, prefork workers. What the dispatcher is compared against; not used by it."""

from __future__ import annotations

import os

import httpx
from celery import Celery

app = Celery("naive", broker=os.environ["NAIVE_BROKER_URL"])
app.conf.update(task_ignore_result=True, task_acks_late=True, worker_prefetch_multiplier=1,
                broker_transport_options={"global_keyprefix": os.environ.get("NAIVE_PREFIX", "naive") + ":"})
_client: httpx.Client | None = None


@app.task(name="naive.send")
def send(url: str, api_key: str, body: dict, report_key: str) -> None:
    global _client
    if _client is None:
        _client = httpx.Client(timeout=10)
    response = _client.post(url, json=body, headers={"x-api-key": api_key})
    import time

    import redis

    redis.Redis.from_url(os.environ["NAIVE_BROKER_URL"]).rpush(report_key, f"{response.status_code} {time.time()}")

"""The producer side of the broker: hand message ids (never bodies) to the workers."""

from __future__ import annotations

import logging
from typing import Sequence

from .keys import QUEUE_LATER, QUEUE_PRIORITY, QUEUE_SEND, TASK_DISPATCH
from .errors import BrokerUnavailable

log = logging.getLogger("dispatcher.queue")


def enqueue(ids: Sequence[str], countdown: float = 0.0, batch_size: int | None = None, *,
            priority: bool = False) -> None:
    """Publish dispatch tasks for `ids`, at most `batch_size` ids per task (the configured one if None).

    Three lanes, which workers read in turn: tasks published with `priority` (single sends) go
    to QUEUE_PRIORITY, tasks with a countdown (a retry, a rate-limited message's next turn) to
    QUEUE_LATER, the rest (send_many(), campaigns, the beat's releases) to QUEUE_SEND. So a
    one-time code or a paced account's next turn does not wait behind a bulk send queued before
    it (in one queue, a single send() waited 15-17 s behind 20,000 messages, and a paced
    account's 1.5 s turn as long: bench/paced_beside_bulk.py), nor a one-time code behind a
    flood of a failing bulk send's retries. A countdown task is taken at once and held by the
    worker until it is due.

    A task's `argsrepr` (what Celery's logs and monitors show for its arguments) names its first
    id and how many it carries: Celery's own repr of a list of 200 ids cost more than the rest
    of publishing it.

    Raises BrokerUnavailable when Redis cannot be reached; the rows are already committed,
    so the beat's sweep will enqueue them once it can.
    """
    from .celery_app import app

    ids = list(ids)
    if not ids:
        return
    if batch_size is None:
        from .runtime import settings

        batch_size = settings().batch_size
    queue = lane(countdown, priority)
    try:
        with app.producer_or_acquire() as producer:
            for start in range(0, len(ids), batch_size):
                chunk = ids[start : start + batch_size]
                app.send_task(
                    TASK_DISPATCH,
                    args=[chunk],
                    argsrepr=_argsrepr(chunk),
                    countdown=countdown or None,
                    queue=queue,
                    producer=producer,
                )
    except Exception as exc:  # kombu raises several connection error types
        if _is_connection_error(exc):
            from .redact import hide_url_passwords

            raise BrokerUnavailable(hide_url_passwords(f"cannot reach the broker: {type(exc).__name__}: {exc}")) from exc
        raise


def lane(countdown: float = 0.0, priority: bool = False) -> str:
    """The queue a dispatch task goes to (enqueue's docstring says why)."""
    return QUEUE_PRIORITY if priority else QUEUE_LATER if countdown else QUEUE_SEND


def _argsrepr(ids: list[str]) -> str:
    return f"[[{ids[0]!r}, ...]] ({len(ids)} ids)" if len(ids) > 1 else repr([ids])


def _is_connection_error(exc: BaseException) -> bool:
    import redis
    from kombu.exceptions import OperationalError

    return isinstance(exc, (OperationalError, redis.exceptions.ConnectionError, ConnectionError, OSError))

"""Every Redis key, queue and task name the dispatcher uses, in one place.

All keys share a prefix (DISPATCHER_REDIS_PREFIX, default "dispatcher") so that tests
and several deployments can share one Redis server. Per-account keys carry a hash tag
`{account}` so that the keys one Lua script touches live in one cluster slot.
"""

from __future__ import annotations

import os

QUEUE_SEND = "dispatcher.send"  # messages in bulk: send_many(), campaigns, the beat's releases
QUEUE_PRIORITY = "dispatcher.priority"  # single sends: send(), POST /v1/messages, recurring reminders
QUEUE_LATER = "dispatcher.later"  # tasks with a countdown: retries, rate-limited turns (queue.py)
QUEUE_BEAT = "dispatcher.beat"
WORKER_QUEUES = (QUEUE_PRIORITY, QUEUE_LATER, QUEUE_SEND, QUEUE_BEAT)  # what `dispatcher worker` reads, in turn
TASK_DISPATCH = "dispatcher.dispatch"
TASK_TICK = "dispatcher.tick"
TASK_POLL = "dispatcher.poll_status"


def prefix() -> str:
    return os.environ.get("DISPATCHER_REDIS_PREFIX", "dispatcher")


def rate_bucket(account: str) -> str:
    """GCRA theoretical-arrival-time for one provider account."""
    return f"{prefix()}:rl:{{{account}}}:tat"


def rate_log(account: str) -> str:
    """Sorted set of the send instants (µs since epoch) reserved for one account: the sliding log."""
    return f"{prefix()}:rl:{{{account}}}:log"


def rate_bulk(account: str) -> str:
    """Bulk (campaign) instants reserved and not yet confirmed: a priority send may take them."""
    return f"{prefix()}:rl:{{{account}}}:bulk"


def rate_pause(account: str) -> str:
    """Pause-until (ms since epoch) learned from a provider's 429 / rate headers."""
    return f"{prefix()}:rl:{{{account}}}:pause"


def beat_tick() -> str:
    """When the beat's tick last ran (seconds since epoch, a string); `dispatcher health` reads it."""
    return f"{prefix()}:beat:last_tick"


def beat_lock() -> str:
    """Held (SET NX PX, renewed) by the one beat process allowed to publish ticks."""
    return f"{prefix()}:beat:lock"


def activity(bucket: int) -> str:
    """Hash of "account|what" -> count for one 10-second bucket of sends (`dispatcher stats`)."""
    return f"{prefix()}:activity:{bucket}"


def broker_epoch() -> str:
    """A marker the beat sets once; if it is gone, Redis lost its data and every queued task with it."""
    return f"{prefix()}:broker:epoch"


def campaign_feeder_lock() -> str:
    """Held while one campaign feeder round runs, and FEED_INTERVAL after it began (feeder.py)."""
    return f"{prefix()}:campaigns:feeder"

"""The worker's tasks: dispatch a batch of ids, the beat tick, the status poll.

Run it with `dispatcher worker` / `dispatcher beat`, or `celery -A dispatcher.worker worker|beat`.
The app and its settings live in celery_app.py (the producers need the app, not the tasks).
"""

from __future__ import annotations

import gc
import logging
import threading

from celery import signals

from .celery_app import app, create_app
from .keys import TASK_DISPATCH, TASK_POLL, TASK_TICK

__all__ = ["app", "create_app", "dispatch", "tick", "poll_status"]
log = logging.getLogger("dispatcher.worker")
STORE_DOWN_WAIT = 2.0  # seconds before a task that found the store unavailable runs again
GC_YOUNG = 7000  # allocations between young collections (Python's default: 700)


@app.task(name=TASK_DISPATCH, ignore_result=True)
def dispatch(ids: list[str]) -> dict:
    """Claim, send and record the given messages (see dispatch.py)."""
    from sqlalchemy.exc import OperationalError

    from .dispatch import dispatch_batch
    from .queue import enqueue

    try:
        report = dispatch_batch(ids, wait=False)  # the sends go on in the background (dispatch.py)
    except OperationalError as exc:  # the store is away or locked: nothing was claimed, try again soon
        log.warning("store unavailable (%s); %d message(s) tried again in %.0fs: %s", type(exc).__name__, len(ids),
                    STORE_DOWN_WAIT, ",".join(ids[:20]))
        enqueue(ids, STORE_DOWN_WAIT)
        return {"claimed": 0, "store_down": True}
    return {"claimed": report.claimed, "expired": len(report.expired)}


@app.task(name=TASK_TICK, ignore_result=True)
def tick() -> dict:
    """Release due messages, re-enqueue lost ones, settle abandoned claims."""
    from .schedule import tick as run_tick

    return run_tick().as_dict()


@app.task(name=TASK_POLL, ignore_result=True)
def poll_status() -> dict:
    """Poll delivery status of accepted messages that are due for it (status.py)."""
    from dataclasses import asdict

    from .status import poll

    return asdict(poll())


@signals.worker_ready.connect
def _get_ready(**_: object) -> None:
    """Prepare the send path beside the consumer (dispatch.prepare), never delaying it: a store
    slow or away at start leaves the work to the first batch, as before."""
    threading.Thread(target=_prepare, name="dispatcher-prepare", daemon=True).start()


def _prepare() -> None:
    from .dispatch import prepare

    try:
        prepare()
    except Exception as exc:  # noqa: BLE001 - the first batch does it again, and says why if it fails
        log.warning("could not prepare the send path at start (%s: %s); the first batch will", type(exc).__name__, exc)


@signals.worker_ready.connect
def _settle_the_heap(**_: object) -> None:
    """Once started, the process's long-lived objects (modules, the app, Celery's state) are moved
    out of the collector's reach and young collections run less often: a full collection
    walking them stalled every thread, the send loop included, for up to 0.4 s during a run
    (docs/throughput.md). Cycles made later are still collected."""
    gc.freeze()
    gc.set_threshold(GC_YOUNG, 10, 10)


@signals.worker_shutting_down.connect
def _stop_starting(**_: object) -> None:
    """Warm shutdown (SIGTERM) begins: sends not yet started are handed back, not begun."""
    from .transport import process_loop

    process_loop().stopping.set()


@signals.worker_process_shutdown.connect
@signals.worker_shutdown.connect
def _close_loop(**_: object) -> None:
    """Let the sends under way finish and be recorded, then leave: the heartbeat row goes last,
    so anything still `sending` after the drain is settled by the reaper at once."""
    from .liveness import retire
    from .transport import close_process_loop

    close_process_loop()
    retire()

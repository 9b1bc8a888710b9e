"""How many status requests polling makes: it grows with messages in flight, not with all ever sent.

Run by hand: `.venv/bin/python bench/status_polling.py [--messages 1000] [--rounds 2]`.
Needs Redis (DISPATCHER_REDIS_URL, default redis://localhost:6379/0). Each round sends
--messages accepted messages across eMsgNow, emnify and eSMS Africa through the sandbox, then
runs the status poll until every one has a final status, and prints the status requests the
sandbox received in that round. A later round costs about what the first did: finished
messages are never polled again.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    os.environ["DISPATCHER_REDIS_PREFIX"] = f"benchst{uuid.uuid4().hex[:8]}"
    import dispatcher
    from dispatcher import queue, runtime
    from dispatcher.dispatch import dispatch_batch
    from dispatcher.sandbox.server import SandboxThread
    from dispatcher.status import poll
    from dispatcher.store.models import FINAL, Event, Message
    from dispatcher.transport import close_process_loop
    from sqlalchemy import func, select

    queue.enqueue = lambda *a, **k: None  # this bench drives dispatch and polling itself
    work = tempfile.mkdtemp(prefix="bench-status-")
    with SandboxThread() as sb:
        for kind in ("emsgnow", "emnify", "esms_africa"):
            sb.configure(kind, delivery_step=1.0, rate_limit=None)
        c = sb.credentials
        with open(f"{work}/dispatcher.toml", "w") as fh:
            fh.write(f"""[dispatcher]
poll_first = 0.2
poll_max_interval = 1.0

[providers.alerts]
kind = "emsgnow"
base_url = "{sb.base_url('emsgnow')}"
api_key = "{c('emsgnow')['api_key']}"
from = "BENCH"

[providers.iot]
kind = "emnify"
base_url = "{sb.base_url('emnify')}"
application_token = "{c('emnify')['application_token']}"
source_address = "12345"
rate_limit = "1000/s"

[providers.africa]
kind = "esms_africa"
base_url = "{sb.base_url('esms_africa')}"
api_key = "{c('esms_africa')['api_key']}"
sender_id = "eSMSAfrica"
""")
        os.environ.update(DISPATCHER_CONFIG=f"{work}/dispatcher.toml", DISPATCHER_DATABASE_URL=f"sqlite:///{work}/s.db")
        runtime.configure(None)
        targets = [("alerts", "+14155550123"), ("iot", "12345"), ("africa", "+254712345678")]
        print(f"{args.messages} messages per round across eMsgNow, emnify, eSMS Africa; delivery takes ~3 s")
        print(f"{'round':>5}  {'status requests':>15}  {'per message':>11}  {'seconds':>7}  by kind")
        for rnd in range(1, args.rounds + 1):
            ids = dispatcher.send_many([{"provider": targets[i % 3][0], "to": targets[i % 3][1], "text": f"r{rnd} m{i}"}
                                        for i in range(args.messages)])
            waiting = ids
            while waiting:  # this bench has no broker: dispatch again what was put back (throttled)
                for start in range(0, len(waiting), 200):
                    dispatch_batch(waiting[start:start + 200])
                with runtime.session() as db:
                    waiting = [row[0] for row in db.execute(
                        select(Message.id).where(Message.id.in_(ids), Message.status == "queued"))]
                if waiting:
                    time.sleep(0.2)
            seq = sb.last_seq
            started = time.monotonic()
            while True:
                poll()
                with runtime.session() as db:
                    open_ = db.execute(select(func.count()).select_from(Message)
                                       .where(Message.id.in_(ids), Message.status.not_in(list(FINAL)))).scalar_one()
                if open_ == 0:
                    break
                if time.monotonic() - started > 120:
                    with runtime.session() as db:
                        left = db.execute(select(Message.provider, Message.status, func.count()).where(
                            Message.id.in_(ids), Message.status.not_in(list(FINAL)))
                            .group_by(Message.provider, Message.status)).all()
                    raise SystemExit(f"not final after 120 s: {left}")
                time.sleep(0.2)
            gets = [r for r in sb.requests(since=seq) if r.method == "GET"]
            kinds = {kind: sum(1 for r in gets if r.kind == kind) for kind in ("emsgnow", "emnify", "esms_africa")}
            checks = sum(1 for r in gets if r.path == "/api/messages/status")
            by_kind = ", ".join(f"{k} {n}" for k, n in kinds.items()) + f" (of which {checks} batched checks)"
            with runtime.session() as db:
                stored, distinct = db.execute(
                    select(func.count(), func.count(func.distinct(Event.message_id + ":" + Event.event_id)))
                    .where(Event.message_id.in_(ids))).one()
            print(f"{rnd:>5}  {len(gets):>15}  {len(gets) / len(ids):>11.2f}  {time.monotonic() - started:>7.1f}  {by_kind}; "
                  f"{stored} events stored, {distinct} distinct")
    close_process_loop()


if __name__ == "__main__":
    main()

"""Soak: mixed traffic for a long while, with worker processes killed and provider faults switched on at random.

    .venv/bin/python bench/soak.py                 # 30 minutes (the issue's figure)
    .venv/bin/python bench/soak.py --minutes 5 --kill-every 20

Runs the sandbox in a process of its own, N `dispatcher worker` processes and the beat's tick
(in this process), on a throw-away SQLite store (or --database-url) and Redis under a key prefix
of its own. Every few seconds it stores a batch of messages across four kinds; every
`--kill-every` seconds it SIGKILLs a random worker and starts a replacement; every few seconds
it switches a random provider fault on (500s, resets before and after the provider took the
message, hangs past the timeout, slow drips, malformed JSON, HTML error pages).

At the end it waits for every message to settle and prints:
    sent        messages the provider took (accepted or delivered)
    duplicates  messages that exist twice at the provider (must be 0)
    lost        messages not settled at the end, or settled without ever being sent or refused (must be 0)
    unknown     messages whose fate nobody can tell (each may or may not have arrived), with how
                many of them did arrive
Accounts without an idempotency key run with on_timeout = "unknown", the setting that promises
no duplicate; with the default ("retry") an ambiguous failure is resent and may arrive twice.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ACCOUNTS = """
[dispatcher]
retry_base = 0.2
retry_cap = 5.0
max_attempts = 8

[providers.now]
kind = "emsgnow"
base_url = "{url}/emsgnow"
api_key = "{emsgnow}"
from = "ACME"
timeout = 2
on_timeout = "unknown"

[providers.africa]
kind = "esms_africa"
base_url = "{url}/esms_africa"
api_key = "{esms}"
sender_id = "eSMSAfrica"
rate_limit = "20/s"
timeout = 2

[providers.fly]
kind = "esimfly"
base_url = "{url}/esimfly"
access_code = "{fly_code}"
secret_key = "{fly_secret}"
rate_limit = "30/s"
timeout = 2

[providers.iot]
kind = "emnify"
base_url = "{url}/emnify"
application_token = "{emnify}"
source_address = "12345"
timeout = 2
on_timeout = "unknown"
"""
KINDS = {"now": ("emsgnow", "message", "+14155550123"), "africa": ("esms_africa", "text", "+254712345678"),
         "fly": ("esimfly", "message", "8948010010036780123"), "iot": ("emnify", "payload", "4711")}
FAULTS = [{"fail_next": 3, "fail_status": 500}, {"reset_next": 1}, {"reset_processed_next": 1},
          {"hang_next": 1, "hang_ms": 3000}, {"drip_next": 1, "drip_ms": 1500}, {"malformed_next": 1},
          {"html_next": 1}, {"fail_next": 2, "fail_status": 503}, {"drop_next": 1}, {"lose_next": 1}]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--kill-every", type=float, default=30.0, help="seconds between SIGKILLs")
    ap.add_argument("--fault-every", type=float, default=3.0, help="seconds between provider faults")
    ap.add_argument("--rate", type=float, default=15.0, help="messages stored per second")
    ap.add_argument("--database-url", default=None)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)

    workdir = Path(tempfile.mkdtemp(prefix="dispatcher-soak-"))
    os.environ["DISPATCHER_DATABASE_URL"] = args.database_url or f"sqlite:///{workdir / 'soak.db'}"
    os.environ["DISPATCHER_REDIS_PREFIX"] = f"soak-{uuid.uuid4().hex[:8]}"
    os.environ.setdefault("DISPATCHER_REDIS_URL", "redis://127.0.0.1:6379/14")

    import dispatcher
    from dispatcher import runtime
    from dispatcher.schedule import tick
    from dispatcher.testing import SandboxProcess, WorkerProcesses, wait_until_settled

    with SandboxProcess(latency_ms=150) as sandbox:
        c = sandbox.credentials
        sandbox.configure("esms_africa", rate_limit=100000)
        sandbox.configure("esimfly", rate_limit=100000)
        config = workdir / "dispatcher.toml"
        config.write_text(ACCOUNTS.format(url=sandbox.url, emsgnow=c("emsgnow")["api_key"], esms=c("esms_africa")["api_key"],
                                          fly_code=c("esimfly")["access_code"], fly_secret=c("esimfly")["secret_key"],
                                          emnify=c("emnify")["application_token"]))
        os.environ["DISPATCHER_CONFIG"] = str(config)
        runtime.configure(None)
        ids: list[str] = []
        kills = 0
        faults = Counter()
        with WorkerProcesses(count=args.workers, env=dict(os.environ), concurrency=8) as workers:
            workers.wait_ready()
            stop = threading.Event()

            def beat() -> None:
                while not stop.wait(0.5):
                    try:
                        tick(enqueue=workers.enqueue)
                    except Exception as exc:  # noqa: BLE001 - a soak keeps going; the tick logs its own
                        print(f"tick failed: {exc}", file=sys.stderr)

            threading.Thread(target=beat, daemon=True).start()
            started = time.monotonic()
            end = started + args.minutes * 60
            next_kill, next_fault, n = started + args.kill_every, started + args.fault_every, 0
            while time.monotonic() < end:
                batch = []
                for _ in range(max(1, int(args.rate))):
                    account = rng.choice(list(KINDS))
                    batch.append({"provider": account, "to": KINDS[account][2], "text": f"soak {n} {uuid.uuid4().hex[:6]}"})
                    n += 1
                fresh = dispatcher.send_many(batch)
                ids += fresh
                workers.enqueue(fresh)
                now = time.monotonic()
                if now >= next_fault:
                    kind, fault = KINDS[rng.choice(list(KINDS))][0], rng.choice(FAULTS)
                    sandbox.set_faults(kind, **fault)
                    faults[next(iter(fault))] += 1
                    next_fault = now + args.fault_every
                if now >= next_kill:
                    victim = rng.choice(workers.alive())
                    workers.spawn()
                    workers.kill(victim)
                    kills += 1
                    next_kill = now + args.kill_every
                elapsed = int(now - started)
                if elapsed and elapsed % 60 == 0:
                    print(f"[{elapsed // 60} min] stored {len(ids)}, kills {kills}", file=sys.stderr)
                time.sleep(max(0.0, 1.0 - (time.monotonic() - now)))
            for kind, _, _ in KINDS.values():
                sandbox.set_faults(kind, fail_rate=0.0)
            try:
                statuses = wait_until_settled(ids, timeout=180, interval=1.0)
            except TimeoutError as exc:
                print(f"not all settled: {exc}", file=sys.stderr)
                statuses = _statuses(ids)
            stop.set()
        report(sandbox, ids, statuses, kills, faults)
    from dispatcher.transport import close_process_loop

    close_process_loop()
    return 0


def _statuses(ids):  # type: ignore[no-untyped-def]
    from sqlalchemy import select

    from dispatcher import runtime
    from dispatcher.store.db import session_scope
    from dispatcher.store.models import Message

    with session_scope(runtime.settings().database_url) as db:
        return dict(db.execute(select(Message.id, Message.status).where(Message.id.in_(ids))).all())


def report(sandbox, ids, statuses, kills, faults) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy import select

    from dispatcher import runtime
    from dispatcher.store.db import session_scope
    from dispatcher.store.models import Message

    with session_scope(runtime.settings().database_url) as db:
        rows = {mid: (provider, text) for mid, provider, text in db.execute(
            select(Message.id, Message.provider, Message.text).where(Message.id.in_(ids)))}
    made = Counter()  # SMS the providers created, per text
    for account, (kind, field, _) in KINDS.items():
        refs: dict[str, set] = {}
        for r in sandbox.requests(kind):
            body, answer = r.get("json"), r.get("response_json")
            if r["method"] != "POST" or not isinstance(body, dict) or r.get("status") not in (200, 201):
                continue
            text = body.get(field)
            if not isinstance(text, str) or not text.startswith("soak "):
                continue
            if r.get("fault") in ("drop",):  # the twin never saw it
                continue
            ref = answer.get("id") if kind == "esms_africa" and isinstance(answer, dict) else r["seq"]
            refs.setdefault(text, set()).add(ref)
        for text, found in refs.items():
            made[text] += len(found)
    statuses = Counter(statuses.values())
    final = {"accepted", "delivered", "failed", "rejected", "expired", "cancelled", "unknown"}
    by_id = _statuses(ids)
    unknown = [mid for mid, s in by_id.items() if s == "unknown"]
    lost = [mid for mid, s in by_id.items() if s not in final]
    sent = sum(1 for mid, s in by_id.items() if s in ("accepted", "delivered"))
    duplicates = sum(1 for n in made.values() if n > 1)
    arrived_unknown = sum(1 for mid in unknown if made[rows[mid][1]] > 0)
    print(f"messages   {len(ids)}")
    print(f"kills      {kills}")
    print(f"faults     {dict(faults)}")
    print(f"statuses   {dict(statuses)}")
    print(f"sent       {sent}")
    print(f"duplicates {duplicates}")
    print(f"lost       {len(lost)}")
    print(f"unknown    {len(unknown)} (of which arrived at the provider: {arrived_unknown})")


if __name__ == "__main__":
    sys.exit(main())

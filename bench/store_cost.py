"""What the store costs a message on the send path: PostgreSQL's CPU and the worker's, statement by statement.

Run by hand: `.venv/bin/python bench/store_cost.py [--messages 10000] [--runs 2]`. Needs PostgreSQL
at DISPATCHER_BENCH_PG_URL (default postgresql://postgres@127.0.0.1:5432/test).

It stores `--messages` messages in a new schema (send_many's insert), then takes them through
the send path's statements in batches of 200, as a worker does, with no provider and no broker:
the claim, the start (in groups of 50, as starts are coalesced), and the record of an accepted
outcome with its attempt. For each step it prints the microseconds of CPU a message costs the
PostgreSQL backend serving it (read from /proc, so on this machine only) and the client thread.
The schema starts with no statistics, as a burst into a new deployment finds it.

Compare two versions side by side by running this file from each checkout in turn
(`PYTHONPATH=/path/to/other/checkout`).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

PG_URL = os.environ.get("DISPATCHER_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
BATCH, STARTS = 200, 50


def backend_cpu(pid: int) -> float:
    """CPU seconds (user + system) the PostgreSQL backend `pid` has used."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(count: int) -> dict[str, tuple[float, float]]:
    """{step: (backend CPU s, client CPU s)} for `count` messages in a schema of their own."""
    from sqlalchemy import create_engine, text

    from dispatcher import dispatch, runtime
    from dispatcher.api import _COLUMN_DEFAULTS, build_many
    from dispatcher.providers.base import Accepted, SendResult
    from dispatcher.store import queries
    from dispatcher.store.db import connection_scope, session_scope, upgrade
    from dispatcher.store.keyed import insert_keyed

    schema = f"bench_store_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    url = f"{PG_URL.replace('postgresql://', 'postgresql+psycopg://', 1)}?options=-csearch_path%3D{schema}"
    try:
        config = os.path.join(tempfile.mkdtemp(prefix="bench-store-"), "dispatcher.toml")
        with open(config, "w") as fh:
            fh.write('[providers.bench]\nkind = "emsgnow"\nbase_url = "http://127.0.0.1:9"\napi_key = "k"\nfrom = "BENCH"\n')
        os.environ.update(DISPATCHER_CONFIG=config, DISPATCHER_DATABASE_URL=url)
        runtime.configure(None)
        upgrade(url)
        settings = runtime.settings()
        rows = build_many([{"provider": "bench", "to": f"+1415555{i % 10000:04d}", "text": f"m{i}"} for i in range(count)])
        rows = [r if r.keys() >= _COLUMN_DEFAULTS.keys() else {**_COLUMN_DEFAULTS, **r} for r in rows]
        used = {step: [0.0, 0.0] for step in ("insert", "claim", "start", "record")}

        def measure(step: str, pid: int, work) -> object:  # type: ignore[no-untyped-def]
            server, client = backend_cpu(pid), time.thread_time()
            result = work()
            used[step][0] += backend_cpu(pid) - server
            used[step][1] += time.thread_time() - client
            return result

        with session_scope(url) as db:  # one pooled connection: every step runs on this backend
            pid = db.execute(text("SELECT pg_backend_pid()")).scalar_one()
            ids, _ = measure("insert", pid, lambda: insert_keyed(db, rows))
        for first in range(0, count, BATCH):
            batch, now, token = ids[first:first + BATCH], datetime.now(timezone.utc), uuid.uuid4().hex

            def claim() -> list:  # type: ignore[type-arg]
                with connection_scope(url) as db:
                    return queries.claim(db, batch, now, token, "bench-worker")

            def start() -> None:
                for group in range(0, len(batch), STARTS):
                    with connection_scope(url) as db:
                        queries.mark_started(db, batch[group:group + STARTS], token, now)

            claimed = measure("claim", pid, claim)
            measure("start", pid, start)
            held = dispatch.Claim(token, "bench-worker", now, claimed)  # type: ignore[arg-type]
            outcomes = [dispatch.settle(m, SendResult(Accepted(provider_ref=uuid.uuid4().hex), 200, 1.0), held, now, settings)
                        for m in claimed]  # type: ignore[union-attr]

            def record() -> None:
                with connection_scope(url) as db:
                    assert queries.record(db, outcomes) == len(outcomes)

            measure("record", pid, record)
        return {step: (server, client) for step, (server, client) in used.items()}
    finally:
        from dispatcher.store.db import dispose_all

        dispose_all()
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    print(f"{args.messages} messages, batches of {BATCH}; microseconds of CPU a message: PostgreSQL backend / client thread")
    for _ in range(args.runs):
        used = run(args.messages)
        per = {step: (1e6 * s / args.messages, 1e6 * c / args.messages) for step, (s, c) in used.items()}
        total = (sum(s for s, _ in per.values()), sum(c for _, c in per.values()))
        print("  " + "   ".join(f"{step} {s:.0f} / {c:.0f}" for step, (s, c) in {**per, "total": total}.items()))


if __name__ == "__main__":
    main()

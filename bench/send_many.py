"""How long one send_many() of 20,000 messages takes, on a fresh SQLite file and a fresh PostgreSQL schema.

Run by hand: `.venv/bin/python bench/send_many.py [--messages 20000] [--runs 3] [--stores sqlite,postgresql]`.
Needs Redis (DISPATCHER_REDIS_URL, default redis://localhost:6379/0) and, for PostgreSQL,
DISPATCHER_BENCH_PG_URL (default postgresql://postgres@127.0.0.1:5432/test).

Each run configures one eMsgNow account (nothing is sent: no worker runs, and the tasks
published to Redis are deleted afterwards), creates a fresh store, makes one warm-up call,
then times one send_many() of `--messages` items. It prints the wall time and a split:

  * validate: everything before the rows reach the store (send_many() minus store_many());
  * insert:   store_many() up to publishing (insert_keyed, the commit, the session);
  * publish:  the dispatch tasks sent to Redis (`_enqueue_or_leave`).

The split wraps module functions of dispatcher.api, so it works on older versions of the code
too: to compare, extract one (`git archive <rev> | tar -x -C /tmp/base`) and run this script
with `PYTHONPATH=/tmp/base`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid

if "PYTHONPATH" not in os.environ:  # run from a checkout: its own package (PYTHONPATH picks another one)
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

REDIS_URL = os.environ.get("DISPATCHER_REDIS_URL", "redis://localhost:6379/0")
PG_URL = os.environ.get("DISPATCHER_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


class Split:
    """Wall time spent inside some of dispatcher.api's functions during one call."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = {}

    def wrap(self, module: object, name: str) -> None:
        original = getattr(module, name)

        def timed(*args, **kwargs):  # type: ignore[no-untyped-def]
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.spent[name] = self.spent.get(name, 0.0) + time.perf_counter() - start

        setattr(module, name, timed)


def one_run(store: str, count: int) -> dict[str, float]:
    import dispatcher
    from dispatcher import api, runtime
    from dispatcher.store.db import upgrade

    work = tempfile.mkdtemp(prefix="bench-sm-")
    config = os.path.join(work, "dispatcher.toml")
    with open(config, "w") as fh:
        fh.write('[dispatcher]\nbatch_size = 200\n\n[providers.bench]\nkind = "emsgnow"\n'
                 'base_url = "http://127.0.0.1:9"\napi_key = "x"\nfrom = "BENCH"\n')
    url = f"sqlite:///{work}/bench.db" if store == "sqlite" else _pg_schema()
    os.environ.update(DISPATCHER_CONFIG=config, DISPATCHER_DATABASE_URL=url)
    runtime.configure(None)
    upgrade(url)
    dispatcher.send_many([{"provider": "bench", "to": "+14155550123", "text": "warm-up"}])
    items = [{"provider": "bench", "to": f"+1415555{i % 10000:04d}", "text": f"m{i}"} for i in range(count)]
    split = Split()
    originals = {name: getattr(api, name) for name in ("store_many", "_enqueue_or_leave")}
    for name in originals:
        split.wrap(api, name)
    try:
        start, cpu = time.perf_counter(), time.process_time()
        ids = dispatcher.send_many(items)
        total, cpu = time.perf_counter() - start, time.process_time() - cpu
    finally:
        for name, fn in originals.items():
            setattr(api, name, fn)
    assert len(set(ids)) == count
    _drop_tasks()
    publish = split.spent.get("_enqueue_or_leave", 0.0)
    stored = split.spent.get("store_many", 0.0)
    return {"total": total, "cpu": cpu, "validate": total - stored, "insert": stored - publish, "publish": publish}


def _drop_tasks() -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)  # nobody is to send these
    for key in client.scan_iter(f"{os.environ['DISPATCHER_REDIS_PREFIX']}:*"):
        client.delete(key)


def _pg_schema() -> str:
    import sqlalchemy as sa

    schema = f"bench_{uuid.uuid4().hex[:8]}"
    engine = sa.create_engine(PG_URL.replace("postgresql://", "postgresql+psycopg://"), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    engine.dispose()
    _pg_schema.made.append(schema)  # type: ignore[attr-defined]
    return f"{PG_URL}?options=-csearch_path%3D{schema}"


_pg_schema.made = []  # type: ignore[attr-defined]


def _drop_schemas() -> None:
    import sqlalchemy as sa
    from dispatcher.store.db import dispose_all

    dispose_all()
    engine = sa.create_engine(PG_URL.replace("postgresql://", "postgresql+psycopg://"), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        for schema in _pg_schema.made:  # type: ignore[attr-defined]
            conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
    engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=3, help="runs per store (each on a fresh store)")
    parser.add_argument("--stores", default="sqlite,postgresql", help="comma-separated: sqlite, postgresql")
    args = parser.parse_args()
    os.environ["DISPATCHER_REDIS_PREFIX"] = f"benchsm{uuid.uuid4().hex[:8]}"
    import dispatcher

    print(f"send_many() of {args.messages} messages, code from {os.path.dirname(os.path.dirname(os.path.abspath(dispatcher.__file__)))}, "
          f"load {os.getloadavg()[0]:.1f}")
    try:
        for store in args.stores.split(","):
            for _ in range(args.runs):
                r = one_run(store, args.messages)
                print(f"{store:<10} {r['total']:.3f} s (CPU {r['cpu']:.3f} s): validate {r['validate']:.3f}, "
                      f"insert {r['insert']:.3f}, publish {r['publish']:.3f}", flush=True)
    finally:
        if _pg_schema.made:  # type: ignore[attr-defined]
            _drop_schemas()


if __name__ == "__main__":
    main()

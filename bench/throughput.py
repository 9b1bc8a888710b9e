"""Throughput of the whole pipeline against a slow provider, beside a naive baseline and a bare client.

Run by hand: `.venv/bin/python bench/throughput.py [--messages 10000] [--latency-ms 200] [--workers 1]`.
Needs Redis (DISPATCHER_REDIS_URL, default redis://localhost:6379/0) and, for the PostgreSQL
row, PostgreSQL at DISPATCHER_BENCH_PG_URL (default postgresql://postgres@127.0.0.1:5432/test).

In one run, on one machine, against `dispatcher sandbox` answering every request after a fixed
latency with no rate limit:
  * bare aiohttp: a client loop that only POSTs the same requests, 256 in flight (the ceiling);
  * dispatcher (SQLite) and dispatcher (PostgreSQL): send_many() -> store -> Redis -> worker
    processes -> sandbox -> store, timed from the first send_many() call to the last acceptance;
  * naive: one Celery task per message, one blocking httpx request per task, prefork, with as
    many processes as the dispatcher has workers (fewer messages: it is slow).
It prints messages/s, the ratios, p50/p99 from send() to accepted, the workers' peak RSS, and
CPU seconds per 1,000 messages of every process involved: the bare client, send_many() (the
producer), the worker(s), the mock provider, Redis and PostgreSQL. Redis and PostgreSQL are
shared with whatever else runs on the machine, so their figures are upper bounds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import aiohttp  # noqa: E402

REDIS_URL = os.environ.get("DISPATCHER_REDIS_URL", "redis://localhost:6379/0")
PROFILE_DIR = os.environ.get("BENCH_PROFILE_DIR")  # set: py-spy records each worker (collapsed stacks) there
PROFILE_ARGS = os.environ.get("BENCH_PROFILE_ARGS", "").split()  # more py-spy options, e.g. --gil (CPU only)
PG_URL = os.environ.get("DISPATCHER_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
BATCH = int(os.environ.get("BENCH_BATCH", "200"))  # ids per dispatch task
CONCURRENCY = int(os.environ.get("BENCH_CONCURRENCY", "8"))  # task threads per worker process (the default)
BODY = {"to": "+14155550123", "from": "BENCH", "message": "hello"}


def _ticks() -> float:
    return float(os.sysconf("SC_CLK_TCK"))


def cpu_seconds(pid: int, children: bool = False) -> float:
    """CPU (user + system) a process has used so far, all its threads; with `children`, also its reaped children."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    used = int(fields[11]) + int(fields[12]) + ((int(fields[13]) + int(fields[14])) if children else 0)
    return used / _ticks()


def pids_named(name: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as fh:
                    if fh.read().strip() == name:
                        found.append(int(entry))
            except OSError:
                pass
    return found


class CpuMeter:
    """CPU seconds used between start() and stop() by processes: given pids, or every process of a
    name (Redis, PostgreSQL: a backend started during the run counts from its start; one that
    ended is counted by its parent, the postmaster, which reaps it)."""

    def __init__(self, pids: dict[str, list[int]], names: dict[str, str] | None = None) -> None:
        self.pids, self.names = pids, names or {}
        self.before: dict[str, dict[int, float]] = {}

    def _now(self) -> dict[str, dict[int, float]]:
        pids = {**self.pids, **{label: pids_named(name) for label, name in self.names.items()}}
        return {label: {p: cpu_seconds(p, children=(label == "postgresql")) for p in ps} for label, ps in pids.items()}

    def start(self) -> "CpuMeter":
        self.before = self._now()
        return self

    def stop(self) -> dict[str, float]:
        after = self._now()
        return {label: sum(cpu - self.before.get(label, {}).get(p, 0.0) for p, cpu in now.items())
                for label, now in after.items()}


SHARED = {"redis": "redis-server", "postgresql": "postgres"}


def per_thousand(used: dict[str, float], count: int) -> str:
    return ", ".join(f"{label} {seconds * 1000 / count:.2f}" for label, seconds in used.items())


async def bare_client(url: str, api_key: str, count: int, in_flight: int = 256) -> float:
    sem = asyncio.Semaphore(in_flight)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=in_flight)) as session:
        async def one() -> None:
            async with sem:
                async with session.post(url, json=BODY, headers={"x-api-key": api_key}) as r:
                    await r.read()

        start = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(count)))
        return count / (time.perf_counter() - start)


def _status_mb(pid: int, field: str) -> float:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def peak_rss_mb(pid: int) -> float:
    return _status_mb(pid, "VmHWM")


def current_rss_mb(pid: int) -> float:
    return _status_mb(pid, "VmRSS")


def pipeline(provider, store_url: str, count: int, workers: int, in_flight: int = 256) -> dict:  # type: ignore[no-untyped-def]
    import dispatcher
    from dispatcher import runtime
    from dispatcher.store.db import session_scope, upgrade
    from dispatcher.store.models import Message
    from dispatcher.testing import WorkerProcesses, wait_until_settled
    from sqlalchemy import func, select

    work = tempfile.mkdtemp(prefix="bench-tp-")
    config = os.path.join(work, "dispatcher.toml")
    with open(config, "w") as fh:
        fh.write(f'[dispatcher]\nbatch_size = {BATCH}\nin_flight = {in_flight}\n\n[providers.bench]\nkind = "emsgnow"\n'
                 f'base_url = "{provider.base_url("emsgnow")}"\napi_key = "{provider.credentials("emsgnow")["api_key"]}"\n'
                 f'from = "BENCH"\ntimeout = 30\n')
    os.environ.update(DISPATCHER_CONFIG=config, DISPATCHER_DATABASE_URL=store_url)
    runtime.configure(None)
    upgrade(store_url)
    with WorkerProcesses(count=workers, env=dict(os.environ), concurrency=CONCURRENCY) as procs:
        time.sleep(3)  # let the workers connect before the clock starts
        meter = CpuMeter({"worker": [p.pid for p in procs.procs], "mock": [provider.proc.pid]}, SHARED).start()
        spies = [subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "py-spy"), "record", "-r", "100", "-f", "raw",
                                   "-o", os.path.join(PROFILE_DIR, f"worker{i}-{os.path.basename(store_url)[:20]}.txt"),
                                   "-p", str(p.pid), "--threads", "--nonblocking", *PROFILE_ARGS], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for i, p in enumerate(procs.procs)] if PROFILE_DIR else []
        wall_start = datetime.now(timezone.utc)
        start = time.perf_counter()
        producer_cpu = time.process_time()
        ids: list[str] = []
        for chunk in range(0, count, 5000):
            ids += dispatcher.send_many([{"provider": "bench", "to": f"+1415555{i % 10000:04d}", "text": f"m{i}"}
                                         for i in range(chunk, min(count, chunk + 5000))])
        produced = time.perf_counter() - start
        producer_cpu = time.process_time() - producer_cpu
        samples = []  # (fraction accepted, current RSS of the largest worker) while the run goes on
        deadline = time.monotonic() + count / 20 + 120
        while time.monotonic() < deadline:
            with session_scope(store_url) as db:
                done = db.execute(select(func.count()).select_from(Message).where(Message.status == "accepted")).scalar_one()
            samples.append((done / count, max(current_rss_mb(p.pid) for p in procs.procs)))
            if done >= count:
                break
            time.sleep(1.0)
        cpu = meter.stop()
        for spy in spies:
            spy.send_signal(2)  # SIGINT: py-spy writes its file and exits
            spy.wait(timeout=60)
        statuses = wait_until_settled(ids, timeout=30, interval=0.5)
        rss = [peak_rss_mb(p.pid) for p in procs.procs]
    with session_scope(store_url) as db:
        rows = db.execute(select(Message.created_at, Message.accepted_at).where(Message.status == "accepted")).all()
    lat = sorted((a - c).total_seconds() for c, a in rows if a is not None)
    last = max(a for _, a in rows if a is not None)
    last = last if last.tzinfo else last.replace(tzinfo=timezone.utc)
    elapsed = (last - wall_start).total_seconds()  # to the last acceptance, not to the next poll
    accepted = sum(1 for s in statuses.values() if s == "accepted")
    quarters = [next((mb for f, mb in samples if f >= q), samples[-1][1]) for q in (0.25, 0.5, 0.75, 1.0)]
    return {"rss_quarters": quarters, "rate": accepted / elapsed, "accepted": accepted, "produce_s": produced, "p50": statistics.median(lat),
            "p99": lat[int(len(lat) * 0.99) - 1], "rss": max(rss),
            "cpu": {"producer": producer_cpu, **cpu}}


def producer(provider, store_url: str, count: int) -> float:  # type: ignore[no-untyped-def]
    """Seconds send_many() takes to persist and enqueue `count` messages, no worker running."""
    import dispatcher
    from dispatcher import runtime
    from dispatcher.store.db import upgrade

    work = tempfile.mkdtemp(prefix="bench-prod-")
    config = os.path.join(work, "dispatcher.toml")
    with open(config, "w") as fh:
        fh.write(f'[dispatcher]\nbatch_size = {BATCH}\n\n[providers.bench]\nkind = "emsgnow"\n'
                 f'base_url = "{provider.base_url("emsgnow")}"\napi_key = "x"\nfrom = "BENCH"\n')
    prefix = os.environ["DISPATCHER_REDIS_PREFIX"]
    os.environ.update(DISPATCHER_CONFIG=config, DISPATCHER_DATABASE_URL=store_url)
    runtime.configure(None)
    upgrade(store_url)
    dispatcher.send_many([{"provider": "bench", "to": "+14155550123", "text": "warm-up"}])
    items = [{"provider": "bench", "to": f"+1415555{i % 10000:04d}", "text": f"m{i}"} for i in range(count)]
    meter = CpuMeter({}, SHARED).start()
    start, cpu = time.perf_counter(), time.process_time()
    dispatcher.send_many(items)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    producer.cpu = {"producer": cpu, **meter.stop()}  # type: ignore[attr-defined]
    import redis

    client = redis.Redis.from_url(REDIS_URL)  # drop the tasks: nobody is to send these
    for key in client.scan_iter(f"{prefix}:dispatcher.send*"):
        client.delete(key)
    return seconds


def naive(provider, count: int, workers: int) -> float:  # type: ignore[no-untyped-def]
    import redis

    env = dict(os.environ, NAIVE_BROKER_URL=REDIS_URL, NAIVE_PREFIX=f"naive{uuid.uuid4().hex[:6]}",
               PYTHONPATH=os.path.dirname(__file__))
    os.environ.update(NAIVE_BROKER_URL=REDIS_URL, NAIVE_PREFIX=env["NAIVE_PREFIX"])
    from naive_app import app  # noqa: E402  (bench/ is on sys.path below)

    key = f"{env['NAIVE_PREFIX']}:done"
    proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "naive_app", "worker", "-P", "prefork", "-c",
                             str(workers), "--loglevel", "WARNING"], env=env, cwd=os.path.dirname(__file__),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    r = redis.Redis.from_url(REDIS_URL)
    try:
        time.sleep(3)
        url, api_key = provider.base_url("emsgnow") + "/sms", provider.credentials("emsgnow")["api_key"]
        start = time.perf_counter()
        for _ in range(count):
            app.send_task("naive.send", args=[url, api_key, BODY, key])
        while r.llen(key) < count:
            time.sleep(0.2)
        return count / (time.perf_counter() - start)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        r.delete(key)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10000)
    parser.add_argument("--naive-messages", type=int, default=400)
    parser.add_argument("--latency-ms", type=int, default=200)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--in-flight", type=int, default=256, help="per worker process, and the bare client's")
    parser.add_argument("--stores", default="sqlite,postgresql", help="comma-separated: sqlite, postgresql")
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(__file__))
    os.environ["DISPATCHER_REDIS_PREFIX"] = f"benchtp{uuid.uuid4().hex[:8]}"
    from dispatcher.testing import SandboxProcess

    print(f"{args.messages} messages, provider latency {args.latency_ms} ms, {args.workers} worker processes")
    with SandboxProcess(latency_ms=args.latency_ms) as provider:
        provider.configure("emsgnow", rate_limit=10**9)
        bare, bare_cpu = run_bare(provider, args, "asyncio")
        try:
            import uvloop
        except ImportError:
            pass
        else:  # for reference: the worker's loop is uvloop's (transport.new_event_loop); the ratios are to the line above
            run_bare(provider, args, "uvloop", uvloop.new_event_loop)
        naive_rate = float("nan")
        if args.naive_messages > 0:  # --naive-messages 0 skips the slow baseline (quick iterations)
            naive_rate = naive(provider, args.naive_messages, args.workers)
            print(f"naive Celery (prefork, 1 req/task)    {naive_rate:8.1f} msg/s  ({args.naive_messages} messages)")
        rates: dict[str, float] = {}
        for store in args.stores.split(","):
            url = f"sqlite:///{tempfile.mkdtemp()}/bench.db" if store == "sqlite" else _pg_schema()
            seconds = producer(provider, url, args.messages)
            print(f"send_many() alone ({store:<10})         {args.messages} messages in {seconds:.2f}s "
                  f"({args.messages / seconds:.0f} msg/s)")
            print(f"    CPU s per 1,000 messages: {per_thousand(producer.cpu, args.messages)}")  # type: ignore[attr-defined]
            url = f"sqlite:///{tempfile.mkdtemp()}/bench.db" if store == "sqlite" else _pg_schema()
            r = pipeline(provider, url, args.messages, args.workers, args.in_flight)
            print(f"dispatcher ({store:<10})               {r['rate']:8.0f} msg/s  "
                  f"= {r['rate'] / bare:.2f} x bare, {r['rate'] / naive_rate:.0f} x naive; "
                  f"send_many (beside the workers) {r['produce_s']:.2f}s; send->accepted p50 {r['p50']:.2f}s p99 {r['p99']:.2f}s; "
                  f"worker peak RSS {r['rss']:.0f} MB; accepted {r['accepted']}")
            print(f"    worker RSS at 25/50/75/100 % accepted: {' / '.join(f'{mb:.0f}' for mb in r['rss_quarters'])} MB")
            print(f"    CPU s per 1,000 messages: {per_thousand(r['cpu'], args.messages)}; "
                  f"worker / bare client = {r['cpu']['worker'] / max(bare_cpu['client'], 1e-9):.1f}")
            rates[store] = r["rate"]
        after, _ = run_bare(provider, args, "asyncio, again after")
        # the machine's load moves the bare client's rate by half between runs: both, and their mean
        for store, rate in rates.items():
            print(f"ratio ({store:<10}) to the bare client before / after / their mean: "
                  f"{rate / bare:.2f} / {rate / after:.2f} / {rate / ((bare + after) / 2):.2f}")


def run_bare(provider, args, name: str, loop_factory=None) -> tuple[float, dict[str, float]]:  # type: ignore[no-untyped-def]
    """The bare aiohttp client's rate and CPU (its own and the mock's), printed."""
    meter = CpuMeter({"mock": [provider.proc.pid]}).start()
    cpu = time.process_time()
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        rate = runner.run(bare_client(provider.base_url("emsgnow") + "/sms", provider.credentials("emsgnow")["api_key"],
                                      args.messages, args.in_flight))
    used = {"client": time.process_time() - cpu, **meter.stop()}
    print(f"bare aiohttp client ({args.in_flight} in flight, {name}) {rate:8.0f} msg/s")
    print(f"    CPU s per 1,000 messages: {per_thousand(used, args.messages)}")
    return rate, used


_SCHEMAS: list[str] = []  # made by this run, dropped at its end


def _pg_schema() -> str:
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    _pg_admin(f'CREATE SCHEMA "{schema}"')
    _SCHEMAS.append(schema)
    return f"{PG_URL}?options=-csearch_path%3D{schema}"


def _pg_admin(*statements: str) -> None:
    import sqlalchemy as sa

    engine = sa.create_engine(PG_URL.replace("postgresql://", "postgresql+psycopg://"), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        for statement in statements:
            conn.exec_driver_sql(statement)
    engine.dispose()


if __name__ == "__main__":
    try:
        main()
    finally:
        if _SCHEMAS:
            _pg_admin(*(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE' for schema in _SCHEMAS))

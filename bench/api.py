"""Throughput and latency of the HTTP API (`dispatcher api`), on SQLite and PostgreSQL.

Run by hand: `.venv/bin/python bench/api.py [--requests 20000] [--clients 64] [--batches 40]`.
Needs Redis (DISPATCHER_REDIS_URL, default redis://localhost:6379/0) and, for the PostgreSQL
rows, PostgreSQL at DISPATCHER_BENCH_PG_URL (default postgresql://postgres@127.0.0.1:5432/test);
`--stores sqlite` skips it.

For each store it starts the real command (`dispatcher api`, one process) on a fresh store and
measures, with one aiohttp client process:
  * single:   POST /v1/messages from `--clients` concurrent clients, each posting again as soon
              as it is answered (closed loop): requests/s and latency;
  * at 1,000/s: the same clients together offering 1,000 requests/s on a fixed schedule (open
              loop): the latency a producer sees at the target rate;
  * batch:    POST /v1/messages/batch of 1,000 messages from `--batch-clients` clients:
              messages/s and latency per batch, beside dispatcher.send_many() of the same
              batches called in one process with no HTTP (what the batch call wraps).
Every message is stored and a dispatch task published to Redis (no worker runs: the broker
keys are removed afterwards). Beside it, the same client against a bare aiohttp server that
answers 201 at once (no store, no broker): the ceiling of this client on this machine, so the
ratio stays meaningful when the machine is busy. The server's CPU time per request (from /proc)
says what the API itself costs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

import aiohttp

REDIS_URL = os.environ.get("DISPATCHER_REDIS_URL", "redis://localhost:6379/0")
PG_URL = os.environ.get("DISPATCHER_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
MESSAGE = {"provider": "alerts", "to": "+14155550123", "text": "Your code is 482910"}
CONFIG = """
[providers.alerts]
kind = "emsgnow"
base_url = "http://127.0.0.1:9/emsgnow"
api_key = "not-used"
from = "BENCH"
"""
IN_PROCESS = r"""
import json, sys, time
import dispatcher
batch, rounds = [json.loads(sys.argv[1])] * 1000, int(sys.argv[2])
dispatcher.send_many(batch)
start = time.perf_counter()
for _ in range(rounds):
    dispatcher.send_many(batch)
print(rounds * 1000 / (time.perf_counter() - start))
"""
BARE_SERVER = r"""
import sys
from aiohttp import web
async def post(request):
    await request.read()
    return web.json_response({"id": "0" * 32, "status": "queued"}, status=201)
app = web.Application(client_max_size=1024 * 1024)
app.router.add_post("/v1/messages", post)
app.router.add_post("/v1/messages/batch", post)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None, backlog=1024)
"""


# --------------------------------------------------------------------------- load
def summary(name: str, elapsed: float, latencies: list[float], requests: int, messages: int) -> dict:
    latencies = sorted(latencies)
    return {"name": name, "rps": requests / elapsed, "mps": messages / elapsed,
            "p50": statistics.median(latencies) * 1000, "p99": latencies[int(len(latencies) * 0.99) - 1] * 1000}


async def closed_loop(url: str, headers: dict, body: bytes, total: int, clients: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    left = total

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            t0 = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as r:
                await r.read()
                if r.status != 201:
                    raise RuntimeError(f"{url}: {r.status} {await r.text()}")
            latencies.append(time.perf_counter() - t0)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:
        start = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        return time.perf_counter() - start, latencies


async def open_loop(url: str, headers: dict, body: bytes, rate: float, seconds: float,
                    clients: int) -> tuple[float, list[float], int]:
    """`clients` connections together offering `rate` requests/s on a fixed schedule.

    Latency counts from the scheduled instant, so a server that falls behind is charged for
    the wait (no coordinated omission). Returns (elapsed, latencies, requests late to start).
    """
    latencies: list[float] = []
    late = 0
    interval = clients / rate

    async def client(session: aiohttp.ClientSession, offset: float, start: float) -> None:
        nonlocal late
        due = start + offset
        while due < start + seconds:
            now = time.perf_counter()
            if due > now:
                await asyncio.sleep(due - now)
            elif now - due > interval:
                late += 1
            async with session.post(url, data=body, headers=headers) as r:
                await r.read()
                if r.status != 201:
                    raise RuntimeError(f"{url}: {r.status}")
            latencies.append(time.perf_counter() - due)
            due += interval

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:
        start = time.perf_counter()
        await asyncio.gather(*(client(session, i * interval / clients, start) for i in range(clients)))
        return time.perf_counter() - start, latencies, late


# --------------------------------------------------------------------------- servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server did not start")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def store_url(store: str, work: str) -> tuple[str, object]:
    """A fresh store: a new SQLite file, or a new PostgreSQL schema (dropped by the returned cleanup)."""
    if store == "sqlite":
        return f"sqlite:///{work}/bench.db", lambda: None
    import sqlalchemy as sa

    schema = f"bench_api_{uuid.uuid4().hex[:8]}"
    base = PG_URL.replace("postgresql://", "postgresql+psycopg://", 1)
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')

    def drop() -> None:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        admin.dispose()

    return f"{base}?options=-csearch_path%3D{schema}", drop


def run_store(store: str, args: argparse.Namespace) -> list[dict]:
    work = tempfile.mkdtemp(prefix="bench-api-")
    with open(os.path.join(work, "dispatcher.toml"), "w") as fh:
        fh.write(CONFIG)
    url, cleanup = store_url(store, work)
    prefix = f"bench-api-{uuid.uuid4().hex[:8]}"
    env = dict(os.environ, DISPATCHER_CONFIG=os.path.join(work, "dispatcher.toml"), DISPATCHER_DATABASE_URL=url,
               DISPATCHER_REDIS_URL=REDIS_URL, DISPATCHER_REDIS_PREFIX=prefix)
    cli = [sys.executable, "-m", "dispatcher.cli"]
    try:
        subprocess.run(cli + ["db", "upgrade"], env=env, check=True, capture_output=True)
        key = subprocess.run(cli + ["api-key", "create", "bench"], env=env, check=True, capture_output=True,
                             text=True).stdout.splitlines()[-1]
        in_process = float(subprocess.run([sys.executable, "-c", IN_PROCESS, json.dumps(MESSAGE), str(args.batches)],
                                          env=env, check=True, capture_output=True, text=True).stdout)
        port = free_port()
        proc = subprocess.Popen(cli + ["api", "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            wait_listening(port, proc)
            rows = measure(f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {key}"}, proc.pid, args, store)
            rows.append({"name": f"{store}: send_many(1,000) in process, no HTTP", "rps": in_process / 1000,
                         "mps": in_process, "p50": 1000 / in_process * 1000, "p99": float("nan")})
            return rows
        finally:
            proc.terminate()
            proc.wait(30)
    finally:
        cleanup()
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        for k in client.scan_iter(f"{prefix}*", count=1000):
            client.delete(k)


def run_bare(args: argparse.Namespace) -> list[dict]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", BARE_SERVER, str(port)])
    try:
        wait_listening(port, proc)
        return measure(f"http://127.0.0.1:{port}", {}, proc.pid, args, "bare aiohttp")
    finally:
        proc.terminate()
        proc.wait(30)


def measure(base: str, auth: dict, pid: int, args: argparse.Namespace, label: str) -> list[dict]:
    headers = dict(auth, **{"Content-Type": "application/json"})
    one = json.dumps(MESSAGE).encode()
    batch = json.dumps({"messages": [MESSAGE] * 1000}).encode()
    rows = []
    asyncio.run(closed_loop(f"{base}/v1/messages", headers, one, 1000, args.clients))  # warm up
    cpu0 = cpu_seconds(pid)
    elapsed, lat = asyncio.run(closed_loop(f"{base}/v1/messages", headers, one, args.requests, args.clients))
    row = summary(f"{label}: single, closed loop", elapsed, lat, args.requests, args.requests)
    row["cpu_us"] = (cpu_seconds(pid) - cpu0) / args.requests * 1e6
    rows.append(row)
    elapsed, lat, late = asyncio.run(open_loop(f"{base}/v1/messages", headers, one, args.rate, args.seconds,
                                               args.clients))
    row = summary(f"{label}: single, {args.rate:,.0f}/s offered", elapsed, lat, len(lat), len(lat))
    row["late"] = late
    rows.append(row)
    cpu0 = cpu_seconds(pid)
    elapsed, lat = asyncio.run(closed_loop(f"{base}/v1/messages/batch", headers, batch, args.batches,
                                           args.batch_clients))
    row = summary(f"{label}: batch of 1,000", elapsed, lat, args.batches, args.batches * 1000)
    row["cpu_us"] = (cpu_seconds(pid) - cpu0) / (args.batches * 1000) * 1e6
    rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20000, help="single POSTs in the closed-loop run")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--rate", type=float, default=1000.0, help="requests/s offered in the open-loop run")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of the open-loop run")
    ap.add_argument("--batches", type=int, default=40, help="batch POSTs of 1,000 messages")
    ap.add_argument("--batch-clients", type=int, default=1)
    ap.add_argument("--stores", default="sqlite,postgresql")
    args = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; {args.clients} clients; "
          f"{args.requests:,} single POSTs, {args.batches} batches of 1,000 ({args.batch_clients} clients)")
    rows = run_bare(args)
    for store in args.stores.split(","):
        rows += run_store(store, args)
    print(f"{'run':<44} {'requests/s':>10} {'messages/s':>10} {'p50 ms':>7} {'p99 ms':>7} {'server CPU us/msg':>17}")
    for r in rows:
        cpu = f"{r['cpu_us']:,.0f}" if "cpu_us" in r else ""
        late = f"  ({r['late']} started late)" if r.get("late") else ""
        print(f"{r['name']:<44} {r['rps']:>10,.0f} {r['mps']:>10,.0f} {r['p50']:>7.1f} {r['p99']:>7.1f} {cpu:>17}{late}")
    bare = {r["name"].split(": ", 1)[1]: r for r in rows if r["name"].startswith("bare")}
    for r in rows:
        label, kind = r["name"].split(": ", 1)
        if label != "bare aiohttp" and "closed loop" in kind:
            print(f"{r['name']}: {r['mps'] / bare[kind]['mps']:.2f} of the bare server's requests/s")
        if label != "bare aiohttp" and "batch" in kind:
            floor = next(x for x in rows if x["name"] == f"{label}: send_many(1,000) in process, no HTTP")
            print(f"{r['name']}: {r['mps'] / floor['mps']:.2f} of send_many()'s messages/s in one process")


if __name__ == "__main__":
    main()

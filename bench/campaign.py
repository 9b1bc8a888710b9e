"""Campaigns: loading speed and memory as the CSV grows, then the send rate against the limit.

Run by hand: `.venv/bin/python bench/campaign.py [--rows 50000,200000] [--db sqlite,postgresql]
[--send 6000] [--rate 200/s] [--workers 2]`. Needs Redis (DISPATCHER_REDIS_URL, default
redis://localhost:6379/0) and, for the PostgreSQL rows, PostgreSQL at DISPATCHER_BENCH_PG_URL
(default postgresql://postgres@127.0.0.1:5432/test; a schema of its own, dropped after).

Load: for each store and size, a fresh child process runs `dispatcher.campaign()` over the CSV
(streamed by csvrows.read_csv); it prints rows/s loaded and stored, and the child's peak RSS
(wait4's ru_maxrss) beside its RSS just before loading (imports, engine, schema). rows/CPU-s
divides by the child's own CPU time (user + system): on a busy shared machine it shows what one
free core would do (for SQLite it includes the database's work; PostgreSQL's server is apart).

Send: a campaign of `--send` rows on an account limited to `--rate`, through a sandbox process
and `--workers` worker processes plus a beat (the feeder is a step of the beat's tick); it
prints the provider's achieved rate against the limit, the most requests in any window of the
limit's unit, and, for single send()s made while the campaign runs, how long each took to
reach the provider (in the account's slots).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

PG_URL = os.environ.get("DISPATCHER_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
TEMPLATE = "Hi {name}, your table for {guests} is booked at {time}. Reply STOP to opt out. Ref {ref}"


def write_csv(path: str, rows: int, seed: int = 7) -> None:
    rng = random.Random(seed)
    with open(path, "w") as fh:
        fh.write("to,name,guests,time,ref\n")
        for i in range(rows):
            fh.write(f"+1415{rng.randint(2000000, 9999999)},Guest {i},{rng.randint(1, 8)},"
                     f"{rng.randint(17, 22)}:{rng.choice(('00', '30'))},R{i:07d}\n")


def config_text(base_url: str, api_key: str, rate: str | None) -> str:
    limit = f'rate_limit = "{rate}"\n' if rate else ""
    margin = os.environ.get("BENCH_RATE_MARGIN")  # the [dispatcher] rate_margin to run with
    general = f"[dispatcher]\nrate_margin = {float(margin)}\n\n" if margin else ""
    return (f'{general}[providers.bulk]\nkind = "emsgnow"\nbase_url = "{base_url}"\napi_key = "{api_key}"\n'
            f'from = "BENCH"\n{limit}')


# --------------------------------------------------------------------------- load (child process)
def child_load(csv_path: str) -> None:
    import dispatcher
    from dispatcher.csvrows import read_csv

    dispatcher.list_campaigns()  # schema, engine, imports: the baseline
    before_kb = _rss_kb()
    start = time.perf_counter()
    with open(csv_path, "rb") as fh:
        c = dispatcher.campaign("bulk", read_csv(fh), TEMPLATE, name="bench")
    seconds = time.perf_counter() - start
    print(json.dumps({"rows": c.total, "invalid": c.invalid_count, "seconds": seconds, "before_kb": before_kb}))


def _rss_kb() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def measure_load(csv_path: str, env: dict[str, str]) -> dict:
    proc = subprocess.Popen([sys.executable, __file__, "--child-load", csv_path], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    out, err = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"load failed: {err.decode()[-2000:]}")
    result = json.loads(out.decode().strip().splitlines()[-1])
    result["peak_kb"] = usage.ru_maxrss
    result["cpu"] = usage.ru_utime + usage.ru_stime  # the loader's own CPU (SQLite's work included)
    return result


def pg_schema() -> tuple[str, str]:
    import sqlalchemy as sa

    schema = f"bench_campaign_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(PG_URL.replace("postgresql://", "postgresql+psycopg://"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    admin.dispose()
    sep = "&" if "?" in PG_URL else "?"
    return schema, f"{PG_URL}{sep}options=-csearch_path%3D{schema}"


def drop_pg_schema(schema: str) -> None:
    import sqlalchemy as sa

    admin = sa.create_engine(PG_URL.replace("postgresql://", "postgresql+psycopg://"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
    admin.dispose()


def run_loads(sizes: list[int], stores: list[str], work: str) -> None:
    from dispatcher.store.db import upgrade

    config = os.path.join(work, "dispatcher.toml")
    with open(config, "w") as fh:
        fh.write(config_text("http://127.0.0.1:9", "unused", "100/s"))
    csvs = {}
    for n in sizes:
        csvs[n] = os.path.join(work, f"rows{n}.csv")
        write_csv(csvs[n], n)
    print(f"{'store':<11} {'rows':>8} {'seconds':>8} {'rows/s':>8} {'rows/CPU-s':>10} {'peak RSS MB':>11} "
          f"{'RSS before MB':>13} {'CSV MB':>7}")
    for store in stores:
        for n in sizes:
            schema = None
            if store == "sqlite":
                url = f"sqlite:///{work}/load-{n}.db"
            else:
                schema, url = pg_schema()
                upgrade(url)
            env = dict(os.environ, DISPATCHER_CONFIG=config, DISPATCHER_DATABASE_URL=url)
            try:
                r = measure_load(csvs[n], env)
            finally:
                if schema:
                    drop_pg_schema(schema)
            print(f"{store:<11} {r['rows']:>8,} {r['seconds']:>8.2f} {r['rows'] / r['seconds']:>8,.0f} "
                  f"{r['rows'] / r['cpu']:>10,.0f} {r['peak_kb'] / 1024:>11.1f} {r['before_kb'] / 1024:>13.1f} "
                  f"{os.path.getsize(csvs[n]) / 1e6:>7.1f}", flush=True)


# --------------------------------------------------------------------------- send
def run_send(rows: int, rate_text: str, workers: int, work: str, singles: int) -> None:
    import dispatcher
    from dispatcher import runtime
    from dispatcher.config import parse_rate_limit
    from dispatcher.csvrows import read_csv
    from dispatcher.testing import SandboxProcess, WorkerProcesses, most_in_window

    rate = parse_rate_limit(rate_text)
    per_s = rate.count / rate.period
    csv_path = os.path.join(work, f"send{rows}.csv")
    write_csv(csv_path, rows, seed=11)
    with SandboxProcess() as provider:
        provider.configure("emsgnow", rate_limit=10**9)
        config = os.path.join(work, "send.toml")
        with open(config, "w") as fh:
            fh.write(config_text(provider.base_url("emsgnow"), provider.credentials("emsgnow")["api_key"], rate_text))
        os.environ.update(DISPATCHER_CONFIG=config, DISPATCHER_DATABASE_URL=f"sqlite:///{work}/send.db")
        runtime.configure(None)
        dispatcher.list_campaigns()  # the schema before the workers start
        with WorkerProcesses(count=workers, env=dict(os.environ), concurrency=8, beat=True) as running:
            running.wait_ready()
            with open(csv_path, "rb") as fh:
                c = dispatcher.campaign("bulk", read_csv(fh), TEMPLATE, name="bench-send")
            loaded = time.time()
            # single sends while the campaign runs: each should overtake the campaign's waiting rows
            sent_at: dict[str, float] = {}
            expected = rows / per_s
            for i in range(singles):
                time.sleep(expected / (singles + 1) if i else min(5.0, expected / 4))
                text = f"one-time code {100000 + i}"
                sent_at[text] = time.time()
                dispatcher.send("bulk", "+14155550100", text)
            deadline = time.time() + expected * 3 + 120
            while True:
                status = dispatcher.campaign_status(c.id)
                if status.state == "done" or time.time() > deadline:
                    break
                time.sleep(1.0)
        log = [r for r in provider.requests("emsgnow") if r["method"] == "POST"]
    arrivals = sorted(r["received_at"] for r in log)
    singles_seen = {}
    for r in log:
        body = r.get("json") or {}
        if str(body.get("message", "")).startswith("one-time code"):
            singles_seen[body["message"]] = r["received_at"]
    span = arrivals[-1] - arrivals[0]
    achieved = (len(arrivals) - 1) / span
    print(f"campaign {rows:,} rows, limit {rate_text}, {workers} worker process(es) + beat; state {status.state}, "
          f"counts {status.counts}")
    print(f"  provider received {len(arrivals):,} POSTs over {span:.1f} s (first {arrivals[0] - loaded:+.2f} s "
          f"after the load returned)")
    print(f"  achieved {achieved:.1f}/s = {achieved / per_s:.3f} x the limit; most in any {rate.period:g} s window: "
          f"{most_in_window(arrivals, rate.period)} (limit {int(rate.count)})")
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:]) if b - a > 3 / per_s]
    print(f"  idle gaps longer than 3 slots: {len(gaps)}, {sum(gaps):.2f} s in all (longest {max(gaps, default=0):.2f} s)")
    if sent_at:
        lat = [singles_seen[t] - sent_at[t] for t in sent_at if t in singles_seen]
        slot = 1 / per_s
        print(f"  single sends during the campaign: {len(lat)}/{len(sent_at)} arrived; send() -> provider "
              f"median {statistics.median(lat) * 1000:.0f} ms, max {max(lat) * 1000:.0f} ms "
              f"(= {statistics.median(lat) / slot:.1f} / {max(lat) / slot:.1f} slots of {slot * 1000:.1f} ms)")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child-load":
        child_load(sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="50000,200000", help="CSV sizes to load, comma-separated")
    parser.add_argument("--db", default="sqlite,postgresql", help="stores to load into, comma-separated")
    parser.add_argument("--send", type=int, default=6000, help="rows of the campaign sent through the sandbox (0: skip)")
    parser.add_argument("--rate", default="200/s", help="the sending account's limit")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--singles", type=int, default=5, help="single send()s made while the campaign runs")
    args = parser.parse_args()
    os.environ["DISPATCHER_REDIS_PREFIX"] = f"benchcampaign{uuid.uuid4().hex[:8]}"
    work = tempfile.mkdtemp(prefix="bench-campaign-")
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start")
    sizes = [int(n) for n in args.rows.split(",") if n]
    if sizes:
        run_loads(sizes, [s for s in args.db.split(",") if s], work)
    if args.send:
        run_send(args.send, args.rate, args.workers, work, args.singles)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()

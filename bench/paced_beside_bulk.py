"""A rate-limited account beside a bulk send in one worker: does it still go at its own pace?

Run by hand: `.venv/bin/python bench/paced_beside_bulk.py [--stores postgresql,sqlite] [--latency-ms 0]`.
Needs Redis and, for PostgreSQL, DISPATCHER_BENCH_PG_URL (default postgresql://postgres@127.0.0.1:5432/test).

One `dispatcher worker` process, the sandbox's eMsgNow endpoint, two accounts on it: `paced`
(rate_limit 20/s, `--paced` messages, sent first) and `bulk` (no limit, `--bulk` messages, sent
right after in chunks of 5,000), then `send()`s to a third account, `single` (one-time codes),
one after another while the bulk send lasts. Alone, the paced messages take `--paced` / 20
seconds. It prints how long they took beside the bulk send, how long each single message took
from its send() to `accepted` (median and most), how long the bulk send took, and how often a
paced message was handed back unsent because it woke, or had its start recorded, later than its
rate-limit slot allows (the worker's log says so each time).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import threading
import sys
import tempfile
import time
import uuid
from collections import Counter

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

RATE = 20  # the paced account's limit, per second


def one_run(store: str, latency_ms: int, paced_count: int, bulk_count: int, margin: str) -> None:
    import dispatcher
    from dispatcher import runtime
    from dispatcher.store.db import upgrade
    from dispatcher.testing import SandboxProcess, WorkerProcesses, wait_until_settled

    import throughput

    with SandboxProcess(latency_ms=latency_ms) as provider:
        provider.configure("emsgnow", rate_limit=10**9)
        url = throughput._pg_schema() if store == "postgresql" else f"sqlite:///{tempfile.mkdtemp()}/bench.db"
        base, key = provider.base_url("emsgnow"), provider.credentials("emsgnow")["api_key"]
        config = os.path.join(tempfile.mkdtemp(prefix="bench-paced-"), "dispatcher.toml")
        with open(config, "w") as fh:
            fh.write(f'[dispatcher]\nrate_margin = {margin}\n\n'
                     f'[providers.bulk]\nkind = "emsgnow"\nbase_url = "{base}"\napi_key = "{key}"\nfrom = "BULK"\n\n'
                     f'[providers.paced]\nkind = "emsgnow"\nbase_url = "{base}"\napi_key = "{key}"\nfrom = "PACED"\n'
                     f'rate_limit = "{RATE}/s"\n\n'
                     f'[providers.single]\nkind = "emsgnow"\nbase_url = "{base}"\napi_key = "{key}"\nfrom = "ONE"\n')
        os.environ.update(DISPATCHER_CONFIG=config, DISPATCHER_DATABASE_URL=url)
        runtime.configure(None)
        upgrade(url)
        with WorkerProcesses(count=1, env=dict(os.environ), loglevel="INFO") as procs:
            time.sleep(3)  # let the worker connect before the clock starts
            start = time.monotonic()
            paced = dispatcher.send_many([{"provider": "paced", "to": "+14155550100", "text": f"p{i}"}
                                          for i in range(paced_count)])
            bulk: list[str] = []
            for chunk in range(0, bulk_count, 5000):
                bulk += dispatcher.send_many([{"provider": "bulk", "to": "+14155550101", "text": f"b{i}"}
                                              for i in range(chunk, min(bulk_count, chunk + 5000))])
            bulk_done = threading.Event()

            def settle(ids: list[str], since: float, interval: float) -> tuple[dict, float]:
                statuses = wait_until_settled(ids, timeout=300, interval=interval)
                return statuses, time.monotonic() - since

            def singles() -> tuple[list[float], Counter]:
                """One send() at a time while the bulk send lasts: each one's time to settle."""
                took, outcomes = [], Counter()
                while not bulk_done.is_set() or not took:
                    sent_at = time.monotonic()
                    one = dispatcher.send("single", "+14155550102", "your code is 1234").id
                    outcomes.update(settle([one], sent_at, 0.02)[0].values())
                    took.append(time.monotonic() - sent_at)
                    bulk_done.wait(0.3)
                return took, outcomes

            with concurrent.futures.ThreadPoolExecutor(3) as pool:
                waits = [pool.submit(settle, paced, start, 0.1), pool.submit(singles), pool.submit(settle, bulk, start, 0.5)]
                bulk_status, bulk_s = waits[2].result()
                bulk_done.set()
                (paced_status, paced_s), (single_s, single_status) = waits[0].result(), waits[1].result()
            single_s.sort()
            with open(os.path.join(procs.logdir, "worker0.log")) as fh:
                log = fh.read()
    woke_late = log.count("after its rate-limit slot")
    start_late = log.count("its start was recorded")
    late = sorted(float(x) for x in re.findall(r"(\d+\.\d+)s after its rate-limit slot", log))
    late_ms = f", late by {1000 * late[len(late) // 2]:.0f} ms (median), {1000 * late[-1]:.0f} ms (most)" if late else ""
    print(f"{store:<10} {latency_ms} ms, rate_margin {margin}: {paced_count} paced in {paced_s:.1f} s "
          f"(alone: {paced_count / RATE:.1f} s) {dict(Counter(paced_status.values()))}; "
          f"{len(single_s)} single send()s one after another meanwhile: {single_s[len(single_s) // 2]:.2f} s (median), "
          f"{single_s[-1]:.2f} s (most) {dict(single_status)}; "
          f"{bulk_count} bulk in {bulk_s:.1f} s {dict(Counter(bulk_status.values()))}; "
          f"paced handed back for a missed slot {woke_late} times ({start_late} of them with the start recorded too late)"
          f"{late_ms}",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stores", default="postgresql,sqlite")
    parser.add_argument("--latency-ms", type=int, default=0)
    parser.add_argument("--paced", type=int, default=100)
    parser.add_argument("--bulk", type=int, default=20000)
    parser.add_argument("--rate-margin", default="0.02")
    args = parser.parse_args()
    os.environ["DISPATCHER_REDIS_PREFIX"] = f"benchpaced{uuid.uuid4().hex[:8]}"
    import throughput

    try:
        for store in args.stores.split(","):
            one_run(store, args.latency_ms, args.paced, args.bulk, args.rate_margin)
    finally:
        if throughput._SCHEMAS:
            throughput._pg_admin(*(f'DROP SCHEMA IF EXISTS "{s}" CASCADE' for s in throughput._SCHEMAS))


if __name__ == "__main__":
    main()

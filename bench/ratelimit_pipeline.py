"""Rate-limit accuracy of the whole pipeline with 1, 2 and 4 worker processes.

Run by hand: `.venv/bin/python bench/ratelimit_pipeline.py [--rate 20/s] [--messages 400]`.
Needs Redis (DISPATCHER_REDIS_URL, default redis://localhost:6379/0). For each worker count it
starts a sandbox process (the provider, counting arrivals), N `dispatcher worker` processes,
sends the messages with send_many(), and prints achieved rate / configured rate and the most
requests the provider saw in any window of the limit's unit.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import dispatcher  # noqa: E402
from dispatcher import runtime  # noqa: E402
from dispatcher.config import parse_rate_limit  # noqa: E402
from dispatcher.testing import SandboxProcess, WorkerProcesses, most_in_window, wait_until_settled  # noqa: E402


def run(workers: int, rate_text: str, messages: int) -> tuple[float, int, float]:
    rate = parse_rate_limit(rate_text)
    work = tempfile.mkdtemp(prefix="bench-rl-")
    with SandboxProcess() as provider:
        provider.configure("emsgnow", rate_limit=10**9)
        config = os.path.join(work, "dispatcher.toml")
        with open(config, "w") as fh:
            fh.write(f'[providers.limited]\nkind = "emsgnow"\nbase_url = "{provider.base_url("emsgnow")}"\n'
                     f'api_key = "{provider.credentials("emsgnow")["api_key"]}"\nfrom = "BENCH"\nrate_limit = "{rate_text}"\n')
        os.environ.update(DISPATCHER_CONFIG=config, DISPATCHER_DATABASE_URL=f"sqlite:///{work}/bench.db")
        runtime.configure(None)
        with WorkerProcesses(count=workers, env=dict(os.environ), concurrency=4) as running:
            running.wait_ready()  # every worker consuming before the messages exist
            ids = dispatcher.send_many([{"provider": "limited", "to": f"+1415555{i:04d}", "text": f"m{i}"}
                                        for i in range(messages)])
            wait_until_settled(ids, timeout=messages * rate.interval * 3 + 60, interval=0.5)
        arrivals = sorted(r["received_at"] for r in provider.requests("emsgnow") if r["method"] == "POST")
    achieved = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])
    return achieved / (rate.count / rate.period), most_in_window(arrivals, rate.period), arrivals[-1] - arrivals[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", default="20/s")
    parser.add_argument("--messages", type=int, default=400)
    args = parser.parse_args()
    rate = parse_rate_limit(args.rate)
    # one key prefix for the whole run: the producer's Celery app is built once per process
    os.environ["DISPATCHER_REDIS_PREFIX"] = f"benchrl{uuid.uuid4().hex[:8]}"
    print(f"limit {args.rate}, {args.messages} messages, provider counting arrivals")
    print(f"{'workers':>7}  {'achieved/configured':>19}  {'worst window':>12}  {'span s':>7}")
    for workers in (1, 2, 4):
        ratio, worst, span = run(workers, args.rate, args.messages)
        print(f"{workers:>7}  {ratio:>19.3f}  {worst:>8} / {int(rate.count)}  {span:>7.2f}")


if __name__ == "__main__":
    main()

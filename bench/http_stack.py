"""Which HTTP server stack for the producer API (and the webhook receiver): aiohttp or FastAPI?

Run by hand: `.venv/bin/python bench/http_stack.py [--requests 20000] [--clients 64]`
(FastAPI and uvicorn must be installed for their rows: `pip install fastapi 'uvicorn[standard]'`).

Each server runs alone in its own process and does the same work per request: read a JSON
body, validate it with the same pydantic model, answer 201 with a JSON body. The client (one
aiohttp process, `--clients` requests in flight) prints requests/s, p50/p99 latency and the
server's CPU time per request (from /proc), which is what a shared 2-core machine runs out of.
Nothing touches a database: this measures the HTTP stack alone.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time

import aiohttp

BODY = {"provider": "alerts", "to": "+14155550123", "text": "Your code is 482910", "options": {"client_id": "o-17"}}

SERVER = r'''
import sys
from datetime import datetime
from typing import Any, Optional
from pydantic import BaseModel, ConfigDict

class MessageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    provider: str
    to: str
    text: Optional[str] = None
    not_before: Optional[datetime] = None
    not_after: Optional[datetime] = None
    options: dict[str, Any] = {}

class MessageOut(BaseModel):
    id: str
    status: str
    provider: str
    to: str

stack, port = sys.argv[1], int(sys.argv[2])
if stack.startswith("aiohttp"):
    import asyncio
    from aiohttp import web
    if stack == "aiohttp+uvloop":
        import uvloop; asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())

    async def post(request):
        m = MessageIn.model_validate_json(await request.read())
        out = MessageOut(id="0123456789abcdef0123456789abcdef", status="queued", provider=m.provider, to=m.to)
        return web.Response(body=out.model_dump_json(), status=201, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/messages", post)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, backlog=1024)
else:
    import uvicorn
    from fastapi import FastAPI
    app = FastAPI()

    @app.post("/v1/messages", status_code=201, response_model=MessageOut)
    async def post(m: MessageIn) -> MessageOut:
        return MessageOut(id="0123456789abcdef0123456789abcdef", status="queued", provider=m.provider, to=m.to)

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, backlog=1024)
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(url: str, total: int, clients: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    left = total

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            t0 = time.perf_counter()
            async with session.post(url, json=BODY) as r:
                await r.read()
                assert r.status == 201, r.status
            latencies.append(time.perf_counter() - t0)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:
        start = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        return time.perf_counter() - start, latencies


def wait_listening(port: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server did not start")


def run(stack: str, total: int, clients: int) -> dict:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVER, stack, str(port)])
    try:
        wait_listening(port)
        url = f"http://127.0.0.1:{port}/v1/messages"
        asyncio.run(load(url, 2000, clients))  # warm up
        cpu0 = cpu_seconds(proc.pid)
        elapsed, lat = asyncio.run(load(url, total, clients))
        cpu = cpu_seconds(proc.pid) - cpu0
    finally:
        proc.terminate()
        proc.wait(10)
    lat.sort()
    return {"stack": stack, "rps": total / elapsed, "p50": statistics.median(lat) * 1000,
            "p99": lat[int(len(lat) * 0.99)] * 1000, "cpu_us": cpu / total * 1e6}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--stacks", default="aiohttp,aiohttp+uvloop,fastapi+uvicorn")
    args = ap.parse_args()
    print(f"{args.requests} POSTs, {args.clients} clients in flight, one server process each")
    print(f"{'stack':<18} {'requests/s':>10} {'p50 ms':>7} {'p99 ms':>7} {'server CPU us/req':>18}")
    rows = [run(s, args.requests, args.clients) for s in args.stacks.split(",")]
    for r in rows:
        print(f"{r['stack']:<18} {r['rps']:>10,.0f} {r['p50']:>7.1f} {r['p99']:>7.1f} {r['cpu_us']:>18,.0f}")
    base = rows[0]
    for r in rows[1:]:
        print(f"{r['stack']} / {base['stack']}: {r['rps'] / base['rps']:.2f}x requests/s, "
              f"{r['cpu_us'] / base['cpu_us']:.2f}x CPU per request")


if __name__ == "__main__":
    main()

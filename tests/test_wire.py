"""The Wire that carries sends: the adapter's signed bytes as they are, and errors read as before."""

from __future__ import annotations

import asyncio
import socket
import threading

import httpx
from aiohttp import web

from dispatcher.providers.base import HeaderAuth, network_outcome
from dispatcher.transport import Wire


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def _with_server(handler, body):  # type: ignore[no-untyped-def]
    app = web.Application()
    app.router.add_post("/sms", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = _free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        return await body(f"http://127.0.0.1:{port}")
    finally:
        await runner.cleanup()


def test_the_provider_receives_the_exact_bytes_the_auth_signed_and_the_parser_gets_an_httpx_response():
    seen: dict = {}

    async def handler(request: web.Request) -> web.Response:
        seen.update(body=await request.read(), key=request.headers.get("x-api-key"),
                    type=request.headers.get("content-type"))
        return web.json_response({"trackingId": "t-1"}, headers={"x-ratelimit-remaining": "7"})

    async def send(base: str) -> httpx.Response:
        wire = Wire()
        try:
            request = httpx.Request("POST", base + "/sms", content=b'{"to":"+14155550123","message":"h\\u00e9"}',
                                    headers={"content-type": "application/json"})
            return await wire.send(request, auth=HeaderAuth({"x-api-key": "k-123"}))
        finally:
            await wire.aclose()

    response = asyncio.run(_with_server(handler, send))
    assert seen == {"body": b'{"to":"+14155550123","message":"h\\u00e9"}', "key": "k-123", "type": "application/json"}
    assert response.status_code == 200 and response.json() == {"trackingId": "t-1"}
    assert response.headers["x-ratelimit-remaining"] == "7"
    assert response.request.headers["x-api-key"] == "k-123"  # the signed request, as httpx gives it


def test_a_refused_connection_is_known_unsent_and_names_its_request():
    port = _free_port()  # nothing listens there

    async def send() -> BaseException:
        wire = Wire()
        request = httpx.Request("POST", f"http://127.0.0.1:{port}/sms", content=b"{}")
        try:
            await wire.send(request)
        except Exception as exc:  # noqa: BLE001 - the error is what is checked
            return exc
        finally:
            await wire.aclose()
        raise AssertionError("a refused connection raised nothing")

    exc = asyncio.run(send())
    assert exc.request.url.port == port  # type: ignore[attr-defined]
    outcome = network_outcome(exc)
    assert (outcome.code, outcome.ambiguous) == ("connect_error", False)  # sent again safely, not `unknown`


def test_a_worker_s_first_tasks_arriving_together_all_find_it_registered(pg_url):
    from sqlalchemy import func, select

    from dispatcher import liveness
    from dispatcher.store.db import session_scope, upgrade
    from dispatcher.store.models import Worker

    url = pg_url  # PostgreSQL: concurrent inserts of one row really collide there
    upgrade(url)
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def task() -> None:
        start.wait()
        try:
            liveness.ensure_alive(url, 60.0)
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    liveness.retire()  # this test process starts as a new worker would: not registered anywhere
    threads = [threading.Thread(target=task) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == []
        with session_scope(url) as db:
            assert db.execute(select(func.count()).select_from(Worker).where(Worker.id == liveness.worker_id())
                              ).scalar_one() == 1
    finally:
        liveness.retire()


def test_a_send_request_is_the_one_httpx_would_build_from_the_same_body():
    """Adapters build their sends with Adapter.json_post: the same method, URL, header lines in
    the same order, and bytes as httpx.Request(content=...), so a signature covers the same."""
    import json

    from dispatcher.providers.base import Adapter

    url = httpx.URL("http://sms.example:8080/api/v1/sms")
    body = {"to": "+14155550100", "text": "Grüße, 2 € ✓", "n": 1.5, "none": None}
    for ascii_only in (True, False):
        headers = {"Content-Type": "application/json", "RT-RequestID": "k-1"}
        ours = Adapter.json_post(url, body, dict(headers), ascii_only=ascii_only)
        theirs = httpx.Request("POST", url, headers=headers,
                               content=json.dumps(body, separators=(",", ":"), ensure_ascii=ascii_only).encode())
        assert (ours.method, ours.url, ours.headers.raw, ours.content) == (
            theirs.method, theirs.url, theirs.headers.raw, theirs.content)

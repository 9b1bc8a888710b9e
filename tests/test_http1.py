"""The sends' HTTP/1.1 (dispatcher/http1.py): every way an answer may be framed is read whole,
kept-alive connections are reused, and one the server closed while idle is never written on."""

from __future__ import annotations

import asyncio
import gzip

import httpx
import pytest

from dispatcher import http1, transport
from dispatcher.providers.base import network_outcome
from dispatcher.transport import Wire

TIMEOUT = {"connect": 2.0, "read": 2.0, "write": 2.0, "pool": 2.0}


_HANDLERS: set[asyncio.Task] = set()  # the raw server's connection handlers, waited for at its stop


async def _stop(server: asyncio.AbstractServer) -> None:
    """Close the raw server and let its handlers see their connections end (the Wire closed its
    side first), so that none is left pending when the test's loop closes."""
    server.close()
    handlers = [t for t in _HANDLERS if not t.done()]
    _HANDLERS.clear()
    if handlers:
        _, pending = await asyncio.wait(handlers, timeout=2.0)
        for task in pending:
            task.cancel()


async def _serve(answers: list[bytes], close_after: set[int] = frozenset()):  # type: ignore[no-untyped-def]
    """A raw server answering the n-th request it reads with answers[n] (then closing the
    connection when n is in `close_after`); returns the server, its port and what it saw."""
    seen: list[tuple[int, bytes]] = []  # (connection number, request bytes)
    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        _HANDLERS.add(asyncio.current_task())  # type: ignore[arg-type]
        connections += 1
        mine = connections
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n") if not reader.at_eof() else b""
            except (asyncio.IncompleteReadError, ConnectionError):  # the client closed it
                break
            if not head:
                break
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            body = await reader.readexactly(length)
            n = len(seen)
            seen.append((mine, head + body))
            writer.write(answers[n])
            await writer.drain()
            if n in close_after:
                writer.close()
                break

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], seen


def _post(port: int, body: bytes = b'{"to":"+14155550123"}') -> httpx.Request:
    request = httpx.Request("POST", f"http://127.0.0.1:{port}/sms?x=1", content=body,
                            headers={"content-type": "application/json"})
    request.extensions["timeout"] = TIMEOUT
    return request


def _run(answers: list[bytes], requests: int, close_after: set[int] = frozenset()):  # type: ignore[no-untyped-def]
    async def go():  # type: ignore[no-untyped-def]
        server, port, seen = await _serve(answers, close_after)
        wire = Wire()
        try:
            responses = [await wire.send(_post(port)) for _ in range(requests)]
        finally:
            await wire.aclose()
            await _stop(server)
        return responses, seen

    return asyncio.run(go())


def test_the_request_goes_as_built_and_kept_alive_connections_carry_the_next_ones():
    ok = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 16\r\n\r\n{"trackingId":1}'
    responses, seen = _run([ok, ok, ok], 3)
    assert [r.json() for r in responses] == [{"trackingId": 1}] * 3
    assert [conn for conn, _ in seen] == [1, 1, 1]  # one connection for all three
    head, _, body = seen[0][1].partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0] == b"POST /sms?x=1 HTTP/1.1"
    assert body == b'{"to":"+14155550123"}'
    assert b"content-type: application/json" in head.lower() and b"content-length: 21" in head.lower()
    assert responses[0].reason_phrase == "OK"


@pytest.mark.parametrize("answer, body", [
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\n\r\n", {"a": 1}),
    (b"HTTP/1.1 201 Created\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(gzip.compress(b'{"b":2}'))
     + gzip.compress(b'{"b":2}'), {"b": 2}),
    (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{\"c\":3}", {"c": 3}),  # no length: the body ends at the close
], ids=["chunked", "gzip", "until-close"])
def test_every_framing_of_an_answer_is_read_whole(answer, body):
    closes = b"Connection: close" in answer
    responses, seen = _run([answer, answer], 2, close_after={0, 1} if closes else set())
    assert [r.json() for r in responses] == [body, body]
    assert [conn for conn, _ in seen] == ([1, 2] if closes else [1, 1])  # a framed answer leaves the connection usable


def test_a_connection_the_server_closes_after_answering_is_not_used_again():
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
    responses, seen = _run([ok, ok], 2, close_after={0, 1})
    assert [r.status_code for r in responses] == [200, 200]
    assert [conn for conn, _ in seen] == [1, 2]


def test_an_answer_cut_short_is_an_error_naming_its_request():
    cut = b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{\"partial\":"

    async def go():  # type: ignore[no-untyped-def]
        server, port, _ = await _serve([cut], close_after={0})
        wire = Wire()
        try:
            with pytest.raises(httpx.RemoteProtocolError) as caught:
                await wire.send(_post(port))
            return caught.value, port
        finally:
            await wire.aclose()
            await _stop(server)

    error, port = asyncio.run(go())
    assert error.request.url.port == port


def test_an_answer_ending_at_the_close_but_cut_by_a_reset_is_an_error_not_a_whole_answer(on_loop):
    """A body delimited by the connection's close is whole only at a clean close: a reset means
    the rest was lost, and the send is ambiguous, not read from half an answer."""
    import socket
    import struct

    async def reset_after_half(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b'HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{"trackingId":')
        await writer.drain()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
        writer.transport.abort()

    async def go():  # type: ignore[no-untyped-def]
        server = await asyncio.start_server(reset_after_half, "127.0.0.1", 0)
        wire = Wire()
        try:
            with pytest.raises(httpx.ReadError) as caught:
                await wire.send(_post(server.sockets[0].getsockname()[1]))
            return caught.value
        finally:
            await wire.aclose()
            await _stop(server)

    outcome = network_outcome(on_loop(go()))
    assert (outcome.code, outcome.ambiguous) == ("network_error", True)


LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": transport.new_event_loop}  # the worker runs on uvloop


@pytest.fixture(params=list(LOOPS))
def on_loop(request, monkeypatch):
    """Runs a coroutine to its end on asyncio's loop, then on uvloop's (the worker's)."""
    monkeypatch.setenv("DISPATCHER_EVENT_LOOP", "uvloop")

    def run(coro):  # type: ignore[no-untyped-def]
        loop = LOOPS[request.param]()
        try:
            return loop.run_until_complete(coro)
        finally:
            loop.close()

    return run


def test_a_kept_alive_connection_whose_close_has_just_arrived_is_not_written_on(on_loop, monkeypatch):
    """The server's close of an idle connection and a send's turn come in the same turn of the
    loop: the send goes on a new connection, not on the closing one (where nothing would be
    written, and the send would fail as if it may have reached the provider)."""
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
    eof_received = http1._Connection.eof_received
    sends: list[asyncio.Task] = []

    def close_arrives(conn):  # type: ignore[no-untyped-def]
        sends.append(asyncio.ensure_future(wire.send(_post(port))))  # its turn comes before connection_lost
        return eof_received(conn)

    async def go():  # type: ignore[no-untyped-def]
        nonlocal wire, port
        server, port, seen = await _serve([ok, ok], close_after={0})
        wire = Wire()
        try:
            monkeypatch.setattr(http1._Connection, "eof_received", close_arrives)
            first = await wire.send(_post(port))
            while not sends:  # the server's close arrives
                await asyncio.sleep(0)
            monkeypatch.setattr(http1._Connection, "eof_received", eof_received)
            second = await sends[0]
            return [first.status_code, second.status_code], seen
        finally:
            await wire.aclose()
            await _stop(server)

    wire = port = None
    statuses, seen = on_loop(go())
    assert statuses == [200, 200]
    assert [conn for conn, _ in seen] == [1, 2]


def test_a_new_connection_closed_before_the_request_is_written_is_a_connect_error(on_loop, monkeypatch):
    """Nothing was written: httpx.ConnectError (sent again with a fresh key), at once; not a
    RuntimeError from the closed transport (settled `unknown`) nor a wait for the read timeout."""
    connect = http1.Connections._connect

    async def connect_then_lose(self, origin, request, timeout):  # type: ignore[no-untyped-def]
        conn = await connect(self, origin, request, timeout)
        while not conn.closed:  # the server's close arrives before the request is written
            await asyncio.sleep(0)
        return conn

    async def close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    async def go():  # type: ignore[no-untyped-def]
        server = await asyncio.start_server(close_at_once, "127.0.0.1", 0)
        wire = Wire()
        request = _post(server.sockets[0].getsockname()[1])
        request.extensions["timeout"] = {**TIMEOUT, "read": 60.0}
        try:
            with pytest.raises(httpx.ConnectError):
                await asyncio.wait_for(wire.send(request), 10.0)
        finally:
            await wire.aclose()
            await _stop(server)

    monkeypatch.setattr(http1.Connections, "_connect", connect_then_lose)
    on_loop(go())
    assert network_outcome(httpx.ConnectError("x")).code == "connect_error"


def test_bytes_after_a_whole_answer_are_never_read_as_the_next_requests_answer():
    """A server that writes more than its answer (a second, stray answer begun behind the first):
    the connection is not used again, and the next request gets its own answer."""
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
    stray = b"HTTP/1.1 500 Stray\r\nContent-Length: 12\r\n\r\n"
    own = b'HTTP/1.1 202 Accepted\r\nContent-Length: 12\r\n\r\n{"ref":"r2"}'
    responses, seen = _run([ok + stray, own], 2)
    assert [(r.status_code, r.content) for r in responses] == [(200, b"{}"), (202, b'{"ref":"r2"}')]
    assert [conn for conn, _ in seen] == [1, 2]


def test_a_switch_of_protocols_is_an_ambiguous_protocol_error():
    """An answer the client cannot speak (101 to an upgrade nobody asked for) fails the request as
    a protocol error naming it, as any malformed answer does."""
    upgrade = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n"

    async def go():  # type: ignore[no-untyped-def]
        server, port, _ = await _serve([upgrade])
        wire = Wire()
        try:
            with pytest.raises(httpx.RemoteProtocolError) as caught:
                await wire.send(_post(port))
            return caught.value
        finally:
            await wire.aclose()
            await _stop(server)

    error = asyncio.run(go())
    assert network_outcome(error).ambiguous

"""HTTP/1.1 for sends: keep-alive connections per origin on the event loop, parsed by httptools.

The Wire (transport.py) hands an `httpx.Request` already built and signed to `Connections.send`,
which writes exactly its bytes on a kept-alive connection to its origin (or a new one) and
returns the answer's status, headers and body. It does one thing per connection at a time
(no pipelining) and nothing else: no redirects, cookies, proxies or retries.

Why not aiohttp underneath, as before: for a small POST and a small answer, aiohttp's request
and response machinery cost the worker about as much CPU as everything else of a send
(docs/throughput.md, third round). Here a request is one `transport.write` and an answer is
parsed by httptools (llhttp, Node's parser, in C).

Failures are httpx's own exception classes carrying the request, as httpx's transport raises
them, so `providers.base.network_outcome` reads them the usual way:

| what happened | raised |
|---|---|
| the connection could not be made (DNS, refused, TLS handshake), or closed before the request was written | httpx.ConnectError |
| ... nor within the connect timeout | httpx.ConnectTimeout |
| no whole answer within the read timeout (or the request's total bound) | httpx.ReadTimeout |
| the connection closed, reset or spoke garbage after the request was written | httpx.RemoteProtocolError, httpx.ReadError |

Only the first two mean nothing left. A kept-alive connection the server closed while idle is
dropped as soon as its close arrives; one that closes just as a request is written on it gives
RemoteProtocolError, ambiguous, as it truly is (the request may have been read).
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import httptools
import httpx

from . import __version__

# A connection idle longer than this is closed, not reused. Servers close idle keep-alive
# connections after their own timeout (5 s in Node.js, 75 s in nginx and aiohttp), and a send
# written just as the server closes is ambiguous (it may have been read): stay well below.
KEEPALIVE_EXPIRY = 2.0
_DEFAULT_HEADERS = ((b"user-agent", f"dispatcher/{__version__}".encode()), (b"accept", b"*/*"),
                    (b"accept-encoding", b"gzip, deflate"))
_Origin = tuple[str, str, int]


class Answer:
    """A whole HTTP answer: status, reason, raw header pairs and body bytes."""

    __slots__ = ("status", "reason", "headers", "body")

    def __init__(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status, self.reason, self.headers, self.body = status, reason, headers, body


class _Connection(asyncio.Protocol):
    """One keep-alive connection: writes a request, parses its answer, then waits for the next."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future | None = None
        self._request: httpx.Request | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._read: float | None = None
        self._deadline: float | None = None
        self._last_read = 0.0
        self._reset()

    def _reset(self) -> None:
        self._reason, self._headers, self._body = b"", [], []  # type: list
        self._status = 0
        self._until_eof = False  # an answer with neither Content-Length nor chunked: its body ends at the close

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._waiter is None or self._waiter.done():  # bytes nobody asked for: not to be trusted again
            self._close()
            return
        self._last_read = self.loop.time()
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:  # an upgrade is not ours to speak
            self._fail(httpx.RemoteProtocolError(f"malformed answer: {exc!r}", request=self._request))

    def eof_received(self) -> bool:
        self.closed = True  # closing from now on, though connection_lost comes only at the loop's next turn
        return False  # close the transport: a half-closed connection is of no further use

    def usable(self) -> bool:
        """Not closed nor closing: a request written now would leave (a closing transport drops it)."""
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is None or self._waiter.done():
            return
        if self._status and self._until_eof and exc is None:  # a clean close ends such a body; a reset cuts it
            self._finish(keep=False)
        elif exc is not None:
            error = httpx.ReadError(f"connection lost: {type(exc).__name__}: {exc}", request=self._request)
            error.__cause__ = exc
            self._fail(error)
        else:
            self._fail(httpx.RemoteProtocolError("server disconnected before a whole answer", request=self._request))

    # -- httptools callbacks
    def on_message_begin(self) -> None:
        if self._waiter is not None and self._waiter.done():  # more than the answer, in the same bytes:
            self._close()  # its start would be read as the next request's answer

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()
        names = {n.lower() for n, _ in self._headers}
        self._until_eof = b"content-length" not in names and b"transfer-encoding" not in names \
            and self._status >= 200 and self._status not in (204, 304)

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._status < 200:  # an interim answer (100 Continue and the like): the real one follows
            self._reset()
            return
        self._finish(keep=self._parser.should_keep_alive())

    # -- the exchange
    async def exchange(self, request: httpx.Request, data: bytes, read: float | None, deadline: float | None
                       ) -> Answer:
        """Write `data` and wait for its whole answer: `read` seconds at most between bytes of it,
        and nothing past `deadline` (loop time), when given."""
        if not self.usable():  # closed by the server before anything was written: provably not sent
            raise httpx.ConnectError("the connection closed before the request was written", request=request)
        self._waiter = self.loop.create_future()
        self._request, self._read = request, read
        self._last_read = self.loop.time()
        self._deadline = deadline
        if read is not None or deadline is not None:
            self._timer = self.loop.call_at(self._due(), self._check_time)
        self.transport.write(data)  # type: ignore[union-attr] - usable() saw it
        try:
            return await self._waiter
        finally:
            if self._timer is not None:
                self._timer.cancel()
            self._waiter = self._request = self._timer = None

    def _due(self) -> float:
        """When the answer is late: `read` after the last bytes arrived, and never past the total bound."""
        at = self._deadline if self._read is None else self._last_read + self._read
        return at if self._deadline is None else min(at, self._deadline)  # type: ignore[return-value]

    def _check_time(self) -> None:
        if self._waiter is None or self._waiter.done():
            return
        if self.loop.time() >= self._due():
            self._fail(httpx.ReadTimeout("no whole answer in time", request=self._request))
        else:  # bytes came meanwhile: one timer per exchange, moved on only when it fires
            self._timer = self.loop.call_at(self._due(), self._check_time)

    def _finish(self, keep: bool) -> None:
        answer = Answer(self._status, self._reason, self._headers, b"".join(self._body))
        self._reset()
        if not keep:
            self._close()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(answer)

    def _fail(self, error: Exception) -> None:
        self._close()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(error)

    def _close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class Connections:
    """Kept-alive connections per origin (scheme, host, port); the most recently used first.

    How many there are is bounded by the callers: a send holds one of its account's request
    slots (transport.LoopThread.request_slot) while it holds a connection.
    """

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self._idle: dict[_Origin, list[_Connection]] = {}
        self._busy: set[_Connection] = set()
        self._ssl = ssl_context

    async def send(self, request: httpx.Request, timeout: dict[str, Any]) -> Answer:
        """Write `request` as it is and read its whole answer (timeouts: httpx's dict of seconds)."""
        url = request.url
        origin = (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))
        data = _encode(request)
        read, connect = timeout.get("read"), timeout.get("connect")
        loop = asyncio.get_running_loop()
        deadline = None if read is None else loop.time() + (connect or 0.0) + read  # the whole request, connect included
        conn = self._reuse(origin) or await self._connect(origin, request, connect)
        self._busy.add(conn)
        try:
            answer = await conn.exchange(request, data, read, deadline)
        except BaseException:
            conn._close()  # whatever happened (a cancel included), its state is unknown: not reused
            raise
        finally:
            self._busy.discard(conn)
        if conn.closed or conn.transport.get_write_buffer_size():  # type: ignore[union-attr]
            conn._close()  # (an answer that came before the whole request was written: not reusable)
            return answer
        conn.idle_since = now = loop.time()
        idle = self._idle.setdefault(origin, [])
        while idle and now - idle[0].idle_since >= KEEPALIVE_EXPIRY:  # the oldest, unused since a spike
            idle.pop(0)._close()
        idle.append(conn)
        return answer

    def _reuse(self, origin: _Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if conn.usable() and conn.loop.time() - conn.idle_since < KEEPALIVE_EXPIRY:
                return conn
            conn._close()
        return None

    async def _connect(self, origin: _Origin, request: httpx.Request, timeout: float | None) -> _Connection:
        scheme, host, port = origin
        loop = asyncio.get_running_loop()
        secure = scheme == "https"
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(loop), host, port, ssl=self.tls() if secure else None,
                                       server_hostname=host if secure else None),
                timeout)
        except (TimeoutError, asyncio.TimeoutError) as exc:
            raise httpx.ConnectTimeout(f"no connection to {host}:{port} within {timeout}s", request=request) from exc
        except OSError as exc:  # refused, unreachable, DNS (socket.gaierror), TLS handshake (ssl.SSLError)
            raise httpx.ConnectError(f"cannot connect to {host}:{port}: {exc}", request=request) from exc
        return conn

    def tls(self) -> ssl.SSLContext:
        """The TLS context of https origins (certifi's CAs, as httpx's), made once."""
        if self._ssl is None:
            self._ssl = httpx.create_ssl_context(trust_env=False)
        return self._ssl

    async def aclose(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn._close()
        for conn in list(self._busy):
            conn._close()
        self._idle.clear()


def _encode(request: httpx.Request) -> bytes:
    """The request line, the request's headers as they are (plus defaults it does not set) and its body."""
    raw = request.headers.raw
    names = {name.lower() for name, _ in raw}
    lines = [request.method.encode(), b" ", request.url.raw_path, b" HTTP/1.1\r\n"]
    for name, value in raw:
        lines += (name, b": ", value, b"\r\n")
    for name, value in _DEFAULT_HEADERS:
        if name not in names:
            lines += (name, b": ", value, b"\r\n")
    lines.append(b"\r\n")
    body = request.content
    if body:
        lines.append(body)
    return b"".join(lines)

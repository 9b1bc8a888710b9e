"""How every adapter classifies every fault, over both production transports.

The case table runs each sandbox fault against each kind over real HTTP, through the worker's
Wire (sends: dispatcher/http1.py underneath) and through `dispatcher.transport.make_client`
(httpx over aiohttp: status polls, cancels, look-ups), and checks the one outcome the
dispatcher acts on: accepted,
retry with a fresh key (the provider said it failed, or provably nothing left), retry as
ambiguous (the provider may have it: same key, or `unknown` under on_timeout = "unknown").
"""

from __future__ import annotations

import asyncio
import errno
import socket
import uuid

import aiohttp
import httpx
import pytest
from httpx_aiohttp.transport import map_aiohttp_exceptions

from dispatcher.config import ProviderAccount
from dispatcher.providers import adapter_class
from dispatcher.providers.base import Accepted, OutboundMessage, RetryLater, network_outcome
from dispatcher.providers.emnify import clear_token_cache
from dispatcher.transport import Wire, make_client

KINDS = ("emsgnow", "esimfly", "esimaccess", "emnify", "esms_africa")
DEFAULTS = {"emsgnow": {"from": "ACME"}, "emnify": {"source_address": "12345689"}}
RECIPIENT = {"emsgnow": "+14155550123", "esimfly": "8948010010036785060", "esimaccess": "23072017992029",
             "emnify": "12345", "esms_africa": "+256712345678"}
TIMEOUT = 0.5  # the client's timeout in these tests; hangs and drips last longer


def adapter_for(sb, kind: str, base_url: str | None = None):
    cls = adapter_class(kind)
    account = ProviderAccount(name=f"t-{kind}", kind=kind, base_url=base_url or sb.base_url(kind),
                              fields={**sb.credentials(kind), **DEFAULTS.get(kind, {})},
                              secret_fields=cls.secret_fields())
    return cls(account)


def message(kind: str, text: str = "hello") -> OutboundMessage:
    return OutboundMessage(id=uuid.uuid4().hex, to=RECIPIENT[kind], text=text, options=dict(DEFAULTS.get(kind, {})),
                           attempt_key=str(uuid.uuid4()))


CLIENTS = {"wire": lambda in_flight, timeout: Wire(timeout), "httpx": make_client}  # what sends go over; what polls, cancels and look-ups go over
_client = make_client  # the one a test uses (the `over` fixture)


@pytest.fixture(params=list(CLIENTS))
def over(request, monkeypatch):
    monkeypatch.setattr(f"{__name__}._client", CLIENTS[request.param])
    return request.param


def send(adapter, *msgs: OutboundMessage, timeout: float = TIMEOUT):
    """Send the messages one after another over one production client (its pool kept between them)."""
    async def go():
        client = _client(in_flight=4, timeout=timeout)
        try:
            return [await adapter.send(client, m) for m in msgs]
        finally:
            await client.aclose()

    results = asyncio.run(go())
    return results[0] if len(results) == 1 else results


@pytest.fixture()
def sb(clean_sandbox):
    clear_token_cache()
    yield clean_sandbox
    clear_token_cache()


def warmed(sb, kind: str):
    """An adapter whose first request of a test is the send itself (emnify authenticates first)."""
    adapter = adapter_for(sb, kind)
    if kind == "emnify":
        assert isinstance(send(adapter, message(kind, "warm-up")).outcome, Accepted)
    return adapter


AMBIGUOUS_TIMEOUT = (RetryLater, "timeout", True)
AMBIGUOUS_NETWORK = (RetryLater, "network_error", True)
UNREADABLE = (RetryLater, "unreadable_answer", True)
# fault id -> (faults, {kind: (outcome class, code or None, ambiguous)} or one for every kind)
CASES = {
    "hang": ({"hang_next": 1, "hang_ms": 1500}, AMBIGUOUS_TIMEOUT),
    "drip": ({"drip_next": 1, "drip_ms": 1500}, AMBIGUOUS_TIMEOUT),
    "drop (read, closed)": ({"drop_next": 1}, AMBIGUOUS_NETWORK),
    "reset (read, reset)": ({"reset_next": 1}, AMBIGUOUS_NETWORK),
    "lose (processed, closed)": ({"lose_next": 1}, AMBIGUOUS_NETWORK),
    "reset_processed (processed, reset)": ({"reset_processed_next": 1}, AMBIGUOUS_NETWORK),
    "500 json": ({"fail_next": 1, "fail_status": 500}, (RetryLater, None, False)),
    "503 json": ({"fail_next": 1, "fail_status": 503}, (RetryLater, None, False)),
    "500 not json": ({"malformed_next": 1, "malformed_status": 500}, (RetryLater, None, False)),
    "502 html": ({"html_next": 1, "html_status": 502}, (RetryLater, "http_502", True)),
    "504 html": ({"html_next": 1, "html_status": 504}, (RetryLater, "http_504", True)),
    "2xx cut short": ({"malformed_next": 1}, {
        "emsgnow": (Accepted, None, None),  # 200 is only ever success there; no key to resend under
        "emnify": (Accepted, None, None),  # success is the 201 and its Location; the body is empty anyway
        "esimfly": UNREADABLE,  # resent with the same RT-RequestID: DUPLICATE_REQUEST settles it
        "esms_africa": UNREADABLE,  # resent with the same Idempotency-Key: the original comes back
        "esimaccess": UNREADABLE,  # its 200 carries errors too: success is unknown
    }),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", list(CASES))
def test_every_fault_reads_as_the_right_outcome_for_every_kind(sb, over, kind, case):
    faults, expected = CASES[case]
    cls, code, ambiguous = expected[kind] if isinstance(expected, dict) else expected
    adapter = warmed(sb, kind)
    mark = sb.last_seq
    sb.set_faults(kind, **faults)
    outcome = send(adapter, message(kind)).outcome
    assert type(outcome) is cls, outcome
    if code is not None:
        assert outcome.code == code
    if ambiguous is not None:
        assert outcome.ambiguous is ambiguous, outcome
    if cls is RetryLater and not ambiguous and code is None:
        assert outcome.code  # the provider's words or the status, never empty
    assert len(sb.requests(kind, since=mark)) == 1  # one request: nobody retried it behind our back


# emnify's first request is the token exchange: failing there, the SMS request never started
NOT_SENT = {kind: "auth_unreachable" if kind == "emnify" else "connect_error" for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_a_refused_connection_is_provably_not_sent(sb, over, kind):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again at once: nothing listens there
    outcome = send(adapter_for(sb, kind, f"http://127.0.0.1:{port}/{kind}"), message(kind)).outcome
    assert (type(outcome), outcome.code, outcome.ambiguous) == (RetryLater, NOT_SENT[kind], False)


@pytest.fixture()
def unanswered_port():
    """A port whose listen queue is full: a connect to it waits and times out, with nothing sent."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        try:
            filler.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(filler)
    yield port
    for sock in fillers + [server]:
        sock.close()


@pytest.mark.parametrize("kind", KINDS)
def test_a_connect_timeout_is_provably_not_sent(sb, over, kind, unanswered_port):
    outcome = send(adapter_for(sb, kind, f"http://127.0.0.1:{unanswered_port}/{kind}"), message(kind),
                   timeout=0.3).outcome
    assert (type(outcome), outcome.code, outcome.ambiguous) == (RetryLater, NOT_SENT[kind], False), outcome


def test_a_hanging_emnify_authentication_times_out_like_the_send_would(sb, over):
    sb.set_faults("emnify", hang_next=1, hang_ms=3000)  # the first request, the token exchange, hangs
    outcome = send(adapter_for(sb, "emnify"), message("emnify"), timeout=0.3).outcome
    assert (type(outcome), outcome.code, outcome.ambiguous) == (RetryLater, "auth_unreachable", False)
    [exchange] = sb.requests("emnify")
    assert exchange.path.endswith("/authenticate")  # the SMS request never started


@pytest.mark.parametrize("kind", KINDS)
def test_a_kept_alive_connection_found_dead_when_used_is_ambiguous_and_not_retried_behind_our_back(sb, over, kind):
    adapter = warmed(sb, kind)
    mark = sb.last_seq

    async def go():
        client = _client(in_flight=4, timeout=TIMEOUT)
        try:
            first = await adapter.send(client, message(kind))
            sb.set_faults(kind, reset_next=1)  # the server side of the pooled connection dies on the next use
            second = await adapter.send(client, message(kind))
            return first, second
        finally:
            await client.aclose()

    first, second = asyncio.run(go())
    assert isinstance(first.outcome, Accepted)
    assert (type(second.outcome), second.outcome.code, second.outcome.ambiguous) == (RetryLater, "network_error", True)
    used, reset = sb.requests(kind, since=mark)
    assert reset.fault == "reset" and reset.peer == used.peer  # the same pooled connection, used once more


# --------------------------------------------------------------------------- the mapping, error by error
def through_transport(error: BaseException) -> BaseException:
    """What httpx-aiohttp raises for an aiohttp error (its own mapping, as the transport applies it)."""
    try:
        with map_aiohttp_exceptions():
            raise error
    except BaseException as mapped:  # noqa: BLE001 - the mapped error is the result
        return mapped
    raise AssertionError("not raised")


def connector_error(cls=aiohttp.ClientConnectorError, code: int = errno.ECONNREFUSED) -> aiohttp.ClientConnectorError:
    from aiohttp.client_reqrep import ConnectionKey

    key = ConnectionKey("provider.example", 443, True, True, None, None, None)
    return cls(key, OSError(code, "refused"))


def retried_after_a_dead_connection() -> BaseException:
    """What aiohttp raises when it reconnects after a dead pooled connection (idempotent methods
    only) and the reconnect fails: a connector error raised while handling the first one."""
    try:
        try:
            raise aiohttp.ServerDisconnectedError()
        except aiohttp.ServerDisconnectedError:
            raise connector_error()
    except aiohttp.ClientConnectorError as exc:
        return exc


MAPPING = [
    # aiohttp error (as the transport raises it), httpx class it becomes, our code, ambiguous
    (connector_error(), httpx.ConnectTimeout, "connect_error", False),  # refused: mapped to ConnectTimeout!
    (connector_error(aiohttp.ClientConnectorDNSError), httpx.ConnectTimeout, "connect_error", False),
    (aiohttp.ConnectionTimeoutError("connect"), httpx.ConnectTimeout, "connect_error", False),
    (aiohttp.ClientOSError(errno.ECONNRESET, "Connection reset by peer"), httpx.ConnectTimeout, "network_error", True),
    (aiohttp.ClientOSError(errno.EPIPE, "Broken pipe"), httpx.ConnectTimeout, "network_error", True),
    (aiohttp.ServerDisconnectedError(), httpx.ConnectTimeout, "network_error", True),
    (aiohttp.SocketTimeoutError("read"), httpx.ReadTimeout, "timeout", True),
    (aiohttp.ClientPayloadError("cut"), httpx.ReadError, "network_error", True),
    (retried_after_a_dead_connection(), httpx.ConnectTimeout, "network_error", True),
]


@pytest.mark.parametrize("error,mapped,code,ambiguous", MAPPING, ids=[type(m[0]).__name__ for m in MAPPING])
def test_each_aiohttp_error_is_read_from_the_cause_not_the_httpx_class(error, mapped, code, ambiguous):
    raised = through_transport(error)
    assert type(raised) is mapped  # what httpx-aiohttp 0.2 makes of it: often not what happened
    outcome = network_outcome(raised)
    assert (outcome.code, outcome.ambiguous) == (code, ambiguous)


@pytest.mark.parametrize("error,code,ambiguous", [
    (httpx.ConnectError("refused"), "connect_error", False),  # httpx's own transport: only while connecting
    (httpx.ConnectTimeout("connect"), "connect_error", False),
    (httpx.PoolTimeout("no connection free"), "connect_error", False),
    (httpx.ReadTimeout("read"), "timeout", True),
    (httpx.WriteTimeout("write"), "timeout", True),
    (httpx.WriteError("broken pipe"), "network_error", True),
    (httpx.RemoteProtocolError("Server disconnected without sending a response."), "network_error", True),
    (aiohttp.UploadAbortedError("body not fully sent"), "network_error", True),  # unmapped by httpx-aiohttp
    (ConnectionResetError(errno.ECONNRESET, "reset"), "network_error", True),
])
def test_errors_without_aiohttp_underneath(error, code, ambiguous):
    outcome = network_outcome(error)
    assert (outcome.code, outcome.ambiguous) == (code, ambiguous)


def adapter_for_account(kind: str):
    cls = adapter_class(kind)
    account = ProviderAccount(name="x", kind=kind, base_url="https://provider.example", fields={"api_key": "k"},
                              secret_fields=cls.secret_fields())
    return cls(account)


def test_an_error_the_transport_lets_through_unmapped_still_becomes_a_retry():
    def handler(request: httpx.Request) -> httpx.Response:
        raise aiohttp.UploadAbortedError("The request body was not fully sent")

    adapter = adapter_for_account("esms_africa")

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await adapter.send(client, message("esms_africa"))

    outcome = asyncio.run(go()).outcome
    assert (type(outcome), outcome.code, outcome.ambiguous) == (RetryLater, "network_error", True)

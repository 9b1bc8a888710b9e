"""One aiohttp server holding every provider twin, with a request log, fault switches and a control API.

Layout of the URL space (the twin's own paths sit under its kind):

    /<kind>/...          a twin, e.g. POST /emsgnow/sms, POST /esms_africa/api/messages/send
    /_sandbox/requests   GET  ?kind=K&since=SEQ   the request log (entries with seq > SEQ)
    /_sandbox/faults     POST {"kind": K, latency_ms, down, fail_next, fail_status, fail_rate,
                               fail_headers, drop_next, reset_next, lose_next,
                               reset_processed_next, hang_next, hang_ms, malformed_next,
                               malformed_status, html_next, html_status, drip_next, drip_ms,
                               seed, replay_callbacks}
    /_sandbox/configure  POST {"kind": K, credentials, rate_limit, rate_window, delivery_step,
                               extra: {...merged...}}
    /_sandbox/callbacks  GET  ?kind=K&since=SEQ   the delivery reports the twins sent, with every answer
    /_sandbox/reset      POST  empties both logs, faults and twin state, cancels pending reports,
                               restores the settings
    /_sandbox/info       GET   base URL and sandbox credentials per kind

A middleware around the twins (never inside them) records every request (it is read whole
first, so every fault below happens after the request was received and logged) and applies
the kind's faults. Each `*_next` counts down: the next N requests of the kind get it.

| fault | what the client sees | did the twin take it? |
|---|---|---|
| latency_ms | every answer waits that long | yes |
| down | 503 with a JSON body, until switched off | no |
| drop_next | the connection closed (FIN), no answer | no |
| reset_next | the connection reset (RST), no answer | no |
| fail_next / fail_rate | fail_status (500) with the kind's JSON error body, plus fail_headers | no |
| html_next | html_status (502) with a text/html error page, as a proxy in front of the provider sends | no |
| malformed_next, malformed_status 0 | the twin's own status and headers, its body cut in half: not JSON | yes |
| malformed_next, malformed_status N | status N (200, 500, ...) with a body that is not JSON | no |
| hang_next | nothing for hang_ms, then the normal answer (a client timeout fires first) | yes |
| lose_next | the connection closed (FIN) after the twin answered | yes |
| reset_processed_next | the connection reset (RST) after the twin answered | yes |
| drip_next | the headers at once, then the body one byte every drip_ms (chunked): a read timeout fires mid-body | yes |

fail_rate draws from a Random seeded with `seed`; fail_headers (e.g. {"Retry-After": "nan"})
go with every failure. The faults apply in this order: latency, down, drop, reset, fail, html,
malformed with a status; the ones the twin takes (lose, reset_processed, malformed with status
0, drip) are decided at arrival, then hang, then the twin answers. A request's log entry names its fault (`fault`);
for the faults the twin took, `status` and `response_json` are what the twin answered,
whether or not the client heard it. drop / reset ("read, then nothing") and lose /
reset_processed ("processed, then nothing") look the same to a client: that is the point of
having both, to check that a client treats them alike (the provider may have it).
Per-request work is an append to the log and a few dict lookups, so one process keeps up with
thousands of requests a second.

Delivery reports (eMsgNow callbackUrl, eSMS Africa and emnify webhooks, configured per kind
through `extra`) leave from one `CallbackScheduler` (callbacks.py) on this server's loop; the
`replay_callbacks` fault sends each of them twice.

`SandboxThread` runs the server on its own event loop in a daemon thread for tests and the
demo; `serve()` runs it in the foreground for `dispatcher sandbox`.
"""

from __future__ import annotations

import asyncio
import copy
import json
import random
import socket
import struct
import time
from dataclasses import asdict, dataclass, field, fields
from http import HTTPStatus
from types import ModuleType
from typing import Any, Awaitable, Callable, Iterable

from aiohttp import web
from multidict import CIMultiDict

from . import emnify, emsgnow, esimaccess, esimfly, esms_africa
from ..appserver import AppThread, serve_until_signal
from .callbacks import CALLBACKS_KEY, CallbackRecord, CallbackScheduler
from .common import PARSED_BODY_KEY, KindSettings, json_response, parse_json_body, state_of

KINDS = ("esimfly", "esimaccess", "emnify", "esms_africa", "emsgnow")
CONTROL_PREFIX = "/_sandbox"
GENERIC_FAULT_BODY = {"error": "injected failure"}
_CONFIGURABLE = ("credentials", "rate_limit", "rate_window", "delivery_step", "extra")
_MAX_LOG = 100_000  # entries kept (a few KB each); the oldest tenth is dropped beyond this


def load_twins() -> dict[str, ModuleType]:
    """The twin module of every kind, by kind name."""
    return {module.KIND: module for module in (esimfly, esimaccess, emnify, esms_africa, emsgnow)}


# --------------------------------------------------------------------------- records and faults
@dataclass
class RecordedRequest:
    """One request a twin received, and what it answered (status None: not answered / dropped)."""

    seq: int
    kind: str
    method: str
    path: str  # within the kind: "/sms", not "/emsgnow/sms"
    query: dict[str, str]
    headers: CIMultiDict  # case-insensitive: headers["x-api-key"] == headers["X-Api-Key"]
    body: bytes
    json: Any
    received_at: float  # epoch seconds at arrival
    status: int | None = None
    response_json: Any = None
    answered_at: float | None = None
    peer: str = ""  # the client's address and port: requests on one kept-alive connection share it
    fault: str | None = None  # the fault that shaped the answer: "down", "fail", "drop", "reset", "html",
    #                           "malformed", "hang", "lose", "reset_processed", "drip"; None for none

    def to_json(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["headers"] = dict(self.headers)
        data["body"] = self.body.decode("utf-8", errors="replace")
        return data


@dataclass
class Faults:
    """The misbehaviour switched on for one kind."""

    latency_ms: float = 0.0
    down: bool = False
    fail_next: int = 0
    fail_status: int = 500
    fail_rate: float = 0.0
    fail_headers: dict[str, str] = field(default_factory=dict)  # sent with every failure, e.g. {"Retry-After": "nan"}
    drop_next: int = 0  # read, then the connection closed (FIN); the twin never sees it
    reset_next: int = 0  # read, then the connection reset (RST); the twin never sees it
    lose_next: int = 0  # the twin answers, then the connection is closed (FIN) instead
    reset_processed_next: int = 0  # the twin answers, then the connection is reset (RST) instead
    hang_next: int = 0
    hang_ms: float = 0.0
    malformed_next: int = 0  # an answer whose body is not JSON
    malformed_status: int = 0  # 0: the twin's own answer, cut; else this status and the twin never sees it
    html_next: int = 0  # a proxy's HTML error page instead of the twin's answer
    html_status: int = 502
    drip_next: int = 0  # the twin's answer, its body trickling one byte every drip_ms
    drip_ms: float = 500.0
    seed: int = 0
    replay_callbacks: bool = False  # send every delivery report of the kind twice
    rng: random.Random = field(default_factory=lambda: random.Random(0), repr=False)

    def update(self, values: dict[str, Any]) -> None:
        """Apply every value or, when one is wrong, none of them."""
        unknown = set(values) - {f.name for f in fields(self) if f.name != "rng"}
        if unknown:
            raise ValueError(f"unknown fault {sorted(unknown)[0]!r}")
        converted = {name: type(getattr(self, name))(value) for name, value in values.items()}
        if "fail_headers" in converted:
            converted["fail_headers"] = {str(k): str(v) for k, v in converted["fail_headers"].items()}
        if "replay_callbacks" in values and not isinstance(values["replay_callbacks"], bool):
            raise ValueError("replay_callbacks must be true or false")
        if not 0.0 <= converted.get("fail_rate", self.fail_rate) <= 1.0:
            raise ValueError("fail_rate must be between 0 and 1")
        for name, value in converted.items():
            setattr(self, name, value)
        if "seed" in values:
            self.rng = random.Random(self.seed)

    def public(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "rng"}


# --------------------------------------------------------------------------- the server state
class Sandbox:
    """The twins, their settings, faults and the request log. Touched only on the server's loop."""

    def __init__(self, settings: dict[str, KindSettings] | None = None,
                 twins: dict[str, ModuleType] | None = None) -> None:
        self.twins = twins if twins is not None else load_twins()
        given = settings or {}
        self.settings = {k: given.get(k) or mod.default_settings() for k, mod in self.twins.items()}
        self._initial = {k: _copy_settings(s) for k, s in self.settings.items()}
        self.faults = {k: Faults() for k in self.twins}
        self.apps: dict[str, web.Application] = {}
        self.log: list[RecordedRequest] = []
        self.seq = 0
        self.callbacks = CallbackScheduler(replays=lambda kind: self.faults[kind].replay_callbacks)

    # ---- log
    def record(self, request: web.Request, kind: str, path: str, raw: bytes, parsed: Any,
               now: float) -> RecordedRequest:
        self.seq += 1
        peername = request.transport.get_extra_info("peername") if request.transport is not None else None
        entry = RecordedRequest(self.seq, kind, request.method, path, dict(request.query),
                                CIMultiDict(request.headers), raw, parsed, now,
                                peer=f"{peername[0]}:{peername[1]}" if peername else "")
        self.log.append(entry)
        if len(self.log) > _MAX_LOG:
            del self.log[: _MAX_LOG // 10]
        return entry

    def requests(self, kind: str | None = None, since: int = 0) -> list[RecordedRequest]:
        start = 0
        if self.log and since > 0:
            start = max(0, since - self.log[0].seq + 1)
        entries = self.log[start:]
        return [e for e in entries if e.seq > since and (kind is None or e.kind == kind)]

    # ---- switches
    def set_faults(self, kind: str, values: dict[str, Any]) -> dict[str, Any]:
        faults = self._faults_of(kind)
        faults.update(values)
        return faults.public()

    def configure(self, kind: str, values: dict[str, Any]) -> dict[str, Any]:
        """Change a kind's settings live; every value is checked before any is applied."""
        settings = self._settings_of(kind)
        changes = {name: _setting_value(name, value) for name, value in values.items()}
        for name, value in changes.items():
            if name == "extra":
                settings.extra.update(value)
            else:
                setattr(settings, name, value)
        return settings_json(settings)

    def reset(self) -> None:
        self.log.clear()
        self.callbacks.reset()
        self.faults = {k: Faults() for k in self.twins}
        for kind, settings in self.settings.items():
            _restore(settings, self._initial[kind])
        for app in self.apps.values():
            state = state_of(app)
            if state is not None:
                state.reset()

    def info(self, root_url: str) -> dict[str, Any]:
        return {
            kind: {"base_url": f"{root_url}/{kind}", "credentials": dict(s.credentials)}
            for kind, s in self.settings.items()
        }

    def fault_body(self, kind: str, status: int, message: str) -> Any:
        make = getattr(self.twins[kind], "fault_body", None)
        return make(status, message) if make is not None else dict(GENERIC_FAULT_BODY)

    def _faults_of(self, kind: str) -> Faults:
        if kind not in self.faults:
            raise ValueError(f"unknown kind {kind!r} (known: {', '.join(self.faults)})")
        return self.faults[kind]

    def _settings_of(self, kind: str) -> KindSettings:
        if kind not in self.settings:
            raise ValueError(f"unknown kind {kind!r} (known: {', '.join(self.settings)})")
        return self.settings[kind]


def _setting_value(name: str, value: Any) -> Any:
    """A configure value checked and converted to the KindSettings field's type."""
    if name not in _CONFIGURABLE:
        raise ValueError(f"{name!r} cannot be configured (allowed: {', '.join(_CONFIGURABLE)})")
    if name in ("extra", "credentials") and not isinstance(value, dict):
        raise ValueError(f"{name} must be an object")
    if name == "credentials":
        return {str(k): str(v) for k, v in value.items()}
    if name == "rate_limit":
        return None if value is None else int(value)
    return value if name == "extra" else float(value)


def _copy_settings(settings: KindSettings) -> KindSettings:
    return KindSettings(
        credentials=dict(settings.credentials), rate_limit=settings.rate_limit, rate_window=settings.rate_window,
        delivery_step=settings.delivery_step, clock=settings.clock, extra=copy.deepcopy(settings.extra),
    )


def _restore(settings: KindSettings, initial: KindSettings) -> None:
    """Put the initial values back into the live object the twin holds."""
    fresh = _copy_settings(initial)
    for f in fields(KindSettings):
        setattr(settings, f.name, getattr(fresh, f.name))


def settings_json(settings: KindSettings) -> dict[str, Any]:
    return {name: getattr(settings, name) for name in _CONFIGURABLE}


# --------------------------------------------------------------------------- middleware
SANDBOX_KEY: web.AppKey[Sandbox] = web.AppKey("sandbox", Sandbox)


class _Dropped(Exception):
    """The connection is to be closed on purpose (reset with an RST when `reset`); nothing is answered."""

    def __init__(self, reset: bool = False) -> None:
        super().__init__("reset" if reset else "closed")
        self.reset = reset


def _hang_up(request: web.Request, reset: bool) -> None:
    """Close the request's connection: a FIN, or with `reset` an RST (SO_LINGER 0, then abort)."""
    transport = request.transport
    if transport is None:
        return
    if reset:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    else:
        transport.close()


def _fault_middleware(sandbox: Sandbox, clock: Callable[[], float]):
    @web.middleware
    async def middleware(request: web.Request, handler):
        kind, _, rest = request.path[1:].partition("/")
        if kind not in sandbox.twins:
            return await handler(request)
        received_at = clock()
        raw = await request.read()
        parsed = parse_json_body(raw)
        request[PARSED_BODY_KEY] = parsed
        entry = sandbox.record(request, kind, "/" + rest, raw, parsed[0], received_at)
        try:
            response = await _answer(sandbox, kind, entry, request, handler)
        except _Dropped as dropped:
            _hang_up(request, dropped.reset)
            raise asyncio.CancelledError() from None
        except web.HTTPException as exc:
            entry.status, entry.answered_at = exc.status, clock()
            raise
        entry.status, entry.answered_at = response.status, clock()
        if entry.response_json is None:
            entry.response_json = _response_json(response)
        return response

    return middleware


async def _answer(sandbox: Sandbox, kind: str, entry: RecordedRequest, request: web.Request,
                  handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    faults = sandbox.faults[kind]
    if faults.latency_ms > 0:
        await asyncio.sleep(faults.latency_ms / 1000.0)
    if faults.down:
        entry.fault = "down"
        return json_response(sandbox.fault_body(kind, 503, "service unavailable"), status=503)
    for name, fault, reset in (("drop_next", "drop", False), ("reset_next", "reset", True)):
        if _take(faults, name):
            entry.fault = fault
            raise _Dropped(reset)
    if faults.fail_next > 0 or (faults.fail_rate > 0 and faults.rng.random() < faults.fail_rate):
        faults.fail_next = max(0, faults.fail_next - 1)
        entry.fault = "fail"
        status = faults.fail_status
        return json_response(sandbox.fault_body(kind, status, "injected failure"), status=status,
                             headers=faults.fail_headers or None)
    if _take(faults, "html_next"):
        entry.fault = "html"
        return html_error_page(faults.html_status)
    if faults.malformed_status and _take(faults, "malformed_next"):
        entry.fault = "malformed"
        return web.Response(status=faults.malformed_status, body=b'{"error": "injected failure',
                            content_type="application/json")
    # What the twin takes is decided at arrival, so that concurrent requests get exactly N.
    lose, reset_after = _take(faults, "lose_next"), _take(faults, "reset_processed_next")
    malformed, drip = _take(faults, "malformed_next"), _take(faults, "drip_next")
    if faults.hang_next > 0:
        faults.hang_next -= 1
        entry.fault = "hang"
        await asyncio.sleep(faults.hang_ms / 1000.0)
    response = await handler(request)
    if lose or reset_after:
        entry.fault = "lose" if lose else "reset_processed"
        entry.status, entry.response_json = response.status, _response_json(response)
        raise _Dropped(reset=reset_after)
    if malformed or drip:
        entry.fault, entry.response_json = ("malformed" if malformed else "drip"), _response_json(response)
        entry.status = response.status  # the twin's answer, whether the drip reaches its end or not
        if malformed:
            return _cut(response)
        return await _drip(request, response, faults.drip_ms / 1000.0)
    return response


def _take(faults: Faults, name: str) -> bool:
    """Count one down from a `*_next` fault; True when this request gets it."""
    left = getattr(faults, name)
    if left <= 0:
        return False
    setattr(faults, name, left - 1)
    return True


def html_error_page(status: int) -> web.Response:
    """The kind of page a reverse proxy answers when the service behind it fails: HTML, not JSON."""
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Error"
    page = (f"<!DOCTYPE html>\n<html><head><title>{status} {reason}</title></head>\n"
            f"<body><h1>{status} {reason}</h1><p>The server behind this gateway did not answer properly.</p>"
            "<hr><address>sandbox-proxy</address></body></html>\n")
    return web.Response(status=status, text=page, content_type="text/html")


def _passed_headers(response: web.StreamResponse) -> CIMultiDict:
    """The twin's headers without the ones that describe the body as it was (length, encoding)."""
    headers = CIMultiDict(response.headers)
    for name in ("Content-Length", "Transfer-Encoding"):
        headers.popall(name, None)
    return headers


def _cut(response: web.StreamResponse) -> web.Response:
    """The twin's answer (status, headers) with its body cut in half, so that it is not JSON."""
    body = bytes(getattr(response, "body", None) or b"")
    cut = body[: len(body) // 2]
    try:
        json.loads(cut)
    except ValueError:
        pass
    else:  # an empty or a tiny body that halves into something valid: make sure it is not JSON
        cut = b"{" + cut
    return web.Response(status=response.status, reason=response.reason, headers=_passed_headers(response), body=cut)


async def _drip(request: web.Request, response: web.StreamResponse, interval: float) -> web.StreamResponse:
    """Send the twin's answer: the headers at once, then its body one byte every `interval` s
    (chunked, and one more pause before the end, so that even an empty body keeps a reader waiting)."""
    body = bytes(getattr(response, "body", None) or b"")
    stream = web.StreamResponse(status=response.status, reason=response.reason, headers=_passed_headers(response))
    stream.enable_chunked_encoding()
    try:
        await stream.prepare(request)
        for index in range(len(body)):
            await asyncio.sleep(interval)
            await stream.write(body[index:index + 1])
        await asyncio.sleep(interval)
        await stream.write_eof()
    except ConnectionError:  # the client gave up (its read timeout fired): nothing more to send
        raise asyncio.CancelledError() from None
    return stream


def _response_json(response: web.StreamResponse) -> Any:
    body = getattr(response, "body", None)
    if not isinstance(body, (bytes, bytearray)) or not body:
        return None
    if "json" not in (response.content_type or ""):
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None


# --------------------------------------------------------------------------- control API
def _control_routes(sandbox: Sandbox) -> list[web.RouteDef]:
    async def list_requests(request: web.Request) -> web.Response:
        kind = request.query.get("kind") or None
        try:
            since = int(request.query.get("since", "0"))
        except ValueError:
            return json_response({"error": "since must be an integer"}, status=400)
        entries = sandbox.requests(kind, since)
        return json_response({"requests": [e.to_json() for e in entries], "last_seq": sandbox.seq})

    async def list_callbacks(request: web.Request) -> web.Response:
        kind = request.query.get("kind") or None
        try:
            since = int(request.query.get("since", "0"))
        except ValueError:
            return json_response({"error": "since must be an integer"}, status=400)
        records = sandbox.callbacks.records(kind, since)
        return json_response({"callbacks": [r.to_json() for r in records], "last_seq": sandbox.callbacks.seq,
                              "pending": sandbox.callbacks.pending})

    async def faults(request: web.Request) -> web.Response:
        return await _switch(request, sandbox.set_faults)

    async def configure(request: web.Request) -> web.Response:
        return await _switch(request, sandbox.configure)

    async def reset(request: web.Request) -> web.Response:
        sandbox.reset()
        return json_response({"reset": True})

    async def info(request: web.Request) -> web.Response:
        return json_response(sandbox.info(f"{request.scheme}://{request.host}"))

    return [
        web.get(f"{CONTROL_PREFIX}/requests", list_requests),
        web.get(f"{CONTROL_PREFIX}/callbacks", list_callbacks),
        web.post(f"{CONTROL_PREFIX}/faults", faults),
        web.post(f"{CONTROL_PREFIX}/configure", configure),
        web.post(f"{CONTROL_PREFIX}/reset", reset),
        web.get(f"{CONTROL_PREFIX}/info", info),
    ]


async def _switch(request: web.Request, apply: Callable[[str, dict[str, Any]], dict[str, Any]]) -> web.Response:
    try:
        body = await request.json()
        if not isinstance(body, dict) or not isinstance(body.get("kind"), str):
            raise ValueError('body must be a JSON object with "kind"')
        values = {k: v for k, v in body.items() if k != "kind"}
        return json_response({"kind": body["kind"], **apply(body["kind"], values)})
    except (ValueError, TypeError) as exc:
        return json_response({"error": str(exc)}, status=400)


# --------------------------------------------------------------------------- building
def build_app(settings: dict[str, KindSettings] | None = None, *,
              clock: Callable[[], float] | None = None) -> web.Application:
    """The root application: every twin mounted at /<kind>, the middleware, the control API."""
    sandbox = Sandbox(settings)
    app = web.Application(middlewares=[_fault_middleware(sandbox, clock or time.time)], client_max_size=4 * 1024**2)
    app[SANDBOX_KEY] = sandbox
    app[CALLBACKS_KEY] = sandbox.callbacks  # twins reach it through request.config_dict
    app.on_cleanup.append(sandbox.callbacks.close)
    app.add_routes(_control_routes(sandbox))
    for kind, module in sandbox.twins.items():
        sub = module.make_app(sandbox.settings[kind])
        sandbox.apps[kind] = sub
        app.add_subapp(f"/{kind}", sub)
    return app


# --------------------------------------------------------------------------- SandboxThread
class SandboxThread(AppThread):
    """The sandbox on its own event loop in a daemon thread; every method is safe from other threads."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0,
                 settings: dict[str, KindSettings] | None = None) -> None:
        super().__init__(lambda: build_app(settings), host, port, name="dispatcher-sandbox", backlog=4096)

    # ---- addresses
    def base_url(self, kind: str) -> str:
        self._sandbox()._settings_of(kind)
        return f"{self.url}/{kind}"

    def credentials(self, kind: str) -> dict[str, str]:
        return self._call(lambda sb: dict(sb._settings_of(kind).credentials))

    def settings(self, kind: str) -> KindSettings:
        """The live settings object of a kind (e.g. to inject a clock: `.clock = fake.time`)."""
        return self._sandbox()._settings_of(kind)

    # ---- log and switches
    def requests(self, kind: str | None = None, since: int = 0) -> list[RecordedRequest]:
        return self._call(lambda sb: sb.requests(kind, since))

    @property
    def last_seq(self) -> int:
        """The seq of the newest recorded request: pass it as `since` to see only what follows."""
        return self._call(lambda sb: sb.seq)

    def set_faults(self, kind: str, **values: Any) -> dict[str, Any]:
        return self._call(lambda sb: sb.set_faults(kind, values))

    def configure(self, kind: str, **values: Any) -> dict[str, Any]:
        return self._call(lambda sb: sb.configure(kind, values))

    def reset(self) -> None:
        self._call(lambda sb: sb.reset())

    def callbacks(self, kind: str | None = None, since: int = 0) -> list[CallbackRecord]:
        """Snapshots of the delivery reports the twins sent (seq > `since`), each with its answers."""
        return self._call(lambda sb: sb.callbacks.records(kind, since))

    # ---- plumbing
    def _sandbox(self) -> Sandbox:
        if self.app is None:
            raise RuntimeError("sandbox is not started")
        return self.app[SANDBOX_KEY]

    def _call(self, fn: Callable[[Sandbox], Any]) -> Any:
        """Run `fn(sandbox)` on the server's loop and return its result."""
        sandbox = self._sandbox()
        return self.call(lambda: fn(sandbox))


# --------------------------------------------------------------------------- foreground
def serve(host: str = "127.0.0.1", port: int = 8765, latency_ms: float = 0, fail_rate: float = 0.0,
          settings: dict[str, KindSettings] | None = None, out: Callable[[str], None] = print) -> None:
    """Serve every twin until Ctrl-C or SIGTERM, after printing each kind's base URL and credentials."""
    asyncio.run(_serve(host, port, latency_ms, fail_rate, settings, out))


async def _serve(host: str, port: int, latency_ms: float, fail_rate: float,
                 settings: dict[str, KindSettings] | None, out: Callable[[str], None]) -> None:
    app = build_app(settings)
    sandbox = app[SANDBOX_KEY]
    for kind in sandbox.twins:
        sandbox.set_faults(kind, {"latency_ms": latency_ms, "fail_rate": fail_rate})

    def started(bound: int) -> None:
        _settle_the_heap()
        for line in describe(sandbox.info(f"http://{host}:{bound}")):
            out(line)
        out(f"control API: http://{host}:{bound}{CONTROL_PREFIX}/info  (Ctrl-C to stop)")

    await serve_until_signal(app, host, port, started, backlog=4096)


def _settle_the_heap() -> None:
    """The twin stamps each request's arrival when its loop gets to it: a full garbage collection
    walking every request it has kept stalled the loop for tens of milliseconds, and the requests
    that came meanwhile were stamped together, as a burst no real provider would have counted
    (docs/campaigns.md, "Figures"). So what exists at start-up is frozen out of the collector's
    reach, and young collections run less often."""
    import gc

    gc.freeze()
    gc.set_threshold(7000, 10, 10)


def describe(info: dict[str, Any]) -> Iterable[str]:
    """One line per kind: its base URL and sandbox credentials."""
    width = max(len(kind) for kind in info)
    for kind, entry in info.items():
        creds = " ".join(f"{k}={v}" for k, v in entry["credentials"].items())
        yield f"{kind:<{width}}  {entry['base_url']}  {creds}"

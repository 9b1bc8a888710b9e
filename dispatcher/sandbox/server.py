"""One aiohttp server holding every provider twin, with a request log, fault switches and a control API.

Layout of the URL space (the twin's own paths sit under its kind):

    /<kind>/...          a twin, e.g. POST /emsgnow/sms, POST /esms_africa/api/messages/send
    /_sandbox/requests   GET  ?kind=K&since=SEQ   the request log (entries with seq > SEQ)
    /_sandbox/faults     POST {"kind": K, latency_ms, down, fail_next, fail_status, fail_rate,
                               drop_next, lose_next, hang_next, hang_ms, seed, replay_callbacks}
    /_sandbox/configure  POST {"kind": K, credentials, rate_limit, rate_window, delivery_step,
                               extra: {...merged...}}
    /_sandbox/callbacks  GET  ?kind=K&since=SEQ   the delivery reports the twins sent, with every answer
    /_sandbox/reset      POST  empties both logs, faults and twin state, cancels pending reports,
                               restores the settings
    /_sandbox/info       GET   base URL and sandbox credentials per kind

A middleware around the twins (never inside them) records every request and applies the
kind's faults, in this order: latency, down (503 with a JSON body), drop (connection closed
before the twin sees the request), fail (fail_status, or fail_rate drawn from a Random seeded
with `seed`), hang (hold hang_ms, then answer normally), lose (the twin handles the request,
then the connection is closed: the provider acted but the client never hears of it).
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
import time
from dataclasses import asdict, dataclass, field, fields
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
    fault: str | None = None  # "down" | "fail" | "drop" | "hang" | "lose" when a fault shaped the answer

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
    drop_next: int = 0
    lose_next: int = 0
    hang_next: int = 0
    hang_ms: float = 0.0
    seed: int = 0
    replay_callbacks: bool = False  # send every delivery report of the kind twice
    rng: random.Random = field(default_factory=lambda: random.Random(0), repr=False)

    def update(self, values: dict[str, Any]) -> None:
        """Apply every value or, when one is wrong, none of them."""
        unknown = set(values) - {f.name for f in fields(self) if f.name != "rng"}
        if unknown:
            raise ValueError(f"unknown fault {sorted(unknown)[0]!r}")
        converted = {name: type(getattr(self, name))(value) for name, value in values.items()}
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
        entry = RecordedRequest(self.seq, kind, request.method, path, dict(request.query),
                                CIMultiDict(request.headers), raw, parsed, now)
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
    """The connection was closed on purpose; nothing is answered."""


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
        except _Dropped:
            if request.transport is not None:
                request.transport.close()
            raise asyncio.CancelledError() from None
        except web.HTTPException as exc:
            entry.status, entry.answered_at = exc.status, clock()
            raise
        entry.status, entry.answered_at = response.status, clock()
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
    if faults.drop_next > 0:
        faults.drop_next -= 1
        entry.fault = "drop"
        raise _Dropped()
    if faults.fail_next > 0 or (faults.fail_rate > 0 and faults.rng.random() < faults.fail_rate):
        faults.fail_next = max(0, faults.fail_next - 1)
        entry.fault = "fail"
        status = faults.fail_status
        return json_response(sandbox.fault_body(kind, status, "injected failure"), status=status)
    lose = faults.lose_next > 0  # decided at arrival, so concurrent requests lose exactly N
    if lose:
        faults.lose_next -= 1
    if faults.hang_next > 0:
        faults.hang_next -= 1
        entry.fault = "hang"
        await asyncio.sleep(faults.hang_ms / 1000.0)
    response = await handler(request)
    if lose:
        entry.fault, entry.status, entry.response_json = "lose", response.status, _response_json(response)
        raise _Dropped()
    return response


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
        for line in describe(sandbox.info(f"http://{host}:{bound}")):
            out(line)
        out(f"control API: http://{host}:{bound}{CONTROL_PREFIX}/info  (Ctrl-C to stop)")

    await serve_until_signal(app, host, port, started, backlog=4096)


def describe(info: dict[str, Any]) -> Iterable[str]:
    """One line per kind: its base URL and sandbox credentials."""
    width = max(len(kind) for kind in info)
    for kind, entry in info.items():
        creds = " ".join(f"{k}={v}" for k, v in entry["credentials"].items())
        yield f"{kind:<{width}}  {entry['base_url']}  {creds}"

"""Loopback twins of the five provider APIs, for demos, users' integration tests and ours.

`dispatcher sandbox` (see `server.serve`) and `server.SandboxThread` serve every twin on one
port, each under its kind: http://HOST:PORT/<kind>/<the provider's own path>.

The contract every twin module (`emsgnow.py`, `esms_africa.py`, `emnify.py`, `esimfly.py`,
`esimaccess.py`) follows:

    KIND = "emsgnow"                                  # the kind name, also its URL prefix
    DEFAULT_CREDENTIALS: dict[str, str]               # e.g. {"api_key": "sandbox-emsgnow-key"}
    def default_settings() -> KindSettings            # credentials, default rate limit,
                                                      # delivery_step, extra switches
    def make_app(settings: KindSettings) -> web.Application
                                                      # aiohttp sub-app; routes are the provider's own paths
    def fault_body(status: int, message: str) -> Any  # optional: an injected failure in the
                                                      # provider's error shape

A twin implements only the provider's semantics: authentication, validation, documented
errors, rate-limit headers and delivery states. It reads its settings at request time (so they
can be changed live through `POST /_sandbox/configure`), keeps what it stores in one object
with a `reset()` method at `app[common.STATE_KEY]`, and never imports `dispatcher.providers`.
Request logging and fault injection (latency, down, fail, drop, hang) are the server's job.

A twin whose provider pushes delivery reports (eMsgNow, eSMS Africa, emnify) hands each one,
with its due time, to the server's shared scheduler (`callbacks.scheduler_of(request)`), which
sends, retries, replays on request and logs them (`GET /_sandbox/callbacks`); it signs them
itself (hmac, PyJWT), never with the dispatcher's receiver code.
"""

from .common import FixedWindow, KindSettings, json_response, read_json

__all__ = ["FixedWindow", "KindSettings", "json_response", "read_json"]

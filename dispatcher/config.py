"""TOML file + environment -> typed settings and named provider accounts.

The file is found at $DISPATCHER_CONFIG (default ./dispatcher.toml); a missing file means
defaults plus environment. `${NAME}` inside any string is replaced by that environment
variable, so secrets stay out of the file. DISPATCHER_DATABASE_URL and DISPATCHER_REDIS_URL
override the file. Errors name the key and, when the file has one, its line.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

DEFAULT_DATABASE_URL = "sqlite:///dispatcher.db"
DEFAULT_REDIS_URL = "redis://localhost:6379/0"
# ids per dispatch task: two tasks of 200 fill a worker's 256 request slots and claim 144 ahead.
# 100 sent 8-12 % less per second through one worker (docs/throughput.md, "Fifth round").
DEFAULT_BATCH_SIZE = 200
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_RATE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*/\s*(?:([0-9]+)\s*)?(s|sec|second|m|min|minute|h|hour)\s*")  # fullmatch
_UNIT_SECONDS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600}
# Account keys the dispatcher itself reads; every other key belongs to the provider kind.
ACCOUNT_KEYS = ("kind", "base_url", "rate_limit", "burst", "timeout", "on_timeout")
ON_TIMEOUT = ("retry", "unknown")
MAX_ACCOUNT_NAME = 100  # the store's provider column


@dataclass(frozen=True)
class RateLimit:
    """`count` requests per `period` seconds, with `burst` requests allowed back to back."""

    count: float
    period: float
    burst: int = 1

    @property
    def interval(self) -> float:
        return self.period / self.count

    def __str__(self) -> str:
        return f"{self.count:g}/{self.period:g}s (burst {self.burst})"


def parse_rate_limit(text: str, burst: int | None = None) -> RateLimit:
    """Parse "N/s", "N/m", "N/h" (also "N/5m" for N per five minutes)."""
    m = _RATE.fullmatch(str(text))
    if not m:
        raise ValueError(f"must look like '10/s', '600/m' or '1000/h', got {text!r}")
    count, mult, unit = float(m.group(1)), int(m.group(2) or 1), m.group(3)
    if count <= 0 or mult <= 0:
        raise ValueError("must be a positive rate")
    if burst is not None and (not isinstance(burst, int) or isinstance(burst, bool) or burst < 1):
        raise ValueError("burst must be a whole number >= 1")
    return RateLimit(count=count, period=float(mult * _UNIT_SECONDS[unit]), burst=burst or 1)


@dataclass(frozen=True)
class ProviderAccount:
    """One named account: its kind, API root, limits and the kind's own fields."""

    name: str
    kind: str
    base_url: str
    rate_limit: RateLimit | None = None
    timeout: float = 10.0
    on_timeout: str = "retry"  # a request that may have arrived: "retry" it, or settle as "unknown"
    fields: dict[str, Any] = field(default_factory=dict)
    secret_fields: tuple[str, ...] = ()

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def __repr__(self) -> str:  # never show a credential
        shown = {k: ("***" if k in self.secret_fields else v) for k, v in self.fields.items()}
        return f"ProviderAccount(name={self.name!r}, kind={self.kind!r}, base_url={self.base_url!r}, fields={shown})"


@dataclass(frozen=True)
class Settings:
    database_url: str = DEFAULT_DATABASE_URL
    redis_url: str = DEFAULT_REDIS_URL
    broker_url: str = ""  # the Celery broker; empty = the Redis at redis_url (amqp://... for RabbitMQ)
    providers: dict[str, ProviderAccount] = field(default_factory=dict)
    max_attempts: int = 6  # sends per message, transient failures included
    retry_base: float = 1.0  # seconds; backoff = base * 2**n with full jitter
    retry_cap: float = 60.0  # never a countdown longer than this
    batch_size: int = DEFAULT_BATCH_SIZE  # ids per dispatch task, whoever publishes it
    in_flight: int = 256  # HTTP requests in flight per provider account in one worker process
    tick_seconds: float = 1.0  # beat interval for due-time release and reaping
    schedule_grace: float = 3600.0  # a recurring occurrence missed by more than this is skipped
    throttle_wait: float = 2.0  # a batch reserves rate-limit slots at most this far ahead
    rate_margin: float = 0.02  # of a limit's period (at most 1 s): the jitter budget between a send and the provider
    lease_seconds: float = 300.0  # a claim older than this is settled by the reaper, whoever holds it
    heartbeat_seconds: float = 2.0  # each worker process writes its heartbeat this often
    worker_timeout: float = 10.0  # a worker silent this long is dead: the reaper settles its claims
    lost_after: float = 60.0  # a queued message untouched this long past due has lost its task
    poll_seconds: float = 2.0  # beat interval of the delivery-status poll
    poll_first: float = 1.0  # seconds after acceptance before the first status poll
    poll_max_interval: float = 600.0  # polls back off (a quarter of the message's age) up to this
    poll_max_age: float = 72 * 3600.0  # after this long without a final status: `unknown`
    source: str | None = None  # the file these came from

    def account(self, name: str) -> ProviderAccount:
        from .errors import UnknownProvider

        try:
            return self.providers[name]
        except KeyError:
            raise UnknownProvider(name, list(self.providers)) from None


def config_path() -> Path:
    return Path(os.environ.get("DISPATCHER_CONFIG", "dispatcher.toml"))


def load_settings(path: str | os.PathLike[str] | None = None, env: dict[str, str] | None = None) -> Settings:
    """Read the file (if any) and the environment into Settings; raise ConfigError on any fault."""
    env = dict(os.environ if env is None else env)
    path = Path(path) if path is not None else config_path()
    text = ""
    data: dict[str, Any] = {}
    if path.exists():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}): a TOML file is UTF-8") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot be read: {exc.strerror or type(exc).__name__}") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {str(exc).splitlines()[0]}") from None
    return _build(data, text, env, str(path) if text else None)


def _build(data: dict[str, Any], text: str, env: dict[str, str], source: str | None) -> Settings:
    where = _Locator(text, source)
    general = data.get("dispatcher", {})
    if not isinstance(general, dict):
        raise ConfigError(where.say("dispatcher", None, "must be a table"))
    general = _interpolate(general, env, where, "dispatcher")
    known_general = {f for f in Settings.__dataclass_fields__ if f not in ("providers", "source")}
    for key in general:
        if key not in known_general:
            raise ConfigError(where.say("dispatcher", key, f"unknown setting (known: {', '.join(sorted(known_general))})"))
    unknown_top = set(data) - {"dispatcher", "providers"}
    if unknown_top:
        key = sorted(unknown_top)[0]
        raise ConfigError(where.say(key, None, "unknown table (expected [dispatcher] or [providers.NAME])"))
    kwargs: dict[str, Any] = {}
    for key, value in general.items():
        kwargs[key] = _coerce_general(key, value, where)
    if env.get("DISPATCHER_DATABASE_URL"):
        kwargs["database_url"] = env["DISPATCHER_DATABASE_URL"]
    if env.get("DISPATCHER_REDIS_URL"):
        kwargs["redis_url"] = env["DISPATCHER_REDIS_URL"]
    if env.get("DISPATCHER_BROKER_URL"):
        kwargs["broker_url"] = env["DISPATCHER_BROKER_URL"]
    providers_raw = data.get("providers", {})
    if not isinstance(providers_raw, dict):
        raise ConfigError(where.say("providers", None, "must be a table of [providers.NAME] accounts"))
    accounts = {}
    for name, raw in providers_raw.items():
        table = f"providers.{name}"
        if not isinstance(raw, dict):
            raise ConfigError(where.say(table, None, "must be a table"))
        accounts[name] = _build_account(name, _interpolate(raw, env, where, table), where)
    return Settings(providers=accounts, source=source, **kwargs)


def _coerce_general(key: str, value: Any, where: _Locator) -> Any:
    kind = type(Settings.__dataclass_fields__[key].default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ConfigError(where.say("dispatcher", key, f"must be a {kind.__name__}, got {value!r}"))
    if kind is float and not math.isfinite(value):
        raise ConfigError(where.say("dispatcher", key, f"must be a finite number, got {value!r}"))
    if kind in (int, float) and value <= 0:
        raise ConfigError(where.say("dispatcher", key, "must be greater than zero"))
    return value


def _build_account(name: str, raw: dict[str, Any], where: _Locator) -> ProviderAccount:
    from .providers import adapter_class, known_kinds

    table = f"providers.{name}"
    if not name.isprintable() or len(name) > MAX_ACCOUNT_NAME or not name.strip():
        raise ConfigError(where.say("providers", None, f"an account name must be 1 to {MAX_ACCOUNT_NAME} printable "
                                                       f"characters, got {name!r}"))
    kind = raw.get("kind")
    if kind is None:
        raise ConfigError(where.say(table, None, f"missing key 'kind' (one of: {', '.join(known_kinds())})"))
    if not isinstance(kind, str) or kind not in known_kinds():
        raise ConfigError(where.say(table, "kind", f"unknown kind {kind!r} (one of: {', '.join(known_kinds())})"))
    cls = adapter_class(kind)
    base_url = raw.get("base_url")
    if not base_url:
        raise ConfigError(where.say(table, None, "missing key 'base_url' (the provider's API root)"))
    if not isinstance(base_url, str) or not re.fullmatch(r"https?://[^\s/?#]+(?:[/?#]\S*)?", base_url):
        raise ConfigError(where.say(table, "base_url", f"must be an http(s) URL, got {base_url!r}"))
    burst = raw.get("burst")
    rate_text = raw.get("rate_limit", cls.default_rate_limit)
    rate = None
    if rate_text is not None:
        try:
            rate = parse_rate_limit(rate_text, burst)
        except ValueError as exc:
            raise ConfigError(where.say(table, "burst" if "burst" in str(exc) else "rate_limit", str(exc))) from None
    timeout = raw.get("timeout", 10.0)
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not math.isfinite(timeout) or timeout <= 0:
        raise ConfigError(where.say(table, "timeout", f"must be a number of seconds > 0, got {timeout!r}"))
    on_timeout = raw.get("on_timeout", "retry")
    if on_timeout not in ON_TIMEOUT:
        raise ConfigError(where.say(table, "on_timeout", f"must be one of {', '.join(ON_TIMEOUT)}, got {on_timeout!r}"))
    fields = {k: v for k, v in raw.items() if k not in ACCOUNT_KEYS}
    allowed = cls.account_keys()
    for key in fields:
        if key not in allowed:
            raise ConfigError(where.say(table, key, f"unknown key for kind {kind!r} (allowed: {', '.join(sorted(allowed)) or 'none'})"))
    for key in cls.credentials:
        if not fields.get(key):
            raise ConfigError(where.say(table, None, f"missing credential {key!r} for kind {kind!r}"))
        if not isinstance(fields[key], str):
            raise ConfigError(where.say(table, key, f"must be a string (e.g. \"${{{key.upper()}}}\"), "
                                                    f"got a {type(fields[key]).__name__}"))
    secret = fields.get("webhook_secret")
    if secret is not None and (not isinstance(secret, str) or not secret):
        raise ConfigError(where.say(table, "webhook_secret", "must be a non-empty string (e.g. \"${WEBHOOK_SECRET}\")"))
    for key, default in cls.optional_credentials.items():
        fields.setdefault(key, default)
    account = ProviderAccount(
        name=name,
        kind=kind,
        base_url=base_url.rstrip("/"),
        rate_limit=rate,
        timeout=float(timeout),
        on_timeout=on_timeout,
        fields=fields,
        secret_fields=tuple(cls.secret_fields()),
    )
    try:
        cls(account)  # the adapter checks its own fields (e.g. an enum like esimaccess auth)
    except ConfigError as exc:
        raise ConfigError(where.say(table, getattr(exc, "key", None), str(exc))) from None
    return account


def _interpolate(value: Any, env: dict[str, str], where: _Locator, path: str) -> Any:
    if isinstance(value, dict):
        return {k: _interpolate(v, env, where, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env, where, path) for v in value]
    if isinstance(value, str):

        def replace(m: re.Match[str]) -> str:
            if m.group(1) not in env:
                table, _, key = path.rpartition(".")
                raise ConfigError(where.say(table, key, f"environment variable {m.group(1)} is not set"))
            return env[m.group(1)]

        return _ENV_REF.sub(replace, value)
    return value


class _Locator:
    """Finds the line of `[table]` / `key =` in the TOML text, for error messages."""

    def __init__(self, text: str, source: str | None) -> None:
        self.lines = text.splitlines()
        self.source = source or "configuration"

    def line_of(self, table: str, key: str | None) -> int | None:
        header = re.compile(r"^\s*\[\s*" + r"\s*\.\s*".join(re.escape(p) for p in table.split(".")) + r"\s*\]")
        start = None
        for i, line in enumerate(self.lines):
            if header.match(line):
                start = i
                break
        if start is None:
            return None
        if key is None:
            return start + 1
        key_re = re.compile(r"^\s*[\"']?" + re.escape(key) + r"[\"']?\s*=")
        for i in range(start + 1, len(self.lines)):
            if re.match(r"^\s*\[", self.lines[i]):
                break
            if key_re.match(self.lines[i]):
                return i + 1
        return start + 1

    def say(self, table: str, key: str | None, problem: str) -> str:
        line = self.line_of(table, key)
        at = f"{self.source}:{line}: " if line else f"{self.source}: "
        name = f"{table}.{key}" if key else table
        if not name.isprintable():  # a key with a newline or a control character in it: one line still
            name = repr(name)
        return f"{at}{name}: {problem}"

"""The `dispatcher` command: send, status, cancel, schedule, campaign, limits, worker, beat, health, stats,
check-config, sandbox, webhooks, api, api-key, demo, db.

Exit status: 0 on success, 2 on bad input (one line saying why), 1 on any other failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from datetime import datetime
from typing import Any, Sequence

from .errors import ConfigError, DispatcherError, NotFound, ValidationError

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2


class BadInput(Exception):
    """A command-line argument is wrong."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        raise BadInput(f"{self.prog}: {message}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser()
    # worker/beat pass every further argument to celery untouched
    if argv and argv[0] in ("worker", "beat"):
        return _run_celery(argv[0], argv[1:])
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "handler", None):
            parser.print_help()
            return EXIT_BAD_INPUT
        return int(args.handler(args) or EXIT_OK)
    except (BadInput, ValidationError, ConfigError, NotFound) as exc:
        _say_error(exc)
        return EXIT_BAD_INPUT
    except DispatcherError as exc:
        _say_error(exc)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence: one line, not a traceback
        from .services import describe_service_error

        print(f"error: {describe_service_error(exc)}", file=sys.stderr)
        return EXIT_FAILURE


def _say_error(exc: BaseException) -> None:
    """The one error line: first line only, any URL password starred."""
    from .redact import hide_url_passwords

    lines = str(exc).splitlines() or [type(exc).__name__]
    print(f"error: {hide_url_passwords(lines[0])}", file=sys.stderr)


def _build_parser() -> _Parser:
    p = _Parser(prog="dispatcher", description="Send SMS through many providers reliably and fast.")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    s = sub.add_parser("send", help="store and enqueue one SMS; prints its id")
    s.add_argument("provider", help="the provider account name from the config")
    s.add_argument("--to", required=True)
    s.add_argument("--text")
    s.add_argument("--not-before", "--scheduled-at", dest="not_before", help="ISO 8601 with a time zone")
    s.add_argument("--not-after", help="ISO 8601 with a time zone")
    s.add_argument("--idempotency-key")
    s.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="a kind option, e.g. sender_id=MyApp or variables='{\"name\": \"Ada\"}'")
    s.set_defaults(handler=_cmd_send)

    st = sub.add_parser("status", help="show a message, its attempts and delivery events")
    st.add_argument("id")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(handler=_cmd_status)

    c = sub.add_parser("cancel", help="cancel a message not yet handed to the provider")
    c.add_argument("id")
    c.set_defaults(handler=_cmd_cancel)

    sc = sub.add_parser("schedule", help="recurring reminders (cron in a time zone)")
    scsub = sc.add_subparsers(dest="schedule_command", parser_class=_Parser)
    add = scsub.add_parser("add", help="add a recurring reminder")
    add.add_argument("name")
    add.add_argument("--cron", required=True, help='a cron expression, e.g. "0 9 * * 1-5"')
    add.add_argument("--tz", required=True, help="the time zone the expression is read in, e.g. Europe/London")
    add.add_argument("--provider", required=True)
    add.add_argument("--to", required=True)
    add.add_argument("--text")
    add.add_argument("--until", help="ISO 8601 with a time zone: no occurrence after this")
    add.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE")
    add.set_defaults(handler=_cmd_schedule_add)
    ls = scsub.add_parser("list", help="every schedule with its next three occurrences, local and UTC")
    ls.set_defaults(handler=_cmd_schedule_list)
    rm = scsub.add_parser("remove", help="remove a schedule")
    rm.add_argument("name")
    rm.set_defaults(handler=_cmd_schedule_remove)

    lm = sub.add_parser("limits", help="each account's rate limit, any pause its provider asked for, the next free slot")
    lm.set_defaults(handler=_cmd_limits)

    sub.add_parser("worker", help="run the worker: --processes N (default: one per CPU core), --metrics-port N; "
                                  "further options go to celery worker")
    sub.add_parser("beat", help="run the Celery beat (further options go to celery beat)")

    he = sub.add_parser("health", help="exit 0 when Redis, the store and the beat are healthy, 1 naming what is not")
    he.add_argument("--json", action="store_true", help="machine-readable output")
    he.add_argument("--check", action="append", choices=["redis", "store", "beat"],
                    help="only these checks (repeatable; default all), e.g. a worker's liveness probe")
    he.set_defaults(handler=_cmd_health)

    sa = sub.add_parser("stats", help="live view of queue depth, rates, throttling and failures per account")
    sa.add_argument("--once", action="store_true", help="print one snapshot and exit")
    sa.add_argument("--json", action="store_true", help="machine-readable output (one object per snapshot)")
    sa.add_argument("--interval", type=float, default=2.0, help="seconds between redraws (default 2)")
    sa.set_defaults(handler=_cmd_stats)

    cc = sub.add_parser("check-config", help="validate the config file and environment; prints no secret")
    cc.add_argument("--file", help="path of the TOML file (default $DISPATCHER_CONFIG or ./dispatcher.toml)")
    cc.set_defaults(handler=_cmd_check_config)

    sb = sub.add_parser("sandbox", help="serve local simulators of all five provider APIs")
    sb.add_argument("--host", default="127.0.0.1")
    sb.add_argument("--port", type=int, default=8765)
    sb.add_argument("--latency-ms", type=int, default=0, help="answer every request after this delay")
    sb.set_defaults(handler=_cmd_sandbox)

    wh = sub.add_parser("webhooks", help="receive delivery reports (eMsgNow, eSMS Africa, emnify) at /webhooks/ACCOUNT")
    wh.add_argument("--host", default="127.0.0.1")
    wh.add_argument("--port", type=int, default=8780)
    wh.add_argument("--metrics-port", type=int, default=_env_int("DISPATCHER_METRICS_PORT"),
                    help="serve Prometheus metrics on this port (default $DISPATCHER_METRICS_PORT; none)")
    wh.add_argument("--metrics-host", default=os.environ.get("DISPATCHER_METRICS_HOST", "127.0.0.1"))
    wh.set_defaults(handler=_cmd_webhooks)

    ap = sub.add_parser("api", help="serve the HTTP API for producers (keys: dispatcher api-key create NAME)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8781)
    ap.set_defaults(handler=_cmd_api)

    ak = sub.add_parser("api-key", help="keys of the HTTP API: create (shown once), list, revoke")
    aksub = ak.add_subparsers(dest="api_key_command", parser_class=_Parser)
    akc = aksub.add_parser("create", help="create a key; it is printed once, on the last line")
    akc.add_argument("name")
    akc.add_argument("--accounts", help="comma-separated provider accounts the key may use (default: all)")
    akc.set_defaults(handler=_cmd_api_key_create)
    akl = aksub.add_parser("list", help="every key: name, id, accounts, created, revoked (never the key)")
    akl.set_defaults(handler=_cmd_api_key_list)
    akr = aksub.add_parser("revoke", help="revoke a key: it is refused (401) within a second")
    akr.add_argument("name")
    akr.set_defaults(handler=_cmd_api_key_revoke)

    d = sub.add_parser("demo", help="the whole pipeline on the sandbox, end to end")
    d.add_argument("--keep", action="store_true", help="keep the demo's working directory")
    d.set_defaults(handler=_cmd_demo)

    db = sub.add_parser("db", help="database schema")
    dbsub = db.add_subparsers(dest="db_command", parser_class=_Parser)
    up = dbsub.add_parser("upgrade", help="apply every pending migration")
    up.set_defaults(handler=_cmd_db_upgrade)

    from .campaign_cli import add_parser as add_campaign_parser  # `dispatcher campaign ...`

    add_campaign_parser(sub, _Parser)
    return p


# --------------------------------------------------------------------------- commands
def _cmd_send(args: argparse.Namespace) -> int:
    from . import api

    options = dict(_parse_opt(o) for o in args.opt)
    msg = api.send(
        args.provider, args.to, args.text,
        not_before=_parse_time("--not-before", args.not_before),
        not_after=_parse_time("--not-after", args.not_after),
        idempotency_key=args.idempotency_key, **options,
    )
    print(msg.id)
    return EXIT_OK


def _cmd_status(args: argparse.Namespace) -> int:
    from . import api
    from .report import format_message, message_as_dict

    msg = api.get(args.id)
    if args.json:
        print(json.dumps(message_as_dict(msg), default=str, indent=2))
    else:
        print(format_message(msg))
    return EXIT_OK


def _cmd_cancel(args: argparse.Namespace) -> int:
    from . import api

    msg = api.cancel(args.id)
    print(f"{msg.id} {msg.status}")
    return EXIT_OK


def _cmd_schedule_add(args: argparse.Namespace) -> int:
    from .recurring import add_schedule

    view = add_schedule(args.name, args.cron, args.tz, args.provider, args.to, args.text,
                        until=_parse_time("--until", args.until), **dict(_parse_opt(o) for o in args.opt))
    _print_schedule(view)
    return EXIT_OK


def _cmd_schedule_list(args: argparse.Namespace) -> int:
    from .recurring import list_schedules

    views = list_schedules()
    if not views:
        print("no schedules")
    for view in views:
        _print_schedule(view)
    return EXIT_OK


def _cmd_schedule_remove(args: argparse.Namespace) -> int:
    from .recurring import remove_schedule

    remove_schedule(args.name)
    print(f"removed {args.name}")
    return EXIT_OK


def _print_schedule(view) -> None:  # type: ignore[no-untyped-def]
    until = f" until {view.until.isoformat()}" if view.until else ""
    broken = f"  BROKEN: {view.broken}" if view.broken else ""
    print(f"{view.name}: '{view.cron}' in {view.tz} via {view.provider} to {view.to}{until}{broken}")
    for occ in view.upcoming:
        print(f"  {occ.local.strftime('%Y-%m-%d %H:%M')} {view.tz}   {occ.at.strftime('%Y-%m-%d %H:%M')} UTC")


def _cmd_limits(args: argparse.Namespace) -> int:
    from . import runtime

    for name, acc in runtime.settings().providers.items():
        d = runtime.limiter().describe(name, acc.rate_limit)
        pause = f"paused until {d['paused_until']}" if d["paused_until"] else "not paused"
        print(f"{name:<16} {d['limit'] or 'unlimited':<24} {pause:<44} next free in {d['next_free_in']:.3f}s")
    return EXIT_OK


def _cmd_check_config(args: argparse.Namespace) -> int:
    from .config import load_settings
    from .redact import hide_url_secrets

    s = load_settings(args.file)
    source = s.source or "(no file: defaults and environment)"
    print(f"ok: {source}")
    print(f"  database: {_hide_password(s.database_url)}")
    print(f"  redis:    {_hide_password(s.redis_url)}")
    for name, acc in s.providers.items():
        rate = str(acc.rate_limit) if acc.rate_limit else "unlimited"
        shown = ", ".join(f"{k}={'***' if k in acc.secret_fields else hide_url_secrets(v)}"
                          for k, v in acc.fields.items())
        print(f"  provider {name}: kind={acc.kind} base_url={acc.base_url} rate_limit={rate} {shown}")
    return EXIT_OK


def _cmd_sandbox(args: argparse.Namespace) -> int:
    from .sandbox.server import serve

    serve(host=args.host, port=args.port, latency_ms=args.latency_ms)
    return EXIT_OK


def _cmd_webhooks(args: argparse.Namespace) -> int:
    from . import runtime
    from .webhooks import serve

    from .logs import configure

    runtime.settings()  # a broken config is bad input (exit 2) before anything listens
    configure(logging.INFO)
    if args.metrics_port is not None:
        from . import metrics

        metrics.serve(args.metrics_port, args.metrics_host)
    serve(host=args.host, port=args.port)
    return EXIT_OK


def _cmd_health(args: argparse.Namespace) -> int:
    from . import health

    results = health.run(tuple(args.check or health.CHECKS))
    if args.json:
        print(json.dumps(health.as_dict(results), indent=2))
    else:
        for c in results:
            print(f"{c.name:<6} {'ok' if c.ok else 'FAIL'}  {c.detail}")
    return EXIT_OK if all(c.ok for c in results) else EXIT_FAILURE


def _cmd_stats(args: argparse.Namespace) -> int:
    from . import statsview

    if args.interval <= 0:
        raise BadInput("--interval: must be greater than zero")
    if args.json:
        while True:
            print(json.dumps(statsview.snapshot()), flush=True)
            if args.once:
                return EXIT_OK
            import time

            time.sleep(args.interval)
    if args.once:
        from rich.console import Console

        Console(width=None if sys.stdout.isatty() else 132).print(statsview.table(statsview.snapshot()))
        return EXIT_OK
    try:
        statsview.live(args.interval)
    except KeyboardInterrupt:  # Ctrl-C is how a live view ends
        pass
    return EXIT_OK


def _cmd_api(args: argparse.Namespace) -> int:
    from . import runtime
    from .httpapi import serve

    runtime.settings()  # a broken config is bad input (exit 2) before anything listens
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(host=args.host, port=args.port)
    return EXIT_OK


def _cmd_api_key_create(args: argparse.Namespace) -> int:
    from .api_keys import create_key

    accounts = None if args.accounts is None else [a.strip() for a in args.accounts.split(",") if a.strip()]
    info, key = create_key(args.name, accounts)
    scope = ", ".join(info.accounts) if info.accounts is not None else "all accounts"
    print(f"created API key {info.name} (id {info.id}) for {scope}")
    print("it is shown only now; store it where your application reads its secrets:")
    print(key)
    return EXIT_OK


def _cmd_api_key_list(args: argparse.Namespace) -> int:
    from .api_keys import list_keys

    keys = list_keys()
    if not keys:
        print("no API keys (create one: dispatcher api-key create NAME)")
    for k in keys:
        scope = ",".join(k.accounts) if k.accounts is not None else "all"
        state = f"revoked {k.revoked_at:%Y-%m-%d %H:%M}Z" if k.revoked_at else "active"
        print(f"{k.name:<24} id {k.id}  accounts {scope:<24} created {k.created_at:%Y-%m-%d %H:%M}Z  {state}")
    return EXIT_OK


def _cmd_api_key_revoke(args: argparse.Namespace) -> int:
    from .api_keys import revoke_key

    info = revoke_key(args.name)
    print(f"revoked API key {info.name} (id {info.id})")
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(keep=args.keep)


def _cmd_db_upgrade(args: argparse.Namespace) -> int:
    from . import runtime
    from .store.db import upgrade

    url = runtime.settings().database_url
    upgrade(url)
    print(f"database at {_hide_password(url)} is up to date")
    return EXIT_OK


def _worker_options(rest: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Split `dispatcher worker`'s own options from those passed on to celery worker."""
    p = _Parser(prog="dispatcher worker", add_help=False, allow_abbrev=False)
    p.add_argument("--processes", type=int, default=_env_int("DISPATCHER_PROCESSES"))
    p.add_argument("--metrics-port", type=int, default=_env_int("DISPATCHER_METRICS_PORT"))
    p.add_argument("--metrics-host", default=os.environ.get("DISPATCHER_METRICS_HOST", "127.0.0.1"))
    opts, celery_args = p.parse_known_args(rest)
    if opts.processes is not None and opts.processes < 1:
        raise BadInput("dispatcher worker: --processes must be at least 1")
    return opts, celery_args


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise BadInput(f"{name}: must be a whole number, got {value!r}") from None


def _run_celery(which: str, rest: list[str]) -> int:
    from .logs import configure, json_wanted

    if json_wanted():  # before Celery starts: its warnings and early records come out as JSON too
        configure(logging.WARNING)
        logging.captureWarnings(True)
    opts = None
    if which == "worker":
        try:
            opts, rest = _worker_options(rest)
        except BadInput as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
    try:
        from .services import require_redis
        from . import runtime

        require_redis(runtime.settings().redis_url)
        from .worker import app
    except (ConfigError, DispatcherError) as exc:
        _say_error(exc)
        return EXIT_BAD_INPUT if isinstance(exc, ConfigError) else EXIT_FAILURE
    if opts is not None:
        from .supervisor import default_processes, run_workers

        processes = opts.processes or default_processes()
        if processes > 1:  # N single-process workers under one supervisor (supervisor.py)
            configure(logging.INFO)
            return run_workers(processes, rest, opts.metrics_port, opts.metrics_host)
    if which == "worker" and "MALLOC_ARENA_MAX" not in os.environ:
        # glibc gives each thread its own malloc arena; with a threads pool and an event loop the
        # arenas fragment and RSS creeps up with every message sent (bench/throughput.py: +33 MB
        # over 30,000 messages). Two arenas keep it flat. It must be set before the process starts.
        os.execve(sys.executable, [sys.executable, "-m", "dispatcher.cli", which, "--processes", "1",
                                   *_metrics_args(opts), *rest],
                  dict(os.environ, MALLOC_ARENA_MAX="2"))
    if opts is not None and opts.metrics_port is not None:  # one process: it serves its own counters
        from . import metrics

        metrics.serve(opts.metrics_port, opts.metrics_host)
    argv = [which, *rest]
    if which == "worker":
        from . import keys

        named = _queues_named(rest)
        if named is None:
            argv += ["-Q", ",".join(keys.WORKER_QUEUES)]
        elif not named >= {keys.QUEUE_PRIORITY, keys.QUEUE_LATER}:
            left_out = ", ".join(q for q in (keys.QUEUE_PRIORITY, keys.QUEUE_LATER) if q not in named)
            print(f"warning: this worker does not read {left_out}: single sends, retries and rate-limited messages' "
                  "next turns wait for a worker that does (docs/operations.md, Queues)", file=sys.stderr)
    app.start(argv=argv)
    return EXIT_OK


def _queues_named(args: list[str]) -> set[str] | None:
    """The queues a celery `-Q`/`--queues` option among `args` names; None without one."""
    named: set[str] | None = None
    for i, arg in enumerate(args):
        if arg in ("-Q", "--queues"):
            value = args[i + 1] if i + 1 < len(args) else ""
        elif arg.startswith("--queues="):
            value = arg.split("=", 1)[1]
        elif arg.startswith("-Q"):
            value = arg[2:]
        else:
            continue
        named = (named or set()) | {name.strip() for name in value.split(",")}
    return named


def _metrics_args(opts: argparse.Namespace | None) -> list[str]:
    if opts is None or opts.metrics_port is None:
        return []
    return ["--metrics-port", str(opts.metrics_port), "--metrics-host", opts.metrics_host]


# --------------------------------------------------------------------------- parsing helpers
def _parse_time(flag: str, value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise BadInput(f"{flag}: not an ISO 8601 date-time: {value!r}") from None
    if dt.tzinfo is None:
        raise BadInput(f"{flag}: must carry a time zone (e.g. 2026-06-01T07:00:00Z or +02:00)")
    return dt


def _parse_opt(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise BadInput(f"--opt: expected KEY=VALUE, got {text!r}")
    if raw[:1] and raw[0] in "{[":
        try:
            return key, json.loads(raw)
        except ValueError:
            raise BadInput(f"--opt {key}: value looks like JSON but does not parse") from None
    return key, raw


def _hide_password(url: str) -> str:
    from .redact import hide_url_passwords

    return hide_url_passwords(url)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

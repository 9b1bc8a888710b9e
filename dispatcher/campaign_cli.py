"""`dispatcher campaign create|status|pause|resume|cancel|list`: the command line of campaigns.py.

cli.py adds these subcommands with add_parser(); the exit codes are cli.py's (0 ok, 2 bad
input with one line, 1 other failure).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, BinaryIO, Iterator

SHOWN_SKIPPED = 10  # skipped rows `campaign status` prints (the JSON form has up to 1,000)
PROGRESS_STEP = 1 << 16  # bytes read between two updates of the progress bar


def add_parser(sub: Any, parser_class: type) -> None:
    cp = sub.add_parser("campaign", help="bulk campaigns: one template, many recipients")
    csub = cp.add_subparsers(dest="campaign_command", parser_class=parser_class)

    cr = csub.add_parser("create", help="load a CSV and start sending; prints the campaign id on its last line")
    cr.add_argument("file", help="a CSV file with a header row ('-' for standard input)")
    cr.add_argument("--provider", required=True, help="the provider account name from the config")
    cr.add_argument("--template", required=True, help="the text, with {column} placeholders")
    cr.add_argument("--to-column", default="to", help="the column holding the recipient (default: to)")
    cr.add_argument("--name")
    cr.add_argument("--idempotency-key", help="the same key again returns the first campaign and sends nothing new; "
                                              "if its loading was interrupted, it loads the rest of the file")
    cr.add_argument("--not-before", help="ISO 8601 with a time zone: start no earlier")
    cr.add_argument("--not-after", help="ISO 8601 with a time zone: what is unsent by then expires")
    cr.add_argument("--window", help="HH:MM-HH:MM in each recipient's local time (zone from the number or a tz column)")
    cr.add_argument("--strict", action="store_true", help="any bad row refuses the whole campaign (exit 2, nothing stored)")
    cr.add_argument("--dry-run", action="store_true", help="check and count; store and send nothing")
    cr.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="a kind option, as for send")
    cr.set_defaults(handler=_cmd_create)

    st = csub.add_parser("status", help="counts per status, send rate and time to finish")
    st.add_argument("id")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(handler=_cmd_status)

    for verb, text in (("pause", "stop handing the campaign's messages to the provider"),
                       ("resume", "go on with a paused campaign; an interrupted one is sent as loaded"),
                       ("cancel", "the campaign's unsent messages end cancelled")):
        p = csub.add_parser(verb, help=text)
        p.add_argument("id")
        p.set_defaults(handler=_cmd_control, verb=verb)

    ls = csub.add_parser("list", help="the latest campaigns")
    ls.add_argument("--limit", type=int, default=50)
    ls.set_defaults(handler=_cmd_list)


# --------------------------------------------------------------------------- commands
def _cmd_create(args: argparse.Namespace) -> int:
    from .campaigns import campaign
    from .cli import BadInput, _parse_opt, _parse_time
    from .csvrows import read_csv

    options = dict(_parse_opt(o) for o in args.opt)
    not_before = _parse_time("--not-before", args.not_before)
    not_after = _parse_time("--not-after", args.not_after)
    if args.file == "-":
        stream, size = sys.stdin.buffer, None
    else:
        try:
            stream = open(args.file, "rb")
        except OSError as exc:
            raise BadInput(f"{args.file}: cannot open ({exc.strerror})") from None
        size = os.fstat(stream.fileno()).st_size
    with stream, _Progress(size) as bar:
        rows = read_csv(_lines(stream, bar))
        c = campaign(args.provider, rows, args.template, to_field=args.to_column, name=args.name,
                     idempotency_key=args.idempotency_key, not_before=not_before, not_after=not_after,
                     window=args.window, strict=args.strict, dry_run=args.dry_run, **options)
    if c.dry_run:
        _print_dry_run(c)
        return 0
    for r in c.invalid:
        print(f"line {r.line}: skipped: {r.reason}", file=sys.stderr)
    if c.invalid_count > len(c.invalid):
        print(f"... and {c.invalid_count - len(c.invalid):,} more skipped row(s)", file=sys.stderr)
    if c.resumed_after is not None:
        print(f"campaign {c.id}: its interrupted loading resumed after line {c.resumed_after:,}; now "
              f"{c.total:,} row(s) stored, {c.invalid_count:,} skipped, {c.segments:,} segment(s); state {c.state}",
              file=sys.stderr)
    elif not c.created:
        print(f"idempotency key already used: campaign {c.id} was created before; nothing new stored", file=sys.stderr)
        if c.state == "loading":
            print(f"campaign {c.id} is still being loaded by another process (line {c.last_line:,} reached); "
                  f"if that process is gone, it counts as interrupted {_timeout()} after its last sign of life, "
                  f"and this command then loads the rest", file=sys.stderr)
    else:
        print(f"stored {c.total:,} row(s), {c.invalid_count:,} skipped, {c.segments:,} segment(s); "
              f"state {c.state}", file=sys.stderr)
    print(c.id)
    return 0


def _print_dry_run(c: Any) -> None:
    print(f"valid rows     {c.total:,}")
    print(f"invalid rows   {c.invalid_count:,}")
    print(f"segments       {c.segments:,}")
    for r in c.invalid:
        print(f"  line {r.line}: {r.reason}")
    if c.invalid_count > len(c.invalid):
        print(f"  ... and {c.invalid_count - len(c.invalid):,} more")
    print("samples")
    for s in c.samples:
        print(f"  line {s.line} to {s.to} ({s.segments} segment{'s' if s.segments != 1 else ''}): {s.text}")
    print("dry run: nothing stored, nothing sent")


def _cmd_status(args: argparse.Namespace) -> int:
    from .campaigns import campaign_status

    c = campaign_status(args.id)
    if args.json:
        print(json.dumps(c.as_dict(), indent=2))
        return 0
    print(f"campaign  {c.id}" + (f"  {c.name!r}" if c.name else ""))
    window = f"   window {c.window} (recipient's time)" if c.window else ""
    print(f"state     {c.state}   provider {c.provider}{window}")
    reached = f"   line {c.last_line:,} reached" if c.state in ("loading", "interrupted") else ""
    print(f"rows      {c.total:,} stored, {c.invalid_count:,} skipped   segments {c.segments:,}{reached}")
    counts = "   ".join(f"{status} {n:,}" for status, n in sorted(c.counts.items(), key=lambda kv: -kv[1]))
    print(f"counts    {counts or '-'}")
    if c.rate_per_s:
        eta = f"; about {_duration(c.eta_seconds)} to finish" if c.eta_seconds is not None else ""
        print(f"rate      {c.rate_per_s:g}/s over the last minute{eta}")
    if c.not_before or c.not_after:
        print(f"times     not_before {c.not_before or '-'}   not_after {c.not_after or '-'}")
    if c.state == "interrupted":
        print("note      its loading stopped before the end of its input; nothing is sent until you act:")
        if c.idempotency_key:
            print(f"{'':<10}load the same file again with --idempotency-key {c.idempotency_key} (same options) "
                  f"to store the rest,")
        else:
            print(f"{'':<10}(it has no idempotency key: its loading cannot be resumed)")
        print(f"{'':<10}`dispatcher campaign resume {c.id}` to send the {c.total:,} row(s) stored,")
        print(f"{'':<10}or `dispatcher campaign cancel {c.id}`")
    for i, r in enumerate(c.invalid[:SHOWN_SKIPPED]):
        print(f"{'skipped' if i == 0 else '':<10}line {r.line}: {r.reason}")
    if c.invalid_count > SHOWN_SKIPPED:
        print(f"{'':<10}... {c.invalid_count - SHOWN_SKIPPED:,} more (--json lists up to 1,000)")
    return 0


def _cmd_control(args: argparse.Namespace) -> int:
    from . import campaigns

    action = {"pause": campaigns.pause_campaign, "resume": campaigns.resume_campaign,
              "cancel": campaigns.cancel_campaign}[args.verb]
    before = campaigns.campaign_status(args.id).state if args.verb == "resume" else None
    c = action(args.id)
    print(f"{c.id} {c.state}")
    if before == "interrupted":
        print(f"its loading had been interrupted: the {c.total:,} row(s) stored, up to line {c.last_line:,}, are "
              f"sent; the rest of the file is not", file=sys.stderr)
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from .campaigns import list_campaigns

    rows = list_campaigns(args.limit)
    if not rows:
        print("no campaigns")
    for c in rows:
        created = c.created_at.strftime("%Y-%m-%d %H:%M") if c.created_at else "-"
        print(f"{c.id}  {c.state:<11} {c.provider:<16} {c.total:>9,} rows  {created}  {c.name or ''}".rstrip())
    return 0


# --------------------------------------------------------------------------- helpers
def _timeout() -> str:
    from .campaigns import LOADER_TIMEOUT

    return f"{int(LOADER_TIMEOUT.total_seconds())} s"



class _Progress:
    """A progress bar over the bytes read, on standard error when it is a terminal (else nothing)."""

    def __init__(self, size: int | None) -> None:
        self.size = size
        self.bar: Any = None

    def __enter__(self) -> "_Progress":
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=self.size, unit="B", unit_scale=True, desc="loading rows", file=sys.stderr,
                            leave=False)
        return self

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


def _lines(stream: BinaryIO, bar: _Progress) -> Iterator[bytes]:
    pending = 0
    for line in stream:
        pending += len(line)
        if pending >= PROGRESS_STEP:
            bar.update(pending)
            pending = 0
        yield line
    bar.update(pending)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")

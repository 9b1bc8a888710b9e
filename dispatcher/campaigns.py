"""Bulk campaigns: one template to many recipients, loaded in chunks and fed to the broker.

    c = dispatcher.campaign("alerts", rows, "Hi {name}, see you at {time}", window="09:00-20:00")
    dispatcher.campaign_status(c.id).counts          # {"pending": 180000, "accepted": 20000, ...}
    dispatcher.pause_campaign(c.id); dispatcher.resume_campaign(c.id); dispatcher.cancel_campaign(c.id)

Loading streams: rows are read, validated (api.build_row: the very checks of send()),
rendered and stored `CHUNK` at a time, each chunk one executemany and one commit, so memory
stays flat whatever the size and the workers keep the store between chunks. A row that cannot
be sent is skipped and recorded with its line and reason; with `strict` any such row refuses
the whole campaign and whatever was stored of it is deleted again.

The messages wait in the store as `pending`; the campaign feeder (feeder.py, a step of the
beat tick) hands them to the broker as the account's limit, their window and the campaign's
state allow. The campaign's states:

    loading --(every row read)--> running --(nothing left waiting)--> done
    loading | running <--pause / resume--> paused        any but done --cancel--> cancelled
    loading --(its loader silent for LOADER_TIMEOUT)--> interrupted --resume--> running
    interrupted --(the same load again, same idempotency key)--> loading (goes on after the last line stored)

Pause and cancel hold at once for every worker: the claim (queries.claim) and the start record
just before each request (queries.mark_started) take a campaign's message only while its
campaign is `running`, and the messages already in the broker go back to `pending` (pause) or
end `cancelled` (cancel).

A loader proves it is alive: each chunk's transaction touches the campaign row (`updated_at`,
and `last_line`, the last input line stored or skipped), and a partial chunk is stored once
LOADER_BEAT passes without one. A campaign `loading` untouched for LOADER_TIMEOUT is taken as
interrupted (its process died) by the feeder. The same load again with the same idempotency
key takes it over and goes on after `last_line`: chunks commit in file order, so every line up
to it is stored. Each chunk is stored only while its loader's token is still the campaign's
(`loader`, a compare-and-set run first in the chunk's transaction), so a loader taken for dead
that wakes up stores nothing more, and of two re-runs racing only one takes over.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Callable, Iterable, Mapping

from . import runtime
from .api import row_values
from .csvrows import UnreadableRow
from .errors import InvalidTime, NotFound, TooLate, ValidationError
from .redact import mask
from .segments import count_segments
from .store import campaign_queries as cq
from .store.db import ensure_schema, session_scope
from .store.models import (
    CANCELLED,
    DONE,
    INTERRUPTED,
    LOADING,
    PAUSED,
    PENDING,
    QUEUED,
    RUNNING,
    Campaign as CampaignRow,
    Message as MessageRow,
    utcnow,
)
from .template import Template
from .window import Window, parse_window, zone, zones_for_number

log = logging.getLogger("dispatcher.campaigns")
CHUNK = 2000  # rows validated, rendered and stored per transaction
SHOWN_INVALID = 1000  # skipped rows listed by campaign()/campaign_status(); all are stored
SAMPLES = 3  # rendered rows a dry run shows
RATE_WINDOW = timedelta(seconds=60)  # the send rate is measured over this much of the recent past
TZ_COLUMN = "tz"
LOADER_BEAT = timedelta(seconds=5)  # a loader touches its campaign at least this often while rows come
LOADER_TIMEOUT = timedelta(seconds=60)  # a load untouched this long is taken as interrupted (its process died)
_COLUMNS = [c.name for c in MessageRow.__table__.columns]  # type: ignore[attr-defined]


@dataclass(frozen=True)
class InvalidRow:
    line: int
    reason: str


@dataclass(frozen=True)
class Sample:
    """A rendered row of a dry run (the recipient masked)."""

    line: int
    to: str
    text: str
    segments: int


@dataclass(frozen=True)
class Campaign:
    """A campaign as it stands. For a dry run `id` is None and `samples` holds rendered rows."""

    id: str | None
    name: str | None
    provider: str
    state: str
    total: int  # valid rows (stored, or that would be stored by a dry run)
    invalid: tuple[InvalidRow, ...]  # the first SHOWN_INVALID skipped rows, by line
    invalid_count: int
    segments: int
    counts: dict[str, int] = field(default_factory=dict)  # message status -> number
    window: str | None = None
    not_before: datetime | None = None
    not_after: datetime | None = None
    created_at: datetime | None = None
    created: bool = True  # False: the idempotency key was already used; this is the first campaign
    idempotency_key: str | None = None
    last_line: int = 0  # the last input line stored or skipped so far (where a resumed load goes on)
    resumed_after: int | None = None  # this call resumed an interrupted load after that line
    dry_run: bool = False
    samples: tuple[Sample, ...] = ()
    rate_per_s: float | None = None  # messages accepted per second lately
    eta_seconds: float | None = None  # time to send what still waits, at that rate

    def as_dict(self) -> dict[str, Any]:
        """The JSON form (`dispatcher campaign status --json`, the HTTP API)."""
        return {
            "id": self.id, "name": self.name, "provider": self.provider, "state": self.state, "total": self.total,
            "invalid": [{"line": r.line, "reason": r.reason} for r in self.invalid],
            "invalid_count": self.invalid_count, "segments": self.segments, "counts": dict(self.counts),
            "window": self.window, "not_before": _iso(self.not_before), "not_after": _iso(self.not_after),
            "created_at": _iso(self.created_at), "rate_per_s": self.rate_per_s, "eta_seconds": self.eta_seconds,
            "idempotency_key": self.idempotency_key, "last_line": self.last_line,
            **({"resumed_after": self.resumed_after} if self.resumed_after is not None else {}),
            **({"dry_run": True, "samples": [vars(s) for s in self.samples]} if self.dry_run else {}),
        }


class CampaignRefused(ValidationError):
    """`strict`: at least one row was invalid, so nothing of the campaign was stored."""

    def __init__(self, invalid: list[InvalidRow], invalid_count: int) -> None:
        self.invalid, self.invalid_count = tuple(invalid), invalid_count
        first = "; ".join(f"line {r.line}: {r.reason}" for r in invalid[:3])
        more = f" (and {invalid_count - 3} more)" if invalid_count > 3 else ""
        super().__init__("rows", f"{invalid_count} invalid row(s), so nothing was stored (strict): {first}{more}")


class LoadingTakenOver(TooLate):
    """This process's load went silent past LOADER_TIMEOUT and its campaign was taken over by the
    same load run again, or resumed as loaded: it stopped storing rows."""

    def __init__(self, campaign_id: str, state: str, last_line: int) -> None:
        self.campaign_id, self.state, self.last_line = campaign_id, state, last_line
        super().__init__(f"campaign {campaign_id}: this load was silent for more than "
                         f"{int(LOADER_TIMEOUT.total_seconds())} s, so it was taken as interrupted, and the campaign "
                         f"is now {state} (resumed as loaded, or its load taken over by another run); this run "
                         f"stopped after line {last_line} and stored nothing more: see `dispatcher campaign status "
                         f"{campaign_id}`")


# --------------------------------------------------------------------------- the Python API
def campaign(
    provider: str,
    rows: Iterable[Mapping[str, Any]],
    template: str,
    *,
    to_field: str = "to",
    name: str | None = None,
    idempotency_key: str | None = None,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    window: str | None = None,
    strict: bool = False,
    dry_run: bool = False,
    **options: Any,
) -> Campaign:
    """Store a campaign of `template` to every row of `rows`; returns it (with `.id`) once loaded.

    `rows` is any iterable of mappings (a generator over a database cursor works; a CSV via
    csvrows.read_csv keeps the file's line numbers). `to_field` names the recipient; every
    key is a template variable (`{name}`). `window` ("09:00-20:00") is read in each
    recipient's zone: a `tz` key gives it, else the number's prefix does. Options are the
    kind's extras, as for send(). Raises a ValidationError naming the field for a bad
    campaign (unknown account, bad template or window, naive datetime), CampaignRefused with
    `strict` and any bad row. The same `idempotency_key` again returns the first campaign;
    if that one's loading was interrupted (its process died), it goes on loading the rows
    after the last line stored (`.resumed_after`), with the same rows given again.
    """
    return create_campaign(provider, rows, template, to_field=to_field, name=name, idempotency_key=idempotency_key,
                           not_before=not_before, not_after=not_after, window=window, strict=strict,
                           dry_run=dry_run, options=options)


def create_campaign(
    provider: str,
    rows: Iterable[Mapping[str, Any]],
    template: str,
    *,
    to_field: str = "to",
    name: str | None = None,
    idempotency_key: str | None = None,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    window: str | Window | None = None,
    strict: bool = False,
    dry_run: bool = False,
    options: Mapping[str, Any] | None = None,
    clock: Callable[[], datetime] = utcnow,
    chunk: int = CHUNK,
) -> Campaign:
    """campaign() with the clock and chunk size injectable (tests, benchmarks)."""
    spec = _Spec.check(provider, template, to_field, name, idempotency_key, not_before, not_after, window,
                       dict(options or {}), getattr(rows, "columns", None), clock())
    if dry_run:
        return _dry_run(spec, rows, clock)
    s = runtime.settings()
    ensure_schema(s.database_url)
    now = clock()
    token = uuid.uuid4().hex
    row = CampaignRow(name=name, provider=provider, template=template, options=_json_options(spec.options),
                      to_field=to_field, state=LOADING, idempotency_key=idempotency_key, not_before=not_before,
                      not_after=not_after, window=str(spec.window) if spec.window else None, created_at=now,
                      updated_at=now, loader=token)
    resumed_after = None
    with session_scope(s.database_url) as db:
        stored, created = cq.add_campaign(db, row)
        campaign_id = stored.id
        if not created:
            resumed_after = _take_over(db, stored, row, token, now)
    if not created and resumed_after is None:
        log.info("campaign %s: idempotency key already used; nothing new stored", campaign_id)
        return campaign_status(campaign_id, created=False)
    loader = _Loader(spec, campaign_id, s.database_url, clock, chunk, strict, token, resumed_after or 0)
    loader.load(rows)
    return campaign_status(campaign_id, created=created, resumed_after=resumed_after)


def _take_over(db: Any, c: CampaignRow, asked: CampaignRow, token: str, now: datetime) -> int | None:
    """The same load again: take over the campaign's loading if it was interrupted (or its loader
    is silent past LOADER_TIMEOUT); returns the last line already stored, None if not taken."""
    if c.loaded_at is not None or c.state not in (INTERRUPTED, LOADING, PAUSED):
        return None
    if c.state != INTERRUPTED and c.updated_at >= now - LOADER_TIMEOUT:
        return None  # its loader is alive
    for label, field_name in (("provider", "provider"), ("template", "template"), ("to_column", "to_field"),
                              ("window", "window"), ("not_before", "not_before"), ("not_after", "not_after"),
                              ("options", "options")):
        if getattr(c, field_name) != getattr(asked, field_name):
            raise ValidationError(label, f"differs from the interrupted campaign {c.id} of this idempotency key: "
                                         f"load the rest with the same settings, or use a new key")
    last = cq.take_over(db, c.id, c.loader, token, now, now - LOADER_TIMEOUT)
    if last is not None:
        log.warning("campaign %s: resuming its interrupted loading after line %d (%d row(s) stored before)",
                    c.id, last, c.total)
    return last


def campaign_status(campaign_id: str, *, created: bool = True, resumed_after: int | None = None,
                    clock: Callable[[], datetime] = utcnow) -> Campaign:
    """The campaign with its counts per message status, send rate and time to finish."""
    with runtime.session() as db:
        c = cq.get_campaign(db, campaign_id)
        if c is None:
            raise NotFound(f"no campaign with id {campaign_id!r}")
        counts = cq.counts(db, campaign_id)
        invalid = [InvalidRow(line, reason) for line, reason in cq.errors(db, campaign_id, SHOWN_INVALID)]
        now = clock()
        since = now - RATE_WINDOW
        recent = cq.accepted_since(db, campaign_id, since) if counts.get("accepted") or counts.get("delivered") else 0
        first = cq.first_accepted(db, campaign_id) if recent else None
    rate = eta = None
    if recent and first is not None:
        span = max((now - max(first, since)).total_seconds(), 1.0)
        rate = round(recent / span, 2)
        waiting = sum(counts.get(st, 0) for st in cq.UNSETTLED_STATUSES)
        eta = round(waiting / rate, 1) if c.state in (RUNNING, LOADING) else None
    return Campaign(
        id=c.id, name=c.name, provider=c.provider, state=c.state, total=c.total, invalid=tuple(invalid),
        invalid_count=c.invalid_count, segments=c.segments, counts=counts, window=c.window, not_before=c.not_before,
        not_after=c.not_after, created_at=c.created_at, created=created, idempotency_key=c.idempotency_key,
        last_line=c.last_line, resumed_after=resumed_after, rate_per_s=rate, eta_seconds=eta,
    )


def list_campaigns(limit: int = 100) -> list[Campaign]:
    """The latest campaigns, newest first (without per-status counts: see campaign_status)."""
    with runtime.session() as db:
        rows = cq.list_campaigns(db, limit)
    return [Campaign(id=c.id, name=c.name, provider=c.provider, state=c.state, total=c.total, invalid=(),
                     invalid_count=c.invalid_count, segments=c.segments, window=c.window, not_before=c.not_before,
                     not_after=c.not_after, created_at=c.created_at, idempotency_key=c.idempotency_key,
                     last_line=c.last_line) for c in rows]


def pause_campaign(campaign_id: str, *, clock: Callable[[], datetime] = utcnow) -> Campaign:
    """No further message of the campaign is handed to a provider until resume_campaign().

    Takes hold at once on every worker: the claim and the start of each request need a running
    campaign, and what the broker already holds goes back to `pending`. Requests already
    written finish.
    Pausing a paused campaign changes nothing; a cancelled or done one raises TooLate.
    """
    now = clock()
    back = None
    with runtime.session() as db:  # (campaign_status after it: SQLite has one writer, this transaction)
        c = _existing(db, campaign_id)
        if c.state != PAUSED:
            if not cq.set_campaign(db, campaign_id, [RUNNING, LOADING], {"state": PAUSED, "updated_at": now}):
                raise TooLate(_interrupted_hint(c) if c.state == INTERRUPTED
                              else f"campaign {campaign_id} is already {c.state}; it cannot be paused")
            back = cq.move(db, campaign_id, [QUEUED], cq.back_to_pending(c.created_at, now))
    if back is not None:
        log.info("campaign %s paused (%d message(s) taken back from the broker)", campaign_id, back)
    return campaign_status(campaign_id)


def resume_campaign(campaign_id: str, *, clock: Callable[[], datetime] = utcnow) -> Campaign:
    """A paused campaign goes on where it stopped (the feeder hands its messages over again).

    An interrupted one is sent as loaded: it runs with the rows stored before its loader died
    (the rest of its input is not loaded any more)."""
    now = clock()
    with runtime.session() as db:  # (campaign_status after it: SQLite has one writer, this transaction)
        c = _existing(db, campaign_id)
        was = c.state
        if was == INTERRUPTED:
            if not cq.set_campaign(db, campaign_id, [INTERRUPTED], {"state": RUNNING, "loaded_at": now,
                                                                   "updated_at": now, "loader": None}):
                raise TooLate(f"campaign {campaign_id} changed meanwhile (its load was resumed, or it was "
                              f"cancelled): see `dispatcher campaign status {campaign_id}`")
        elif was not in (RUNNING, LOADING):
            state = RUNNING if c.loaded_at is not None else LOADING
            if not cq.set_campaign(db, campaign_id, [PAUSED], {"state": state, "updated_at": now}):
                raise TooLate(f"campaign {campaign_id} is already {c.state}; it cannot be resumed")
            cq.move(db, campaign_id, [QUEUED], cq.back_to_pending(c.created_at, now))  # strays of the pause
    if was == INTERRUPTED:
        log.warning("campaign %s: interrupted while loading; resumed with the %d row(s) stored up to line %d "
                    "(the rest of its input is not loaded)", campaign_id, c.total, c.last_line)
    elif was == PAUSED:
        log.info("campaign %s resumed", campaign_id)
    return campaign_status(campaign_id)


def cancel_campaign(campaign_id: str, *, clock: Callable[[], datetime] = utcnow) -> Campaign:
    """Every message of the campaign not yet handed to a provider ends `cancelled`; sent ones stay.

    Cancelling a cancelled campaign changes nothing; a done one raises TooLate.
    """
    now = clock()
    with runtime.session() as db:  # (campaign_status after it: SQLite has one writer, this transaction)
        c = _existing(db, campaign_id)
        if c.state != CANCELLED and not cq.set_campaign(db, campaign_id, [LOADING, INTERRUPTED, RUNNING, PAUSED],
                                                        {"state": CANCELLED, "updated_at": now}):
            raise TooLate(f"campaign {campaign_id} is already {c.state}; nothing is left to cancel")
    if c.state == CANCELLED:
        return campaign_status(campaign_id)
    cancelled = sweep_cancelled(campaign_id, now)
    log.info("campaign %s cancelled (%d message(s) will not be sent)", campaign_id, cancelled)
    return campaign_status(campaign_id)


def interrupt_stale_loads(db: Any, now: datetime) -> list[str]:
    """Mark `interrupted` every campaign still `loading` whose loader has not touched it for
    LOADER_TIMEOUT (its process died: killed, machine lost); the feeder's rounds call this.
    Nothing of it is sent until it is resumed or its load is run again (same idempotency key)."""
    stale_before = now - LOADER_TIMEOUT
    marked: list[str] = []
    for c in cq.stale_loads(db, stale_before):
        if cq.interrupt(db, c.id, stale_before, now):
            marked.append(c.id)
            log.warning("campaign %s: its loading stopped (no sign of its loader since %s): interrupted with %d "
                        "row(s) stored, up to line %d; the same load again with its idempotency key stores the "
                        "rest, `dispatcher campaign resume %s` sends what is stored, or cancel it",
                        c.id, c.updated_at.isoformat(), c.total, c.last_line, c.id)
    return marked


def sweep_cancelled(campaign_id: str, now: datetime, chunk: int = 20000) -> int:
    """End a cancelled campaign's waiting messages as `cancelled`, a chunk per transaction (so
    the workers keep the store between them); the claim guard already stops them all."""
    url = runtime.settings().database_url
    values = {"status": CANCELLED, "finished_at": now, "updated_at": now, "error_code": "cancelled",
              "error": "the campaign was cancelled before this message was sent"}
    total = 0
    while True:
        with session_scope(url) as db:
            moved = cq.move(db, campaign_id, cq.WAITING_STATUSES, values, chunk)
        total += moved
        if moved < chunk:
            return total


def _interrupted_hint(c: CampaignRow) -> str:
    """What the user can do with an interrupted campaign."""
    again = (f"load the same file again with --idempotency-key {c.idempotency_key} to store the rest"
             if c.idempotency_key else "(it has no idempotency key, so its load cannot be resumed)")
    return (f"campaign {c.id} was interrupted while loading ({c.total} row(s) stored, up to line {c.last_line}): "
            f"resume it to send those, cancel it, or {again}")


def _existing(db: Any, campaign_id: str) -> CampaignRow:
    c = cq.get_campaign(db, campaign_id)
    if c is None:
        raise NotFound(f"no campaign with id {campaign_id!r}")
    return c


# --------------------------------------------------------------------------- checking and loading
@dataclass
class _Spec:
    """What every row of a campaign shares, checked once before any row is read."""

    provider: str
    template: Template
    to_field: str
    not_before: datetime | None
    not_after: datetime | None
    window: Window | None
    options: dict[str, Any]

    @classmethod
    def check(cls, provider: str, template: str, to_field: str, name: str | None, idempotency_key: str | None,
              not_before: datetime | None, not_after: datetime | None, window: str | Window | None,
              options: dict[str, Any], columns: list[str] | None, now: datetime) -> "_Spec":
        if not isinstance(provider, str) or not provider:
            raise ValidationError("provider", "must be the name of a configured provider account")
        runtime.settings().account(provider)  # UnknownProvider names the configured accounts
        tmpl = Template(template)
        if not isinstance(to_field, str) or not to_field:
            raise ValidationError("to_column", "must name the column holding the recipient")
        if name is not None and (not isinstance(name, str) or len(name) > 200):
            raise ValidationError("name", "must be a string of at most 200 characters")
        if idempotency_key is not None and (not isinstance(idempotency_key, str) or not 0 < len(idempotency_key) <= 200):
            raise ValidationError("idempotency_key", "must be a string of 1 to 200 characters")
        for label, value in (("not_before", not_before), ("not_after", not_after)):
            if value is not None and (not isinstance(value, datetime) or value.utcoffset() is None):
                raise InvalidTime(label, "must be a timezone-aware datetime")
        if not_after is not None and not_after <= now:
            raise InvalidTime("not_after", "is already in the past")
        if not_before is not None and not_after is not None and not_after <= not_before:
            raise InvalidTime("not_after", "must be later than not_before")
        if columns is not None:
            if to_field not in columns:
                raise ValidationError("to_column", f"no column {to_field!r} in the header (columns: {', '.join(columns)})")
            missing = [f for f in tmpl.fields if f not in columns]
            if missing:
                raise ValidationError("template", f"uses {{{missing[0]}}}, which is not a column of the file "
                                                  f"(columns: {', '.join(columns)})")
        return cls(provider, tmpl, to_field, not_before, not_after, parse_window(window), options)


class _Invalid(Exception):
    """One row that cannot be sent: why."""


def _prepare(spec: _Spec, item: Any, line: int, now: datetime) -> dict[str, Any]:
    """Validate and render one row into a message row (a dict of column values); raises _Invalid.

    The checks are send()'s own (api.row_values, the body of api.build_row)."""
    if isinstance(item, UnreadableRow):
        raise _Invalid(item.reason)
    if not isinstance(item, Mapping):
        raise _Invalid(f"not a mapping of column to value ({type(item).__name__})")
    to = item.get(spec.to_field)
    to = to.strip() if isinstance(to, str) else (None if to is None else str(to))
    try:
        text = spec.template.render(item)
        values = row_values(spec.provider, to or "", text, not_before=spec.not_before, not_after=spec.not_after,
                            options=spec.options)
    except ValidationError as exc:
        raise _Invalid(f"{spec.to_field}: {exc.rule}" if exc.field == "to" else str(exc)) from None
    due = max(now, spec.not_before) if spec.not_before is not None else now
    tz = None
    if spec.window is not None:
        given = item.get(TZ_COLUMN)
        if isinstance(given, str) and given.strip():
            try:
                tz = zone(given.strip())
            except ValidationError as exc:
                raise _Invalid(str(exc)) from None
            zones: tuple[str, ...] | None = (tz,)
        else:
            zones = zones_for_number(values["to"])
            if zones is None:
                raise _Invalid(f"{spec.to_field}: no time zone is known for this number: give a {TZ_COLUMN} column")
        opens = spec.window.next_open(due, zones)
        if opens is None:
            raise _Invalid(f"{spec.to_field}: the number spans time zones ({', '.join(zones)}) that never share the "
                           f"window {spec.window}: give a {TZ_COLUMN} column")
        due = opens
    values.update(status=PENDING, due_at=due, campaign_line=line, tz=tz)
    return values


def _numbered(rows: Iterable[Any]) -> Iterable[tuple[int, Any]]:
    """(line, row): the row's own line when it has one (csvrows), else its 1-based position."""
    for position, item in enumerate(rows, start=1):
        yield getattr(item, "line", None) or position, item


class _Loader:
    """Reads rows into the store a chunk at a time (see the module docstring); `after`: the rows
    up to that line are stored already (a resumed load) and are read past."""

    def __init__(self, spec: _Spec, campaign_id: str, url: str, clock: Callable[[], datetime], chunk: int,
                 strict: bool, token: str, after: int = 0) -> None:
        self.spec, self.id, self.url, self.clock, self.chunk, self.strict = spec, campaign_id, url, clock, chunk, strict
        self.token, self.after, self.last_line = token, after, after
        self.invalid: list[InvalidRow] = []
        self.invalid_count = 0
        self.stopped = False  # cancelled while loading
        self._defaults: dict[str, Any] | None = None

    def load(self, rows: Iterable[Any]) -> None:
        try:
            self._read(rows)
        except LoadingTakenOver:
            raise  # the campaign is another loader's now (or is sent as it is): nothing of it is deleted
        except BaseException:
            log.exception("campaign %s: loading failed; deleting what was stored of it", self.id)
            self._delete()
            raise
        if self.strict and self.invalid_count:
            self._delete()
            raise CampaignRefused(self.invalid, self.invalid_count)
        now = self.clock()
        with session_scope(self.url) as db:
            if not cq.finish_loading(db, self.id, self.token, now):
                raise self._taken_over(db)
        if self.stopped:
            sweep_cancelled(self.id, now)

    def _read(self, rows: Iterable[Any]) -> None:
        good: list[dict[str, Any]] = []
        bad: list[tuple[int, str]] = []
        now = beat = self.clock()
        for line, item in _numbered(rows):
            if line > self.after:
                try:
                    values = _prepare(self.spec, item, line, now)
                except _Invalid as exc:
                    bad.append((line, str(exc)))
                    self.invalid_count += 1
                    if len(self.invalid) < SHOWN_INVALID:
                        self.invalid.append(InvalidRow(line, str(exc)))
                else:
                    if not (self.strict and self.invalid_count):  # strict: nothing more is stored after a bad row
                        good.append(self._complete(values))
            # a full chunk, or a slow source: store what there is, which also shows the loader is alive
            if len(good) + len(bad) >= self.chunk or self.clock() - beat >= LOADER_BEAT:
                if not self._store(good, bad):
                    return
                good, bad = [], []
                now = beat = self.clock()
        self._store(good, bad)

    def _complete(self, values: dict[str, Any]) -> dict[str, Any]:
        """The message row to insert: the values given over the model's defaults. Columns that
        stay NULL are left out (the same for every row, as an executemany needs): half of the
        columns, and half of the per-row work of binding parameters."""
        if self._defaults is None:
            model = MessageRow(**values)
            self._defaults = {c: getattr(model, c) for c in _COLUMNS
                              if c in values or getattr(model, c) is not None}
        row = dict(self._defaults)
        row.update(values, campaign_id=self.id)
        return row

    def _store(self, good: list[dict[str, Any]], bad: list[tuple[int, str]]) -> bool:
        """Store one chunk in one transaction, only while this loader still loads the campaign;
        False once it was cancelled meanwhile. Raises LoadingTakenOver when another took it over."""
        from .store import queries

        if self.strict and self.invalid_count:
            good, bad = [], []  # strict: nothing more is stored after a bad row (the loader still beats)
        last = max([v["campaign_line"] for v in good[-1:]] + [line for line, _ in bad[-1:]], default=None)
        segments = sum(v["segments"] for v in good)
        with session_scope(self.url) as db:
            if not cq.add_chunk(db, self.id, self.token, len(good), len(bad), segments, last, self.clock()):
                c = cq.get_campaign(db, self.id)
                if c is None or c.state == CANCELLED:
                    self.stopped = True
                    return False
                if not (c.state == INTERRUPTED and cq.reclaim(db, self.id, self.token, self.clock())):
                    raise self._taken_over(db)
                log.warning("campaign %s: its loader was slow, not dead: loading goes on after line %d",
                            self.id, self.last_line)
                cq.add_chunk(db, self.id, self.token, len(good), len(bad), segments, last, self.clock())
            queries.add_messages(db, good)
            cq.add_errors(db, self.id, bad)
        self.last_line = last or self.last_line
        return True

    def _taken_over(self, db: Any) -> "LoadingTakenOver":
        c = cq.get_campaign(db, self.id)
        state = c.state if c is not None else "deleted"
        log.error("campaign %s: this loader was silent for more than %s and its campaign is now %s (another load "
                  "took it over, or it was resumed as loaded): it stops after line %d", self.id, LOADER_TIMEOUT,
                  state, self.last_line)
        return LoadingTakenOver(self.id, state, self.last_line)

    def _delete(self) -> None:
        """Delete what this load stored, only while the campaign is still this loader's and not
        loaded: fenced as `cancelled` first, so nobody resumes or takes it over meanwhile."""
        with session_scope(self.url) as db:
            mine = cq.give_up_loading(db, self.id, self.token, self.clock())
        if not mine:
            log.error("campaign %s: this load failed after another took the campaign over (or it was resumed "
                      "as loaded); nothing of it is deleted", self.id)
            return
        while True:
            with session_scope(self.url) as db:
                if not cq.delete_campaign(db, self.id, 20000):
                    return


def _dry_run(spec: _Spec, rows: Iterable[Any], clock: Callable[[], datetime]) -> Campaign:
    now = clock()
    total = segments = invalid_count = 0
    invalid: list[InvalidRow] = []
    samples: list[Sample] = []
    for line, item in _numbered(rows):
        try:
            values = _prepare(spec, item, line, now)
        except _Invalid as exc:
            invalid_count += 1
            if len(invalid) < SHOWN_INVALID:
                invalid.append(InvalidRow(line, str(exc)))
            continue
        total += 1
        segments += values["segments"]
        if len(samples) < SAMPLES:
            text = values["text"] or ""
            samples.append(Sample(line, mask(values["to"]), text, count_segments(text).count))
    return Campaign(id=None, name=None, provider=spec.provider, state="dry-run", total=total, invalid=tuple(invalid),
                    invalid_count=invalid_count, segments=segments, window=str(spec.window) if spec.window else None,
                    not_before=spec.not_before, not_after=spec.not_after, dry_run=True, samples=tuple(samples))


def _json_options(options: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (v if isinstance(v, (str, int, float, bool, list, dict, type(None))) else str(v)) for k, v in options.items()}


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None

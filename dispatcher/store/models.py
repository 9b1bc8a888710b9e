"""SQLModel tables: messages, their send attempts, delivery events, and bulk campaigns.

Times are stored as UTC and always come back timezone-aware (see UTCDateTime).
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from typing import Any, Optional

from sqlalchemy import JSON, Column, DateTime, Index, String, Text, TypeDecorator, UniqueConstraint, text
from sqlmodel import Field, SQLModel


class UTCDateTime(TypeDecorator):
    """Aware datetimes in, aware UTC datetimes out, on SQLite and PostgreSQL alike."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Optional[datetime], dialect: Any) -> Optional[datetime]:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Optional[datetime], dialect: Any) -> Optional[datetime]:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


# A random (version 4) UUID: 122 random bits, the version and variant bits set as RFC 9562 says.
_UUID4_KEEP = ~((0xF000 << 64) | (0xC000 << 48)) & ((1 << 128) - 1)
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)


def new_id() -> str:
    """A new row id: a version 4 UUID as 32 hex digits (what `uuid.uuid4().hex` gives, in half
    the time: send_many() makes one per message)."""
    return "%032x" % (int.from_bytes(os.urandom(16), "big") & _UUID4_KEEP | _UUID4_SET)


def new_attempt_key() -> str:
    """A new attempt key: a version 4 UUID in its usual 36-character form (`str(uuid.uuid4())`)."""
    h = "%032x" % (int.from_bytes(os.urandom(16), "big") & _UUID4_KEEP | _UUID4_SET)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# Statuses (interface.md). FINAL ones never change back.
SCHEDULED, QUEUED, SENDING, ACCEPTED = "scheduled", "queued", "sending", "accepted"
DELIVERED, FAILED, REJECTED, EXPIRED, CANCELLED, UNKNOWN = (
    "delivered", "failed", "rejected", "expired", "cancelled", "unknown",
)
# A campaign's message waiting in the store for its turn: only the campaign feeder (feeder.py)
# moves it to `queued`, as the account's limit, the sending window and the campaign's state allow.
PENDING = "pending"
FINAL = frozenset({DELIVERED, FAILED, REJECTED, EXPIRED, CANCELLED, UNKNOWN})
WAITING = frozenset({SCHEDULED, QUEUED})


def _dt(**kw: Any) -> Any:
    return Field(default=None, sa_column=Column(UTCDateTime(), **kw))


def _partial(name: str, *columns: str, where: str) -> Index:
    """An index of the rows that satisfy `where` (a partial index, on PostgreSQL and SQLite)."""
    return Index(name, *columns, postgresql_where=text(where), sqlite_where=text(where))


class Message(SQLModel, table=True):
    __tablename__ = "messages"
    __table_args__ = (
        Index("ix_messages_status_due", "status", "due_at"),
        # The next three hold only the rows with a value there, the only rows their queries look for:
        # every status change writes an entry in each index that takes the row (migration 0008).
        _partial("ix_messages_provider_ref", "provider", "provider_ref", where="provider_ref IS NOT NULL"),  # webhooks find a message by the provider's id
        _partial("ix_messages_claimed_by", "claimed_by", where="claimed_by IS NOT NULL"),  # the reaper finds a dead worker's claims
        # the feeder takes a campaign's next due rows in file order; status counts per campaign
        _partial("ix_messages_campaign", "campaign_id", "status", "due_at", "campaign_line", where="campaign_id IS NOT NULL"),
        UniqueConstraint("idempotency_key", name="uq_messages_idempotency_key"),
        # On PostgreSQL migration 0008 also leaves 30% of each page free (fillfactor 70): a start
        # (started_at alone) is then rewritten in place, touching no index.
    )

    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    provider: str = Field(max_length=100, index=True)  # the account name
    kind: str = Field(max_length=32)
    to: str = Field(max_length=64)
    text: Optional[str] = Field(default=None, sa_column=Column(Text))
    options: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    status: str = Field(default=QUEUED, max_length=16)
    segments: int = 0
    idempotency_key: Optional[str] = Field(default=None, sa_column=Column(String(200), nullable=True))
    not_before: Optional[datetime] = _dt()
    not_after: Optional[datetime] = _dt()
    due_at: Optional[datetime] = _dt()  # when the message may next go (release / retry time)
    attempts: int = 0  # send attempts made so far
    attempt_key: Optional[str] = Field(default=None, max_length=64)  # request id of the current attempt
    provider_ref: Optional[str] = Field(default=None, max_length=200)
    provider_status: Optional[str] = Field(default=None, max_length=64)
    cost: Optional[float] = None
    cost_currency: Optional[str] = Field(default=None, max_length=8)
    error_code: Optional[str] = Field(default=None, max_length=100)
    error: Optional[str] = Field(default=None, sa_column=Column(Text))
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False))
    updated_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False))
    claimed_at: Optional[datetime] = _dt()
    # The current claim (see README "What survives a failure"): which claim and worker process
    # hold the message while it is `sending`, and whether its request may have started.
    claim_token: Optional[str] = Field(default=None, max_length=32)
    claimed_by: Optional[str] = Field(default=None, max_length=64)
    started_at: Optional[datetime] = _dt()  # set (compare-and-set) just before the request is written
    key_exposed: bool = False  # attempt_key may have reached the provider: never replace it
    enqueued_at: Optional[datetime] = _dt()  # last time a task for it was published (lost-task sweep)
    accepted_at: Optional[datetime] = _dt()
    finished_at: Optional[datetime] = _dt()
    # A campaign's message (campaigns.py): its campaign, its line in the file, and the time zone
    # its sending window is read in when a `tz` column gave one (else the number's own zones).
    campaign_id: Optional[str] = Field(default=None, max_length=32)
    campaign_line: Optional[int] = None
    tz: Optional[str] = Field(default=None, max_length=64)


class Attempt(SQLModel, table=True):
    """One settled send attempt: its claim, its key, whether its request started, its result.

    Never a credential, only what the wire showed.
    """

    __tablename__ = "attempts"

    id: Optional[int] = Field(default=None, primary_key=True)
    message_id: str = Field(foreign_key="messages.id", index=True, max_length=32)
    number: int
    started_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    http_status: Optional[int] = None
    # accepted | retry | throttled | rejected | unknown | recovered (a dead worker's claim, settled by the reaper)
    outcome: str = Field(max_length=16)
    claim_token: Optional[str] = Field(default=None, max_length=32)
    worker: Optional[str] = Field(default=None, max_length=64)
    attempt_key: Optional[str] = Field(default=None, max_length=64)
    request_started: bool = True  # False: the claim ended before any byte of the request left
    provider_code: Optional[str] = Field(default=None, max_length=100)
    detail: Optional[str] = Field(default=None, sa_column=Column(Text))
    latency_ms: float = 0.0


class Worker(SQLModel, table=True):
    """A live worker process: its heartbeat tells the reaper within seconds that it died."""

    __tablename__ = "workers"

    id: str = Field(primary_key=True, max_length=64)
    host: str = Field(max_length=200)
    pid: int
    started_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    last_seen: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))


class Event(SQLModel, table=True):
    """A delivery event, stored once per (message, provider event id)."""

    __tablename__ = "events"
    __table_args__ = (UniqueConstraint("message_id", "event_id", name="uq_events_message_event"),)

    id: Optional[int] = Field(default=None, primary_key=True)
    message_id: str = Field(foreign_key="messages.id", index=True, max_length=32)
    event_id: str = Field(max_length=200)
    status: str = Field(max_length=16)
    provider_status: str = Field(max_length=64)
    occurred_at: Optional[datetime] = _dt()
    recorded_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False))
    detail: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class Schedule(SQLModel, table=True):
    """A recurring reminder: a cron expression in its own time zone, and the message to send."""

    __tablename__ = "schedules"

    name: str = Field(primary_key=True, max_length=100)
    cron: str = Field(max_length=100)
    tz: str = Field(max_length=64)
    provider: str = Field(max_length=100)
    to: str = Field(max_length=64)
    text: Optional[str] = Field(default=None, sa_column=Column(Text))
    options: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    until: Optional[datetime] = _dt()
    cursor: str = Field(max_length=19)  # the last local wall-clock time handled, "YYYY-MM-DDTHH:MM:SS"
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False))


# Campaign states (interface.md "Bulk campaigns").
LOADING, RUNNING, PAUSED, DONE = "loading", "running", "paused", "done"
INTERRUPTED = "interrupted"  # its loading process stopped beating before every row was read
CAMPAIGN_STATES = (LOADING, INTERRUPTED, RUNNING, PAUSED, CANCELLED, DONE)


class Campaign(SQLModel, table=True):
    """One template sent to many recipients; its rows are messages with its `campaign_id`."""

    __tablename__ = "campaigns"
    __table_args__ = (
        UniqueConstraint("idempotency_key", name="uq_campaigns_idempotency_key"),
        Index("ix_campaigns_state", "state"),
    )

    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    name: Optional[str] = Field(default=None, max_length=200)
    provider: str = Field(max_length=100)
    template: str = Field(sa_column=Column(Text, nullable=False))
    options: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    to_field: str = Field(default="to", max_length=100)
    state: str = Field(default=LOADING, max_length=16)
    idempotency_key: Optional[str] = Field(default=None, sa_column=Column(String(200), nullable=True))
    not_before: Optional[datetime] = _dt()
    not_after: Optional[datetime] = _dt()
    window: Optional[str] = Field(default=None, max_length=11)  # "HH:MM-HH:MM" in each recipient's time
    total: int = 0  # valid rows stored
    invalid_count: int = 0
    segments: int = 0  # SMS parts of every stored row together
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False))
    updated_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False))
    loaded_at: Optional[datetime] = _dt()  # every row read
    loader: Optional[str] = Field(default=None, max_length=32)  # the token of the process loading it (a fence)
    last_line: int = 0  # the last input line stored or skipped (chunks commit in file order)
    finished_at: Optional[datetime] = _dt()  # nothing of it waits any more (done, or cancelled and swept)


class CampaignError(SQLModel, table=True):
    """A row of a campaign's input that was skipped: its line and why."""

    __tablename__ = "campaign_errors"

    id: Optional[int] = Field(default=None, primary_key=True)
    campaign_id: str = Field(max_length=32, index=True)
    line: int
    reason: str = Field(sa_column=Column(Text, nullable=False))

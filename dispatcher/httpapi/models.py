"""The HTTP API's bodies as pydantic models: what handlers parse and answer, and what
/openapi.json describes (openapi.py reads the same classes; nothing is written twice).

These models check only the JSON's shape (a string where a string belongs, no unknown
field); the rules of a send (addresses, lengths, times, options) are dispatcher.api's, so
the HTTP API refuses exactly what send() refuses, in the same words.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field

from ..api import Message
from ..redact import hide_url_secrets

MAX_BATCH = 1000


class MessageIn(BaseModel):
    """One message to send: the arguments of `dispatcher.send()`."""

    model_config = ConfigDict(extra="forbid")

    provider: str = Field(description="the provider account (a name from the config)")
    to: str = Field(description="what the kind addresses: an E.164 number, an ICCID, an esimTranNo or an endpoint id")
    text: Optional[str] = Field(default=None, description="the message text (a template may stand instead)")
    not_before: Optional[datetime] = Field(default=None, description="ISO 8601 with a zone: hold the message until then")
    not_after: Optional[datetime] = Field(default=None, description="ISO 8601 with a zone: never send it after then")
    options: Optional[dict[str, Any]] = Field(
        default=None, description="the kind's extras: sender_id, route, source_address, template_id, variables, "
                                  "client_id, callback_url, esim_id, iccid, from")

    def send_args(self) -> dict[str, Any]:
        return {"provider": self.provider, "to": self.to, "text": self.text, "not_before": self.not_before,
                "not_after": self.not_after, "options": dict(self.options or {})}


class BatchIn(BaseModel):
    """Up to 1,000 messages, stored together or not at all."""

    model_config = ConfigDict(extra="forbid")

    messages: list[MessageIn] = Field(min_length=1, max_length=MAX_BATCH)


class EventOut(BaseModel):
    """A delivery event, as the provider reported it."""

    event_id: str
    status: str
    provider_status: str
    occurred_at: Optional[datetime]
    detail: dict[str, Any]


class AttemptOut(BaseModel):
    """One send attempt and its outcome."""

    number: int
    started_at: datetime
    outcome: str
    http_status: Optional[int]
    provider_code: Optional[str]
    detail: Optional[str]
    latency_ms: float


class MessageOut(BaseModel):
    """A message: where it is and how it got there (events and attempts oldest first)."""

    id: str
    provider: str
    kind: str
    to: str
    text: Optional[str]
    status: str = Field(description="scheduled | queued | sending | accepted | delivered | failed | rejected | "
                                    "expired | cancelled | unknown")
    segments: int
    options: dict[str, Any]
    provider_ref: Optional[str]
    provider_status: Optional[str]
    error_code: Optional[str]
    error: Optional[str]
    not_before: Optional[datetime]
    not_after: Optional[datetime]
    idempotency_key: Optional[str]
    cost: Optional[float]
    cost_currency: Optional[str]
    created_at: datetime
    updated_at: datetime
    accepted_at: Optional[datetime]
    finished_at: Optional[datetime]
    events: list[EventOut]
    attempts: list[AttemptOut]

    @classmethod
    def of(cls, msg: Message) -> "MessageOut":
        return cls(
            id=msg.id, provider=msg.provider, kind=msg.kind, to=msg.to, text=msg.text, status=msg.status,
            segments=msg.segments, options=_shown_options(msg.options), provider_ref=msg.provider_ref,
            provider_status=msg.provider_status, error_code=msg.error_code, error=msg.error,
            not_before=msg.not_before, not_after=msg.not_after, idempotency_key=msg.idempotency_key,
            cost=msg.cost, cost_currency=msg.cost_currency, created_at=msg.created_at, updated_at=msg.updated_at,
            accepted_at=msg.accepted_at, finished_at=msg.finished_at,
            events=[EventOut(event_id=e.event_id, status=e.status, provider_status=e.provider_status,
                             occurred_at=e.occurred_at, detail=e.detail) for e in msg.events],
            attempts=[AttemptOut(number=a.number, started_at=a.started_at, outcome=a.outcome,
                                 http_status=a.http_status, provider_code=a.provider_code, detail=a.detail,
                                 latency_ms=a.latency_ms) for a in msg.attempt_log],
        )

    @classmethod
    def of_values(cls, values: dict[str, Any]) -> "MessageOut":
        """A message just stored from its column values (dispatcher.api.row_values)."""
        fields = {name: values.get(name) for name in cls.model_fields if name not in ("events", "attempts")}
        fields["options"] = _shown_options(values.get("options") or {})
        return cls(events=[], attempts=[], **fields)


class BatchOut(BaseModel):
    """The stored messages' ids, in the order they were given."""

    ids: list[str]


class ErrorDetail(BaseModel):
    field: Optional[str] = Field(description="the field, header or part of the request at fault, when one is")
    message: str = Field(description="what is wrong and the rule it breaks")


class ErrorOut(BaseModel):
    """Every refusal: `field` names what is wrong, `message` says the rule."""

    error: ErrorDetail


class Health(BaseModel):
    status: str


def _shown_options(options: dict[str, Any]) -> dict[str, Any]:
    """Options as a client may see them: a token in a callback URL is starred."""
    return {k: hide_url_secrets(v) for k, v in options.items()}


# --------------------------------------------------------------------------- campaigns
class CampaignQuery(BaseModel):
    """The options of `dispatcher campaign create`, as query parameters of POST /v1/campaigns."""

    model_config = ConfigDict(extra="forbid")

    provider: str = Field(description="the provider account")
    template: str = Field(description="the text, with {column} placeholders")
    to_column: str = Field(default="to", description="the column holding the recipient")
    name: Optional[str] = None
    idempotency_key: Optional[str] = Field(
        default=None, description="the same key again returns the first campaign (200) and stores nothing new; if "
                                  "its loading was interrupted, the same CSV again loads the rest (201, "
                                  "`resumed_after`)")
    not_before: Optional[datetime] = Field(default=None, description="ISO 8601 with a zone: start no earlier")
    not_after: Optional[datetime] = Field(default=None, description="ISO 8601 with a zone: what is unsent then expires")
    window: Optional[str] = Field(default=None, description="HH:MM-HH:MM in each recipient's local time")
    strict: bool = Field(default=False, description="any bad row refuses the whole campaign (422, nothing stored)")
    dry_run: bool = Field(default=False, description="check and count; store and send nothing (200)")
    opt: list[str] = Field(default_factory=list,
                           description="a kind option as KEY=VALUE, repeatable (a value starting with { or [ is JSON)")


class InvalidRowOut(BaseModel):
    line: int = Field(description="the CSV file's own line (the header is line 1)")
    reason: str


class SampleOut(BaseModel):
    line: int
    to: str
    text: str
    segments: int


class CampaignOut(BaseModel):
    """A campaign as it stands (`dispatcher campaign status --json`)."""

    id: Optional[str] = Field(description="null for a dry run")
    name: Optional[str]
    provider: str
    state: str = Field(description="loading | interrupted | running | paused | cancelled | done; `interrupted`: "
                                   "its loading stopped before the end of the CSV (the loading process died); "
                                   "resume sends what was stored, the same load again (same idempotency key) "
                                   "stores the rest")
    total: int = Field(description="valid rows stored (or that a dry run would store)")
    invalid: list[InvalidRowOut] = Field(description="skipped rows (the first 1,000)")
    invalid_count: int
    segments: int
    counts: dict[str, int] = Field(description="message status -> number")
    window: Optional[str]
    not_before: Optional[datetime]
    not_after: Optional[datetime]
    created_at: Optional[datetime]
    rate_per_s: Optional[float] = Field(description="messages accepted per second lately")
    eta_seconds: Optional[float] = Field(description="time to send what still waits, at that rate")
    idempotency_key: Optional[str] = None
    last_line: int = Field(default=0, description="the last CSV line stored or skipped so far (the header is line 1)")
    resumed_after: Optional[int] = Field(
        default=None, description="this request resumed an interrupted load after this line")
    dry_run: bool = False
    samples: list[SampleOut] = Field(default_factory=list, description="rendered rows of a dry run")

    @classmethod
    def of(cls, c: Any) -> "CampaignOut":
        """From a dispatcher.campaigns.Campaign."""
        return cls(id=c.id, name=c.name, provider=c.provider, state=c.state, total=c.total,
                   invalid=[InvalidRowOut(line=r.line, reason=r.reason) for r in c.invalid],
                   invalid_count=c.invalid_count, segments=c.segments, counts=dict(c.counts), window=c.window,
                   not_before=c.not_before, not_after=c.not_after, created_at=c.created_at,
                   rate_per_s=c.rate_per_s, eta_seconds=c.eta_seconds, idempotency_key=c.idempotency_key,
                   last_line=c.last_line, resumed_after=c.resumed_after, dry_run=c.dry_run,
                   samples=[SampleOut(line=s.line, to=s.to, text=s.text, segments=s.segments) for s in c.samples])

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

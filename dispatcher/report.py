"""Human-readable and JSON views of a message, for `dispatcher status` and the demo.

Both show a token inside a URL (a message's own callback_url) and a URL's password as ***.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from .api import Message
from .redact import hide_secrets_in, mask


def message_as_dict(msg: Message) -> dict[str, Any]:
    data = asdict(msg)
    data["attempts"] = data.pop("attempt_log")
    return hide_secrets_in(data)


def _t(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z" if value else "-"


def format_message(msg: Message, *, full_address: bool = True) -> str:
    to = msg.to if full_address else mask(msg.to)
    lines = [
        f"message   {msg.id}",
        f"status    {msg.status}" + (f"  ({msg.error_code}: {msg.error})" if msg.error_code else ""),
        f"provider  {msg.provider} ({msg.kind})   to {to}   segments {msg.segments}",
        f"ref       {msg.provider_ref or '-'}" + (f"   cost {msg.cost} {msg.cost_currency or ''}" if msg.cost is not None else ""),
        f"created   {_t(msg.created_at)}   accepted {_t(msg.accepted_at)}   finished {_t(msg.finished_at)}",
    ]
    if msg.not_before or msg.not_after:
        lines.append(f"window    not_before {_t(msg.not_before)}   not_after {_t(msg.not_after)}")
    if msg.attempt_log:
        lines.append("attempts")
        for a in msg.attempt_log:
            http = a.http_status if a.http_status is not None else "-"
            lines.append(f"  #{a.number} {_t(a.started_at)} http {http} {a.outcome} {a.provider_code or ''} "
                         f"{a.latency_ms:.0f} ms {a.detail or ''}".rstrip())
    if msg.events:
        lines.append("events")
        for e in msg.events:
            lines.append(f"  {_t(e.occurred_at)} {e.status:<10} {e.provider_status}")
    return hide_secrets_in("\n".join(lines))

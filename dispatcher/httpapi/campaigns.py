"""The campaign calls of the HTTP API: create from a CSV body, read, pause, resume, cancel.

They call the Python campaign API (dispatcher.campaigns) and answer `CampaignOut`, the form
of `dispatcher campaign status --json`. POST /v1/campaigns takes the CSV as a `text/csv` body
(up to 64 MiB) and the options of `dispatcher campaign create` as query parameters; it answers
once every row is loaded: 201 with the campaign, 200 for a dry run or an idempotency key
already used, 422 for a bad campaign (or, with `strict`, any bad row: nothing stored). The
key of a campaign whose loading was interrupted (the loading process died) loads the rest of
the CSV: 201 with `resumed_after`, the line after which it went on.
"""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any, Callable

from aiohttp import web

from .. import campaigns
from ..csvrows import read_csv
from .common import IDEMPOTENCY_DOC, IDEMPOTENCY_HEADER, Refusal, Reply, allow, idempotency_key, key_of, query_params
from .models import CampaignOut, CampaignQuery, ErrorOut
from .openapi import Route

MAX_CSV = 64 * 1024 * 1024
CSV = "text/csv"


async def post_campaign(request: web.Request) -> Reply:
    """Load a campaign from the CSV body and start sending (201), as `dispatcher campaign create`."""
    q = query_params(request, CampaignQuery)
    allow(key_of(request), q.provider, "provider")
    body = await _csv_body(request)
    header_key = idempotency_key(request)
    if header_key is not None and q.idempotency_key is not None and header_key != q.idempotency_key:
        raise Refusal(422, IDEMPOTENCY_HEADER, "differs from the query's idempotency_key: give one of them")
    options = _options(q.opt)

    def create() -> Any:
        return campaigns.create_campaign(
            q.provider, read_csv(io.BytesIO(body)), q.template, to_field=q.to_column, name=q.name,
            idempotency_key=q.idempotency_key or header_key, not_before=q.not_before, not_after=q.not_after,
            window=q.window, strict=q.strict, dry_run=q.dry_run, options=options)

    c = await asyncio.to_thread(create)
    stored = c.created or c.resumed_after is not None
    return Reply(201 if stored and not c.dry_run else 200, CampaignOut.of(c))


async def get_campaign(request: web.Request) -> Reply:
    """The campaign: state, rows stored and skipped, counts per message status, rate."""
    return Reply(200, CampaignOut.of(await _own_campaign(request)))


async def pause_campaign(request: web.Request) -> Reply:
    """No further message of the campaign goes to the provider until it is resumed."""
    return await _control(request, campaigns.pause_campaign)


async def resume_campaign(request: web.Request) -> Reply:
    """A paused campaign goes on where it stopped; an interrupted one is sent with the rows stored."""
    return await _control(request, campaigns.resume_campaign)


async def cancel_campaign(request: web.Request) -> Reply:
    """The campaign's unsent messages end `cancelled`; sent ones are untouched."""
    return await _control(request, campaigns.cancel_campaign)


async def _own_campaign(request: web.Request) -> Any:
    c = await asyncio.to_thread(campaigns.campaign_status, request.match_info["id"])
    allow(key_of(request), c.provider, "provider")
    return c


async def _control(request: web.Request, action: Callable[[str], Any]) -> Reply:
    await _own_campaign(request)
    return Reply(200, CampaignOut.of(await asyncio.to_thread(action, request.match_info["id"])))


async def _csv_body(request: web.Request) -> bytes:
    if request.content_type != CSV:
        raise Refusal(415, "Content-Type", f"must be {CSV}, got {request.content_type or 'none'}")
    too_large = Refusal(413, "body", f"must be at most {MAX_CSV} bytes (64 MiB)")
    if (request.content_length or 0) > MAX_CSV:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > MAX_CSV:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _options(pairs: list[str]) -> dict[str, Any]:
    """`opt=KEY=VALUE` pairs as send() options (a value starting with { or [ is JSON), as `--opt` reads them."""
    options: dict[str, Any] = {}
    for text in pairs:
        key, sep, raw = text.partition("=")
        if not sep or not key:
            raise Refusal(422, "opt", f"expected KEY=VALUE, got {text!r}")
        if raw[:1] in ("{", "["):
            try:
                options[key] = json.loads(raw)
            except ValueError:
                raise Refusal(422, "opt", f"{key}: the value looks like JSON but does not parse") from None
        else:
            options[key] = raw
    return options


_OWN = {200: CampaignOut, 403: ErrorOut, 404: ErrorOut}
CAMPAIGN_ROUTES = (
    Route("POST", "/v1/campaigns", post_campaign, "Create a campaign from a CSV body",
          {201: CampaignOut, 200: CampaignOut, 403: ErrorOut}, raw_body=CSV, query=CampaignQuery,
          headers=IDEMPOTENCY_DOC,
          description="The CSV has a header row; `to_column` names the recipient column, every other column is a "
                      "template variable. Rows that cannot be sent are skipped and listed with their line (the "
                      "header is line 1); with `strict=true` any bad row refuses the campaign (422, nothing "
                      "stored). Answers once the rows are loaded: 201, or 200 for `dry_run=true` or an "
                      "idempotency key already used. The key of a campaign whose loading was interrupted (state "
                      "`interrupted`, or `loading` with no sign of its loader for 60 s) loads the rest of the same "
                      "CSV, after the last line stored: 201 with `resumed_after`."),
    Route("GET", "/v1/campaigns/{id}", get_campaign, "A campaign: state, rows, counts per status", _OWN),
    Route("POST", "/v1/campaigns/{id}/pause", pause_campaign, "Pause a campaign", {**_OWN, 409: ErrorOut}),
    Route("POST", "/v1/campaigns/{id}/resume", resume_campaign,
          "Resume a paused campaign, or send an interrupted one as loaded", {**_OWN, 409: ErrorOut}),
    Route("POST", "/v1/campaigns/{id}/cancel", cancel_campaign, "Cancel a campaign's unsent messages",
          {**_OWN, 409: ErrorOut}),
)

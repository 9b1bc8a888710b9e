"""The message calls of the HTTP API: send one, send a batch, read one, cancel one; liveness."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from .. import api
from ..errors import ValidationError
from .common import (IDEMPOTENCY_DOC, IDEMPOTENCY_HEADER, Refusal, Reply, allow, idempotency_key, json_body, key_of,
                     one_writer)
from .group_commit import GroupCommit
from .models import BatchIn, BatchOut, ErrorOut, Health, MessageIn, MessageOut
from .openapi import Route

MAX_BATCH_KEY = 190  # a batch's key gets "#<index>" per message; stored keys hold 200 characters
COMMITS = web.AppKey("commits", GroupCommit)


async def post_message(request: web.Request) -> Reply:
    """Store and enqueue one message (201), or with a used Idempotency-Key return the first (200)."""
    msg = await json_body(request, MessageIn)
    allow(key_of(request), msg.provider, "provider")
    args = msg.send_args()
    provider, to, text = args.pop("provider"), args.pop("to"), args.pop("text")
    idem = idempotency_key(request)
    if idem is None:
        values = api.row_values(provider, to, text, **args)
        await request.app[COMMITS].add(values)
        return Reply(201, MessageOut.of_values(values))
    try:
        row = api.build_row(provider, to, text, idempotency_key=idem, **args)
    except ValidationError as exc:
        if exc.field == "idempotency_key":
            raise Refusal(422, IDEMPOTENCY_HEADER, exc.rule) from None
        raise
    stored, new = await asyncio.to_thread(one_writer(api.store_one), row)
    return Reply(201 if new else 200, MessageOut.of(stored))


async def post_batch(request: web.Request) -> Reply:
    """Store and enqueue up to 1,000 messages in one transaction; one invalid refuses them all."""
    batch = await json_body(request, BatchIn)
    key = key_of(request)
    for index, msg in enumerate(batch.messages):
        allow(key, msg.provider, f"messages[{index}].provider")
    items = [msg.send_args() for msg in batch.messages]
    idem = idempotency_key(request)
    if idem is not None:
        if not 0 < len(idem) <= MAX_BATCH_KEY:
            raise Refusal(422, IDEMPOTENCY_HEADER, f"must be 1 to {MAX_BATCH_KEY} characters for a batch")
        for index, item in enumerate(items):
            item["idempotency_key"] = f"{idem}#{index}"
    ids, new = await asyncio.to_thread(one_writer(_send_batch), items)
    return Reply(201 if new else 200, BatchOut(ids=ids))


def _send_batch(items: list[dict[str, Any]]) -> tuple[list[str], bool]:
    """send_many(): the ids in input order (with idempotency keys, those stored under them) and
    whether every message was new."""
    ids, new = api.store_many(api.build_many(items))
    return ids, new == len(items)


async def get_message(request: web.Request) -> Reply:
    """The message with its status, delivery events and attempts."""
    msg = await asyncio.to_thread(api.get, request.match_info["id"])
    allow(key_of(request), msg.provider, "provider")
    return Reply(200, MessageOut.of(msg))


async def cancel_message(request: web.Request) -> Reply:
    """Cancel a message not yet handed to the provider (200); 409 once it is with the provider."""
    message_id = request.match_info["id"]
    msg = await asyncio.to_thread(api.get, message_id)
    allow(key_of(request), msg.provider, "provider")
    return Reply(200, MessageOut.of(await asyncio.to_thread(api.cancel, message_id)))


async def healthz(request: web.Request) -> Reply:
    """Liveness: answers without a key."""
    return Reply(200, Health(status="ok"))


MESSAGE_ROUTES = (
    Route("POST", "/v1/messages", post_message, "Send one message", {201: MessageOut, 200: MessageOut, 403: ErrorOut},
          body=MessageIn, headers=IDEMPOTENCY_DOC),
    Route("POST", "/v1/messages/batch", post_batch, "Send up to 1,000 messages",
          {201: BatchOut, 200: BatchOut, 403: ErrorOut}, body=BatchIn, headers=IDEMPOTENCY_DOC,
          description="One invalid message refuses the whole batch (422 naming `messages[i]`); the ids come "
                      "back in the order given. With an Idempotency-Key, message i is stored under `KEY#i`."),
    Route("GET", "/v1/messages/{id}", get_message, "A message, its events and attempts",
          {200: MessageOut, 403: ErrorOut, 404: ErrorOut}),
    Route("POST", "/v1/messages/{id}/cancel", cancel_message, "Cancel a message not yet with the provider",
          {200: MessageOut, 403: ErrorOut, 404: ErrorOut, 409: ErrorOut}),
    Route("GET", "/healthz", healthz, "Liveness (no key needed)", {200: Health}, public=True),
)

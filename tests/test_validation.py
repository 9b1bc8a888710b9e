"""Bad input is refused before anything is stored or queued, with the field and the rule named."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

import dispatcher
from dispatcher.store.db import session_scope
from dispatcher.store.models import Message


def stored_count() -> int:
    from sqlalchemy import func, select

    from dispatcher import runtime
    from dispatcher.store.db import ensure_schema

    ensure_schema(runtime.settings().database_url)
    with session_scope(runtime.settings().database_url) as db:
        return db.execute(select(func.count()).select_from(Message)).scalar_one()


NOW = datetime.now(timezone.utc)


@pytest.mark.parametrize(
    "args, kwargs, error, field",
    [
        (("nobody", "+14155550123", "hi"), {}, dispatcher.UnknownProvider, "provider"),
        (("alerts", "0044 20 7946", "hi"), {}, dispatcher.InvalidAddress, "to"),
        (("alerts", "+14155550123", "x" * 161), {}, dispatcher.TextTooLong, "text"),
        (("alerts", "+14155550123", None), {}, dispatcher.MissingField, "text"),
        (("alerts", "+14155550123", "hi"), {"colour": "red"}, dispatcher.InvalidOption, "colour"),
        (("alerts", "+14155550123", "hi"), {"client_id": "c" * 101}, dispatcher.InvalidOption, "client_id"),
        (("alerts", "+14155550123", "hi"), {"not_before": datetime(2030, 1, 1)}, dispatcher.InvalidTime, "not_before"),
        (("alerts", "+14155550123", "hi"),
         {"not_before": NOW + timedelta(hours=2), "not_after": NOW + timedelta(hours=1)}, dispatcher.InvalidTime, "not_after"),
        (("alerts", "+14155550123", "hi"), {"not_after": NOW - timedelta(hours=1)}, dispatcher.InvalidTime, "not_after"),
        (("alerts", "+14155550123", "hi"), {"template_id": "t1"}, dispatcher.ValidationError, "template_id"),
    ],
)
def test_bad_input_raises_naming_the_field_and_stores_nothing(dispatcher_env, args, kwargs, error, field):
    before = stored_count()
    with pytest.raises(error) as err:
        dispatcher.send(*args, **kwargs)
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}: ")
    assert stored_count() == before


def test_send_many_refuses_the_whole_batch_naming_the_item(dispatcher_env):
    items = [{"provider": "alerts", "to": "+14155550123", "text": "ok"},
             {"provider": "alerts", "to": "+14155550124", "text": "y" * 200}]
    with pytest.raises(dispatcher.TextTooLong, match=r"messages\[1\]\.text"):
        dispatcher.send_many(items)
    assert stored_count() == 0


def test_a_message_held_for_later_waits_in_the_store_not_the_broker(dispatcher_env, redis_client, redis_prefix):
    msg = dispatcher.send("alerts", "+14155550123", "later", not_before=NOW + timedelta(days=3))
    assert msg.status == "scheduled"
    keys = [k.decode() for k in redis_client.scan_iter(f"{redis_prefix}*")]
    queued = sum(redis_client.llen(k) for k in keys if redis_client.type(k) == b"list")
    assert queued == 0  # no task (let alone an ETA task) was published for it

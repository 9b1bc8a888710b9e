"""Recurring reminders, driven by an injected clock: once per occurrence, grace, DST in Europe/London."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select

import dispatcher
from dispatcher import runtime
from dispatcher.cli import main
from dispatcher.recurring import fire_due
from dispatcher.schedule import tick
from dispatcher.store.db import session_scope
from dispatcher.store.models import Message

UTC = timezone.utc


def at(*args) -> datetime:
    return datetime(*args, tzinfo=UTC)


def stored() -> list[tuple[str, datetime]]:
    """(idempotency key, not_before) of every message the schedules produced, in order."""
    with session_scope(runtime.settings().database_url) as db:
        rows = db.execute(select(Message.idempotency_key, Message.not_before).order_by(Message.not_before)).all()
    return [(k, nb) for k, nb in rows]


def ignore(ids, countdown):
    pass


def test_each_occurrence_is_sent_once_however_many_beats_run(dispatcher_env):
    dispatcher.add_schedule("pill", "0 8 * * *", "UTC", "alerts", "+14155550123", "Take your pill",
                            clock=lambda: at(2030, 1, 1, 12))
    for _ in range(3):  # three beats at the same moment, then again a little later
        fire_due(at(2030, 1, 2, 8, 0, 1))
    tick(clock=lambda: at(2030, 1, 2, 8, 0, 30), enqueue=ignore)
    assert stored() == [("schedule:pill:2030-01-02T08:00:00", at(2030, 1, 2, 8))]


def test_a_missed_occurrence_is_sent_late_within_grace_and_skipped_beyond(dispatcher_env, caplog):
    dispatcher.add_schedule("hourly", "0 * * * *", "UTC", "alerts", "+14155550123", "tick",
                            clock=lambda: at(2030, 1, 1, 0, 30))
    # everything was down from 00:30 until 03:30; grace is one hour: 01:00 and 02:00 are too old
    fire_due(at(2030, 1, 1, 3, 30))
    assert [k for k, _ in stored()] == ["schedule:hourly:2030-01-01T03:00:00"]
    assert "2030-01-01T01:00:00" in caplog.text and "skipped" in caplog.text


def test_dst_in_london_fires_the_expected_instants_once_each(dispatcher_env):
    dispatcher.add_schedule("night", "30 1 * * *", "Europe/London", "alerts", "+14155550123", "01:30 local",
                            clock=lambda: at(2026, 3, 27, 12))
    day = at(2026, 3, 27, 12)
    while day < at(2026, 3, 31):
        day += timedelta(minutes=15)
        fire_due(day)
    spring = [nb for _, nb in stored()]
    assert spring == [
        at(2026, 3, 28, 1, 30),  # 01:30 GMT
        at(2026, 3, 29, 1, 0),  # 01:30 does not exist that night: the next valid instant, 02:00 BST
        at(2026, 3, 30, 0, 30),  # 01:30 BST
    ]
    dispatcher.remove_schedule("night")
    dispatcher.add_schedule("autumn", "30 1 * * *", "Europe/London", "alerts", "+14155550123", "01:30 local",
                            clock=lambda: at(2026, 10, 23, 12))
    day = at(2026, 10, 23, 12)
    while day < at(2026, 10, 27):
        day += timedelta(minutes=15)
        fire_due(day)
    autumn = [nb for k, nb in stored() if k.startswith("schedule:autumn")]
    assert autumn == [
        at(2026, 10, 24, 0, 30),  # 01:30 BST
        at(2026, 10, 25, 0, 30),  # 01:30 happens twice that night: sent once, the first time
        at(2026, 10, 26, 1, 30),  # 01:30 GMT
    ]


def test_until_ends_a_schedule(dispatcher_env):
    dispatcher.add_schedule("short", "0 9 * * *", "UTC", "alerts", "+14155550123", "x",
                            until=at(2030, 1, 3, 0), clock=lambda: at(2030, 1, 1, 0))
    for d in range(1, 6):
        fire_due(at(2030, 1, d, 9, 0, 5))
    assert [nb for _, nb in stored()] == [at(2030, 1, 1, 9), at(2030, 1, 2, 9)]


@pytest.mark.parametrize("kwargs, field", [
    ({"cron": "61 * * * *"}, "cron"),
    ({"tz": "Mars/Olympus"}, "tz"),
    ({"text": "x" * 200}, "text"),
    ({"provider": "nobody"}, "provider"),
])
def test_a_bad_schedule_is_refused_naming_the_field(dispatcher_env, kwargs, field):
    args = dict(name="bad", cron="0 9 * * *", tz="UTC", provider="alerts", to="+14155550123", text="hi")
    args.update(kwargs)
    with pytest.raises(dispatcher.ValidationError) as err:
        dispatcher.add_schedule(**args)
    assert err.value.field == field
    assert dispatcher.list_schedules() == []


def test_schedule_commands_add_list_and_remove(dispatcher_env, capsys):
    assert main(["schedule", "add", "standup", "--cron", "0 9 * * 1-5", "--tz", "Europe/London",
                 "--provider", "alerts", "--to", "+14155550123", "--text", "Stand-up"]) == 0
    capsys.readouterr()
    assert main(["schedule", "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("standup: '0 9 * * 1-5' in Europe/London")
    assert len(out) == 4 and all("09:00 Europe/London" in line and "UTC" in line for line in out[1:])
    assert main(["schedule", "remove", "standup"]) == 0
    assert main(["schedule", "remove", "standup"]) == 2

"""One bad row never stops the beat's work for the others.

* A cron expression with no next date (30 February) is refused by `schedule add` (exit 2, one
  line naming --cron, nothing stored).
* A stored schedule that went bad (no next date, its account removed from the config, a
  required default gone, a zone no longer known) is logged with its name and skipped by the
  beat, and `schedule list` shows it as broken; the other schedules go on.
* A message of an account removed from the config, or one whose status answer cannot be read,
  is logged with its id and set aside by the status poller; every other account is polled.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select, update

import dispatcher
from dispatcher import runtime
from dispatcher.cli import main
from dispatcher.dispatch import dispatch_batch
from dispatcher.recurring import fire_due, list_schedules
from dispatcher.status import poll
from dispatcher.store.models import Message, Schedule, utcnow

from .conftest import write_config

UTC = timezone.utc
NOFROM = """
[providers.nofrom]
kind = "emsgnow"
base_url = "{url}"
api_key = "{key}"
"""


def messages() -> list[Message]:
    with runtime.session() as db:
        return list(db.execute(select(Message).order_by(Message.created_at)).scalars())


# --------------------------------------------------------------------------- schedules
def test_a_cron_expression_with_no_next_date_is_refused_and_nothing_is_stored(dispatcher_env, capsys):
    code = main(["schedule", "add", "r1", "--cron", "0 9 30 2 *", "--tz", "UTC", "--provider", "alerts",
                 "--to", "+14155550123", "--text", "never"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "cron" in err and "no next date" in err
    assert main(["schedule", "list"]) == 0
    assert capsys.readouterr().out.strip() == "no schedules"
    with pytest.raises(dispatcher.ValidationError) as e:
        dispatcher.add_schedule("r2", "0 9 31 4 *", "UTC", "alerts", "+14155550123", "never")
    assert e.value.field == "cron"
    assert list_schedules() == []


def _insert(name: str, *, cron: str = "* * * * *", tz: str = "UTC", provider: str = "alerts",
            options: dict | None = None) -> None:
    """A schedule row as an older release (or a config since changed) may have left it."""
    with runtime.session() as db:
        db.add(Schedule(name=name, cron=cron, tz=tz, provider=provider, to="+14155550123", text=f"from {name}",
                        options={"from": "ACME"} if options is None else options, cursor="2030-01-01T11:55:00",
                        created_at=datetime(2030, 1, 1, 11, 55, tzinfo=UTC)))


@pytest.fixture()
def bad_schedules(dispatcher_env, sandbox, broker_down, monkeypatch):
    """One good schedule among four that went bad; 'nofrom' lost its account's `from` default."""
    extra = NOFROM.format(url=sandbox.base_url("emsgnow"), key=sandbox.credentials("emsgnow")["api_key"])
    monkeypatch.setenv("DISPATCHER_CONFIG", write_config(dispatcher_env / "s.toml", sandbox, extra=extra))
    runtime.configure(None)
    _insert("a-nodate", cron="0 9 30 2 *")
    _insert("b-gone", provider="gone")
    _insert("c-nozone", tz="Mars/Olympus_Mons")
    _insert("d-nofrom", provider="nofrom", options={})
    _insert("e-good")
    _insert("f-good-too", cron="*/2 * * * *")


def test_bad_stored_schedules_are_logged_and_skipped_and_the_others_fire(bad_schedules, caplog, capsys):
    caplog.set_level(logging.WARNING, logger="dispatcher")
    now = datetime(2030, 1, 1, 12, 0, 30, tzinfo=UTC)
    assert fire_due(now) == 5 + 3  # e-good 11:56..12:00, f-good-too 11:56, 11:58, 12:00
    assert {m.idempotency_key.split(":")[1] for m in messages()} == {"e-good", "f-good-too"}
    for name, reason in [("a-nodate", "no next date"), ("b-gone", "gone"), ("c-nozone", "Mars/Olympus_Mons"),
                         ("d-nofrom", "from")]:
        lines = [r.getMessage() for r in caplog.records if f"schedule {name}" in r.getMessage()]
        assert lines and reason in lines[0], (name, lines)
    caplog.clear()
    assert fire_due(now + timedelta(seconds=60)) == 1  # 12:01 for e-good; the bad ones are still skipped
    assert main(["schedule", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("a-nodate", "b-gone", "c-nozone", "d-nofrom"):
        line = next(line for line in out.splitlines() if line.startswith(f"{name}:"))
        assert "BROKEN" in line, line
    assert "e-good: '* * * * *' in UTC via alerts" in out and "BROKEN" not in out.split("e-good:")[1]
    views = {v.name: v for v in list_schedules()}
    assert views["e-good"].broken is None and len(views["e-good"].upcoming) == 3
    assert "no next date" in views["a-nodate"].broken and views["a-nodate"].upcoming == ()


def test_a_broken_schedule_is_logged_once_not_at_every_tick(bad_schedules, caplog):
    caplog.set_level(logging.WARNING, logger="dispatcher")
    now = datetime(2030, 1, 1, 12, 0, 30, tzinfo=UTC)
    for second in range(5):
        fire_due(now + timedelta(seconds=second))
    assert len([r for r in caplog.records if "schedule b-gone" in r.getMessage()]) == 1


# --------------------------------------------------------------------------- status polling
def _accepted(provider: str, to: str) -> str:
    msg = dispatcher.send(provider, to, "poll me")
    assert dispatch_batch([msg.id]).statuses[msg.id] == "accepted"
    return msg.id


@pytest.fixture()
def removed_account(dispatcher_env, sandbox, broker_down, monkeypatch):
    """Accepted messages of three accounts; then the config loses 'africa'."""
    from .all_kinds import accounts_toml

    for kind in ("emsgnow", "esms_africa", "emnify"):
        sandbox.configure(kind, delivery_step=0.01, rate_limit=None)
    monkeypatch.setenv("DISPATCHER_CONFIG", write_config(dispatcher_env / "all.toml", sandbox,
                                                         extra=accounts_toml(sandbox)))
    runtime.configure(None)
    ids = {"africa": _accepted("africa", "+254712345678"), "alerts": _accepted("alerts", "+14155550123"),
           "iot": _accepted("iot", "12345")}
    monkeypatch.setenv("DISPATCHER_CONFIG", write_config(dispatcher_env / "less.toml", sandbox))  # alerts only
    runtime.configure(None)
    return ids


def test_a_message_of_a_removed_account_never_stops_polling_for_the_others(removed_account, caplog):
    caplog.set_level(logging.WARNING, logger="dispatcher")
    ids = removed_account
    report = poll(clock=lambda: utcnow() + timedelta(seconds=5))
    assert dispatcher.get(ids["alerts"]).events, "alerts was polled"
    assert report.polled == 1
    for account in ("africa", "iot"):
        line = next(r.getMessage() for r in caplog.records if ids[account] in r.getMessage())
        assert account in line and "not configured" in line
        m = dispatcher.get(ids[account])
        assert m.status == "accepted"  # nothing written off: the account may come back
    with runtime.session() as db:  # set aside for a while, so that it does not crowd the due list
        due = {i: d for i, d in db.execute(select(Message.id, Message.due_at)).all()}
    assert due[ids["africa"]] > utcnow() + timedelta(minutes=5)


def test_an_answer_that_cannot_be_read_is_logged_with_the_message_and_the_rest_go_on(
        dispatcher_env, sandbox, broker_down, monkeypatch, caplog):
    from dispatcher import intake, status

    sandbox.configure("emsgnow", delivery_step=0.01, rate_limit=None)
    first = _accepted("alerts", "+14155550123")
    second = _accepted("alerts", "+14155550124")
    real = intake.apply_events

    def choke_on_first(db, message_id, events, now):
        if message_id == first:
            raise ValueError("an event the store cannot take")
        return real(db, message_id, events, now)

    monkeypatch.setattr(status, "apply_events", choke_on_first)
    caplog.set_level(logging.WARNING, logger="dispatcher")
    poll(clock=lambda: utcnow() + timedelta(seconds=5))
    assert dispatcher.get(second).events, "the second message's events were stored"
    assert any(first in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert dispatcher.get(first).status == "accepted"

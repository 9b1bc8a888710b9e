"""Input no database can hold, and addresses with something after them, are refused before storing.

A lone surrogate cannot be encoded as UTF-8 and PostgreSQL holds no NUL character: each would
reach the database driver and fail there with the driver's own error. They are refused in
send() instead, naming the field (text, to, an option, idempotency_key), on SQLite and
PostgreSQL alike. An address must be the whole string: "12345\\n" is not an endpoint id.
"""

from __future__ import annotations

import pytest
from sqlalchemy import func, select, text

import dispatcher
from dispatcher import runtime
from dispatcher.store.db import session_scope
from dispatcher.store.models import Message

from .all_kinds import VALID_TO, accounts_toml
from .conftest import write_config


@pytest.fixture(params=["sqlite", "postgresql"])
def kinds_env(request, dispatcher_env, sandbox, broker_down, monkeypatch):
    """Every kind configured; the store is SQLite or this session's PostgreSQL schema (emptied)."""
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_url")
        from dispatcher.store.db import upgrade

        upgrade(url)
        with session_scope(url) as db:
            for table in ("events", "attempts", "messages"):
                db.execute(text(f"DELETE FROM {table}"))
        monkeypatch.setenv("DISPATCHER_DATABASE_URL", url)
    monkeypatch.setenv("DISPATCHER_CONFIG", write_config(dispatcher_env / "kinds.toml", sandbox,
                                                         extra=accounts_toml(sandbox)))
    runtime.configure(None)
    return request.param


def stored() -> int:
    with runtime.session() as db:
        return db.execute(select(func.count()).select_from(Message)).scalar_one()


LONE = "\ud800"
NUL = "\x00"


@pytest.mark.parametrize("bad", [LONE, NUL, "\udfff"], ids=["high-surrogate", "nul", "low-surrogate"])
@pytest.mark.parametrize(
    "field, call",
    [
        ("text", lambda bad: dispatcher.send("alerts", "+14155550123", f"hello {bad} there")),
        ("to", lambda bad: dispatcher.send("alerts", f"+1415555{bad}0123", "hi")),
        ("idempotency_key", lambda bad: dispatcher.send("alerts", "+14155550123", "hi", idempotency_key=f"k-{bad}")),
        ("client_id", lambda bad: dispatcher.send("alerts", "+14155550123", "hi", client_id=f"c{bad}")),
        ("variables", lambda bad: dispatcher.send("alerts", "+14155550123", template_id="t1",
                                                  variables={"name": f"Ada{bad}"})),
        ("variables", lambda bad: dispatcher.send("alerts", "+14155550123", template_id="t1",
                                                  variables={f"na{bad}me": "Ada"})),
        ("sender_id", lambda bad: dispatcher.send("africa", "+254712345678", "hi", sender_id=f"Me{bad}")),
        ("text", lambda bad: dispatcher.send("iot", "12345", f"reboot{bad}")),
    ],
)
def test_text_the_database_cannot_hold_is_refused_naming_the_field(kinds_env, field, call, bad):
    with pytest.raises(dispatcher.ValidationError) as err:
        call(bad)
    assert err.value.field == field
    assert stored() == 0


def test_send_many_names_the_item_and_the_field(kinds_env):
    items = [{"provider": "alerts", "to": "+14155550123", "text": "fine"},
             {"provider": "alerts", "to": "+14155550123", "text": f"bad{NUL}"}]
    with pytest.raises(dispatcher.ValidationError) as err:
        dispatcher.send_many(items)
    assert err.value.field == "messages[1].text"
    assert stored() == 0


def test_the_same_text_without_the_bad_character_is_stored_exactly(kinds_env):
    msg = dispatcher.send("alerts", "+14155550123", "h\u00e9llo \U0001f600 \u200b\t\u0007 there")
    assert dispatcher.get(msg.id).text == "h\u00e9llo \U0001f600 \u200b\t\u0007 there"


# --------------------------------------------------------------------------- whole-string addresses
@pytest.mark.parametrize(
    "account, to, options, field",
    [
        ("alerts", "+14155550123\n", {}, "to"),
        ("alerts", "+1415555\u0663123", {}, "to"),  # an Arabic-Indic digit is no E.164 digit
        ("africa", "+254712345678\n", {}, "to"),
        ("iot", "12345\n", {}, "to"),
        ("iot", "12345", {"source_address": "ACME\n"}, "source_address"),
        ("fly", "8948010010036785060\n", {}, "to"),
        ("fly", "89480100100367850\u0666\u0660", {}, "to"),
        ("access", "23072017992029\n", {}, "to"),
        ("access", "", {"iccid": "8948010010036785060\n"}, "iccid"),
        ("fly", "", {"esim_id": "1" * 100}, "esim_id"),  # PostgreSQL's `to` column holds 64 characters
        ("fly", "", {"esim_id": 10**80}, "esim_id"),
    ],
)
def test_an_address_must_be_the_whole_string(kinds_env, account, to, options, field):
    with pytest.raises(dispatcher.ValidationError) as err:
        dispatcher.send(account, to, "hi", **options)
    assert err.value.field == field
    assert stored() == 0


@pytest.mark.parametrize("account", sorted(VALID_TO))
def test_the_valid_address_of_each_kind_is_still_taken(kinds_env, account):
    msg = dispatcher.send(account, VALID_TO[account][1], "hi")
    assert dispatcher.get(msg.id).to == VALID_TO[account][1]


@pytest.mark.parametrize(
    "items, field, error",
    [
        ([{"provider": "nobody", "to": "+14155550123", "text": "hi"}], "messages[0].provider", dispatcher.UnknownProvider),
        ([{"provider": "alerts", "to": "+14155550123", "text": "hi"}, "not a mapping"], "messages[1]",
         dispatcher.ValidationError),
        ([{"provider": "alerts", "to": "+14155550123", "text": "hi", "options": ["from", "x"]}], "messages[0].options",
         dispatcher.ValidationError),
        ([{"to": "+14155550123", "text": "hi"}], "messages[0].provider", dispatcher.ValidationError),
    ],
)
def test_send_many_names_the_item_of_any_refusal(kinds_env, items, field, error):
    with pytest.raises(error) as err:
        dispatcher.send_many(items)
    assert err.value.field == field and str(err.value).startswith(f"{field}: ")
    assert stored() == 0

"""Property-based tests of every way in: send(), the command line, the config file, the webhook receiver.

Whatever comes in (any Unicode, lone surrogates, control characters, huge strings, wrong types)
is either stored exactly as given (read back with dispatcher.get) or refused with a
ValidationError naming the field (the CLI: exit 2 and one line) -- never another exception,
never a crash, never a 500 from the receiver. Example counts are kept modest (the file runs in
about half a minute); `PROP_EXAMPLES=1000` searches harder. Cases the properties found are pinned
as plain tests below each property.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import re
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import jwt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select, text as sql

import dispatcher
from dispatcher import runtime
from dispatcher.cli import main
from dispatcher.config import load_settings
from dispatcher.errors import ConfigError
from dispatcher.providers import adapter_class
from dispatcher.store.db import session_scope
from dispatcher.store.models import Message

from .all_kinds import VALID_TO, accounts_toml
from .conftest import write_config

FEW = settings(max_examples=40, deadline=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                      HealthCheck.data_too_large])
SOME = settings(FEW, max_examples=int(os.environ.get("PROP_EXAMPLES", 60)))  # PROP_EXAMPLES=1000 to search harder

# --------------------------------------------------------------------------- strategies
ANY_CHAR = st.characters(exclude_categories=())  # lone surrogates and control characters included
NASTY = ["", " ", "\x00", "\ud800", "\udfff", "\n", "\r\n", "\t", "\x1b[31m", "\u202e", "\ufeff", "\u200b",
         "\U0001f600", "e\u0301", "\uffff", "\U0010ffff", "null", "None", "0", "-1", "${HOME}", "%s", "{}", "'\";--",
         "+14155550123\n", "12345\n", "\u0663\u0663\u0663"]
any_text = st.one_of(
    st.text(ANY_CHAR, max_size=40),
    st.sampled_from(NASTY),
    st.text(st.characters(codec="utf-8"), max_size=300),
    st.builds(lambda c, n: c * n, st.sampled_from(["a", "\u00e9", "\U0001f600", "\x00", "7"]), st.integers(0, 120_000)),
)
wrong_type = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.binary(max_size=8),
                       st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
                       st.just(object()), st.just(datetime(2030, 1, 1)))
json_value = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**64, 2**64), st.floats(), any_text),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(any_text, inner, max_size=3)),
    max_leaves=6,
)
OPTION_NAMES = sorted({o for kind in ("esimfly", "esimaccess", "emnify", "esms_africa", "emsgnow")
                       for o in adapter_class(kind).options} - {"from_", "sender"})
option_names = st.one_of(st.sampled_from(OPTION_NAMES), st.text(ANY_CHAR, min_size=1, max_size=8))
option_values = st.one_of(any_text, json_value, wrong_type, st.integers(1, 10**30).map(str))
ACCOUNTS = sorted(VALID_TO)
zones = st.sampled_from([None, timezone.utc, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8))])
times = st.one_of(st.none(), st.datetimes(min_value=datetime(1990, 1, 1), max_value=datetime(2200, 1, 1),
                                          timezones=zones), wrong_type)


def address_for(account: str):
    return st.one_of(st.just(VALID_TO.get(account, ("", "+14155550123"))[1]), any_text, wrong_type,
                     st.from_regex(r"\+?[0-9]{1,40}", fullmatch=True))


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(params=["sqlite", "postgresql"])
def every_kind(request, dispatcher_env, sandbox, broker_down, monkeypatch):
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_url")
        from dispatcher.store.db import upgrade

        upgrade(url)
        with session_scope(url) as db:
            for table in ("events", "attempts", "messages"):
                db.execute(sql(f"DELETE FROM {table}"))
        monkeypatch.setenv("DISPATCHER_DATABASE_URL", url)
    monkeypatch.setenv("DISPATCHER_CONFIG", write_config(dispatcher_env / "kinds.toml", sandbox,
                                                         extra=accounts_toml(sandbox)))
    runtime.configure(None)
    return {}  # idempotency key -> the id of the message first sent with it


def stored() -> int:
    with runtime.session() as db:
        return db.execute(select(func.count()).select_from(Message)).scalar_one()


def same_instant(a, b) -> bool:
    return a == b if a is None or b is None else a.astimezone(timezone.utc) == b.astimezone(timezone.utc)


def stored_exactly(msg_id: str, to, text, options: dict, key, not_before=None, not_after=None) -> None:
    got = dispatcher.get(msg_id)
    own = {k: v for k, v in options.items() if v is not None}
    expected_to = to if to else str(own.get("esim_id") or own.get("iccid"))
    assert (got.to, got.text, got.idempotency_key) == (expected_to, text, key)
    assert got.options == own
    assert same_instant(got.not_before, not_before) and same_instant(got.not_after, not_after)


# --------------------------------------------------------------------------- send()
@SOME
@given(data=st.data())
def test_send_stores_exactly_or_refuses_naming_the_field(every_kind, data):
    account = data.draw(st.one_of(st.sampled_from(ACCOUNTS), any_text, wrong_type), label="provider")
    to = data.draw(address_for(account if isinstance(account, str) else ""), label="to")
    text = data.draw(st.one_of(any_text, wrong_type, st.just("hello")), label="text")
    options = data.draw(st.dictionaries(option_names, option_values, max_size=3), label="options")
    key = data.draw(st.one_of(st.none(), any_text, wrong_type), label="idempotency_key")
    not_before = data.draw(times, label="not_before")
    not_after = data.draw(times, label="not_after")
    before = stored()
    try:
        msg = dispatcher.send(account, to, text, idempotency_key=key, not_before=not_before, not_after=not_after,
                              **options)
    except dispatcher.ValidationError as exc:
        assert str(exc).startswith(f"{exc.field}: ") and exc.field
        assert stored() == before
        return
    if key in every_kind:
        assert msg.id == every_kind[key] and stored() == before
        return
    every_kind[key] = msg.id
    assert stored() == before + 1
    stored_exactly(msg.id, to, text, options, key, not_before, not_after)


@FEW
@given(items=st.lists(st.one_of(
    st.fixed_dictionaries({"provider": st.sampled_from(ACCOUNTS), "to": st.sampled_from([v for _, v in VALID_TO.values()]),
                           "text": any_text}, optional={"idempotency_key": any_text, "options": st.dictionaries(
                               option_names, option_values, max_size=2)}),
    wrong_type), max_size=4))
def test_send_many_stores_every_item_or_none(every_kind, items):
    before = stored()
    try:
        ids = dispatcher.send_many(items)
    except dispatcher.ValidationError as exc:
        assert exc.field.startswith("messages")
        assert stored() == before
        return
    assert len(ids) == len(items)
    for item, mid in zip(items, ids):
        if mid in every_kind.values() and item.get("idempotency_key") is not None:
            continue  # a key used before: the first message stands for it
        got = dispatcher.get(mid)
        assert (got.to, got.text) == (item["to"], item["text"])
        every_kind.setdefault(item.get("idempotency_key"), mid)


# --------------------------------------------------------------------------- the command line
cli_text = st.one_of(st.text(ANY_CHAR, max_size=30), st.sampled_from(NASTY),
                     st.builds(lambda c, n: c * n, st.sampled_from(["a", "\U0001f600"]), st.integers(0, 5000)))


@SOME
@given(data=st.data())
def test_cli_send_stores_exactly_or_exits_2_with_one_line(every_kind, capsys, data):
    account = data.draw(st.one_of(st.sampled_from(ACCOUNTS), cli_text), label="provider")
    to = data.draw(st.one_of(st.just(VALID_TO.get(account, ("", "+14155550123"))[1]), cli_text), label="to")
    text = data.draw(st.one_of(cli_text, st.just("hello")), label="text")
    opts = data.draw(st.lists(st.one_of(
        st.builds(lambda k, v: f"{k}={v}", st.sampled_from(OPTION_NAMES), cli_text),
        st.builds(lambda k, v: f"{k}={json.dumps(v, allow_nan=True)}", st.sampled_from(OPTION_NAMES),
                  st.one_of(st.dictionaries(cli_text, cli_text, max_size=2), st.lists(cli_text, max_size=2))),
        cli_text), max_size=2), label="opts")
    extra = data.draw(st.lists(st.sampled_from(["--not-before", "--not-after", "--idempotency-key"]) .flatmap(
        lambda flag: st.tuples(st.just(flag), cli_text)), max_size=1), label="flags")
    argv = ["send", account, "--to", to, "--text", text]
    for o in opts:
        argv += ["--opt", o]
    for flag, value in extra:
        argv += [flag, value]
    capsys.readouterr()
    before = stored()
    code = main(argv)
    out, err = capsys.readouterr()
    assert code in (0, 2), (code, err)
    if code == 2:
        assert err.startswith("error: ") and err.count("\n") == 1 and out == "", err
        assert stored() == before
        assert re.match(r"error: (dispatcher send|--opt [^\s:]+|--[a-z-]+|[^\s:]+): ", err), err  # names the field
        return
    mid = out.strip().splitlines()[-1]
    got = dispatcher.get(mid)
    key = dict(extra).get("--idempotency-key")
    if key is not None and key in every_kind:
        assert mid == every_kind[key]
        return
    every_kind[key] = mid
    expected_to = to
    if not to:
        own = dict(o.split("=", 1) for o in opts if "=" in o)
        expected_to = own.get("esim_id") or own.get("iccid")
    assert (got.to, got.text) == (expected_to, text)


# --------------------------------------------------------------------------- the config file
def toml_string(value: str) -> str:
    out = []
    for ch in value:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F or 0xD800 <= ord(ch) <= 0xDFFF:
            out.append(f"\\u{ord(ch):04X}")  # a surrogate escape is itself invalid TOML: refused
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return toml_string(str(value))


GENERAL_KEYS = ["max_attempts", "retry_base", "retry_cap", "tick_seconds", "schedule_grace", "in_flight",
                "poll_seconds", "lease_seconds", "batch_size", "database_url", "throttle_wait", "bogus"]
ACCOUNT_KEYS = ["kind", "base_url", "rate_limit", "burst", "timeout", "on_timeout", "api_key", "access_code",
                "secret_key", "application_token", "from", "callback_url", "sender_id", "route", "source_address",
                "webhook_secret", "auth", "colour"]
toml_scalar = st.one_of(any_text, st.integers(-2**63, 2**63 - 1), st.floats(), st.booleans(),
                        st.sampled_from(["emsgnow", "emnify", "esimfly", "esimaccess", "esms_africa", "http://x.test",
                                         "https://api.example.com/v1", "10/s", "5/m", "0/s", "1e9/h", "retry",
                                         "unknown", "${NOT_SET_ANYWHERE}", "${HOME}", "header", "hmac"]))
toml_values = st.one_of(toml_scalar, st.lists(toml_scalar, max_size=2))


KIND_KEYS = {
    "emsgnow": {"api_key": "k", "from": "ACME", "callback_url": "https://h.test/in?token=t"},
    "esms_africa": {"api_key": "k", "sender_id": "Me", "route": "r"},
    "emnify": {"application_token": "t", "source_address": "12345"},
    "esimfly": {"access_code": "c", "secret_key": "s"},
    "esimaccess": {"access_code": "c", "secret_key": "s", "auth": "hmac"},
}
fuzzed = st.one_of(toml_values, any_text)


@st.composite
def account_table(draw) -> dict:
    """Mostly a valid account of some kind, with a few of its values (or extra keys) fuzzed."""
    kind = draw(st.sampled_from(sorted(KIND_KEYS)))
    table = {"kind": kind, "base_url": "http://127.0.0.1:9/api", **KIND_KEYS[kind],
             "rate_limit": "10/s", "timeout": 5, "webhook_secret": "w"}
    for key in draw(st.lists(st.sampled_from(sorted(table)), max_size=3, unique=True)):
        if draw(st.booleans()):
            table[key] = draw(fuzzed)
        else:
            del table[key]
    for key, value in draw(st.dictionaries(st.sampled_from(ACCOUNT_KEYS), fuzzed, max_size=2)).items():
        table[key] = value
    return table


@st.composite
def config_documents(draw) -> bytes:
    lines = []
    if draw(st.booleans()):
        lines.append("[dispatcher]")
        for key, value in draw(st.dictionaries(st.sampled_from(GENERAL_KEYS), toml_values, max_size=3)).items():
            lines.append(f"{key} = {toml_value(value)}")
    names = draw(st.lists(st.one_of(st.sampled_from(["alerts", "a.b", "x y", "iot"]), any_text), max_size=2,
                          unique=True))
    for name in names:
        lines.append(f"[providers.{toml_string(name)}]")
        table = draw(st.one_of(account_table(), st.dictionaries(st.sampled_from(ACCOUNT_KEYS), toml_values, max_size=7)))
        for key, value in table.items():
            lines.append(f"{toml_string(key) if not key.isidentifier() else key} = {toml_value(value)}")
    text = "\n".join(lines) + "\n"
    choice = draw(st.integers(0, 9))
    if choice == 0:
        return draw(st.binary(max_size=64))  # not TOML at all, perhaps not even UTF-8
    if choice == 1:
        return text.encode("utf-8", "surrogatepass") + b"\xff\xfe"
    return text.encode("utf-8", "surrogatepass")


@SOME
@given(document=config_documents())
def test_the_config_loader_loads_or_says_what_is_wrong(tmp_path, document):
    path = tmp_path / "fuzz.toml"
    path.write_bytes(document)
    try:
        s = load_settings(path, env={"HOME": "/home/x"})
    except ConfigError as exc:
        assert str(exc) and "\n" not in str(exc).strip()
        return
    for name, account in s.providers.items():
        assert isinstance(name, str) and name.isprintable()
        for key in account.secret_fields:
            assert account.get(key) is None or isinstance(account.get(key), str), (name, key)
    for field in ("max_attempts", "retry_base", "retry_cap", "tick_seconds", "in_flight", "poll_seconds"):
        value = getattr(s, field)
        assert math.isfinite(value) and value > 0, (field, value)


GOOD_ACCOUNT = '[providers.alerts]\nkind = "emsgnow"\nbase_url = "http://127.0.0.1:9"\napi_key = "k"\n'


@pytest.mark.parametrize("document", [
    # found by the properties above: each loaded (or raised something else) before
    b"\n\xff\xfe",
    b"[dispatcher]\ntick_seconds = nan\n",
    b"[dispatcher]\nretry_cap = inf\n",
    (GOOD_ACCOUNT.replace('"k"', "5")).encode(),
    (GOOD_ACCOUNT.replace('"http://127.0.0.1:9"', '"http://127.0.0.1:9\\n"')).encode(),
    (GOOD_ACCOUNT + "timeout = nan\n").encode(),
    (GOOD_ACCOUNT + 'rate_limit = "10/s"\nburst = true\n').encode(),
    (GOOD_ACCOUNT.replace("[providers.alerts]", '[providers."al\\nerts"]')).encode(),
    (GOOD_ACCOUNT + '"co\\nlour" = 1\n').encode(),
    (GOOD_ACCOUNT.replace("[providers.alerts]", f'[providers.{"a" * 101}]')).encode(),
])
def test_config_files_that_broke_the_loader_are_refused_in_one_line(tmp_path, capsys, document):
    path = tmp_path / "bad.toml"
    path.write_bytes(document)
    with pytest.raises(ConfigError) as err:
        load_settings(path, env={})
    assert "\n" not in str(err.value)
    assert main(["check-config", "--file", str(path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_a_config_path_that_is_a_directory_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot be read"):
        load_settings(tmp_path, env={})


def test_an_empty_opt_value_is_an_empty_string_not_json(every_kind, capsys):
    assert main(["send", "alerts", "--to", "+14155550123", "--text", "hi", "--opt", "client_id="]) == 0
    mid = capsys.readouterr().out.strip()
    assert dispatcher.get(mid).options == {"client_id": ""}


@FEW
@given(document=config_documents())
def test_check_config_exits_0_or_2_with_one_line(tmp_path, capsys, document):
    path = tmp_path / "fuzz.toml"
    path.write_bytes(document)
    capsys.readouterr()
    code = main(["check-config", "--file", str(path)])
    out, err = capsys.readouterr()
    assert code in (0, 2), err
    if code == 2:
        assert err.startswith("error: ") and err.count("\n") == 1


# --------------------------------------------------------------------------- the webhook receiver
EM_SECRET = "prop-emsgnow-token-0123456789abcdef"
ESMS_SECRET = "prop-esms-secret-0123456789abcdef"
EMNIFY_SECRET = "prop-emnify-secret-0123456789abcdef"
HOOK_ACCOUNTS = """
[providers.hooks]
kind = "emsgnow"
base_url = "http://127.0.0.1:9"
api_key = "k"
from = "ACME"
webhook_secret = "{em}"

[providers.africa]
kind = "esms_africa"
base_url = "http://127.0.0.1:9"
api_key = "k"
webhook_secret = "{esms}"

[providers.iot]
kind = "emnify"
base_url = "http://127.0.0.1:9"
application_token = "t"
source_address = "12345"
webhook_secret = "{emnify}"
"""


@pytest.fixture(params=["sqlite", "postgresql"])
def hook_env(request, dispatcher_env, sandbox, monkeypatch, receiver):
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_url")
        from dispatcher.store.db import upgrade

        upgrade(url)
        with session_scope(url) as db:
            for table in ("events", "attempts", "messages"):
                db.execute(sql(f"DELETE FROM {table}"))
        monkeypatch.setenv("DISPATCHER_DATABASE_URL", url)
    extra = HOOK_ACCOUNTS.format(em=EM_SECRET, esms=ESMS_SECRET, emnify=EMNIFY_SECRET)
    monkeypatch.setenv("DISPATCHER_CONFIG", write_config(dispatcher_env / "hooks.toml", sandbox, extra=extra))
    runtime.configure(None)
    with runtime.session() as db:  # a few known messages for reports to name
        for i, (provider, kind, ref) in enumerate([("hooks", "emsgnow", "trk-1"), ("africa", "esms_africa", "msg-1"),
                                                   ("iot", "emnify", "77/1001")]):
            db.add(Message(provider=provider, kind=kind, to="+14155550123", text="t", status="accepted",
                           provider_ref=ref, attempt_key=f"a{i}"))
    return receiver


json_safe = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False), any_text,
              st.sampled_from(["trk-1", "msg-1", 1001, 77, "delivered", "DELIVERED", 4, "2026-01-01T00:00:00Z"])),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(
        st.one_of(st.sampled_from(["id", "status", "message", "trackingId", "messageId", "timeline", "endpoint",
                                   "submit_date", "event", "timestamp", "statusAt", "description", "events"]),
                  any_text), inner, max_size=5)),
    max_leaves=12,
)


def _body(value) -> bytes:
    try:
        return json.dumps(value).encode("utf-8", "surrogatepass")
    except (TypeError, ValueError):
        return b"{}"


def either(value, *more):
    """The value a provider would send, or something else in its place."""
    return st.one_of(st.just(value), *[st.just(m) for m in more], json_safe, any_text)


ISO = "2026-01-01T00:00:00Z"
reports = {
    "hooks": st.fixed_dictionaries({
        "messageId": either("trk-1"), "id": either("ev-1"), "timestamp": either(ISO),
        "message": st.one_of(st.fixed_dictionaries({"trackingId": either("trk-1"), "status": either("delivered", "failed"),
                                                    "statusAt": either(ISO), "additionalInfo": either({})}), json_safe)}),
    "africa": st.fixed_dictionaries({
        "id": either("msg-1"), "status": either("delivered", "failed"), "updated_at": either(ISO),
        "timeline": st.one_of(st.lists(st.fixed_dictionaries({"status": either("sent", "delivered"), "at": either(ISO),
                                                               "id": either("t1")}), max_size=3), json_safe)}),
    "iot": st.fixed_dictionaries({
        "id": either(1001), "endpoint": st.one_of(st.fixed_dictionaries({"id": either(77)}), json_safe),
        "status": st.one_of(st.fixed_dictionaries({"id": either(4, 5), "description": either("Delivered")}), json_safe),
        "submit_date": either(ISO), "delivery_date": either(ISO), "final_date": either(ISO)}),
}


@st.composite
def webhook_calls(draw):
    account = draw(st.one_of(st.sampled_from(["hooks", "africa", "iot"]),
                             st.text(st.characters(codec="ascii", categories=["L", "N"]), max_size=8)))
    shape = draw(st.integers(0, 5))
    if shape == 0:
        body = draw(st.binary(max_size=200))
    elif shape == 1:
        body = _body(draw(json_safe))
    else:
        report = draw(reports.get(account, reports["hooks"]))
        body = _body([report] if account == "iot" and draw(st.booleans()) else report)
    return account, body, draw(st.booleans()), draw(st.sampled_from(["POST", "PATCH"]))


def post_report(receiver, account: str, body: bytes, signed: bool = True, method: str = "POST") -> httpx.Response:
    headers = {"content-type": "application/json"}
    params = {}
    if signed:
        params["token"] = EM_SECRET
        headers["X-Webhook-Signature"] = "sha256=" + hmac.new(ESMS_SECRET.encode(), body, hashlib.sha256).hexdigest()
        headers["Authorization"] = "Bearer " + jwt.encode({"iss": "emnify", "exp": int(time.time()) + 300},
                                                          EMNIFY_SECRET, algorithm="HS256")
    return httpx.request(method, f"{receiver.url}/webhooks/{account}", params=params, content=body,
                         headers=headers, timeout=30)


@SOME
@given(call=webhook_calls())
def test_the_receiver_never_answers_500(hook_env, call):
    account, body, signed, method = call
    response = post_report(hook_env, account, body, signed, method)
    assert response.status_code < 500, (response.status_code, response.text)  # no send in flight: no 503 either


EVENT = {"messageId": "trk-1", "id": "ev-1", "timestamp": ISO,
         "message": {"trackingId": "trk-1", "status": "delivered", "statusAt": ISO}}


@pytest.mark.parametrize("account, body, status", [
    # found by the property above: each answered 500 before
    ("hooks", dict(EVENT, message=dict(EVENT["message"], statusAt="67770000000000000000")), 200),
    ("hooks", dict(EVENT, message=dict(EVENT["message"], statusAt="NaN")), 200),
    ("hooks", dict(EVENT, messageId="\ud800"), 400),
    ("hooks", dict(EVENT, id="ev\x00"), 400),
    ("hooks", [EVENT, EVENT], 200),  # one event id twice in one report
    ("hooks", dict(EVENT, id="e" * 500), 200),  # longer than the store's event id column
    ("hooks", dict(EVENT, message=dict(EVENT["message"], status="delivered " + "x" * 200)), 200),
    ("africa", {"id": "msg-1", "status": "delivered", "updated_at": "1e400"}, 200),
    ("iot", {"id": 1001, "endpoint": {"id": 77}, "status": {"id": 4, "description": "Delivered"},
             "final_date": "inf"}, 200),
])
def test_reports_that_broke_the_receiver(hook_env, account, body, status):
    response = post_report(hook_env, account, json.dumps(body).encode())
    assert response.status_code == status, response.text

"""Secrets stay out of what the dispatcher stores and shows.

* an account's defaults (an eMsgNow callback_url carrying ?token=) are merged at send time, never
  copied into the stored message, so `dispatcher status` and `dispatcher.get()` cannot show them;
* a token inside a message's own callback_url is starred wherever the message is shown;
* a Redis URL's password is starred in every error line;
* an emnify delivery-report JWT must carry an expiry.
"""

from __future__ import annotations

import json
import logging
import time

import jwt
import pytest

import dispatcher
from dispatcher import runtime
from dispatcher.cli import main
from dispatcher.store.db import session_scope
from dispatcher.store.models import Message

from .conftest import send_out, write_config

ACCOUNT_TOKEN = "acct-callback-token-5f1e0c9a7b3d4e21"
OWN_TOKEN = "own-callback-token-9a8b7c6d5e4f3a2b"
EMNIFY_SECRET = "emnify-callback-secret-secrets-0123456789abcdef"


@pytest.fixture()
def hooked(dispatcher_env, sandbox, broker_down, monkeypatch):
    """An eMsgNow account whose callback_url default carries the webhook token."""
    extra = f"""
[providers.hooks]
kind = "emsgnow"
base_url = "{sandbox.base_url("emsgnow")}"
api_key = "{sandbox.credentials("emsgnow")["api_key"]}"
from = "ACME"
webhook_secret = "{ACCOUNT_TOKEN}"
callback_url = "http://127.0.0.1:9/webhooks/hooks?token={ACCOUNT_TOKEN}"
"""
    monkeypatch.setenv("DISPATCHER_CONFIG", write_config(dispatcher_env / "hooks.toml", sandbox, extra=extra))
    runtime.configure(None)
    return sandbox


def _status_outputs(capsys, mid: str) -> str:
    assert main(["status", mid]) == 0
    plain = capsys.readouterr().out
    assert main(["status", mid, "--json"]) == 0
    as_json = capsys.readouterr().out
    json.loads(as_json)
    return plain + as_json


def test_the_account_callback_token_is_never_stored_nor_shown_yet_is_sent(hooked, capsys):
    msg = dispatcher.send("hooks", "+14155550123", "hello")
    assert ACCOUNT_TOKEN not in repr(dispatcher.get(msg.id))
    assert ACCOUNT_TOKEN not in _status_outputs(capsys, msg.id)
    with session_scope(runtime.settings().database_url) as db:
        stored = db.get(Message, msg.id)
        assert ACCOUNT_TOKEN not in json.dumps(stored.options)
    since = hooked.last_seq
    assert send_out(msg.id) == {msg.id: "accepted"}
    sent = [r for r in hooked.requests("emsgnow", since=since) if r.path == "/sms"]
    # the account's defaults are merged at send time: the provider still gets both
    assert sent[-1].json["callbackUrl"] == f"http://127.0.0.1:9/webhooks/hooks?token={ACCOUNT_TOKEN}"
    assert sent[-1].json["from"] == "ACME"
    assert ACCOUNT_TOKEN not in _status_outputs(capsys, msg.id)


def test_a_message_own_callback_url_with_a_token_is_refused_and_one_without_is_sent_whole(hooked, capsys):
    from sqlalchemy import func, select

    from dispatcher.store.models import Message

    url = f"https://hooks.example.com/in?account=hooks&token={OWN_TOKEN}"
    with pytest.raises(dispatcher.InvalidOption) as refused:  # it would be stored with the message
        dispatcher.send("hooks", "+14155550123", "hello", callback_url=url)
    assert refused.value.field == "callback_url" and OWN_TOKEN not in str(refused.value)
    with runtime.session() as db:
        assert db.execute(select(func.count()).select_from(Message)).scalar() == 0  # nothing stored
    plain = "https://hooks.example.com/in?account=hooks"
    msg = dispatcher.send("hooks", "+14155550123", "hello", callback_url=plain)
    since = hooked.last_seq
    send_out(msg.id)
    sent = [r for r in hooked.requests("emsgnow", since=since) if r.path == "/sms"]
    assert sent[-1].json["callbackUrl"] == plain  # the provider gets the message's own URL whole


def test_the_status_poll_and_cancel_still_see_the_account_defaults(hooked, monkeypatch):
    """outbound() merges the account's defaults for every path that builds a request from a row."""
    from dispatcher import status
    from dispatcher.dispatch import outbound

    msg = dispatcher.send("hooks", "+14155550123", "hello")
    with session_scope(runtime.settings().database_url) as db:
        row = db.get(Message, msg.id)
    out = outbound(row)
    assert out.options["callback_url"].endswith(f"token={ACCOUNT_TOKEN}")
    assert out.options["from"] == "ACME"
    assert status.outbound is outbound


# --------------------------------------------------------------------------- Redis URL passwords
REDIS_PASSWORD = "s3cr3t-redis-pass-71c2"


def test_require_redis_never_prints_the_password():
    from dispatcher.errors import BrokerUnavailable
    from dispatcher.services import require_redis

    with pytest.raises(BrokerUnavailable) as err:
        require_redis(f"redis://:{REDIS_PASSWORD}@127.0.0.1:1/0")
    assert REDIS_PASSWORD not in str(err.value)
    assert "redis://:***@127.0.0.1:1/0" in str(err.value)


def test_describe_service_error_masks_urls_with_passwords():
    from dispatcher.services import describe_service_error

    exc = RuntimeError(f"cannot reach redis://user:{REDIS_PASSWORD}@db.internal:6379/0 nor "
                       f"postgresql://app:{REDIS_PASSWORD}@pg.internal/app")
    line = describe_service_error(exc)
    assert REDIS_PASSWORD not in line
    assert "redis://user:***@db.internal:6379/0" in line and "postgresql://app:***@pg.internal/app" in line


def test_the_cli_error_line_and_logs_never_show_the_redis_password(dispatcher_env, monkeypatch, capsys, caplog):
    monkeypatch.setenv("DISPATCHER_REDIS_URL", f"redis://:{REDIS_PASSWORD}@127.0.0.1:1/0")
    runtime.configure(None)
    caplog.set_level(logging.DEBUG, logger="dispatcher")
    assert main(["worker"]) == 1  # refused before anything starts: Redis does not answer
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and REDIS_PASSWORD not in err and "redis://:***@127.0.0.1:1/0" in err
    assert main(["limits"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and REDIS_PASSWORD not in err
    assert REDIS_PASSWORD not in caplog.text


def test_check_config_and_db_upgrade_mask_a_redis_password(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DISPATCHER_REDIS_URL", f"redis://default:{REDIS_PASSWORD}@127.0.0.1:6379/0")
    monkeypatch.setenv("DISPATCHER_DATABASE_URL", f"sqlite:///{tmp_path / 'd.db'}")
    monkeypatch.setenv("DISPATCHER_CONFIG", str(tmp_path / "none.toml"))
    runtime.configure(None)
    try:
        assert main(["check-config"]) == 0
        out = capsys.readouterr().out
        assert REDIS_PASSWORD not in out and "redis://default:***@127.0.0.1:6379/0" in out
    finally:
        runtime.configure(None)


# --------------------------------------------------------------------------- emnify JWT expiry
def _bearer(**claims) -> str:
    return "Bearer " + jwt.encode({"iss": "emnify", **claims}, EMNIFY_SECRET, algorithm="HS256")


def test_an_emnify_report_jwt_without_exp_is_refused():
    from dispatcher.webhook_auth import verify_emnify_jwt, why_emnify_jwt_fails

    assert verify_emnify_jwt(EMNIFY_SECRET, _bearer(exp=int(time.time()) + 300))
    assert why_emnify_jwt_fails(EMNIFY_SECRET, _bearer()) == "the JWT carries no exp claim"
    assert not verify_emnify_jwt(EMNIFY_SECRET, _bearer(iat=int(time.time())))


def test_the_broker_unreachable_error_and_its_log_line_star_the_password(dispatcher_env, monkeypatch, caplog):
    from kombu.exceptions import OperationalError

    from dispatcher import api, queue
    from dispatcher.celery_app import app
    from dispatcher.errors import BrokerUnavailable

    def refuse():
        raise OperationalError(f"Cannot connect to redis://:{REDIS_PASSWORD}@10.0.0.9:6379/0: Connection refused")

    monkeypatch.setattr(app, "producer_or_acquire", refuse)
    with pytest.raises(BrokerUnavailable) as err:
        queue.enqueue(["m1"])
    assert REDIS_PASSWORD not in str(err.value) and "redis://:***@10.0.0.9:6379/0" in str(err.value)
    caplog.set_level(logging.WARNING, logger="dispatcher")
    api._enqueue_or_leave(["m1"])
    assert "redis://:***@10.0.0.9" in caplog.text and REDIS_PASSWORD not in caplog.text

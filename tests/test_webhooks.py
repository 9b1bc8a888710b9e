"""Webhook receiver: delivery reports over real HTTP into a real store, beside the poller.

Per kind (eMsgNow, eSMS Africa, emnify): a valid report stores its events and finishes the
message; a bad or missing signature is refused with 401 and stores nothing; a replay stores
nothing new; an out-of-order pair leaves the message final with both events, oldest first;
an event seen by both a webhook and a poll is stored once. The signature checks are also
unit-tested on their own.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timedelta, timezone

import httpx
import jwt
import pytest
from sqlalchemy import text

import dispatcher
from dispatcher import runtime
from dispatcher.dispatch import dispatch_batch
from dispatcher.status import poll
from dispatcher.store.models import utcnow
from dispatcher.webhook_auth import (
    esms_signature,
    verify_emnify_jwt,
    verify_esms_signature,
    verify_token,
    why_emnify_jwt_fails,
)

from .conftest import wait_for, write_config

EMSGNOW_SECRET = "emsgnow-webhook-token-0123456789abcdef"
ESMS_SECRET = "esms-africa-webhook-key-0123456789abcdef"
EMNIFY_SECRET = "emnify-callback-secret-0123456789abcdef"

ACCOUNTS = """
[providers.hooks]
kind = "emsgnow"
base_url = "{emsgnow}"
api_key = "{em_key}"
from = "ACME"
webhook_secret = "{em_secret}"

[providers.africa]
kind = "esms_africa"
base_url = "{esms_africa}"
api_key = "{esms_key}"
sender_id = "eSMSAfrica"
webhook_secret = "${{ESMS_WEBHOOK_SECRET}}"

[providers.iot]
kind = "emnify"
base_url = "{emnify}"
application_token = "{emnify_token}"
source_address = "12345"
webhook_secret = "{emnify_secret}"

[providers.fly]
kind = "esimfly"
base_url = "{esimfly}"
access_code = "code"
secret_key = "secret"
"""


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(params=["sqlite", "postgresql"])
def hooks(request, dispatcher_env, sandbox, broker_down, monkeypatch, receiver):
    from dispatcher.providers.emnify import clear_token_cache

    if request.param == "postgresql":
        url = request.getfixturevalue("pg_url")
        from dispatcher.store.db import session_scope, upgrade

        upgrade(url)
        with session_scope(url) as db:  # polls take every accepted message: start from an empty store
            for table in ("events", "attempts", "messages"):
                db.execute(text(f"DELETE FROM {table}"))
        monkeypatch.setenv("DISPATCHER_DATABASE_URL", url)

    c = sandbox.credentials
    extra = ACCOUNTS.format(
        emsgnow=sandbox.base_url("emsgnow"), em_key=c("emsgnow")["api_key"], em_secret=EMSGNOW_SECRET,
        esms_africa=sandbox.base_url("esms_africa"), esms_key=c("esms_africa")["api_key"],
        emnify=sandbox.base_url("emnify"), emnify_token=c("emnify")["application_token"],
        emnify_secret=EMNIFY_SECRET, esimfly=sandbox.base_url("esimfly"))
    monkeypatch.setenv("ESMS_WEBHOOK_SECRET", ESMS_SECRET)
    monkeypatch.setenv("DISPATCHER_CONFIG", write_config(dispatcher_env / "hooks.toml", sandbox, extra=extra))
    runtime.configure(None)
    clear_token_cache()
    for kind in ("emsgnow", "esms_africa", "emnify"):
        sandbox.configure(kind, delivery_step=0.01)
    yield receiver
    clear_token_cache()


def later(seconds: float):
    return lambda: utcnow() + timedelta(seconds=seconds)


def iso(seconds_ago: float) -> str:
    return (datetime.now(timezone.utc) - timedelta(seconds=seconds_ago)).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def accepted(account: str, to: str, text: str = "hello") -> dispatcher.Message:
    msg = dispatcher.send(account, to, text)
    # a send handed back unstarted (its rate-limit slot missed on a busy machine) goes again
    wait_for(lambda: dispatch_batch([msg.id]) and dispatcher.get(msg.id).status == "accepted", timeout=10)
    msg = dispatcher.get(msg.id)
    assert msg.status == "accepted" and msg.provider_ref
    return msg


# --------------------------------------------------------------------------- one helper per kind
class Emsgnow:
    kind, account, to = "emsgnow", "hooks", "+14155550123"

    def __init__(self, sandbox, receiver):
        self.sandbox, self.receiver = sandbox, receiver

    def provider_events(self, msg) -> list[dict]:
        """The message's events as eMsgNow lists them, once the final one has happened."""
        key = self.sandbox.credentials("emsgnow")["api_key"]

        def final():
            r = httpx.get(f"{self.sandbox.base_url('emsgnow')}/sms/{msg.provider_ref}/events",
                          headers={"x-api-key": key})
            events = r.json()["events"]
            return events if events and events[-1]["message"]["status"] == "delivered" else None

        return wait_for(final)

    def reports(self, msg) -> list[bytes]:
        """What eMsgNow posts to the callbackUrl: one event object per event."""
        return [json.dumps({"messageId": msg.provider_ref, **e}).encode() for e in self.provider_events(msg)]

    def post(self, body: bytes, credential: str | None = EMSGNOW_SECRET) -> httpx.Response:
        params = {"token": credential} if credential is not None else {}
        return httpx.post(f"{self.receiver.url}/webhooks/{self.account}", content=body, params=params,
                          headers={"content-type": "application/json"})

    def out_of_order(self, msg) -> tuple[bytes, bytes]:
        """(final event, an earlier intermediate event), in that order."""
        def event(event_id, status, ago):
            return json.dumps({"id": event_id, "timestamp": iso(ago), "message": {
                "channel": "sms", "trackingId": msg.provider_ref, "status": status, "statusAt": iso(ago),
                "additionalInfo": {}}}).encode()

        return event("evtFinal000000000001", "delivered", 1), event("evtSent0000000000001", "sent to provider", 5)


class EsmsAfrica:
    kind, account, to = "esms_africa", "africa", "+254712345678"

    def __init__(self, sandbox, receiver):
        self.sandbox, self.receiver = sandbox, receiver

    def provider_message(self, msg) -> dict:
        key = self.sandbox.credentials("esms_africa")["api_key"]

        def final():
            r = httpx.get(f"{self.sandbox.base_url('esms_africa')}/api/messages/{msg.provider_ref}",
                          headers={"authorization": f"Bearer {key}"})
            return r.json() if r.json()["status"] == "delivered" else None

        return wait_for(final)

    def reports(self, msg) -> list[bytes]:
        """eSMS Africa sends one webhook, at the final state: the message object with its timeline."""
        return [json.dumps(self.provider_message(msg)).encode()]

    def post(self, body: bytes, credential: str | None = ESMS_SECRET) -> httpx.Response:
        headers = {"content-type": "application/json"}
        if credential is not None:
            headers["X-Webhook-Signature"] = esms_signature(credential, body)
        return httpx.post(f"{self.receiver.url}/webhooks/{self.account}", content=body, headers=headers)

    def out_of_order(self, msg) -> tuple[bytes, bytes]:
        final = {"id": msg.provider_ref, "status": "delivered", "updated_at": iso(1)}
        earlier = {"id": msg.provider_ref, "status": "sent", "updated_at": iso(5)}
        return json.dumps(final).encode(), json.dumps(earlier).encode()


class Emnify:
    kind, account, to = "emnify", "iot", "12345"

    def __init__(self, sandbox, receiver):
        self.sandbox, self.receiver = sandbox, receiver

    def provider_sms(self, msg) -> dict:
        base = self.sandbox.base_url("emnify")
        token = httpx.post(f"{base}/api/v1/authenticate", json={
            "application_token": self.sandbox.credentials("emnify")["application_token"]}).json()["auth_token"]
        endpoint, _, sms_id = msg.provider_ref.partition("/")

        def final():
            r = httpx.get(f"{base}/api/v1/endpoint/{endpoint}/sms/{sms_id}", headers={"authorization": f"Bearer {token}"})
            return r.json() if r.json()["status"]["id"] == 4 else None

        return wait_for(final)

    def reports(self, msg) -> list[bytes]:
        """emnify PATCHes the SMS object to the callback URL."""
        return [json.dumps(self.provider_sms(msg)).encode()]

    def post(self, body: bytes, credential: str | None = EMNIFY_SECRET) -> httpx.Response:
        headers = {"content-type": "application/json"}
        if credential is not None:
            claims = {"iss": "emnify", "exp": int(time.time()) + 300}
            headers["Authorization"] = f"Bearer {jwt.encode(claims, credential, algorithm='HS256')}"
        return httpx.patch(f"{self.receiver.url}/webhooks/{self.account}", content=body, headers=headers)

    def out_of_order(self, msg) -> tuple[bytes, bytes]:
        endpoint, _, sms_id = msg.provider_ref.partition("/")
        common = {"id": int(sms_id), "endpoint": {"id": int(endpoint)}, "submit_date": iso(5)}
        final = dict(common, status={"id": 4, "description": "Delivered"}, delivery_date=iso(1), final_date=iso(1))
        earlier = dict(common, status={"id": 2, "description": "In Progress"})
        return json.dumps(final).encode(), json.dumps(earlier).encode()


KINDS = {"emsgnow": Emsgnow, "esms_africa": EsmsAfrica, "emnify": Emnify}


@pytest.fixture(params=list(KINDS))
def kind(request, hooks, sandbox):
    return KINDS[request.param](sandbox, hooks)


# --------------------------------------------------------------------------- per kind, over HTTP
def test_a_valid_report_stores_its_events_and_finishes_the_message(kind):
    msg = accepted(kind.account, kind.to)
    answers = [kind.post(body) for body in kind.reports(msg)]
    assert [a.status_code for a in answers] == [200] * len(answers)
    got = dispatcher.get(msg.id)
    assert got.status == "delivered"
    assert got.events and got.events[-1].status == "delivered"
    assert sum(a.json()["stored"] for a in answers) == len(got.events)


@pytest.mark.parametrize("credential", ["wrong-secret-0123456789abcdef0123456789", None], ids=["bad", "unsigned"])
def test_a_bad_or_missing_signature_is_refused_and_stores_nothing(kind, credential, caplog):
    msg = accepted(kind.account, kind.to)
    with caplog.at_level(logging.WARNING, logger="dispatcher.webhooks"):
        answers = [kind.post(body, credential=credential) for body in kind.reports(msg)]
    assert [a.status_code for a in answers] == [401] * len(answers)
    assert answers[0].json() == {"error": "unauthorized"}
    got = dispatcher.get(msg.id)
    assert got.status == "accepted" and len(got.events) == 0
    refusals = [r.getMessage() for r in caplog.records if r.name == "dispatcher.webhooks"]
    assert refusals and all(kind.account in line for line in refusals)
    assert not any(secret in caplog.text for secret in (EMSGNOW_SECRET, ESMS_SECRET, EMNIFY_SECRET))


def test_a_replayed_report_stores_nothing_new(kind):
    msg = accepted(kind.account, kind.to)
    bodies = kind.reports(msg)
    for body in bodies:
        assert kind.post(body).status_code == 200
    before = dispatcher.get(msg.id)
    replays = [kind.post(body) for body in bodies]
    assert [(a.status_code, a.json()) for a in replays] == [(200, {"stored": 0})] * len(bodies)
    after = dispatcher.get(msg.id)
    assert after.status == before.status == "delivered"
    assert [e.event_id for e in after.events] == [e.event_id for e in before.events]


def test_an_out_of_order_pair_leaves_the_message_final_with_both_events_oldest_first(kind):
    msg = accepted(kind.account, kind.to)
    final, earlier = kind.out_of_order(msg)
    assert kind.post(final).json() == {"stored": 1}
    assert dispatcher.get(msg.id).status == "delivered"
    assert kind.post(earlier).json() == {"stored": 1}
    got = dispatcher.get(msg.id)
    assert got.status == "delivered"  # the late intermediate event does not move it back
    assert [e.status for e in got.events] == ["accepted", "delivered"]
    assert got.events[0].occurred_at < got.events[1].occurred_at


# --------------------------------------------------------------------------- webhook and poll together
def test_emsgnow_an_event_from_a_webhook_and_from_a_later_poll_is_stored_once(hooks, sandbox):
    em = Emsgnow(sandbox, hooks)
    msg = accepted(em.account, em.to)
    first = em.reports(msg)[0]  # "processing" only: the message stays accepted
    assert em.post(first).json() == {"stored": 1}
    assert dispatcher.get(msg.id).status == "accepted"
    report = poll(clock=later(5))
    assert report.new_events == 2  # the poll lists all three; "processing" was already there
    got = dispatcher.get(msg.id)
    assert got.status == "delivered"
    assert [e.provider_status for e in got.events] == ["processing", "sent to provider", "delivered"]


def test_esms_africa_a_poll_then_the_final_webhook_store_each_timeline_entry_once(hooks, sandbox):
    es = EsmsAfrica(sandbox, hooks)
    msg = accepted(es.account, es.to)
    full = es.provider_message(msg)
    so_far = dict(full, status="sent", timeline=full["timeline"][:-1])  # what a poll saw before delivery
    sandbox_answer = json.dumps(so_far).encode()
    assert es.post(sandbox_answer).json() == {"stored": len(so_far["timeline"])}
    assert dispatcher.get(msg.id).status == "accepted"
    report = poll(clock=later(5))  # the poll sees the whole timeline: only "delivered" is new
    assert report.new_events == 1 and report.finished == 1
    assert es.post(json.dumps(full).encode()).json() == {"stored": 0}  # the webhook at the final state
    got = dispatcher.get(msg.id)
    assert got.status == "delivered"
    assert [e.provider_status for e in got.events] == [entry["status"] for entry in full["timeline"]]


def test_emnify_a_delivery_report_and_a_later_poll_store_the_status_once(hooks, sandbox):
    en = Emnify(sandbox, hooks)
    msg = accepted(en.account, en.to)
    delivered = en.provider_sms(msg)
    in_progress = dict(delivered, status={"id": 2, "description": "In Progress"})
    assert en.post(json.dumps(in_progress).encode()).json() == {"stored": 1}
    assert poll(clock=later(5)).new_events == 1  # the poll reads "Delivered", new
    assert en.post(json.dumps(delivered).encode()).json() == {"stored": 0}  # the callback of the same status
    got = dispatcher.get(msg.id)
    assert got.status == "delivered"
    assert [e.event_id for e in got.events] == [f"{delivered['id']}:2", f"{delivered['id']}:4"]


def test_emnify_a_report_on_an_early_part_of_a_long_text_does_not_finish_it(hooks, sandbox):
    en = Emnify(sandbox, hooks)
    msg = accepted(en.account, en.to, "x" * 300)  # three parts, three SMS ids
    endpoint, _, ids = msg.provider_ref.partition("/")
    first, last = ids.split(",")[0], ids.split(",")[-1]
    report = {"id": int(first), "endpoint": {"id": int(endpoint)}, "status": {"id": 4, "description": "Delivered"},
              "delivery_date": iso(1)}
    assert en.post(json.dumps(report).encode()).json() == {"stored": 1}
    assert dispatcher.get(msg.id).status == "accepted"
    assert en.post(json.dumps(dict(report, id=int(last))).encode()).json() == {"stored": 1}
    assert dispatcher.get(msg.id).status == "delivered"


# --------------------------------------------------------------------------- what else is answered
def test_unknown_accounts_missing_secrets_bad_bodies_and_unknown_messages(hooks, sandbox, caplog):
    url = hooks.url
    assert httpx.post(f"{url}/webhooks/nosuch", content=b"{}").status_code == 404
    assert httpx.post(f"{url}/webhooks/fly", content=b"{}").status_code == 404  # esimfly has no webhooks
    assert httpx.get(f"{url}/webhooks/hooks").status_code == 405
    with caplog.at_level(logging.WARNING, logger="dispatcher.webhooks"):
        no_secret = httpx.post(f"{url}/webhooks/alerts", params={"token": "anything"}, content=b"{}")
    assert no_secret.status_code == 401  # an account without webhook_secret never accepts reports
    assert "alerts" in caplog.text and "no webhook_secret" in caplog.text
    em, es = Emsgnow(sandbox, hooks), EsmsAfrica(sandbox, hooks)
    assert es.post(b"not json").status_code == 400
    assert es.post(b'{"hello": "world"}').status_code == 400
    assert em.post(b'{"events": []}').status_code == 400
    unknown = es.post(json.dumps({"id": "no-such-message", "status": "delivered"}).encode())
    assert (unknown.status_code, unknown.json()) == (202, {"stored": 0, "unknown": 1})


def test_a_report_that_may_have_overtaken_its_send_is_asked_again_not_dropped(hooks, sandbox):
    from dispatcher.store import queries

    es = EsmsAfrica(sandbox, hooks)
    msg = dispatcher.send(es.account, es.to, "in flight")
    with runtime.session() as db:
        queries.claim(db, [msg.id], utcnow(), "claim-1", "worker-1")  # its send is under way: the provider's id is not stored yet
    report = json.dumps({"id": "not-recorded-yet", "status": "delivered"}).encode()
    answer = es.post(report)
    assert (answer.status_code, answer.headers["Retry-After"]) == (503, "1")  # the provider retries
    with runtime.session() as db:
        queries.set_status(db, msg.id, ["sending"], {"status": "queued"})  # no send of the account in flight now
    assert es.post(report).status_code == 202  # a message this store never sent: no endless retries


def test_a_message_of_another_account_is_not_touched(hooks, sandbox, monkeypatch):
    """Lookups are by (account, provider id): a report for `hooks` never settles an `alerts` message."""
    em = Emsgnow(sandbox, hooks)
    other = accepted("alerts", "+14155550123")
    body = em.reports(other)[-1]
    assert em.post(body).status_code == 202
    assert dispatcher.get(other.id).status == "accepted"


# --------------------------------------------------------------------------- the checks on their own
def test_esms_signature_check():
    body = b'{"id":"m1","status":"delivered"}'
    good = esms_signature(ESMS_SECRET, body)
    assert good.startswith("sha256=") and len(good) == 7 + 64
    assert verify_esms_signature(ESMS_SECRET, body, good)
    assert verify_esms_signature(ESMS_SECRET, body, good.upper().replace("SHA256=", "sha256="))
    assert not verify_esms_signature(ESMS_SECRET, body + b" ", good)  # the body was changed
    assert not verify_esms_signature("another-key", body, good)
    assert not verify_esms_signature(ESMS_SECRET, body, good[7:])  # no sha256= prefix
    assert not verify_esms_signature(ESMS_SECRET, body, None)
    assert not verify_esms_signature(ESMS_SECRET, body, "sha256=")


def test_emnify_jwt_check():
    def bearer(secret, **claims):
        return "Bearer " + jwt.encode({"iss": "emnify", **claims}, secret, algorithm="HS256")

    soon = int(time.time()) + 300
    assert verify_emnify_jwt(EMNIFY_SECRET, bearer(EMNIFY_SECRET, exp=soon))
    assert not verify_emnify_jwt(EMNIFY_SECRET, bearer(EMNIFY_SECRET))  # a token without exp would be good forever
    assert verify_emnify_jwt(EMNIFY_SECRET, bearer(EMNIFY_SECRET, exp=soon, aud="someone"))
    assert why_emnify_jwt_fails(EMNIFY_SECRET, bearer("the-wrong-secret-0123456789abcdefghij", exp=soon)) == \
        "the JWT signature does not match the callback secret"
    assert why_emnify_jwt_fails(EMNIFY_SECRET, bearer(EMNIFY_SECRET, exp=int(time.time()) - 3600)) == \
        "the JWT has expired"
    none_alg = "Bearer " + jwt.encode({"iss": "emnify"}, None, algorithm="none")
    assert not verify_emnify_jwt(EMNIFY_SECRET, none_alg)  # an unsigned token is never enough
    assert not verify_emnify_jwt(EMNIFY_SECRET, bearer(EMNIFY_SECRET, exp=soon).replace("Bearer", "Basic"))
    assert not verify_emnify_jwt(EMNIFY_SECRET, "Bearer not.a.jwt")
    assert not verify_emnify_jwt(EMNIFY_SECRET, None)


def test_emsgnow_token_check():
    assert verify_token(EMSGNOW_SECRET, EMSGNOW_SECRET)
    assert not verify_token(EMSGNOW_SECRET, EMSGNOW_SECRET[:-1])
    assert not verify_token(EMSGNOW_SECRET, "")
    assert not verify_token(EMSGNOW_SECRET, None)


# --------------------------------------------------------------------------- configuration
def test_check_config_never_prints_the_webhook_secret_nor_a_callback_token(tmp_path, capsys):
    from dispatcher.cli import main

    path = tmp_path / "d.toml"
    path.write_text(f'''
[providers.hooks]
kind = "emsgnow"
base_url = "https://api.emsgnow.example"
api_key = "k"
from = "ACME"
webhook_secret = "{EMSGNOW_SECRET}"
callback_url = "https://dispatcher.example/webhooks/hooks?token={EMSGNOW_SECRET}"
''')
    assert main(["check-config", "--file", str(path)]) == 0
    out = capsys.readouterr().out
    assert "webhook_secret=***" in out and "/webhooks/hooks?token=***" in out
    assert EMSGNOW_SECRET not in out


@pytest.mark.parametrize("kind_lines,problem", [
    ('kind = "emsgnow"\napi_key = "k"\nwebhook_secret = ""', "webhook_secret: must be a non-empty string"),
    ('kind = "esimfly"\naccess_code = "a"\nsecret_key = "s"\nwebhook_secret = "x"', "webhook_secret: unknown key"),
])
def test_webhook_secret_is_checked_where_it_is_configured(tmp_path, capsys, kind_lines, problem):
    from dispatcher.cli import main

    path = tmp_path / "d.toml"
    path.write_text(f'[providers.p]\nbase_url = "https://x.example"\n{kind_lines}\n')
    assert main(["check-config", "--file", str(path)]) == 2
    assert problem in capsys.readouterr().err


def test_the_webhooks_command_serves_in_the_foreground_until_sigterm(tmp_path):
    import os
    import re
    import subprocess
    import sys

    config = tmp_path / "d.toml"
    config.write_text(f'[providers.hooks]\nkind = "emsgnow"\nbase_url = "https://api.emsgnow.example"\n'
                      f'api_key = "k"\nfrom = "ACME"\nwebhook_secret = "{EMSGNOW_SECRET}"\n')
    env = dict(os.environ, DISPATCHER_CONFIG=str(config), PYTHONUNBUFFERED="1",
               DISPATCHER_DATABASE_URL=f"sqlite:///{tmp_path / 'd.db'}")
    proc = subprocess.Popen([sys.executable, "-m", "dispatcher.cli", "webhooks", "--port", "0"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
        url = re.search(r"http://\S+", first).group(0)
        assert "/webhooks/hooks?token=<webhook_secret>" in proc.stdout.readline()
        event = {"id": "e1", "message": {"trackingId": "nosuch", "status": "delivered"}}
        refused = httpx.post(f"{url}/webhooks/hooks", params={"token": "wrong"}, json=event)
        unknown = httpx.post(f"{url}/webhooks/hooks", params={"token": EMSGNOW_SECRET}, json=event)
        assert (refused.status_code, unknown.status_code) == (401, 202)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0
    assert "webhook refused for account hooks: the token query parameter is wrong" in err
    assert "names no known message" in err
    assert EMSGNOW_SECRET not in err

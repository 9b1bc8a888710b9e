"""Delivery reports end to end: the sandbox twins push them, the receiver stores them.

Over real HTTP on loopback: a message goes out through the pipeline (`dispatch_batch`) to a
twin configured to report to the webhook receiver (`ReceiverThread`), and reaches its final
status with no `status.poll()` and no status request to the provider. Per kind (eMsgNow,
eSMS Africa, emnify): each event is stored once; with the `replay_callbacks` fault every
report arrives twice and still each event is stored once; with a wrong secret every report
is answered 401 (the twin's retries included), the message stays `accepted`, and a poll then
settles it. The sandbox's callback log (`SandboxThread.callbacks`) shows what was sent and
what the receiver answered.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

import dispatcher
from dispatcher import runtime
from dispatcher.dispatch import dispatch_batch
from dispatcher.sandbox.callbacks import DEFAULT_RETRIES
from dispatcher.status import poll
from dispatcher.store.models import utcnow

from .conftest import wait_for, write_config

EMSGNOW_SECRET = "emsgnow-webhook-token-e2e-0123456789abcdef"
ESMS_SECRET = "esms-africa-webhook-key-e2e-0123456789abcdef"
EMNIFY_SECRET = "emnify-callback-secret-e2e-0123456789abcdef"
WRONG_SECRET = "not-the-receivers-secret-0123456789abcdef"
STEP = 0.1  # seconds between a twin's delivery states
# A report leaves REPORT_LAG after its event, so that the send's own result is stored first
# even on a busy machine (else the receiver answers 202 for a message it does not know yet);
# a generous timeout keeps a slow answer from being retried.
REPORT_SETTINGS = {"callback_delay": 0.3, "callback_timeout": 10.0}

ACCOUNTS = """
[providers.hooks]
kind = "emsgnow"
base_url = "{emsgnow}"
api_key = "{em_key}"
from = "ACME"
webhook_secret = "{em_secret}"
callback_url = "{receiver}/webhooks/hooks?token={em_secret}"

[providers.hooks_wrong]  # the same account's reports, sent with a token the receiver does not know
kind = "emsgnow"
base_url = "{emsgnow}"
api_key = "{em_key}"
from = "ACME"
callback_url = "{receiver}/webhooks/hooks?token={wrong_secret}"

[providers.africa]
kind = "esms_africa"
base_url = "{esms_africa}"
api_key = "{esms_key}"
sender_id = "eSMSAfrica"
webhook_secret = "{esms_secret}"

[providers.iot]
kind = "emnify"
base_url = "{emnify}"
application_token = "{emnify_token}"
source_address = "12345"
webhook_secret = "{emnify_secret}"
"""


@pytest.fixture()
def e2e(dispatcher_env, sandbox, broker_down, monkeypatch, receiver):
    """Accounts that report to the receiver; no worker, no beat: the test drives the send."""
    from dispatcher.providers.emnify import clear_token_cache

    c = sandbox.credentials
    extra = ACCOUNTS.format(
        receiver=receiver.url, emsgnow=sandbox.base_url("emsgnow"), em_key=c("emsgnow")["api_key"],
        em_secret=EMSGNOW_SECRET, wrong_secret=WRONG_SECRET, esms_africa=sandbox.base_url("esms_africa"), esms_key=c("esms_africa")["api_key"],
        esms_secret=ESMS_SECRET, emnify=sandbox.base_url("emnify"),
        emnify_token=c("emnify")["application_token"], emnify_secret=EMNIFY_SECRET)
    monkeypatch.setenv("DISPATCHER_CONFIG", write_config(dispatcher_env / "e2e.toml", sandbox, extra=extra))
    runtime.configure(None)
    clear_token_cache()
    for kind in ("emsgnow", "esms_africa", "emnify"):
        sandbox.configure(kind, delivery_step=STEP, extra=REPORT_SETTINGS)
    yield receiver
    clear_token_cache()


# --------------------------------------------------------------------------- one helper per kind
class Emsgnow:
    """Reports every event to the message's callbackUrl, which carries the receiver's token."""

    kind, account, to = "emsgnow", "hooks", "+14155550123"
    provider_words = ["processing", "sent to provider", "delivered"]

    def __init__(self, sandbox, receiver):
        self.sandbox, self.receiver = sandbox, receiver

    def subscribe(self, secret: str) -> dict:
        """The twin needs no setting; a wrong secret is an account whose callback URL has the wrong
        token (a message's own callback_url may not carry one: it would be stored)."""
        assert secret in (EMSGNOW_SECRET, WRONG_SECRET)
        self.account = "hooks" if secret == EMSGNOW_SECRET else "hooks_wrong"
        return {}

    def is_about(self, body: dict, msg) -> bool:
        return body.get("messageId") == msg.provider_ref

    def reported_status(self, body: dict) -> str:
        return body["message"]["status"]


class EsmsAfrica:
    """Reports once, at the final state: the message object with its whole timeline."""

    kind, account, to = "esms_africa", "africa", "+254712345678"
    provider_words = ["queued", "submitted", "sent", "delivered"]

    def __init__(self, sandbox, receiver):
        self.sandbox, self.receiver = sandbox, receiver

    def subscribe(self, secret: str) -> dict:
        self.sandbox.configure(self.kind, extra={"webhook_url": f"{self.receiver.url}/webhooks/{self.account}",
                                                 "webhook_secret": secret})
        return {}

    def is_about(self, body: dict, msg) -> bool:
        return body.get("id") == msg.provider_ref

    def reported_status(self, body: dict) -> str:
        return body["status"]


class Emnify:
    """PATCHes the SMS object at each status change after submission, with a HS256 JWT."""

    kind, account, to = "emnify", "iot", "12345"
    provider_words = ["In progress", "Delivered"]

    def __init__(self, sandbox, receiver):
        self.sandbox, self.receiver = sandbox, receiver

    def subscribe(self, secret: str) -> dict:
        self.sandbox.configure(self.kind, extra={"callback_url": f"{self.receiver.url}/webhooks/{self.account}",
                                                 "callback_secret": secret})
        return {}

    def is_about(self, body: dict, msg) -> bool:
        return str(body.get("id")) == msg.provider_ref.partition("/")[2]

    def reported_status(self, body: dict) -> str:
        return body["status"]["description"]


KINDS = {"emsgnow": Emsgnow, "esms_africa": EsmsAfrica, "emnify": Emnify}


@pytest.fixture(params=list(KINDS))
def kind(request, e2e, sandbox):
    return KINDS[request.param](sandbox, e2e)


def send_accepted(kind, secret: str) -> dispatcher.Message:
    """Subscribe the twin with `secret`, then send one message through the pipeline."""
    options = kind.subscribe(secret)
    msg = dispatcher.send(kind.account, kind.to, "hello", **options)
    dispatch_batch([msg.id])
    msg = dispatcher.get(msg.id)
    assert msg.status == "accepted" and msg.provider_ref
    return msg


def reports_about(kind, msg, *, finished: bool = True) -> list:
    """The twin's callback records about `msg` once its final report (and any replay) is done."""
    def settled():
        records = [r for r in kind.sandbox.callbacks(kind.kind) if kind.is_about(r.json, msg)]
        final = [r for r in records if kind.reported_status(r.json).lower() in ("delivered", "failed")]
        return records if final and all(r.done for r in records) else None

    return wait_for(settled, timeout=15)


def assert_never_polled(kind) -> None:
    """No status request reached the twin: only sends (and emnify's token exchange)."""
    reads = [r for r in kind.sandbox.requests(kind.kind) if r.method == "GET"]
    assert reads == []


# --------------------------------------------------------------------------- per kind
def test_reports_alone_bring_the_message_to_delivered_with_each_event_once(kind):
    msg = send_accepted(kind, {"emsgnow": EMSGNOW_SECRET, "esms_africa": ESMS_SECRET,
                               "emnify": EMNIFY_SECRET}[kind.kind])
    got = wait_for(lambda: (m := dispatcher.get(msg.id)).status == "delivered" and m)
    records = reports_about(kind, msg)
    assert [r.replay for r in records] == [False] * len(records)
    # one attempt each; a report that overtook its send's own result got a 503 and a retry
    assert all(r.delivered and all(a.status == 503 for a in r.attempts[:-1]) for r in records)
    got = dispatcher.get(msg.id)
    ids = [e.event_id for e in got.events]
    assert len(ids) == len(set(ids))  # each event once
    assert sum(r.response["stored"] for r in records) == len(got.events)
    stored_words = [e.provider_status for e in got.events]
    answered_unknown = [kind.reported_status(r.json) for r in records if r.status == 202]
    # should a report still race ahead of the send's own result being stored (eMsgNow's
    # "processing" happens at acceptance), the receiver answers 202 and a poll would fetch it
    assert answered_unknown == kind.provider_words[:len(answered_unknown)] and records[-1].status == 200
    expected = [w for w in kind.provider_words if w not in answered_unknown]
    assert [w.lower() for w in stored_words] == [w.lower() for w in expected]
    assert got.events[-1].status == "delivered"
    assert_never_polled(kind)


def test_replayed_reports_store_nothing_new(kind, sandbox):
    sandbox.set_faults(kind.kind, replay_callbacks=True)
    msg = send_accepted(kind, {"emsgnow": EMSGNOW_SECRET, "esms_africa": ESMS_SECRET,
                               "emnify": EMNIFY_SECRET}[kind.kind])
    wait_for(lambda: dispatcher.get(msg.id).status == "delivered")
    records = reports_about(kind, msg)
    originals = [r for r in records if not r.replay]
    replays = [r for r in records if r.replay]
    assert len(replays) == len(originals) > 0
    assert [r.body for r in replays] == [r.body for r in originals]  # byte-for-byte duplicates
    assert all(r.delivered for r in records)
    for original, replay in zip(originals, replays):
        if original.status == 200:  # the report was stored: its duplicate stores nothing
            assert replay.response == {"stored": 0}
        # else 202: it raced ahead of the send's result (eMsgNow's "processing"); the later
        # duplicate finds the message and stores the event, once
    got = dispatcher.get(msg.id)
    assert got.status == "delivered"
    ids = [e.event_id for e in got.events]
    assert len(ids) == len(set(ids)) == sum(r.response["stored"] for r in records)
    assert_never_polled(kind)


def test_a_wrong_secret_is_refused_and_leaves_the_message_to_polling(kind):
    msg = send_accepted(kind, WRONG_SECRET)
    records = reports_about(kind, msg)
    assert records and all(r.done for r in records)
    for record in records:  # each report tried 1 + DEFAULT_RETRIES times, refused every time
        assert [a.status for a in record.attempts] == [401] * (1 + DEFAULT_RETRIES)
        assert record.response == {"error": "unauthorized"}
    got = dispatcher.get(msg.id)
    assert got.status == "accepted" and len(got.events) == 0
    assert_never_polled(kind)

    report = poll(clock=lambda: utcnow() + timedelta(seconds=5))  # polling still settles it
    assert report.finished == 1
    assert dispatcher.get(msg.id).status == "delivered"


# --------------------------------------------------------------------------- the log keeps no secret
def test_the_callback_log_masks_tokens_and_bearer_credentials(e2e, sandbox):
    em, en = Emsgnow(sandbox, e2e), Emnify(sandbox, e2e)
    sent = [send_accepted(em, EMSGNOW_SECRET), send_accepted(en, EMNIFY_SECRET)]
    for helper, msg in zip((em, en), sent):
        reports_about(helper, msg)
    records = sandbox.callbacks()
    shown = repr([r.to_json() for r in records])
    assert EMSGNOW_SECRET not in shown and EMNIFY_SECRET not in shown
    assert all(r.url.endswith("?token=***") for r in records if r.kind == "emsgnow")
    assert all(r.headers["Authorization"] == "Bearer ***" for r in records if r.kind == "emnify")

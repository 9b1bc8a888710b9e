"""Every provider kind through the whole pipeline: send() -> worker -> sandbox twin -> store.

For each kind: the exact request the provider received (path, headers, body, signature) and the
recorded outcome, for a success, a permanent error and a transient error.
"""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest

import dispatcher
from dispatcher import runtime

from .conftest import send_out, wait_for, write_config

ACCOUNTS = """
[providers.fly]
kind = "esimfly"
base_url = "{esimfly}"
access_code = "{fly_code}"
secret_key = "{fly_secret}"
rate_limit = "100/s"  # not the published 1000/h: tests send faster than one every 3.6 s

[providers.access]
kind = "esimaccess"
base_url = "{esimaccess}"
access_code = "{acc_code}"
secret_key = "{acc_secret}"

[providers.iot]
kind = "emnify"
base_url = "{emnify}"
application_token = "{emnify_token}"
source_address = "12345"

[providers.africa]
kind = "esms_africa"
base_url = "{esms_africa}"
api_key = "{esms_key}"
sender_id = "eSMSAfrica"
"""


@pytest.fixture()
def all_kinds(dispatcher_env, sandbox, monkeypatch):
    from dispatcher.providers.emnify import clear_token_cache

    c = sandbox.credentials
    extra = ACCOUNTS.format(
        esimfly=sandbox.base_url("esimfly"), fly_code=c("esimfly")["access_code"], fly_secret=c("esimfly")["secret_key"],
        esimaccess=sandbox.base_url("esimaccess"), acc_code=c("esimaccess")["access_code"],
        acc_secret=c("esimaccess")["secret_key"], emnify=sandbox.base_url("emnify"),
        emnify_token=c("emnify")["application_token"], esms_africa=sandbox.base_url("esms_africa"),
        esms_key=c("esms_africa")["api_key"])
    monkeypatch.setenv("DISPATCHER_CONFIG", write_config(dispatcher_env / "all.toml", sandbox, extra=extra))
    runtime.configure(None)
    clear_token_cache()
    yield sandbox
    clear_token_cache()


def settled(mid: str):
    msg = dispatcher.get(mid)
    return msg if msg.status not in ("queued", "sending", "scheduled") else None


def posts(sandbox, kind):
    return [r for r in sandbox.requests(kind) if r.method == "POST" and "authenticate" not in r.path]


# kind -> (account, to, text, options) for a success, and for a permanent refusal
CASES = {
    "emsgnow": (("alerts", "+14155550123", "hello", {}), ("badkey", "+14155550123", "hello", {})),
    "esimfly": (("fly", "8948010010036785060", "hello", {}), ("fly", "8948010010036780001", "hello", {})),
    "esimaccess": (("access", "23072017992029", "hello", {}), ("access", "23072017990002", "hello", {})),
    "emnify": (("iot", "12345", "hello", {}), ("iot", "900001", "hello", {})),
    "esms_africa": (("africa", "+254712345678", "hello", {}), ("africa", "+254712345678", "hello", {"sender_id": "NotMine"})),
}
PERMANENT_CODE = {"emsgnow": "invalid_api_key", "esimfly": "SMS_NOT_SUPPORTED", "esimaccess": "200002",
                  "emnify": None, "esms_africa": "sender_id_not_approved"}


def check_request(kind: str, req, sandbox) -> None:
    """The exact request, as the provider documents it."""
    creds = sandbox.credentials(kind)
    h = req.headers
    if kind == "emsgnow":
        assert req.path == "/sms" and h["x-api-key"] == creds["api_key"]
        assert req.json == {"to": "+14155550123", "from": "ACME", "message": "hello"}
    elif kind == "esimfly":
        assert req.path == "/api/v1/business/esims/send-sms"
        assert req.json == {"iccid": "8948010010036785060", "message": "hello"}
        signed = h["RT-Timestamp"] + h["RT-RequestID"] + creds["access_code"] + req.body.decode()
        expected = hmac.new(creds["secret_key"].encode(), signed.encode(), hashlib.sha256).hexdigest().upper()
        assert h["RT-AccessCode"] == creds["access_code"] and h["RT-Signature"] == expected
    elif kind == "esimaccess":
        assert req.path == "/api/v1/open/esim/sendSms"
        assert (h["RT-AccessCode"], h["RT-SecretKey"]) == (creds["access_code"], creds["secret_key"])
        assert req.json == {"esimTranNo": "23072017992029", "message": "hello"}
    elif kind == "emnify":
        assert req.path == "/api/v1/endpoint/12345/sms" and h["Authorization"].startswith("Bearer ")
        assert req.json == {"source_address": "12345", "payload": "hello"}
    elif kind == "esms_africa":
        assert req.path == "/api/messages/send" and h["Authorization"] == f"Bearer {creds['api_key']}"
        assert req.json == {"to": "+254712345678", "text": "hello", "sender_id": "eSMSAfrica"}
        assert h["Idempotency-Key"]


@pytest.mark.parametrize("kind", list(CASES))
def test_success_is_recorded_with_the_exact_request(kind, all_kinds, celery_worker_thread):
    sandbox = all_kinds
    account, to, text, opts = CASES[kind][0]
    msg = dispatcher.send(account, to, text, **opts)
    done = wait_for(lambda: settled(msg.id))
    assert done.status == "accepted", (done.error_code, done.error)
    [req] = posts(sandbox, kind)
    check_request(kind, req, sandbox)
    assert [a.outcome for a in done.attempt_log] == ["accepted"]
    if kind in ("emsgnow", "emnify", "esms_africa"):
        assert done.provider_ref


@pytest.mark.parametrize("kind", list(CASES))
def test_permanent_error_is_rejected_once_with_the_providers_code(kind, all_kinds, celery_worker_thread):
    sandbox = all_kinds
    account, to, text, opts = CASES[kind][1]
    msg = dispatcher.send(account, to, text, **opts)
    done = wait_for(lambda: settled(msg.id))
    assert done.status == "rejected"
    if PERMANENT_CODE[kind]:
        assert done.error_code == PERMANENT_CODE[kind]
    assert done.error
    assert len(posts(sandbox, kind)) == 1  # never retried


@pytest.mark.parametrize("kind", list(CASES))
def test_transient_error_is_retried_then_accepted(kind, all_kinds, celery_worker_thread):
    sandbox = all_kinds
    account, to, text, opts = CASES[kind][0]
    if kind == "emnify":  # authenticate first, so that the injected failure hits the send itself
        warm = dispatcher.send(account, "12346", "warm-up")
        assert wait_for(lambda: settled(warm.id)).status == "accepted"
    since = sandbox.last_seq
    sandbox.set_faults(kind, fail_next=1, fail_status=503)
    msg = dispatcher.send(account, to, text, **opts)
    done = wait_for(lambda: settled(msg.id))
    assert done.status == "accepted", (done.error_code, done.error)
    assert [a.outcome for a in done.attempt_log] == ["retry", "accepted"]
    assert done.attempt_log[0].http_status == 503
    sends = [r for r in sandbox.requests(kind, since) if r.method == "POST" and "authenticate" not in r.path]
    assert [r.status for r in sends] == [503, 201 if kind == "emnify" else 200]
    check_request(kind, sends[-1], sandbox)


def test_a_hanging_provider_never_delays_another_providers_messages(all_kinds, celery_worker_thread):
    sandbox = all_kinds
    # more hanging esimfly sends (one task each) than the worker has threads
    sandbox.set_faults("esimfly", hang_next=12, hang_ms=4000)
    slow = [dispatcher.send("fly", "8948010010036785060", f"slow {i}").id for i in range(12)]
    wait_for(lambda: len(posts(sandbox, "esimfly")) == 12)  # all twelve are held by the provider
    fast = [dispatcher.send("alerts", "+14155550123", f"fast {i}").id for i in range(5)]
    for mid in fast:
        assert wait_for(lambda: settled(mid)).status == "accepted"
    # every eMsgNow message went through while the esimfly ones were still waiting on their answers
    assert {dispatcher.get(mid).status for mid in slow} == {"sending"}
    for mid in slow:
        assert wait_for(lambda: settled(mid), timeout=30).status == "accepted"


def test_cancel_recalls_an_sms_emnify_still_buffers_and_says_too_late_otherwise(all_kinds, broker_down):
    from datetime import timedelta

    from dispatcher.status import poll
    from dispatcher.store.models import utcnow

    sandbox = all_kinds
    sandbox.configure("emnify", delivery_step=0.01)
    buffered = dispatcher.send("iot", "4477", "device offline: emnify buffers it")  # endpoint ids ending 77
    handed_over = dispatcher.send("fly", "8948010010036785060", "esimfly cannot recall")
    assert send_out(buffered.id, handed_over.id) == {buffered.id: "accepted", handed_over.id: "accepted"}

    def seen_buffered():  # the status poll reads what emnify says of it
        poll(clock=lambda: utcnow() + timedelta(seconds=5))
        return any("uffer" in e.provider_status for e in dispatcher.get(buffered.id).events)

    wait_for(seen_buffered)
    assert dispatcher.cancel(buffered.id).status == "cancelled"
    [delete] = [r for r in sandbox.requests("emnify") if r.method == "DELETE"]
    assert delete.path.startswith("/api/v1/endpoint/4477/sms/") and delete.status == 204
    with pytest.raises(dispatcher.TooLate, match="already accepted"):
        dispatcher.cancel(handed_over.id)

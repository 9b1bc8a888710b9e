"""The sandbox's delivery reports on their own: what each twin sends, signed how, and when.

A small aiohttp receiver on loopback stands in for the webhook receiver (it answers what the
test tells it), so these tests check the twins' side only: the eSMS Africa signature over the
exact body, the emnify JWT, eMsgNow's event bodies, retries after an error or a dead address,
the replay fault, the log over HTTP, and `reset()` cancelling what is pending.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import socket
import threading

import httpx
import jwt
import pytest
from aiohttp import web

from dispatcher.sandbox.callbacks import DEFAULT_RETRIES, masked_url

from .conftest import wait_for

SECRET = "sandbox-callback-secret-0123456789abcdef"


class Catcher:
    """A loopback HTTP server recording every request; answers `status` (200 by default)."""

    def __init__(self) -> None:
        self.received: list[tuple[str, str, dict, bytes]] = []
        self.status = 200
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.url = ""

    async def _handle(self, request: web.Request) -> web.Response:
        self.received.append((request.method, request.path_qs, dict(request.headers), await request.read()))
        return web.json_response({"seen": len(self.received)}, status=self.status)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    def __enter__(self) -> "Catcher":
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture()
def catcher():
    with Catcher() as c:
        yield c


@pytest.fixture()
def sb(clean_sandbox):
    for kind in ("emsgnow", "esms_africa", "emnify"):
        clean_sandbox.configure(kind, delivery_step=0.05)
    return clean_sandbox


def send_emsgnow(sb, callback_url: str, to: str = "+14155550123") -> str:
    r = httpx.post(f"{sb.base_url('emsgnow')}/sms", headers={"x-api-key": sb.credentials("emsgnow")["api_key"]},
                   json={"to": to, "from": "ACME", "message": "hi", "callbackUrl": callback_url})
    return r.json()["trackingId"]


def send_esms(sb, to: str = "+254712345678") -> str:
    r = httpx.post(f"{sb.base_url('esms_africa')}/api/messages/send", json={"to": to, "text": "hi"},
                   headers={"authorization": f"Bearer {sb.credentials('esms_africa')['api_key']}"})
    return r.json()["id"]


def emnify_token(sb) -> str:
    return httpx.post(f"{sb.base_url('emnify')}/api/v1/authenticate", json={
        "application_token": sb.credentials("emnify")["application_token"]}).json()["auth_token"]


def send_emnify(sb, token: str, endpoint: int = 5) -> int:
    r = httpx.post(f"{sb.base_url('emnify')}/api/v1/endpoint/{endpoint}/sms", json={"source_address": "123",
                   "payload": "hi"}, headers={"authorization": f"Bearer {token}"})
    return int(r.headers["Location"].rsplit("/", 1)[1])


def all_done(sb, kind: str, count: int):
    return wait_for(lambda: (rs := sb.callbacks(kind)) and len(rs) >= count and all(r.done for r in rs) and rs)


# --------------------------------------------------------------------------- per kind
def test_emsgnow_posts_each_event_as_its_listing_shows_it(sb, catcher):
    tracking_id = send_emsgnow(sb, f"{catcher.url}/hook?token=abc")
    records = all_done(sb, "emsgnow", 3)
    listing = httpx.get(f"{sb.base_url('emsgnow')}/sms/{tracking_id}/events",
                        headers={"x-api-key": sb.credentials("emsgnow")["api_key"]}).json()["events"]
    assert [r.json for r in records] == [{"messageId": tracking_id, **event} for event in listing]
    assert [r.json["message"]["status"] for r in records] == ["processing", "sent to provider", "delivered"]
    assert [(m, p) for m, p, _, _ in catcher.received] == [("POST", "/hook?token=abc")] * 3
    assert all(r.url.endswith("/hook?token=***") and r.status == 200 for r in records)


def test_emsgnow_sends_nothing_without_a_callback_url(sb, catcher):
    httpx.post(f"{sb.base_url('emsgnow')}/sms", headers={"x-api-key": sb.credentials("emsgnow")["api_key"]},
               json={"to": "+14155550123", "from": "ACME", "message": "hi"})
    send_esms(sb)  # nor do the others without their webhook settings
    send_emnify(sb, emnify_token(sb))
    shown = httpx.get(f"{sb.url}/_sandbox/callbacks").json()
    assert (shown["callbacks"], shown["pending"]) == ([], 0)
    assert catcher.received == []


def test_esms_africa_posts_the_final_message_once_signed_over_the_exact_bytes(sb, catcher):
    sb.configure("esms_africa", extra={"webhook_url": f"{catcher.url}/esms", "webhook_secret": SECRET})
    msg_id = send_esms(sb, "+254712340000")  # "0000": sent, retrying twice, then failed
    [record] = all_done(sb, "esms_africa", 1)
    [(method, path, headers, body)] = catcher.received
    assert (method, path) == ("POST", "/esms")
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert headers["X-Webhook-Signature"] == expected
    sent = json.loads(body)
    shown = httpx.get(f"{sb.base_url('esms_africa')}/api/messages/{msg_id}",
                      headers={"authorization": f"Bearer {sb.credentials('esms_africa')['api_key']}"}).json()
    assert sent == shown and sent["status"] == "failed"
    assert [e["status"] for e in sent["timeline"]] == ["queued", "submitted", "sent", "retrying", "retrying", "failed"]
    assert record.body == body


def test_emnify_patches_each_status_change_with_a_short_lived_hs256_jwt(sb, catcher):
    sb.configure("emnify", extra={"callback_url": f"{catcher.url}/emnify", "callback_secret": SECRET})
    sms_id = send_emnify(sb, emnify_token(sb))
    all_done(sb, "emnify", 2)
    assert [m for m, _, _, _ in catcher.received] == ["PATCH", "PATCH"]
    bodies = [json.loads(body) for _, _, _, body in catcher.received]
    assert [b["id"] for b in bodies] == [sms_id, sms_id]
    assert [b["status"] for b in bodies] == [{"id": 2, "description": "In progress"},
                                             {"id": 4, "description": "Delivered"}]
    for _, _, headers, _ in catcher.received:
        scheme, _, token = headers["Authorization"].partition(" ")
        claims = jwt.decode(token, SECRET, algorithms=["HS256"])
        assert scheme == "Bearer" and 0 < claims["exp"] - claims["iat"] <= 300


def test_emnify_reports_a_cancellation_at_once_and_no_expiry_after_it(sb, catcher):
    sb.configure("emnify", extra={"callback_url": f"{catcher.url}/emnify", "callback_secret": SECRET})
    token = emnify_token(sb)
    sms_id = send_emnify(sb, token, endpoint=177)  # "77": the device is offline, the SMS is buffered
    wait_for(lambda: len(catcher.received) == 1)
    assert json.loads(catcher.received[0][3])["status"]["id"] == 3
    cancel = httpx.delete(f"{sb.base_url('emnify')}/api/v1/endpoint/177/sms/{sms_id}",
                          headers={"authorization": f"Bearer {token}"})
    assert cancel.status_code == 204
    wait_for(lambda: len(catcher.received) == 2)
    assert json.loads(catcher.received[1][3])["status"] == {"id": 7, "description": "Canceled"}


# --------------------------------------------------------------------------- delivery mechanics
def test_a_refused_report_is_retried_then_given_up(sb, catcher):
    catcher.status = 500
    send_emsgnow(sb, f"{catcher.url}/hook", to="+14155550199")
    records = all_done(sb, "emsgnow", 3)
    assert all([a.status for a in r.attempts] == [500] * (1 + DEFAULT_RETRIES) for r in records)
    assert not any(r.delivered for r in records)
    assert len(catcher.received) == 3 * (1 + DEFAULT_RETRIES)


def test_an_unreachable_receiver_is_retried_and_the_error_recorded(sb):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/hook"
    sb.configure("esms_africa", extra={"webhook_url": dead, "webhook_secret": SECRET, "callback_retries": 1})
    send_esms(sb)
    [record] = all_done(sb, "esms_africa", 1)
    assert [a.status for a in record.attempts] == [None, None]
    assert all(a.error for a in record.attempts)


def test_the_replay_fault_sends_each_report_twice_byte_for_byte(sb, catcher):
    sb.set_faults("emsgnow", replay_callbacks=True)
    send_emsgnow(sb, f"{catcher.url}/hook")
    records = all_done(sb, "emsgnow", 6)
    originals, replays = [r for r in records if not r.replay], [r for r in records if r.replay]
    assert len(originals) == len(replays) == 3
    assert sorted(r.body for r in originals) == sorted(r.body for r in replays)
    assert len(catcher.received) == 6


def test_reset_cancels_pending_reports(sb, catcher):
    sb.configure("emsgnow", delivery_step=1.0)
    send_emsgnow(sb, f"{catcher.url}/hook")
    wait_for(lambda: len(catcher.received) == 1)  # "processing", at once; two more are pending
    info = wait_for(lambda: (i := httpx.get(f"{sb.url}/_sandbox/callbacks").json())["pending"] == 2 and i)
    assert len(info["callbacks"]) == 1
    sb.reset()
    after = httpx.get(f"{sb.url}/_sandbox/callbacks").json()
    assert (after["callbacks"], after["pending"]) == ([], 0)
    with pytest.raises(AssertionError):
        wait_for(lambda: len(catcher.received) > 1, timeout=2.5)


def test_the_log_over_http_filters_by_kind_and_since(sb, catcher):
    sb.configure("esms_africa", extra={"webhook_url": f"{catcher.url}/esms", "webhook_secret": SECRET})
    send_emsgnow(sb, f"{catcher.url}/hook")
    send_esms(sb)
    all_done(sb, "emsgnow", 3)
    all_done(sb, "esms_africa", 1)
    everything = httpx.get(f"{sb.url}/_sandbox/callbacks").json()
    assert len(everything["callbacks"]) == 4
    only = httpx.get(f"{sb.url}/_sandbox/callbacks", params={"kind": "esms_africa"}).json()["callbacks"]
    assert [c["kind"] for c in only] == ["esms_africa"] and only[0]["status"] == 200 and only[0]["delivered"]
    later = httpx.get(f"{sb.url}/_sandbox/callbacks", params={"since": everything["last_seq"] - 1}).json()
    assert [c["seq"] for c in later["callbacks"]] == [everything["last_seq"]]
    assert httpx.get(f"{sb.url}/_sandbox/callbacks", params={"since": "x"}).status_code == 400


def test_replay_callbacks_must_be_a_boolean(sb):
    r = httpx.post(f"{sb.url}/_sandbox/faults", json={"kind": "emsgnow", "replay_callbacks": "yes"})
    assert r.status_code == 400
    ok = httpx.post(f"{sb.url}/_sandbox/faults", json={"kind": "emsgnow", "replay_callbacks": True})
    assert ok.json()["replay_callbacks"] is True


def test_masked_url_hides_secret_query_values_only():
    assert masked_url("http://h/w/a?token=s3cret&x=1") == "http://h/w/a?token=***&x=1"
    assert masked_url("http://h/w/a") == "http://h/w/a"


def test_callback_delay_holds_each_report_after_its_event(sb, catcher):
    sb.configure("emsgnow", delivery_step=0.05, extra={"callback_delay": 0.3})
    send_emsgnow(sb, f"{catcher.url}/hook")
    records = all_done(sb, "emsgnow", 3)
    assert all(r.attempts[0].at >= r.due_at + 0.3 for r in records)

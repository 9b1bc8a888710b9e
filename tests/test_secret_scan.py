"""No secret anywhere: a full run end to end, then a search for every configured secret.

Messages go through all five kinds (eMsgNow with a callback_url carrying ?token=, eSMS Africa
and emnify reporting to the webhook receiver, esimfly with a retry, eSIM Access in both auth
modes, a wrong API key, a held and a cancelled message, a status poll, a report with a wrong
token) on the session's real Celery worker, the sandbox and the receiver. Then every secret
(each credential, each webhook secret, the token in the callback URL, the emnify auth tokens
the sandbox handed out, the wrong token a caller presented) is searched for in:

* the log records of the run, at DEBUG (dispatcher, celery, kombu, httpx, aiohttp);
* the bytes of the SQLite database (its -wal and -shm files too);
* every Redis key and value under the session prefix, snapshotted while the run goes on, and
  the body and headers of every task published (base64 bodies decoded);
* the output of `dispatcher status ID` and `status ID --json` for each message, `limits` and
  `check-config`.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import secrets
import threading
import urllib.error
import urllib.request
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from celery.signals import before_task_publish

import dispatcher
from dispatcher import runtime
from dispatcher.cli import main
from dispatcher.providers.emnify import clear_token_cache
from dispatcher.schedule import tick
from dispatcher.status import poll
from dispatcher.store.models import FINAL, utcnow

from .conftest import wait_for, write_config

SCANNED_LOGGERS = ("dispatcher", "celery", "kombu", "httpx", "httpcore", "aiohttp")


def _secret(name: str) -> str:
    return f"{name}-{secrets.token_hex(12)}"


@pytest.fixture()
def scan_env(dispatcher_env, sandbox, receiver, redis_url, redis_prefix, monkeypatch):
    """Fresh secrets everywhere: the sandbox accepts them, the config names them through ${ENV}."""
    s = {
        "EMSGNOW_KEY": _secret("emsgnow-key"), "HOOK_TOKEN": _secret("hook-token"),
        "ESMS_KEY": _secret("esms-key"), "ESMS_HOOK": _secret("esms-hook"),
        "EMNIFY_APP_TOKEN": _secret("emnify-app"), "EMNIFY_HOOK": _secret("emnify-hook"),
        "FLY_CODE": _secret("fly-code"), "FLY_SECRET": _secret("fly-secret"),
        "ACCESS_CODE": _secret("access-code"), "ACCESS_SECRET": _secret("access-secret"),
        "WRONG_KEY": _secret("wrong-key"),
    }
    for name, value in s.items():
        monkeypatch.setenv(name, value)
    sandbox.configure("emsgnow", credentials={"api_key": s["EMSGNOW_KEY"]}, delivery_step=0.05)
    sandbox.configure("esms_africa", credentials={"api_key": s["ESMS_KEY"]}, delivery_step=0.05,
                      extra={"webhook_url": f"{receiver.url}/webhooks/africa", "webhook_secret": s["ESMS_HOOK"]})
    sandbox.configure("emnify", credentials={"application_token": s["EMNIFY_APP_TOKEN"]}, delivery_step=0.05,
                      extra={"callback_url": f"{receiver.url}/webhooks/iot", "callback_secret": s["EMNIFY_HOOK"]})
    sandbox.configure("esimfly", credentials={"access_code": s["FLY_CODE"], "secret_key": s["FLY_SECRET"]})
    sandbox.configure("esimaccess", credentials={"access_code": s["ACCESS_CODE"], "secret_key": s["ACCESS_SECRET"]})
    for kind in ("emsgnow", "esms_africa", "emnify"):
        sandbox.configure(kind, extra={"callback_delay": 0.2, "callback_timeout": 10.0})
    extra = f"""
[providers.hooks]
kind = "emsgnow"
base_url = "{sandbox.base_url("emsgnow")}"
api_key = "${{EMSGNOW_KEY}}"
from = "ACME"
webhook_secret = "${{HOOK_TOKEN}}"
callback_url = "{receiver.url}/webhooks/hooks?token=${{HOOK_TOKEN}}"

[providers.plain]
kind = "emsgnow"
base_url = "{sandbox.base_url("emsgnow")}"
api_key = "${{EMSGNOW_KEY}}"
from = "ACME"

[providers.wrongkey]
kind = "emsgnow"
base_url = "{sandbox.base_url("emsgnow")}"
api_key = "${{WRONG_KEY}}"
from = "ACME"

[providers.africa]
kind = "esms_africa"
base_url = "{sandbox.base_url("esms_africa")}"
api_key = "${{ESMS_KEY}}"
sender_id = "eSMSAfrica"
webhook_secret = "${{ESMS_HOOK}}"

[providers.iot]
kind = "emnify"
base_url = "{sandbox.base_url("emnify")}"
application_token = "${{EMNIFY_APP_TOKEN}}"
source_address = "12345"
webhook_secret = "${{EMNIFY_HOOK}}"

[providers.fly]
kind = "esimfly"
base_url = "{sandbox.base_url("esimfly")}"
access_code = "${{FLY_CODE}}"
secret_key = "${{FLY_SECRET}}"

[providers.access]
kind = "esimaccess"
base_url = "{sandbox.base_url("esimaccess")}"
access_code = "${{ACCESS_CODE}}"
secret_key = "${{ACCESS_SECRET}}"

[providers.access_hmac]
kind = "esimaccess"
base_url = "{sandbox.base_url("esimaccess")}"
access_code = "${{ACCESS_CODE}}"
secret_key = "${{ACCESS_SECRET}}"
auth = "hmac"
"""
    monkeypatch.setenv("DISPATCHER_CONFIG", write_config(dispatcher_env / "scan.toml", sandbox, extra=extra))
    runtime.configure(None)
    clear_token_cache()
    yield s
    clear_token_cache()


class RedisWatcher:
    """Snapshots every key and value under the session prefix while the run goes on."""

    def __init__(self, url: str, prefix: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.prefix = prefix
        self.seen: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RedisWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)
        self.snapshot()
        self.client.close()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.snapshot()

    def snapshot(self) -> None:
        for key in self.client.scan_iter(f"{self.prefix}*", count=1000):
            self.seen.append(key)
            kind = self.client.type(key)
            if kind == b"string":
                self.seen.append(self.client.get(key) or b"")
            elif kind == b"list":
                self.seen.extend(self.client.lrange(key, 0, -1))
            elif kind == b"hash":
                for field, value in self.client.hgetall(key).items():
                    self.seen += [field, value]
            elif kind == b"set":
                self.seen.extend(self.client.smembers(key))
            elif kind == b"zset":
                self.seen.extend(self.client.zrange(key, 0, -1))


def _decoded(blobs: list[bytes]) -> list[bytes]:
    """The blobs and every base64 run inside them decoded (kombu keeps task bodies in base64)."""
    out = list(blobs)
    for blob in blobs:
        for run in re.findall(rb"[A-Za-z0-9+/]{16,}={0,2}", blob):
            try:
                out.append(base64.b64decode(run + b"=" * (-len(run) % 4)))
            except (binascii.Error, ValueError):
                pass
    return out


def _find(secrets_by_name: dict[str, str], blobs: list[bytes]) -> dict[str, str]:
    found = {}
    for name, value in secrets_by_name.items():
        needle = value.encode()
        for blob in blobs:
            if needle in blob:
                i = blob.index(needle)
                found[name] = blob[max(0, i - 120): i + len(needle) + 40].decode("utf-8", "replace")
                break
    return found


def test_no_secret_in_logs_database_redis_tasks_or_output(scan_env, celery_worker_thread, sandbox, receiver,
                                                          redis_url, redis_prefix, caplog, capsys):
    s = scan_env
    for name in SCANNED_LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name)
    published: list[bytes] = []

    def on_publish(body=None, headers=None, **_):  # the task's arguments as they leave for the broker
        published.append(json.dumps([body, headers], default=repr).encode())

    before_task_publish.connect(on_publish, weak=False)
    sandbox.set_faults("esimfly", fail_next=1, fail_status=503)  # one retry
    wrong_token = _secret("presented-token")
    try:
        with RedisWatcher(redis_url, redis_prefix) as watcher:
            sent = [
                dispatcher.send("hooks", "+14155550123", "via webhooks"),
                dispatcher.send("plain", "+14155550124", "via polling"),
                dispatcher.send("wrongkey", "+14155550125", "refused by the provider"),
                dispatcher.send("africa", "+254712345678", "karibu"),
                dispatcher.send("iot", "12345", "reboot " * 30),  # two parts
                dispatcher.send("fly", "8948010010036785060", "esim ready"),
                dispatcher.send("access", "23072017992029", "plan active"),
                dispatcher.send("access_hmac", "23072017992029", "plan active (hmac)"),
                dispatcher.send("hooks", "+14155550126", "held", not_before=utcnow() + timedelta(seconds=1)),
            ]
            ids = [m.id for m in sent]
            ids += dispatcher.send_many([{"provider": "plain", "to": "+14155550127", "text": "bulk",
                                          "idempotency_key": "scan-bulk-1"}])
            cancelled = dispatcher.send("hooks", "+14155550128", "never", not_before=utcnow() + timedelta(days=1))
            dispatcher.cancel(cancelled.id)
            ids.append(cancelled.id)
            # a caller presenting a wrong token is refused, and its token is not logged either (urllib:
            # the test's own client must not log the URL it calls, as httpx would)
            request = urllib.request.Request(f"{receiver.url}/webhooks/hooks?token={wrong_token}",
                                             data=b'{"messageId": "x"}', method="POST")
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=10)
            assert refused.value.code == 401

            def all_done():
                tick()
                poll(clock=lambda: utcnow() + timedelta(seconds=5))
                states = {i: dispatcher.get(i).status for i in ids}
                settled = all(st in FINAL or (st == "accepted" and i in (ids[5], ids[6], ids[7]))
                              for i, st in states.items())
                return states if settled else None

            states = wait_for(all_done, timeout=60, interval=0.2)
            wait_for(lambda: all(r.done for r in sandbox.callbacks()), timeout=20)
    finally:
        before_task_publish.disconnect(on_publish)
    assert states[ids[0]] == "delivered" and states[ids[3]] == "delivered" and states[ids[4]] == "delivered"
    assert states[ids[2]] == "rejected" and states[ids[5]] == "accepted"

    # everything the run showed
    outputs = []
    for mid in ids:
        for argv in (["status", mid], ["status", mid, "--json"]):
            assert main(argv) == 0
            outputs.append(capsys.readouterr().out)
    assert main(["limits"]) == 0
    outputs.append(capsys.readouterr().out)
    assert main(["check-config"]) == 0
    outputs.append(capsys.readouterr().out)

    database = Path(runtime.settings().database_url.removeprefix("sqlite:///"))
    db_bytes = [p.read_bytes() for p in (database, Path(f"{database}-wal"), Path(f"{database}-shm")) if p.exists()]
    log_text = "\n".join(
        f"{r.name} {r.levelname} {r.getMessage()} {caplog.handler.format(r) if r.exc_info else ''}"
        for r in caplog.records if r.name.startswith(SCANNED_LOGGERS))

    auth_tokens = {f"EMNIFY_AUTH_TOKEN_{i}": r.response_json["auth_token"]
                   for i, r in enumerate(sandbox.requests("emnify"))
                   if r.path.endswith("/authenticate") and isinstance(r.response_json, dict)
                   and r.response_json.get("auth_token")}
    assert auth_tokens, "the sandbox handed out an emnify auth token"
    every_secret = dict(s, **auth_tokens, PRESENTED_TOKEN=wrong_token)
    assert len(watcher.seen) > 0 and published, "the scan saw Redis and the published tasks"
    assert len(caplog.records) > 10, "the scan saw the run's logs"

    leaks = {
        "logs": _find(every_secret, [log_text.encode()]),
        "database": _find(every_secret, db_bytes),
        "redis": _find(every_secret, _decoded(watcher.seen)),
        "task arguments": _find(every_secret, _decoded(published)),
        "command output": _find(every_secret, [o.encode() for o in outputs]),
    }
    assert {where: found for where, found in leaks.items() if found} == {}

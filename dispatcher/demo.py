"""`dispatcher demo`: the whole pipeline on the sandbox, end to end, shown as it happens.

It starts what it needs on loopback (the sandbox and the webhook receiver in this process,
a Celery worker and a beat as child processes, a SQLite store in a temporary directory, its
own Redis key prefix), sends a handful of messages through every provider kind, prints each
status change as it happens, and stops what it started once every message has reached a
final status. The eMsgNow account `alerts` gives the sandbox a callback URL, so its messages
are settled by the sandbox's delivery reports; the others by status polling, which starts
`poll_first` seconds after acceptance, late enough for the reports to come first. The
summary says which of the two settled each message.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from .redact import mask

FINAL = {"delivered", "failed", "rejected", "expired", "cancelled", "unknown"}
# accepted is the last status esimfly and eSIM Access can report (no status endpoint)
FINAL_FOR_KIND = {"esimfly": FINAL | {"accepted"}, "esimaccess": FINAL | {"accepted"}}


def _config(sandbox, receiver_url: str) -> str:  # type: ignore[no-untyped-def]
    c = sandbox.credentials
    return f"""
[dispatcher]
retry_base = 0.5
retry_cap = 5.0
max_attempts = 4
tick_seconds = 0.5
poll_seconds = 0.5
poll_first = 2.0

[providers.alerts]
kind = "emsgnow"
base_url = "{sandbox.base_url('emsgnow')}"
api_key = "${{DEMO_EMSGNOW_KEY}}"
from = "ACME"
rate_limit = "10/s"
webhook_secret = "${{DEMO_WEBHOOK_SECRET}}"
callback_url = "{receiver_url}/webhooks/alerts?token=${{DEMO_WEBHOOK_SECRET}}"

[providers.broken]
kind = "emsgnow"
base_url = "{sandbox.base_url('emsgnow')}"
api_key = "not-the-right-key"
from = "ACME"

[providers.esim]
kind = "esimfly"
base_url = "{sandbox.base_url('esimfly')}"
access_code = "{c('esimfly')['access_code']}"
secret_key = "${{DEMO_ESIMFLY_SECRET}}"

[providers.esim_access]
kind = "esimaccess"
base_url = "{sandbox.base_url('esimaccess')}"
access_code = "{c('esimaccess')['access_code']}"
secret_key = "${{DEMO_ESIMACCESS_SECRET}}"

[providers.iot]
kind = "emnify"
base_url = "{sandbox.base_url('emnify')}"
application_token = "${{DEMO_EMNIFY_TOKEN}}"
source_address = "12345"

[providers.africa]
kind = "esms_africa"
base_url = "{sandbox.base_url('esms_africa')}"
api_key = "${{DEMO_ESMS_KEY}}"
sender_id = "eSMSAfrica"
"""


def _secrets(sandbox) -> dict[str, str]:  # type: ignore[no-untyped-def]
    c = sandbox.credentials
    return {
        "DEMO_EMSGNOW_KEY": c("emsgnow")["api_key"],
        "DEMO_ESIMFLY_SECRET": c("esimfly")["secret_key"],
        "DEMO_ESIMACCESS_SECRET": c("esimaccess")["secret_key"],
        "DEMO_EMNIFY_TOKEN": c("emnify")["application_token"],
        "DEMO_ESMS_KEY": c("esms_africa")["api_key"],
        "DEMO_WEBHOOK_SECRET": secrets.token_hex(16),
    }


def _sends() -> list[tuple[str, str, dict]]:
    """(label, account, send() arguments); `not_before` given in seconds from the moment of sending."""
    return [
        ("an OTP that is delivered", "alerts", dict(to="+14155550123", text="Your code is 482910")),
        ("a number the network cannot reach", "alerts", dict(to="+14155550000", text="Hello?")),
        ("first attempt hits a 500, the retry gets through", "alerts", dict(to="+14155550124", text="Retry me")),
        ("an account with a wrong API key", "broken", dict(to="+14155550125", text="Refused")),
        ("held until 3 s from now", "alerts", dict(to="+14155550126", text="Scheduled", not_before=3)),
        ("scheduled an hour ahead, then cancelled", "alerts", dict(to="+14155550127", text="Never", not_before=3600)),
        ("an eSIM by ICCID (esimfly, HMAC-signed)", "esim", dict(to="8948010010036785060", text="Welcome! Your eSIM is ready.")),
        ("an eSIM by esimTranNo (eSIM Access)", "esim_access", dict(to="23072017992029", text="Your data plan is active")),
        ("a long text to an IoT device in 2 parts (emnify)", "iot", dict(to="12345", text="Reboot scheduled. " * 10)),
        ("a number in Kenya (eSMS Africa)", "africa", dict(to="+254712345678", text="Your OTP is 482910")),
    ]


def run_demo(keep: bool = False) -> int:
    from .services import require_redis

    redis_url = os.environ.get("DISPATCHER_REDIS_URL", "redis://localhost:6379/0")
    require_redis(redis_url)
    from .sandbox.server import SandboxThread
    from .webhooks import ReceiverThread

    workdir = Path(tempfile.mkdtemp(prefix="dispatcher-demo-"))
    procs: list[subprocess.Popen] = []
    prefix = f"demo{os.getpid()}"
    with SandboxThread(port=0) as sandbox, ReceiverThread(port=0) as receiver:
        for kind in ("emsgnow", "esms_africa", "emnify"):
            sandbox.configure(kind, delivery_step=0.5)
        sandbox.configure("emsgnow", extra={"callback_delay": 0.25})  # reports lag their events a little
        config = workdir / "dispatcher.toml"
        config.write_text(_config(sandbox, receiver.url))
        overrides = dict(DISPATCHER_CONFIG=str(config), DISPATCHER_DATABASE_URL=f"sqlite:///{workdir / 'demo.db'}",
                         DISPATCHER_REDIS_URL=redis_url, DISPATCHER_REDIS_PREFIX=prefix, **_secrets(sandbox))
        os.environ.update(overrides)  # this process sends; the children run the worker and beat
        env = dict(os.environ)
        from . import api, runtime
        from .store.db import upgrade

        runtime.configure(None)
        print(f"sandbox      {sandbox.url} (all five provider APIs)")
        print(f"webhooks     {receiver.url}/webhooks/alerts (eMsgNow reports each delivery event there)")
        print(f"store        {workdir / 'demo.db'} (migrations applied)")
        upgrade(runtime.settings().database_url)
        log = open(workdir / "processes.log", "w")
        cmd = [sys.executable, "-m", "dispatcher.cli"]
        procs.append(subprocess.Popen([*cmd, "worker", "--loglevel", "WARNING", "-c", "8"], env=env, stdout=log, stderr=log))
        procs.append(subprocess.Popen([*cmd, "beat", "--loglevel", "WARNING", "-s", str(workdir / "beat-schedule")],
                                      env=env, stdout=log, stderr=log))
        print(f"worker, beat started (log: {workdir / 'processes.log'})\n")
        try:
            ids: list[tuple[str, str]] = []
            sends = sorted(_sends(), key=lambda item: not item[0].startswith("first attempt"))
            for label, account, kw in sends:
                if "not_before" in kw:
                    kw = dict(kw, not_before=datetime.now(timezone.utc) + timedelta(seconds=kw["not_before"]))
                if label.startswith("first attempt"):  # sent alone, so that it is the one the fault hits
                    sandbox.set_faults("emsgnow", fail_next=1, fail_status=500)
                    msg = api.send(account, **kw)
                    _wait_first_attempt(api, msg.id)
                    ids.append((msg.id, label))
                    continue
                msg = api.send(account, **kw)
                ids.append((msg.id, label))
                if "cancelled" in label:
                    api.cancel(msg.id)
            try:
                api.send("alerts", "+14155550128", "x" * 200)
            except Exception as exc:  # noqa: BLE001 - shown to the user as the point of the demo
                print(f"refused before storing: {type(exc).__name__}: {exc}\n")
            ok = _watch(api, ids, timeout=60.0, settled_by=lambda msg: _settled_by(sandbox, msg))
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
            _cleanup_redis(redis_url, prefix)
    if not keep and ok:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"\nworking directory kept: {workdir}")
    return 0 if ok else 1


def _wait_first_attempt(api, message_id: str, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not api.get(message_id).attempt_log and time.monotonic() < deadline:
        time.sleep(0.05)


def _settled_by(sandbox, msg) -> str:  # type: ignore[no-untyped-def]
    """"webhook" when a delivery report stored the message's final event, else "status poll"."""
    for record in sandbox.callbacks("emsgnow"):
        body, answer = record.json or {}, record.response or {}
        final = str((body.get("message") or {}).get("status", "")).lower() in ("delivered", "failed", "expired")
        if body.get("messageId") == msg.provider_ref and final and answer.get("stored", 0) > 0:
            return "webhook"
    return "status poll"


def _watch(api, ids: list[tuple[str, str]], timeout: float,  # type: ignore[no-untyped-def]
           settled_by=lambda msg: "status poll") -> bool:
    paths: dict[str, list[str]] = {mid: [] for mid, _ in ids}
    start = time.monotonic()
    done: set[str] = set()
    while time.monotonic() - start < timeout and len(done) < len(ids):
        for mid, label in ids:
            if mid in done:
                continue
            msg = api.get(mid)
            if not paths[mid] or paths[mid][-1] != msg.status:
                paths[mid].append(msg.status)
                t = time.monotonic() - start
                print(f"{t:6.2f}s  {msg.provider:<11} {mask(msg.to):<16} {' -> '.join(paths[mid])}")
            if msg.status in FINAL_FOR_KIND.get(msg.kind, FINAL):
                done.add(mid)
        time.sleep(0.1)
    print("\nwhere every message ended:")
    for mid, label in ids:
        msg = api.get(mid)
        why = f"  ({msg.error_code}: {msg.error})" if msg.error_code else ""
        print(f"  {msg.status:<10} {label}{why}")
        if msg.events:
            how = f"  [settled by {settled_by(msg)}]" if msg.status in FINAL and msg.status != "unknown" else ""
            print("             events: " + ", ".join(e.provider_status for e in msg.events) + how)
    if len(done) < len(ids):
        print(f"\n{len(ids) - len(done)} message(s) did not reach a final status within {timeout:.0f}s")
        return False
    print(f"\nall {len(ids)} messages reached a final status in {time.monotonic() - start:.1f}s")
    return True


def _cleanup_redis(url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        for key in client.scan_iter(f"{prefix}*", count=1000):
            client.delete(key)
    finally:
        client.close()

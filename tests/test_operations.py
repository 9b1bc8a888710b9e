"""Running it for real: a worker of several processes, its metrics, its JSON logs, `health`, `stats`.

The worker here is the real `dispatcher worker --processes 2` command in a subprocess, on a
Redis key prefix of its own (so the session's in-process worker never takes its tasks), sending
to the sandbox over HTTP.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone

import pytest

import dispatcher
from dispatcher import health, runtime
from dispatcher.cli import main
from dispatcher.testing import wait_until_settled

from .conftest import wait_for

PHONE = "+14155550123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """{(sample name, labels): value} from the endpoint's Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture()
def worker_env(dispatcher_env, redis_url):
    """The environment of a worker subprocess on this test's store, config and own key prefix."""
    env = dict(os.environ, DISPATCHER_REDIS_PREFIX=f"ops{os.getpid()}{time.monotonic_ns() % 10**6}",
               DISPATCHER_REDIS_URL=redis_url)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return env


def publish(env: dict, ids: list[str], batch_size: int = 1) -> None:
    """Enqueue dispatch tasks where the subprocess worker (its broker and prefix) consumes them."""
    from dispatcher.testing import WorkerProcesses

    WorkerProcesses(0, env).publish(ids, batch_size=batch_size)


# an account whose callback URL carries a secret token (to a closed loopback port: reports go nowhere)
HOOKED = """
[providers.hooked]
kind = "emsgnow"
base_url = "{url}"
api_key = "{key}"
from = "ACME"
callback_url = "http://127.0.0.1:9/webhooks/hooked?token=s3cr3t-token-value"
"""


def test_two_processes_serve_one_metrics_endpoint_and_log_json_without_secrets(worker_env, sandbox, broker_down,
                                                                               tmp_path):
    from .conftest import write_config

    write_config(tmp_path / "dispatcher.toml", sandbox, extra=HOOKED.format(
        url=sandbox.base_url("emsgnow"), key=sandbox.credentials("emsgnow")["api_key"]))
    runtime.configure(None)
    port = free_port()
    env = dict(worker_env, DISPATCHER_LOG_FORMAT="json", DISPATCHER_METRICS_PORT=str(port))
    log_path = tmp_path / "worker.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dispatcher.cli", "worker", "--processes", "2",
             "--loglevel", "INFO", "-c", "4", "--without-gossip", "--without-mingle", "--without-heartbeat"],
            env=env, stdout=subprocess.DEVNULL, stderr=log)
    try:
        from dispatcher.celery_app import create_app

        app = create_app(prefix=env["DISPATCHER_REDIS_PREFIX"])
        try:  # two Celery nodes answer, each its own process, neither the supervisor
            stats = wait_for(lambda: (lambda s: s if s and len(s) == 2 else None)(
                app.control.inspect(timeout=1).stats()), timeout=60)
        finally:
            app.close()
        pids = {node: info["pid"] for node, info in stats.items()}
        assert len(set(pids.values())) == 2 and proc.pid not in pids.values()
        assert sorted(n.split("@")[0] for n in pids) == ["dispatcher1", "dispatcher2"]
        for pid in pids.values():  # both are the supervisor's children
            assert int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1]) == proc.pid

        sent = [dispatcher.send("hooked", PHONE, f"hello {i}").id for i in range(12)]
        refused = [dispatcher.send("badkey", PHONE, "never").id for _ in range(3)]
        # waiting, not sent: one due an hour ago that no task carries, one due tomorrow
        due = dispatcher.send("alerts", PHONE, "stuck")
        from dispatcher.store.db import session_scope
        from dispatcher.store.models import Message

        with session_scope(runtime.settings().database_url) as db:
            db.get(Message, due.id).due_at = datetime.now(timezone.utc) - timedelta(hours=1)
        dispatcher.send("alerts", PHONE, "tomorrow", not_before=datetime.now(timezone.utc) + timedelta(days=1))

        publish(env, sent + refused)
        statuses = wait_until_settled(sent + refused, timeout=60)
        assert {statuses[i] for i in sent} == {"accepted"} and {statuses[i] for i in refused} == {"rejected"}

        samples = wait_for(lambda: (lambda s: s if value(s, "dispatcher_sends_total", account="badkey",
                                                          outcome="rejected", code="invalid_api_key") == 3 else None)(scrape(port)))
        assert value(samples, "dispatcher_sends_total", account="hooked", outcome="accepted", code="") == 12
        assert value(samples, "dispatcher_send_latency_seconds_count", account="hooked") == 12
        assert value(samples, "dispatcher_send_latency_seconds_sum", account="hooked") > 0
        assert value(samples, "dispatcher_queue_depth", account="alerts", status="queued") == 1
        assert value(samples, "dispatcher_queue_depth", account="alerts", status="scheduled") == 1
        assert value(samples, "dispatcher_queue_depth", account="alerts", status="sending") == 0
        assert 3590 < value(samples, "dispatcher_oldest_due_age_seconds", account="alerts") < 3700
        assert value(samples, "dispatcher_up", source="store") == 1

        snapshot = subprocess.run([sys.executable, "-m", "dispatcher.cli", "stats", "--once", "--json"], env=env,
                                  capture_output=True, text=True, timeout=60)
        assert snapshot.returncode == 0, snapshot.stderr
        accounts = json.loads(snapshot.stdout)["accounts"]
        assert accounts["hooked"]["recent"]["accepted"] == 12 and accounts["alerts"]["waiting"]["queued"] == 1
        assert json.loads(snapshot.stdout)["accounts"]["badkey"]["failures"] == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    assert wait_for(lambda: not any(_alive(pid) for pid in pids.values()), timeout=10)

    lines = [line for line in log_path.read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    outcomes = [r for r in records if r.get("logger") == "dispatcher.dispatch" and "->" in r["message"]]
    assert {r["message_id"] for r in outcomes} == set(sent + refused)
    assert {(r["account"], r["attempt"]) for r in outcomes} == {("hooked", 1), ("badkey", 1)}
    text = log_path.read_text()
    secrets = [sandbox.credentials("emsgnow")["api_key"], "wrong-key", "s3cr3t-token-value", PHONE]
    assert [s for s in secrets if s in text] == []
    assert "+14******123" in text  # the number shows masked


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_json_formatter_hides_what_a_careless_log_call_would_show():
    import logging

    from dispatcher.logs import JsonFormatter, about

    record = logging.LogRecord("dispatcher.x", logging.WARNING, __file__, 1,
                               "sending %s to %s via https://h/cb?token=abc123 with Authorization: Bearer eyJhbGci.x.y "
                               "on postgresql://app:hunter2@db/dispatcher", ("0123456789abcdef0123456789abcdef", PHONE),
                               None)
    out = json.loads(JsonFormatter().format(record))
    assert out["message_id"] == "0123456789abcdef0123456789abcdef" and out["level"] == "WARNING"
    for secret in ("abc123", "eyJhbGci", "hunter2", PHONE):
        assert secret not in out["message"]
    record = logging.LogRecord("dispatcher.x", logging.INFO, __file__, 1, "m", (), None)
    record.__dict__.update(about("id1", "alerts", 2))
    assert {k: json.loads(JsonFormatter().format(record))[k] for k in ("message_id", "account", "attempt")} == \
        {"message_id": "id1", "account": "alerts", "attempt": 2}


# --------------------------------------------------------------------------- health
def test_health_fails_naming_redis_when_it_does_not_answer(dispatcher_env, monkeypatch, capsys):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    monkeypatch.setenv("DISPATCHER_REDIS_URL", f"redis://127.0.0.1:{closed}/0")
    runtime.configure(None)
    assert main(["health"]) == 1
    out = capsys.readouterr().out
    assert re.search(rf"redis\s+FAIL\s+not reachable at redis://127.0.0.1:{closed}/0", out)
    assert re.search(r"store\s+ok", out)
    assert main(["health", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["healthy"] is False and report["checks"]["redis"]["ok"] is False


def test_health_follows_the_beats_tick(dispatcher_env, capsys):
    from dispatcher.schedule import tick

    s = runtime.settings()
    health.record_tick(s.redis_url, now=time.time() - 45)  # the beat stopped 45 s ago
    assert main(["health"]) == 1
    assert re.search(r"beat\s+FAIL\s+last tick 45 s ago", capsys.readouterr().out)

    tick(enqueue=lambda ids, countdown: None)  # a tick runs (as the beat's task would)
    assert main(["health", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["healthy"] is True and set(report["checks"]) == {"redis", "store", "beat"}
    assert main(["health", "--check", "redis", "--check", "store"]) == 0  # a worker's probe: no beat needed


def test_health_fails_naming_the_store(dispatcher_env, monkeypatch, capsys):
    monkeypatch.setenv("DISPATCHER_DATABASE_URL", "postgresql+psycopg://nobody@127.0.0.1:1/none")
    runtime.configure(None)
    assert main(["health", "--check", "store"]) == 1
    assert re.search(r"store\s+FAIL\s+not reachable at postgresql\+psycopg://nobody@127.0.0.1:1/none",
                     capsys.readouterr().out)


# --------------------------------------------------------------------------- one beat
def test_only_one_beat_holds_the_lock_and_a_waiting_one_takes_over(redis_url, redis_client, redis_prefix):
    from dispatcher.beatlock import BeatLock, Holder

    key = f"{redis_prefix}:test:beatlock"
    first, second = BeatLock(redis_url, ttl=2.0, key=key), BeatLock(redis_url, ttl=2.0, key=key)
    lost = []
    holder = Holder(first, on_lost=lambda: lost.append(True), renew_every=0.2)
    holder.wait_and_hold()
    assert not second.acquire() and first.holder() == first.token
    time.sleep(2.5)  # longer than the TTL: only renewal keeps it
    assert not second.acquire()
    second_lost = []
    waiting = Holder(second, on_lost=lambda: second_lost.append(True), renew_every=0.1, wait_every=0.1)
    import threading

    taker = threading.Thread(target=waiting.wait_and_hold)
    taker.start()
    holder.close()  # the first beat stops: the waiting one takes over at once
    taker.join(timeout=5)
    assert second.holder() == second.token and lost == []
    redis_client.set(key, "someone-else")  # lost (say Redis restarted empty and another beat took it)
    wait_for(lambda: second_lost, timeout=5)  # the beat is told to stop rather than tick beside another
    waiting.close()
    assert redis_client.get(key) == b"someone-else"  # a holder never releases a lock it no longer holds


# --------------------------------------------------------------------------- polls and webhooks
def test_status_polls_and_webhook_reports_are_counted(dispatcher_env, sandbox, broker_down, receiver):
    from prometheus_client import REGISTRY

    from dispatcher.dispatch import dispatch_batch
    from dispatcher.status import poll
    from dispatcher.store.models import utcnow

    def count(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    polls_before = count("dispatcher_status_polls_total", account="alerts", result="ok")
    accepted_before = count("dispatcher_sends_total", account="alerts", outcome="accepted", code="")
    msg = dispatcher.send("alerts", PHONE, "poll me")
    dispatch_batch([msg.id])
    assert count("dispatcher_sends_total", account="alerts", outcome="accepted", code="") == accepted_before + 1
    assert poll(clock=lambda: utcnow() + timedelta(seconds=5)).requests == 1
    assert count("dispatcher_status_polls_total", account="alerts", result="ok") == polls_before + 1

    refused_before = count("dispatcher_webhook_reports_total", account="alerts", status="401")
    unknown_before = count("dispatcher_webhook_reports_total", account="(unknown)", status="404")
    for path in ("/webhooks/alerts?token=wrong", "/webhooks/no-such-account", "/webhooks/another-one"):
        request = urllib.request.Request(f"{receiver.url}{path}", data=b"{}", method="POST")
        try:
            urllib.request.urlopen(request, timeout=5)
        except urllib.error.HTTPError:
            pass
    assert count("dispatcher_webhook_reports_total", account="alerts", status="401") == refused_before + 1
    assert count("dispatcher_webhook_reports_total", account="(unknown)", status="404") == unknown_before + 2


def test_a_second_dispatcher_beat_waits_and_takes_over_when_the_first_stops(worker_env, redis_client, tmp_path):
    from dispatcher import keys

    env = dict(worker_env)
    lock = f"{env['DISPATCHER_REDIS_PREFIX']}:beat:lock"
    assert lock.endswith(keys.beat_lock().split(":", 1)[1])

    def beat(name: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "dispatcher.cli", "beat", "--loglevel", "INFO",
                                 "-s", str(tmp_path / f"{name}-schedule")], env=env,
                                stdout=open(tmp_path / f"{name}.log", "w"), stderr=subprocess.STDOUT)

    first = beat("first")
    second = None
    try:
        holder = wait_for(lambda: redis_client.get(lock), timeout=60).decode()
        assert holder.split(":")[1] == str(first.pid)
        second = beat("second")
        wait_for(lambda: "another beat holds the lock" in (tmp_path / "second.log").read_text(), timeout=60)
        assert redis_client.get(lock).decode() == holder  # the second one does not tick
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=30) == 0
        taken = wait_for(lambda: (lambda v: v if v and v.decode() != holder else None)(redis_client.get(lock)),
                         timeout=15).decode()
        assert taken.split(":")[1] == str(second.pid)
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=30)
        redis_client.delete(lock)

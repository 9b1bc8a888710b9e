"""Worker processes killed with SIGKILL at chosen moments: nothing sent twice, nothing lost.

Real `dispatcher worker` processes, the sandbox in a process of its own (it counts what
arrives), the store (SQLite) and Redis; the beat runs as a thread in the test calling the real
tick. Three accounts: `slow` (eMsgNow answering after 2 s: no way to ask it about a lost
request), `paced` (the same eMsgNow, rate-limited to 10/s) and `limited` (eSMS Africa at 20/s,
whose Idempotency-Key makes a resend harmless).

Each round sends a batch, kills a worker at one moment and starts a replacement:
  before the claim | while claims wait for rate-limit slots | with requests in flight |
  while the record is held up by a locked store.
Afterwards: every message is final within 60 s of its round's kill, no SMS exists twice at
the sandbox, and a message whose request never reached the sandbox ended sent, not `unknown`.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections import Counter

import pytest
from sqlalchemy import select

import dispatcher
from dispatcher import runtime
from dispatcher.schedule import tick
from dispatcher.store.db import session_scope
from dispatcher.store.models import Message
from dispatcher.testing import SandboxProcess, WorkerProcesses, wait_until_settled

from .conftest import wait_for, write_config

ACCOUNTS = """
[providers.slow]
kind = "emsgnow"
base_url = "{emsgnow}"
api_key = "{emsgnow_key}"
from = "ACME"

[providers.limited]
kind = "esms_africa"
base_url = "{esms}"
api_key = "{esms_key}"
sender_id = "eSMSAfrica"
rate_limit = "20/s"

[providers.paced]
kind = "emsgnow"
base_url = "{emsgnow_fast}"
api_key = "{emsgnow_key}"
from = "ACME"
rate_limit = "10/s"
"""
ROUNDS = 5  # x 4 moments = 20 kills


class Beat:
    """The beat, as a thread of the test: the real tick every `every` seconds."""

    def __init__(self, enqueue, every: float = 0.5) -> None:
        self.enqueue, self.every = enqueue, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            tick(enqueue=self.enqueue)

    def __enter__(self) -> "Beat":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


@pytest.fixture()
def killing_field(dispatcher_env, broker_down, redis_prefix, monkeypatch):
    with SandboxProcess() as provider:
        provider.configure("esms_africa", rate_limit=100000)
        provider.set_faults("emsgnow", latency_ms=2000)
        extra = ACCOUNTS.format(emsgnow=provider.base_url("emsgnow"), emsgnow_fast=provider.base_url("emsgnow"),
                                emsgnow_key=provider.credentials("emsgnow")["api_key"],
                                esms=provider.base_url("esms_africa"),
                                esms_key=provider.credentials("esms_africa")["api_key"])
        monkeypatch.setenv("DISPATCHER_CONFIG", write_config(dispatcher_env / "kills.toml", provider, extra=extra))
        runtime.configure(None)
        env = dict(os.environ, DISPATCHER_REDIS_PREFIX=f"{redis_prefix}-kills")
        with WorkerProcesses(count=2, env=env, concurrency=8) as workers:
            workers.wait_ready()
            with Beat(workers.enqueue):
                yield provider, workers


def _send(account: str, n: int, tag: str) -> list[str]:
    to = "+254712345678" if account == "limited" else "+14155550123"
    return dispatcher.send_many([{"provider": account, "to": to, "text": f"{tag} {i}"} for i in range(n)])


def _arrived(provider, kind: str, texts: set[str]) -> int:
    key = "message" if kind == "emsgnow" else "text"
    return sum(1 for r in provider.requests(kind) if r["method"] == "POST" and (r.get("json") or {}).get(key) in texts)


def _kill_one(workers: WorkerProcesses) -> float:
    victim = workers.alive()[0]
    workers.spawn()  # its replacement starts at once; the survivor keeps working meanwhile
    workers.kill(victim)
    return time.time()


@pytest.mark.timeout(400)
def test_workers_killed_at_any_moment_never_send_twice_and_lose_nothing(killing_field):
    provider, workers = killing_field
    url = runtime.settings().database_url
    rounds: list[tuple[list[str], float]] = []
    for r in range(ROUNDS):
        # 1. before the claim: the tasks are published and the worker dies at once
        ids = _send("limited", 10, f"r{r} before-claim")
        workers.enqueue(ids)
        rounds.append((ids, _kill_one(workers)))
        # 2. while claims wait for rate-limit slots: 30 at 10/s is three seconds of slots, and
        #    eMsgNow cannot be asked: a claim taken for started would end `unknown`
        ids = _send("paced", 30, f"r{r} waiting-slot")
        workers.enqueue(ids)
        wait_for(lambda: _arrived(provider, "emsgnow", {f"r{r} waiting-slot {i}" for i in range(30)}) >= 5, 30)
        rounds.append((ids, _kill_one(workers)))
        # 3. with requests in flight: the slow provider holds them for two seconds
        ids = _send("slow", 20, f"r{r} in-flight")
        workers.enqueue(ids)
        wait_for(lambda: _arrived(provider, "emsgnow", {f"r{r} in-flight {i}" for i in range(20)}) >= 10, 30)
        rounds.append((ids, _kill_one(workers)))
        # 4. while recording: the answers come back to a store that is locked, then the worker dies
        ids = _send("slow", 10, f"r{r} recording")
        workers.enqueue(ids)
        wait_for(lambda: _arrived(provider, "emsgnow", {f"r{r} recording {i}" for i in range(10)}) >= 10, 30)
        with _locked(url):
            time.sleep(2.5)  # the provider answers after 2 s; the record now waits for the lock
            rounds.append((ids, _kill_one(workers)))
    all_ids = [mid for ids, _ in rounds for mid in ids]
    statuses = wait_until_settled(all_ids, timeout=90, interval=0.5)

    finished = _finished_at(url, all_ids)
    kills = sorted(killed_at for _, killed_at in rounds)
    for ids, sent_before in rounds:
        for mid in ids:  # the kill that last touched it: the latest before it settled
            last_kill = max([k for k in kills if k <= finished[mid]], default=sent_before)
            assert finished[mid] - last_kill <= 60, f"{mid} settled {finished[mid] - last_kill:.0f} s after a kill"

    accounts = _accounts(url, all_ids)
    texts = _texts(url, all_ids)
    posts = _posts_by_text(provider)  # requests that reached the sandbox, by message text
    sms = _sms_by_text(provider)  # SMS the providers created, by message text
    assert [t for t, n in sms.items() if n > 1] == [], "an SMS exists twice at the provider"
    # eMsgNow has no idempotency key: its messages were never even posted twice
    assert [mid for mid in all_ids if accounts[mid] != "limited" and posts[texts[mid]] > 1] == []
    for mid, status in statuses.items():
        if status == "accepted":
            assert sms[texts[mid]] == 1  # accepted: exactly one SMS
    written_off = [mid for mid, st in statuses.items() if st == "unknown" and posts[texts[mid]] == 0]
    # eSMS Africa: a resend under the same key is harmless, so nothing of it is ever written off
    assert [mid for mid in written_off if accounts[mid] == "limited"] == []
    assert {statuses[mid] for mid in all_ids if accounts[mid] == "limited"} == {"accepted"}
    # eMsgNow: a request is written within milliseconds of its start being recorded; a kill inside
    # that gap leaves a claim that may have started yet never arrived, and eMsgNow cannot be asked.
    assert len(written_off) <= 1, f"{len(written_off)} message(s) never sent yet written off as unknown"
    assert set(Counter(statuses.values())) <= {"accepted", "unknown"}


def _accounts(url: str, ids: list[str]) -> dict[str, str]:
    with session_scope(url) as db:
        return dict(db.execute(select(Message.id, Message.provider).where(Message.id.in_(ids))).all())


def _finished_at(url: str, ids: list[str]) -> dict[str, float]:
    with session_scope(url) as db:
        rows = db.execute(select(Message.id, Message.updated_at).where(Message.id.in_(ids)))
        return {mid: at.timestamp() for mid, at in rows}


def _texts(url: str, ids: list[str]) -> dict[str, str]:
    with session_scope(url) as db:
        return dict(db.execute(select(Message.id, Message.text).where(Message.id.in_(ids))).all())


def _posts_by_text(provider) -> Counter:
    """POSTs that reached the sandbox, by message text (a count of 0 for one that never did)."""
    seen: Counter = Counter()
    for kind, key in (("emsgnow", "message"), ("esms_africa", "text")):
        for r in provider.requests(kind):
            if r["method"] == "POST" and isinstance(r.get("json"), dict) and r["json"].get(key):
                seen[r["json"][key]] += 1
    return seen


def _sms_by_text(provider) -> Counter:
    """How many distinct SMS each text became: eMsgNow creates one per accepted POST; eSMS Africa
    answers a reused Idempotency-Key with the first SMS's id, so distinct ids count."""
    made: dict[str, set] = {}
    for kind, key in (("emsgnow", "message"), ("esms_africa", "text")):
        for r in provider.requests(kind):
            body = r.get("response_json")
            if r["method"] != "POST" or r.get("status") not in (200, 201) or not isinstance(r.get("json"), dict):
                continue
            ref = body.get("id") if isinstance(body, dict) else None
            made.setdefault(r["json"].get(key), set()).add(ref if kind == "esms_africa" else r["seq"])
    return Counter({text: len(refs) for text, refs in made.items()})


class _locked:
    """Hold SQLite's write lock from another connection: every writer waits (busy_timeout)."""

    def __init__(self, url: str) -> None:
        self.path = url.split("sqlite:///", 1)[1]

    def __enter__(self) -> "_locked":
        self.conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        self.conn.execute("BEGIN IMMEDIATE")
        return self

    def __exit__(self, *exc: object) -> None:
        self.conn.execute("ROLLBACK")
        self.conn.close()

"""A campaign whose loading process dies mid-file: the loader is killed for real (a child process
loading a CSV, SIGKILLed after some chunks committed), then the feeder marks the campaign
`interrupted` once its loader has been silent for LOADER_TIMEOUT (and not before); the same
load again with the same idempotency key stores exactly the missing rows; `resume` sends what
was loaded; `cancel` drops it. A loader taken for dead that wakes up stores nothing twice.
Time is driven by injected clocks; the real store (SQLite) as the other campaign tests."""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from datetime import timedelta

import pytest
from sqlalchemy import select as sql_select

import dispatcher
from dispatcher import runtime
from dispatcher.campaigns import LOADER_BEAT, LOADER_TIMEOUT, LoadingTakenOver, create_campaign
from dispatcher.cli import main
from dispatcher.csvrows import read_csv
from dispatcher.feeder import feed_round
from dispatcher.store import campaign_queries as cq
from dispatcher.store.models import Campaign, CampaignError, Message, utcnow

from .test_campaigns import Enqueued, send_all_queued

KEY = "spring-2026"
TEMPLATE = "Hi {name}"
LINES = range(2, 42)  # 40 rows after the header
BAD = {5, 24, 35}  # a bad address: skipped and recorded with its line
GOOD = [line for line in LINES if line not in BAD]
CHUNK = 10
STALL_AT = 27  # the child stops for good before reading this line: lines 2-21 are in two committed chunks


def people_csv(tmp_path) -> str:
    rows = ["to,name"] + [("not-a-number" if line in BAD else f"+1415555{line:04d}") + f",P{line}" for line in LINES]
    path = tmp_path / "people.csv"
    path.write_text("\n".join(rows) + "\n")
    return str(path)


CHILD = textwrap.dedent("""
    import sys
    from dispatcher.campaigns import create_campaign
    from dispatcher.csvrows import read_csv

    path, stall_at, chunk, key, template = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]

    def lines():
        with open(path, "rb") as f:
            for number, line in enumerate(f, start=1):
                if number == stall_at:
                    print("stalled", flush=True)  # every row before this line went to the loader
                    sys.stdin.read()  # and here it stays until it is killed
                yield line

    create_campaign("alerts", read_csv(lines()), template, idempotency_key=key, chunk=chunk)
    print("finished", flush=True)
""")


def killed_load(path: str, key: str = KEY, stall_at: int = STALL_AT, meanwhile=None) -> Campaign:
    """Load `path` in a child process and SIGKILL it mid-file (no cleanup of any kind runs);
    `meanwhile()` runs while the child is stalled, before the kill."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, path, str(stall_at), str(CHUNK), key, TEMPLATE],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=dict(os.environ))
    try:
        ready, _, _ = select.select([child.stdout], [], [], 120)
        said = child.stdout.readline().decode().strip() if ready else ""
        assert said == "stalled", f"the loading child did not stall: {said!r} {child.stderr.read1(4000)!r}"
        if meanwhile is not None:
            meanwhile()
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        child.stdin.close(), child.stdout.close(), child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    return by_key(key)


def by_key(key: str = KEY) -> Campaign:
    with runtime.session() as db:
        c = cq.find_by_idempotency_key(db, key)
        db.expunge(c)
        return c


def lines_of(campaign_id: str) -> tuple[Counter, Counter]:
    """How many times each input line is stored: as a message, and as a skipped row."""
    with runtime.session() as db:
        stored = Counter(n for (n,) in db.execute(sql_select(Message.campaign_line)
                                                  .where(Message.campaign_id == campaign_id)))
        skipped = Counter(n for (n,) in db.execute(sql_select(CampaignError.line)
                                                   .where(CampaignError.campaign_id == campaign_id)))
    return stored, skipped


def assert_stored_up_to(campaign_id: str, last: int) -> None:
    """Exactly the rows up to line `last`, each once, as messages (good rows) or skipped rows (bad)."""
    stored, skipped = lines_of(campaign_id)
    assert stored == Counter(line for line in GOOD if line <= last)
    assert skipped == Counter(line for line in BAD if line <= last)


# --------------------------------------------------------------------------- a load killed mid-file
def test_a_killed_load_is_marked_interrupted_after_the_timeout_and_not_before(dispatcher_env, caplog):
    c = killed_load(people_csv(dispatcher_env))
    assert c.state == "loading" and c.loaded_at is None
    assert c.last_line >= 21  # at least the two chunks before the stall committed...
    assert_stored_up_to(c.id, c.last_line)  # ...and exactly what they hold
    assert (c.total, c.invalid_count) == (len([g for g in GOOD if g <= c.last_line]), 1)

    sent = Enqueued()
    just_before = c.updated_at + LOADER_TIMEOUT - timedelta(seconds=1)
    report = feed_round(runtime.settings(), just_before, sent)
    assert report.interrupted == [] and by_key().state == "loading"
    with caplog.at_level(logging.WARNING, logger="dispatcher.campaigns"):
        report = feed_round(runtime.settings(), c.updated_at + LOADER_TIMEOUT + timedelta(seconds=1), sent)
    assert report.interrupted == [c.id] and by_key().state == "interrupted"
    said = [r.getMessage() for r in caplog.records if c.id in r.getMessage()]
    assert len(said) == 1 and f"up to line {c.last_line}" in said[0] and "interrupted" in said[0]
    # an interrupted campaign is not fed, however late
    assert feed_round(runtime.settings(), utcnow() + timedelta(days=1), sent).released == 0 and sent == []
    assert dispatcher.campaign_status(c.id).counts == {"pending": c.total}


def test_the_same_load_again_stores_exactly_the_missing_rows(dispatcher_env, capsys):
    path = people_csv(dispatcher_env)
    c = killed_load(path)
    feed_round(runtime.settings(), c.updated_at + LOADER_TIMEOUT + timedelta(seconds=1), Enqueued())
    assert main(["campaign", "status", c.id]) == 0
    out = capsys.readouterr().out
    assert "state     interrupted" in out and f"line {c.last_line} reached" in out
    assert f"--idempotency-key {KEY}" in out and f"dispatcher campaign resume {c.id}" in out

    assert main(["campaign", "create", path, "--provider", "alerts", "--template", TEMPLATE,
                 "--idempotency-key", KEY]) == 0
    out, err = capsys.readouterr()
    assert out.strip().splitlines()[-1] == c.id
    assert f"resumed after line {c.last_line}" in err and "37 row(s) stored, 3 skipped" in err
    assert_stored_up_to(c.id, LINES[-1])  # every line once: none lost, none twice
    after = dispatcher.campaign_status(c.id)
    assert (after.state, after.total, after.invalid_count, after.last_line) == ("running", 37, 3, 41)
    assert [r.line for r in after.invalid] == sorted(BAD)
    # it is loaded now: the same key once more stores nothing
    again = create_campaign("alerts", read_csv(open(path, "rb")), TEMPLATE, idempotency_key=KEY, chunk=CHUNK)
    assert (again.id, again.created, again.resumed_after) == (c.id, False, None)
    assert_stored_up_to(c.id, LINES[-1])


def test_a_live_loader_keeps_its_campaign_and_a_silent_one_is_taken_over_before_the_feeder_marks_it(dispatcher_env,
                                                                                                    capsys):
    path = people_csv(dispatcher_env)
    c = killed_load(path)

    def again(after: timedelta):
        at = c.updated_at + after
        return create_campaign("alerts", read_csv(open(path, "rb")), TEMPLATE, idempotency_key=KEY, chunk=CHUNK,
                               clock=lambda: at)

    fresh = again(LOADER_TIMEOUT - timedelta(seconds=1))  # its loader may still be alive: hands off
    assert (fresh.id, fresh.created, fresh.resumed_after, fresh.state) == (c.id, False, None, "loading")
    assert_stored_up_to(c.id, c.last_line)
    with pytest.raises(dispatcher.ValidationError) as refused:  # another template is another load
        create_campaign("alerts", read_csv(open(path, "rb")), "Hello {name}", idempotency_key=KEY,
                        clock=lambda: c.updated_at + LOADER_TIMEOUT * 2)
    assert refused.value.field == "template" and c.id in str(refused.value)
    with runtime.session() as db:  # as if its loader had just beaten (the command reads the real clock)
        db.execute(Campaign.__table__.update().where(Campaign.id == c.id)
                   .values(updated_at=utcnow() + timedelta(hours=1)))
    assert main(["campaign", "create", path, "--provider", "alerts", "--template", TEMPLATE,
                 "--idempotency-key", KEY]) == 0
    err = capsys.readouterr().err
    assert "nothing new stored" in err and f"still being loaded by another process (line {c.last_line} reached)" in err
    assert_stored_up_to(c.id, c.last_line)
    c = by_key()
    resumed = again(LOADER_TIMEOUT + timedelta(seconds=1))  # silent past the timeout: taken as interrupted
    assert (resumed.id, resumed.created, resumed.resumed_after, resumed.state) == (c.id, False, c.last_line, "running")
    assert_stored_up_to(c.id, LINES[-1])


def test_resume_sends_only_what_was_loaded(dispatcher_env, capsys):
    path = people_csv(dispatcher_env)
    c = killed_load(path)
    assert dispatcher.resume_campaign(c.id).state == "loading"  # not yet taken as interrupted: nothing changes
    feed_round(runtime.settings(), c.updated_at + LOADER_TIMEOUT + timedelta(seconds=1), Enqueued())
    with pytest.raises(dispatcher.TooLate) as paused:
        dispatcher.pause_campaign(c.id)
    assert "interrupted while loading" in str(paused.value) and "resume" in str(paused.value)

    assert main(["campaign", "resume", c.id]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == f"{c.id} running" and f"up to line {c.last_line}" in err and "rest of the file is not" in err
    sent = Enqueued()
    feed_round(runtime.settings(), utcnow(), sent)  # no limit on this account: all of it goes
    with runtime.session() as db:
        lines = sorted(db.get(Message, i).campaign_line for i in sent)
    assert lines == [line for line in GOOD if line <= c.last_line]
    send_all_queued(c.id)
    feed_round(runtime.settings(), utcnow(), sent)
    assert dispatcher.campaign_status(c.id).state == "done"
    # the same load again now stores nothing: the campaign was sent as it was
    again = create_campaign("alerts", read_csv(open(path, "rb")), TEMPLATE, idempotency_key=KEY, chunk=CHUNK)
    assert (again.created, again.resumed_after, again.total) == (False, None, c.total)
    assert_stored_up_to(c.id, c.last_line)


def test_cancel_drops_an_interrupted_campaign_and_the_feeder_finishes_it(dispatcher_env):
    path = people_csv(dispatcher_env)
    c = killed_load(path)
    feed_round(runtime.settings(), c.updated_at + LOADER_TIMEOUT + timedelta(seconds=1), Enqueued())
    cancelled = dispatcher.cancel_campaign(c.id)
    assert cancelled.state == "cancelled" and cancelled.counts == {"cancelled": c.total}
    feed_round(runtime.settings(), utcnow(), Enqueued())
    with runtime.session() as db:
        assert db.get(Campaign, c.id).finished_at is not None  # no longer looked after by the feeder
        assert cq.active(db) == []
    again = create_campaign("alerts", read_csv(open(path, "rb")), TEMPLATE, idempotency_key=KEY, chunk=CHUNK)
    assert (again.created, again.resumed_after, again.state) == (False, None, "cancelled")
    assert_stored_up_to(c.id, c.last_line)


# --------------------------------------------------------------------------- a loader taken for dead wakes up
def rows_of(lines, during=None, at_line=None):
    """The CSV's rows as mappings with their line; `during()` runs before the row of `at_line` is given."""
    for line in lines:
        if line == at_line and during is not None:
            during()
        yield {"to": "not-a-number" if line in BAD else f"+1415555{line:04d}", "name": f"P{line}", "line": line}


class Lined(dict):
    """A row carrying its line, as csvrows' rows do."""

    def __init__(self, row):
        super().__init__(row)
        self.line = row["line"]


def lined(rows):
    return (Lined(r) for r in rows)


def _the_same_load_a_minute_later():
    """The same load again with the same key, after LOADER_TIMEOUT has passed (the first run silent)."""
    later = utcnow() + LOADER_TIMEOUT + timedelta(seconds=1)
    return create_campaign("alerts", lined(rows_of(LINES)), TEMPLATE, idempotency_key=KEY, chunk=CHUNK,
                           clock=lambda: later)


def test_a_loader_taken_for_dead_that_wakes_up_stores_nothing_more_and_deletes_nothing(dispatcher_env):
    took_over = []

    def another_run_a_minute_later():
        took_over.append(_the_same_load_a_minute_later())

    with pytest.raises(LoadingTakenOver) as stopped:  # the first run stalls at line 27; meanwhile the same load again
        create_campaign("alerts", lined(rows_of(LINES, another_run_a_minute_later, 27)), TEMPLATE,
                        idempotency_key=KEY, chunk=CHUNK)
    assert took_over[0].resumed_after == 21 and stopped.value.last_line == 21
    c = dispatcher.campaign_status(took_over[0].id)
    assert (c.state, c.total, c.invalid_count) == ("running", 37, 3)  # not deleted by the run that stopped
    assert_stored_up_to(c.id, LINES[-1])


def test_a_loader_waking_up_while_another_run_loads_the_rest_stores_nothing_twice(dispatcher_env):
    path = people_csv(dispatcher_env)
    two_minutes_ago = utcnow() - LOADER_TIMEOUT * 2  # the first run's clock: silent for long, to the second run
    second: list[Campaign] = []

    def the_same_load_in_another_process():  # while the first run is stalled before line 27, holding lines 22-26
        second.append(killed_load(path, stall_at=37))  # takes over after line 21, commits lines 22-31, is killed

    with pytest.raises(LoadingTakenOver):  # the first run wakes up: its next chunk (lines 22-31) is refused
        create_campaign("alerts", lined(rows_of(LINES, the_same_load_in_another_process, 27)), TEMPLATE,
                        idempotency_key=KEY, chunk=CHUNK, clock=lambda: two_minutes_ago)
    assert (second[0].state, second[0].last_line) == ("loading", 31)
    assert_stored_up_to(second[0].id, 31)  # lines 22-31 once, by the second run


def test_a_slow_loader_marked_interrupted_goes_on_if_nobody_acted(dispatcher_env):
    def the_feeder_a_minute_later():
        report = feed_round(runtime.settings(), utcnow() + LOADER_TIMEOUT + timedelta(seconds=1), Enqueued())
        assert len(report.interrupted) == 1

    c = create_campaign("alerts", lined(rows_of(LINES, the_feeder_a_minute_later, 27)), TEMPLATE,
                        idempotency_key=KEY, chunk=CHUNK)
    assert (c.state, c.total, c.invalid_count, c.created) == ("running", 37, 3, True)
    assert_stored_up_to(c.id, LINES[-1])


def test_two_runs_racing_to_resume_only_one_takes_over(dispatcher_env):
    c = killed_load(people_csv(dispatcher_env))
    now = c.updated_at + LOADER_TIMEOUT + timedelta(seconds=1)
    with runtime.session() as db:  # both read the campaign as stale, then both try
        first = cq.take_over(db, c.id, c.loader, "run-a", now, now - LOADER_TIMEOUT)
        second = cq.take_over(db, c.id, c.loader, "run-b", now, now - LOADER_TIMEOUT)
    assert (first, second) == (c.last_line, None)
    assert by_key().loader == "run-a"


# --------------------------------------------------------------------------- a slow source still beats
def test_a_slow_source_beats_so_the_feeder_never_takes_it_for_dead(dispatcher_env):
    t = [utcnow()]
    checked = []

    def clock():
        return t[0]

    def slow_rows():
        for line in range(2, 12):
            t[0] += LOADER_BEAT + timedelta(seconds=1)  # a row every 6 s: 10 rows take a minute
            if line == 11:  # a minute after the start, no chunk full: the loader has beaten all along
                report = feed_round(runtime.settings(), t[0] + timedelta(seconds=1), Enqueued())
                checked.append((report.interrupted, by_key().state, by_key().last_line))
            yield {"to": f"+1415555{line:04d}", "name": "x"}

    c = create_campaign("alerts", slow_rows(), "hi {name}", idempotency_key=KEY, chunk=1000, clock=clock)
    assert checked == [([], "loading", 9)]  # 9 rows reached the store though the chunk of 1,000 never filled
    assert (c.state, c.total) == ("running", 10)


def test_status_json_and_the_http_model_carry_the_line_reached(dispatcher_env, capsys):
    c = killed_load(people_csv(dispatcher_env))
    assert main(["campaign", "status", c.id, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert (status["state"], status["last_line"], status["idempotency_key"]) == ("loading", c.last_line, KEY)


# --------------------------------------------------------------------------- over HTTP
from .test_http_api_campaigns import api, api_server  # noqa: E402,F401 - their fixtures


def test_over_http_the_same_key_resumes_an_interrupted_load_201_then_200(api, dispatcher_env):
    path = people_csv(dispatcher_env)
    c = killed_load(path)
    feed_round(runtime.settings(), c.updated_at + LOADER_TIMEOUT + timedelta(seconds=1), Enqueued())
    got = api.get(f"/v1/campaigns/{c.id}").json()
    assert (got["state"], got["last_line"], got["idempotency_key"]) == ("interrupted", c.last_line, KEY)

    def post():
        return api.post("/v1/campaigns", content=open(path, "rb").read(), headers={"Content-Type": "text/csv",
                        "Idempotency-Key": KEY}, params={"provider": "alerts", "template": TEMPLATE})

    r = post()
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["id"], body["state"], body["total"], body["resumed_after"]) == (c.id, "running", 37, c.last_line)
    assert_stored_up_to(c.id, LINES[-1])
    r = post()
    assert r.status_code == 200 and r.json()["resumed_after"] is None
    assert_stored_up_to(c.id, LINES[-1])


class SourceLost(Exception):
    """The rows' source fails (a dropped DB cursor, a broken pipe, Ctrl-C in the terminal)."""


def test_a_loader_taken_for_dead_whose_source_then_fails_deletes_nothing_of_the_taken_over_campaign(dispatcher_env):
    took_over = []

    def another_run_a_minute_later_then_the_source_fails():
        took_over.append(_the_same_load_a_minute_later())
        raise SourceLost("cursor closed")

    with pytest.raises(SourceLost):
        create_campaign("alerts", lined(rows_of(LINES, another_run_a_minute_later_then_the_source_fails, 27)),
                        TEMPLATE, idempotency_key=KEY, chunk=CHUNK)
    c = dispatcher.campaign_status(took_over[0].id)  # on main: NotFound, the stale run deleted the whole campaign
    assert (c.state, c.total) == ("running", 37)


def test_a_loader_taken_for_dead_and_resumed_as_loaded_never_deletes_messages_already_sent(dispatcher_env):
    sent_ids = []

    def marked_interrupted_resumed_and_sent_then_the_user_hits_ctrl_c():
        feed_round(runtime.settings(), utcnow() + LOADER_TIMEOUT + timedelta(seconds=1), Enqueued())
        c_id = dispatcher.list_campaigns()[0].id
        dispatcher.resume_campaign(c_id)
        q = Enqueued()
        feed_round(runtime.settings(), utcnow(), q)  # released to the workers...
        send_all_queued(c_id)  # ...and accepted by the provider
        sent_ids.extend(q)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        create_campaign("alerts", lined(rows_of(LINES, marked_interrupted_resumed_and_sent_then_the_user_hits_ctrl_c,
                                                27)), TEMPLATE, idempotency_key=KEY, chunk=CHUNK)
    assert sent_ids
    gone = []
    for mid in sent_ids:
        try:
            assert dispatcher.get(mid).status == "accepted"
        except dispatcher.NotFound:
            gone.append(mid)
    assert not gone, f"{len(gone)} accepted message(s) deleted with their campaign by the stale loader"

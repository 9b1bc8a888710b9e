"""Campaigns in the store: loading a CSV with bad rows, --strict, --dry-run, the same key twice,
pause / resume / cancel, and the feeder (room per account, fairness, windows, times) driven by
an injected clock. The whole pipeline runs in test_campaigns_pipeline.py."""

from __future__ import annotations

import io
import json
import time
from collections import Counter
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import func, select

import dispatcher
from dispatcher import runtime
from dispatcher.campaigns import create_campaign
from dispatcher.cli import main
from dispatcher.csvrows import read_csv
from dispatcher.feeder import feed_round
from dispatcher.store import queries
from dispatcher.store.models import Campaign, CampaignError, Message, utcnow

from .conftest import write_config

LIMITED = """
[providers.limited]
kind = "emsgnow"
base_url = "{url}"
api_key = "{key}"
from = "ACME"
rate_limit = "5/s"
"""

GOOD_AND_BAD = (
    "to,name,code\n"                                  # line 1: the header
    "+14155550101,Ada,111\n"                          # 2
    "not-a-number,Bob,222\n"                          # 3 bad address
    "+14155550103,,333\n"                             # 4 empty variable
    "+14155550104,Cyd,444\n"                          # 5
    "+14155550105," + "x" * 150 + ",555\n"            # 6 rendered text over 160 characters
    '+14155550106,"Dee "quoted",666\n'                # 7 unreadable CSV
    "+14155550107,Eve\n"                              # 8 too few fields
    '+14155550108,"Fay\nSmith",888\n'                 # 9 a quoted field over two lines (fine)
    "+14155550110,Gus,000\n"                          # 11
)
TEMPLATE = "Hi {name}, your code is {code}"


@pytest.fixture()
def limited(dispatcher_env, sandbox, redis_client, monkeypatch):
    """The test config plus an account limited to 5/s (its limiter state cleaned after the test)."""
    extra = LIMITED.format(url=sandbox.base_url("emsgnow"), key=sandbox.credentials("emsgnow")["api_key"])
    monkeypatch.setenv("DISPATCHER_CONFIG", write_config(dispatcher_env / "dispatcher.toml", sandbox, extra))
    runtime.configure(None)
    return "limited"


def stored(model=Message, **where) -> int:
    with runtime.session() as db:
        stmt = select(func.count()).select_from(model)
        for key, value in where.items():
            stmt = stmt.where(getattr(model, key) == value)
        return db.execute(stmt).scalar_one()


def statuses(campaign_id: str) -> Counter:
    with runtime.session() as db:
        return Counter(s for (s,) in db.execute(select(Message.status).where(Message.campaign_id == campaign_id)))


class Enqueued(list):
    def __call__(self, ids, countdown):
        self.extend(ids)


def send_all_queued(campaign_id: str) -> None:
    """Stand-in for the workers: every queued message of the campaign was sent."""
    with runtime.session() as db:
        db.execute(Message.__table__.update().where(Message.campaign_id == campaign_id, Message.status == "queued")
                   .values(status="accepted", accepted_at=utcnow()))


def csv_file(tmp_path, text: str, name: str = "people.csv") -> str:
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return str(path)


# --------------------------------------------------------------------------- loading
def test_bad_rows_are_reported_by_line_and_skipped_while_the_valid_rows_are_stored(dispatcher_env, capsys):
    path = csv_file(dispatcher_env, GOOD_AND_BAD.encode() + b"+14155550111,\xff\xfeZed,999\n")  # line 12: not UTF-8
    assert main(["campaign", "create", path, "--provider", "alerts", "--template", TEMPLATE, "--name", "spring"]) == 0
    out, err = capsys.readouterr()
    campaign_id = out.strip().splitlines()[-1]  # the id alone on the last line
    assert len(campaign_id) == 32
    reported = {int(line.split(":")[0].split()[1]): line for line in err.splitlines() if line.startswith("line ")}
    assert sorted(reported) == [3, 4, 6, 7, 8, 12]
    assert "to: must be an E.164" in reported[3]
    assert "name: variable is empty" in reported[4]
    assert "text: at most 160 characters" in reported[6]
    assert "unreadable CSV" in reported[7]
    assert "2 field(s), the header has 3" in reported[8]
    assert "not valid utf-8" in reported[12]

    assert main(["campaign", "status", campaign_id, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["id"] == campaign_id and status["name"] == "spring" and status["state"] == "running"
    assert status["total"] == 4 and status["counts"] == {"pending": 4}
    assert [i["line"] for i in status["invalid"]] == [3, 4, 6, 7, 8, 12]
    assert all(i["reason"] for i in status["invalid"])
    with runtime.session() as db:
        rows = db.execute(select(Message.campaign_line, Message.to, Message.text, Message.status)
                          .where(Message.campaign_id == campaign_id).order_by(Message.campaign_line)).all()
    assert [(r[0], r[1]) for r in rows] == [(2, "+14155550101"), (5, "+14155550104"), (9, "+14155550108"),
                                           (11, "+14155550110")]
    assert rows[0][2] == "Hi Ada, your code is 111" and rows[2][2] == "Hi Fay\nSmith, your code is 888"
    # each row is a message of its own: status and cancel work on it
    one = dispatcher.get(next(iter(_ids(campaign_id))))
    assert one.status == "pending"
    assert dispatcher.cancel(one.id).status == "cancelled"


def _ids(campaign_id: str) -> list[str]:
    with runtime.session() as db:
        return [i for (i,) in db.execute(select(Message.id).where(Message.campaign_id == campaign_id)
                                         .order_by(Message.campaign_line))]


def test_strict_refuses_the_whole_campaign_and_stores_nothing(dispatcher_env, capsys):
    path = csv_file(dispatcher_env, GOOD_AND_BAD)
    code = main(["campaign", "create", path, "--provider", "alerts", "--template", TEMPLATE, "--strict"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "5 invalid row(s)" in err and "line 3: to:" in err
    assert stored(Campaign) == 0 and stored(Message) == 0 and stored(CampaignError) == 0


def test_strict_deletes_what_earlier_chunks_stored(dispatcher_env):
    rows = [{"to": f"+1415555{i:04d}", "name": f"n{i}"} for i in range(25)] + [{"to": "nope", "name": "x"}]
    with pytest.raises(dispatcher.CampaignRefused) as refused:
        create_campaign("alerts", rows, "Hi {name}", strict=True, chunk=10)
    assert [(r.line, r.reason[:3]) for r in refused.value.invalid] == [(26, "to:")]
    assert stored(Campaign) == 0 and stored(Message) == 0


def test_dry_run_counts_segments_shows_samples_and_stores_nothing(dispatcher_env, capsys):
    text = ("to,name\n+14155550101,Ada\n+14155550102,Zoé\n+14155550103,Łukasz\nnope,Bob\n"
            "+14155550104,Dan\n")
    path = csv_file(dispatcher_env, text)
    template = "Hello {name}, " + "x" * 60  # 70+ characters: 1 GSM-7 segment, 2 in UCS-2 (Ł is not GSM-7)
    assert main(["campaign", "create", path, "--provider", "alerts", "--template", template, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "valid rows     4" in out and "invalid rows   1" in out
    assert "segments       5" in out  # 1 + 1 + 2 + 1: é is GSM-7, Ł is not
    assert "line 5: to: must be an E.164" in out
    samples = [line for line in out.splitlines() if line.startswith("  line ") and " to " in line]
    assert len(samples) == 3 and "Hello Ada" in samples[0] and "+14******101" in samples[0]
    assert "(2 segments): Hello Łukasz" in samples[2]
    assert stored(Campaign) == 0 and stored(Message) == 0


def test_the_same_idempotency_key_returns_the_first_campaign_and_stores_nothing_new(dispatcher_env, capsys):
    path = csv_file(dispatcher_env, GOOD_AND_BAD)
    args = ["campaign", "create", path, "--provider", "alerts", "--template", TEMPLATE, "--idempotency-key", "spring-1"]
    assert main(args) == 0
    first = capsys.readouterr().out.strip().splitlines()[-1]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert out.strip().splitlines()[-1] == first and "nothing new stored" in err
    again = dispatcher.campaign("alerts", [{"to": "+14155550199", "name": "Z", "code": "1"}], TEMPLATE,
                                idempotency_key="spring-1")
    assert (again.id, again.created, again.total) == (first, False, 4)
    assert stored(Campaign) == 1 and stored(Message) == 4


def test_a_campaign_that_cannot_work_is_refused_before_any_row_is_read(dispatcher_env, capsys):
    path = csv_file(dispatcher_env, "phone,name\n+14155550101,Ada\n")
    cases = [
        (["--template", "Hi {name}"], "to_column: no column 'to' in the header (columns: phone, name)"),
        (["--template", "Hi {nmae}", "--to-column", "phone"], "template: uses {nmae}, which is not a column"),
        (["--template", "Hi {name}", "--to-column", "phone", "--window", "9-5"], "window: must look like 09:00-20:00"),
        (["--template", "Hi {name", "--to-column", "phone"], "template: a lone '{'"),
    ]
    for extra, message in cases:
        assert main(["campaign", "create", path, "--provider", "alerts", *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert main(["campaign", "create", path, "--provider", "nope", "--template", "x", "--to-column", "phone"]) == 2
    assert "no provider account named 'nope'" in capsys.readouterr().err
    assert stored(Campaign) == 0


def test_rows_from_any_iterable_a_generator_works(dispatcher_env):
    def cursor():
        for i in range(5):
            yield {"to": f"+1415555{i:04d}", "first": f"P{i}"}

    c = dispatcher.campaign("alerts", cursor(), "Hi {first}", name="gen")
    assert (c.total, c.invalid_count, c.state) == (5, 0, "running")
    assert dispatcher.campaign_status(c.id).counts == {"pending": 5}


# --------------------------------------------------------------------------- the feeder
def test_the_feeder_hands_over_only_what_the_limit_lets_go_and_the_generic_release_leaves_them(limited):
    from dispatcher.schedule import tick

    c = dispatcher.campaign(limited, [{"to": f"+1415555{i:04d}", "n": str(i)} for i in range(30)], "m{n}")
    sent = Enqueued()
    now = utcnow()
    tick(clock=lambda: now, enqueue=sent)  # the beat's tick: its generic release must leave pending rows alone
    # 5/s, look-ahead of 2 slots: 2 messages to the broker, the rest waiting in the store
    assert len(sent) == 2 and statuses(c.id) == Counter(pending=28, queued=2)
    assert feed_round(runtime.settings(), utcnow(), sent).released == 0  # the broker still holds them
    send_all_queued(c.id)
    assert feed_round(runtime.settings(), utcnow(), sent).released == 2
    assert len(set(sent)) == 4 and statuses(c.id) == Counter(pending=26, queued=2, accepted=2)
    with runtime.session() as db:  # in file order
        lines = [db.get(Message, i).campaign_line for i in sent]
    assert lines == [1, 2, 3, 4]


def test_a_single_send_comes_first_two_campaigns_share_the_account(limited, broker_down):
    a = dispatcher.campaign(limited, [{"to": f"+1415555{i:04d}"} for i in range(40)], "from A")
    b = dispatcher.campaign(limited, [{"to": f"+1416555{i:04d}"} for i in range(40)], "from B")
    single = dispatcher.send(limited, "+14155550999", "your code is 1234")  # (no broker: stays queued)
    sent = Enqueued()
    assert feed_round(runtime.settings(), utcnow(), sent).released == 1  # 2 slots, 1 taken by the single send
    with runtime.session() as db:
        db.execute(Message.__table__.update().where(Message.id == single.id).values(status="accepted"))
    for _ in range(10):
        send_all_queued(a.id)
        send_all_queued(b.id)
        feed_round(runtime.settings(), utcnow(), sent)
    per_campaign = Counter(dispatcher.get(i).text for i in sent)
    assert sum(per_campaign.values()) == 21
    assert abs(per_campaign["from A"] - per_campaign["from B"]) <= 1


def test_pause_stops_the_claim_at_once_resume_goes_on_cancel_ends_the_rest(limited):
    from dispatcher.dispatch import dispatch_batch

    c = dispatcher.campaign(limited, [{"to": f"+1415555{i:04d}"} for i in range(10)], "hello")
    sent = Enqueued()
    feed_round(runtime.settings(), utcnow(), sent)
    assert len(sent) == 2
    assert dispatcher.pause_campaign(c.id).state == "paused"
    with runtime.session() as db:  # the broker's tasks now claim nothing
        assert queries.claim(db, sent, utcnow(), "claim-1", "worker-1") == []
    assert dispatch_batch(sent, enqueue=Enqueued()).claimed == 0
    assert statuses(c.id) == Counter(pending=10)  # what the broker held waits in the store again
    with runtime.session() as db:  # a stray back in the queue (a retry's task)...
        db.execute(Message.__table__.update().where(Message.id == sent[0]).values(status="queued"))
        assert queries.claim(db, sent, utcnow(), "claim-1", "worker-1") == []  # ...is not claimed while the campaign is paused
    assert feed_round(runtime.settings(), utcnow(), Enqueued()).released == 0
    assert statuses(c.id) == Counter(pending=10)  # and the feeder puts it back with the others
    assert dispatcher.resume_campaign(c.id).state == "running"
    again = Enqueued()
    feed_round(runtime.settings(), utcnow(), again)
    assert again == sent  # the same first two, in file order
    cancelled = dispatcher.cancel_campaign(c.id)
    assert cancelled.state == "cancelled" and cancelled.counts == {"cancelled": 10}
    with runtime.session() as db:
        assert queries.claim(db, again, utcnow(), "claim-1", "worker-1") == []
    with pytest.raises(dispatcher.TooLate):
        dispatcher.pause_campaign(c.id)


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])  # starts are written from a thread, or from the loop
def test_a_pause_holds_even_for_messages_already_claimed_and_waiting_for_their_slot(limited, sandbox, broker_down,
                                                                                   store, request, monkeypatch):
    from dispatcher import transport
    from dispatcher.campaigns import cq
    from dispatcher.dispatch import dispatch_batch

    if store == "postgresql":
        from dispatcher.store.db import upgrade

        upgrade(request.getfixturevalue("pg_url"))
        monkeypatch.setenv("DISPATCHER_DATABASE_URL", request.getfixturevalue("pg_url"))
        runtime.configure(None)
    c = dispatcher.campaign(limited, [{"to": f"+1415555{i:04d}", "n": str(i)} for i in range(8)], "slot held {n}")
    with runtime.session() as db:  # all eight handed to a worker at once: at 5/s their slots reach 1.4 s ahead
        ids = cq.release(db, [r.id for r in cq.due_pending(db, c.id, utcnow(), 8)], utcnow())
    assert dispatch_batch(ids, enqueue=Enqueued(), wait=False).claimed == 8
    dispatcher.pause_campaign(c.id)
    paused_at = time.time()
    transport.process_loop().drain(timeout=10)

    arrived = [r.received_at for r in sandbox.requests("emsgnow") if (r.json or {}).get("message", "").startswith("slot held")]
    assert [t for t in arrived if t > paused_at + 0.1] == []  # nothing started after the pause
    assert len(arrived) <= 2
    feed_round(runtime.settings(), utcnow(), Enqueued())  # the paused campaign's round
    assert statuses(c.id) == Counter(accepted=len(arrived), pending=8 - len(arrived))  # the rest wait, unsent


def test_the_window_is_read_in_each_recipients_time_and_opens_at_the_limits_pace(limited):
    rows = ([{"to": f"+1415555{i:04d}", "tz": ""} for i in range(6)]  # San Francisco, from the number
            + [{"to": "+447700900123", "tz": "Europe/London"}]
            + [{"to": "+819012345678", "tz": "Asia/Tokyo"}])
    noon = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)  # London 13:00 BST, San Francisco 05:00, Tokyo 21:00
    c = create_campaign(limited, rows, "see you", window="09:00-20:00", clock=lambda: noon)
    assert c.total == 8
    to = {m: dispatcher.get(m).to for m in _ids(c.id)}

    def feed(at):
        sent = Enqueued()
        feed_round(runtime.settings(), at, sent)
        send_all_queued(c.id)
        return [to[m] for m in sent]

    assert feed(noon) == ["+447700900123"]
    assert feed(noon + timedelta(hours=3, minutes=59)) == []  # 08:59 in San Francisco
    opening = datetime(2026, 6, 1, 16, 0, tzinfo=timezone.utc)  # 09:00 in San Francisco
    first = feed(opening)
    assert len(first) == 2 and all(t.startswith("+1415") for t in first)  # not all six at once: 5/s
    assert len(feed(opening)) == 2 and len(feed(opening)) == 2 and feed(opening) == []
    assert feed(datetime(2026, 6, 1, 23, 59, tzinfo=timezone.utc)) == []  # 08:59 in Tokyo
    assert feed(datetime(2026, 6, 2, 0, 0, tzinfo=timezone.utc)) == ["+819012345678"]


def test_a_row_whose_zone_is_unknown_needs_a_tz_column(dispatcher_env):
    rows = [{"to": "+14155550101"}, {"to": "+88212345678"}, {"to": "+14155550102", "tz": "Mars/Olympus"}]
    c = dispatcher.campaign("alerts", rows, "hi", window="09:00-20:00")
    assert c.total == 1
    assert [(r.line, r.reason) for r in c.invalid] == [
        (2, "to: no time zone is known for this number: give a tz column"),
        (3, "tz: unknown time zone 'Mars/Olympus' (an IANA name such as Europe/London)")]


def test_not_before_holds_the_campaign_and_not_after_expires_what_is_left(limited):
    start = utcnow() + timedelta(hours=1)
    end = start + timedelta(hours=1)
    c = dispatcher.campaign(limited, [{"to": f"+1415555{i:04d}"} for i in range(6)], "later",
                            not_before=start, not_after=end)
    sent = Enqueued()
    assert feed_round(runtime.settings(), start - timedelta(seconds=1), sent).released == 0
    assert feed_round(runtime.settings(), start, sent).released == 2
    send_all_queued(c.id)
    report = feed_round(runtime.settings(), end + timedelta(seconds=1), sent)
    assert report.expired == 4 and report.done == [c.id]
    after = dispatcher.campaign_status(c.id)
    assert after.state == "done" and after.counts == {"accepted": 2, "expired": 4}
    assert len(sent) == 2


def test_a_campaign_with_nothing_left_to_send_is_done(dispatcher_env):
    c = dispatcher.campaign("alerts", [{"to": "+14155550101"}, {"to": "+14155550102"}], "hi")
    sent = Enqueued()
    feed_round(runtime.settings(), utcnow(), sent)  # no limit: all of it fits
    assert len(sent) == 2 and dispatcher.campaign_status(c.id).state == "running"
    send_all_queued(c.id)
    feed_round(runtime.settings(), utcnow(), sent)
    assert dispatcher.campaign_status(c.id).state == "done"
    assert main(["campaign", "list"]) == 0


def test_a_csv_stream_reads_in_flat_memory_line_by_line():
    lines_read = 0

    def source():
        nonlocal lines_read
        yield b"to,name\n"
        for i in range(100_000):
            lines_read += 1
            yield f"+1415{i:07d},n{i}\n".encode()

    rows = read_csv(source())
    it = iter(rows)
    first = next(it)
    assert first == {"to": "+14150000000", "name": "n0"} and first.line == 2
    assert lines_read <= 2  # nothing is read ahead of the row asked for
    assert sum(1 for _ in it) == 99_999


def test_read_csv_refuses_a_file_without_a_usable_header():
    for data, message in ((b"", "is empty"), (b"to,,name\n", "an empty column name"),
                          (b"to,name,to\n", "names column 'to' twice")):
        with pytest.raises(dispatcher.ValidationError) as refused:
            read_csv(io.BytesIO(data))
        assert message in str(refused.value)


def test_a_feeder_round_stuck_past_its_lock_never_cuts_a_newer_rounds_lock_short(dispatcher_env, redis_client):
    from dispatcher import keys
    from dispatcher.feeder import _RoundLock

    s = runtime.settings()
    stuck, newer = _RoundLock(s), _RoundLock(s)
    assert stuck.__enter__() is True
    redis_client.delete(keys.campaign_feeder_lock())  # its lock ran out while the round was stuck
    assert newer.__enter__() is True
    stuck.__exit__(None, None, None)  # the stuck round ends at last

    assert redis_client.get(keys.campaign_feeder_lock()).decode() == newer.lock.token  # still the newer round's
    assert redis_client.pttl(keys.campaign_feeder_lock()) > 1000  # and not shortened to the stuck one's rest
    newer.__exit__(None, None, None)
    assert 0 < redis_client.pttl(keys.campaign_feeder_lock()) <= 100  # kept FEED_INTERVAL after it began


def test_pausing_a_paused_resuming_a_running_cancelling_a_cancelled_campaign_change_nothing(dispatcher_env):
    c = dispatcher.campaign("alerts", [{"to": "+14155550101"}, {"to": "+14155550102"}], "hi")
    assert dispatcher.resume_campaign(c.id).state == "running"  # (these answered only after the store's
    assert dispatcher.pause_campaign(c.id).state == "paused"    # 30 s lock timeout, then failed, on SQLite)
    assert dispatcher.pause_campaign(c.id).state == "paused"
    assert dispatcher.cancel_campaign(c.id).state == "cancelled"
    assert dispatcher.cancel_campaign(c.id).counts == {"cancelled": 2}


def test_a_campaign_message_whose_slot_was_taken_and_cannot_reserve_again_is_handed_back_not_written_off(
        limited, sandbox, monkeypatch, broker_down):
    """A single send took the campaign messages' slots; reserving again then fails with a Redis
    error that is not a connection error (OOM at maxmemory). Nothing was sent, so nothing may be
    settled `unknown` (never re-sent): the messages must wait, unsent, for another try."""
    import redis

    from dispatcher.campaigns import cq
    from dispatcher.dispatch import dispatch_batch
    from dispatcher.ratelimit.strategy import RateLimiter

    c = dispatcher.campaign("limited", [{"to": f"+1415555{i:04d}", "n": str(i)} for i in range(4)], "taken {n}")
    with runtime.session() as db:
        ids = cq.release(db, [r.id for r in cq.due_pending(db, c.id, utcnow(), 4)], utcnow())

    real_reserve = RateLimiter.reserve

    def reserve(self, account, rate, n, max_wait=0.0, *, bulk=False):
        if bulk and n == 1:  # BulkSlots._again: the displaced message reserves again
            raise redis.exceptions.ResponseError("OOM command not allowed when used memory > 'maxmemory'.")
        return real_reserve(self, account, rate, n, max_wait, bulk=bulk)

    monkeypatch.setattr(RateLimiter, "reserve", reserve)
    monkeypatch.setattr(RateLimiter, "confirm", lambda self, account, tickets: [False] * len(tickets))
    dispatch_batch(ids, enqueue=Enqueued(), wait=True)

    sent = [r for r in sandbox.requests("emsgnow") if (r.json or {}).get("message", "").startswith("taken")]
    assert len(sent) <= 1  # only a slot too close to take (< PRIORITY_GUARD) goes without a confirm
    assert statuses(c.id)["unknown"] == 0, statuses(c.id)  # on main: all that lost their slot end `unknown`

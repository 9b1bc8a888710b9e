"""Campaigns over HTTP (`dispatcher api` on loopback, real store and Redis): a CSV body with the
options of `dispatcher campaign create` as query parameters; read, pause, resume, cancel."""

from __future__ import annotations

import uuid

import httpx
import pytest
from sqlalchemy import func, select

from dispatcher import runtime
from dispatcher.api_keys import create_key
from dispatcher.store.models import Campaign, Message, utcnow

from .conftest import wait_for

CSV = {"Content-Type": "text/csv"}
ROWS = (
    "to,name\n"            # line 1: the header
    "+14155550101,Ada\n"   # 2
    "not-a-number,Bob\n"   # 3: bad address
    "+14155550103,\n"      # 4: empty variable
    "+14155550104,Cyd\n"   # 5
)


@pytest.fixture(scope="module")
def api_server():
    from dispatcher.httpapi import ApiThread

    with ApiThread() as server:
        yield server


@pytest.fixture()
def api(api_server, dispatcher_env):
    _, key = create_key(f"all-{uuid.uuid4().hex[:8]}")
    with httpx.Client(base_url=api_server.url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
        yield client


def count(model) -> int:
    with runtime.session() as db:
        return db.execute(select(func.count()).select_from(model)).scalar_one()


def create(api, body: str = ROWS, **params):
    return api.post("/v1/campaigns", content=body.encode(), headers=CSV,
                    params={"provider": "alerts", "template": "Hi {name}", **params})


def test_a_csv_posted_becomes_a_campaign_its_bad_rows_listed_by_line(api):
    r = create(api, name="spring")
    assert r.status_code == 201
    c = r.json()
    assert (c["name"], c["provider"], c["state"], c["total"]) == ("spring", "alerts", "running", 2)
    assert [(i["line"], i["reason"].split(":")[0]) for i in c["invalid"]] == [(3, "to"), (4, "name")]
    assert c["counts"] == {"pending": 2}
    got = api.get(f"/v1/campaigns/{c['id']}")
    assert got.status_code == 200 and got.json()["total"] == 2 and got.json()["invalid_count"] == 2
    with runtime.session() as db:
        texts = [t for (t,) in db.execute(select(Message.text).where(Message.campaign_id == c["id"])
                                          .order_by(Message.campaign_line))]
    assert texts == ["Hi Ada", "Hi Cyd"]


def test_strict_refuses_the_whole_campaign_with_422_and_stores_nothing(api):
    r = create(api, strict="true")
    assert r.status_code == 422
    assert r.json()["error"]["field"] == "rows"
    assert "line 3" in r.json()["error"]["message"]
    assert count(Message) == 0 and count(Campaign) == 0


def test_a_dry_run_answers_200_with_samples_and_stores_nothing(api):
    r = create(api, dry_run="true")
    assert r.status_code == 200
    body = r.json()
    assert body["dry_run"] is True and body["id"] is None and body["total"] == 2 and body["invalid_count"] == 2
    assert [s["text"] for s in body["samples"]] == ["Hi Ada", "Hi Cyd"]
    assert count(Message) == 0 and count(Campaign) == 0


def test_the_same_idempotency_key_returns_the_first_campaign_with_200(api):
    key = f"spring-{uuid.uuid4().hex}"
    first = create(api, idempotency_key=key)
    again = api.post("/v1/campaigns", content=ROWS.encode(), headers={**CSV, "Idempotency-Key": key},
                     params={"provider": "alerts", "template": "Hi {name}"})
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"]
    assert count(Campaign) == 1 and count(Message) == 2


def test_options_go_through_as_for_campaign_create(api):
    r = create(api, opt=["client_id=spring-1", 'variables={"a": 1}'], template="hello", body="to\n+14155550101\n")
    assert r.status_code == 201
    with runtime.session() as db:
        [options] = db.execute(select(Message.options)).scalars().all()
    assert options["client_id"] == "spring-1" and options["variables"] == {"a": 1}
    bad = create(api, opt=["no-equals-sign"], template="hello", body="to\n+14155550101\n")
    assert (bad.status_code, bad.json()["error"]["field"]) == (422, "opt")


@pytest.mark.parametrize("params, field", [
    ({"provider": "alerts"}, "template"),
    ({"provider": "nope", "template": "x"}, "provider"),
    ({"provider": "alerts", "template": "x", "window": "late"}, "window"),
    ({"provider": "alerts", "template": "x", "strict": "maybe"}, "strict"),
    ({"provider": "alerts", "template": "x", "colour": "red"}, "colour"),
    ({"provider": "alerts", "template": "x", "not_before": "2030-01-01T09:00:00"}, "not_before"),
])
def test_a_bad_campaign_gets_422_naming_the_parameter_and_stores_nothing(api, params, field):
    r = api.post("/v1/campaigns", content=ROWS.encode(), headers=CSV, params=params)
    assert (r.status_code, r.json()["error"]["field"]) == (422, field)
    assert count(Campaign) == 0 and count(Message) == 0


def test_a_body_that_is_not_csv_or_has_no_header_is_refused(api):
    r = api.post("/v1/campaigns", json={"to": "+14155550101"}, params={"provider": "alerts", "template": "x"})
    assert (r.status_code, r.json()["error"]["field"]) == (415, "Content-Type")
    r = create(api, body="")
    assert (r.status_code, r.json()["error"]["field"]) == (422, "file")
    assert count(Campaign) == 0


def test_pause_resume_cancel_and_409_once_cancelled(api):
    c = create(api).json()
    assert api.post(f"/v1/campaigns/{c['id']}/pause").json()["state"] == "paused"
    assert api.post(f"/v1/campaigns/{c['id']}/resume").json()["state"] == "running"
    cancelled = api.post(f"/v1/campaigns/{c['id']}/cancel")
    assert cancelled.status_code == 200
    assert (cancelled.json()["state"], cancelled.json()["counts"]) == ("cancelled", {"cancelled": 2})
    r = api.post(f"/v1/campaigns/{c['id']}/pause")
    assert (r.status_code, r.json()["error"]["field"]) == (409, "id")
    for path in ("", "/pause", "/resume", "/cancel"):
        method = api.get if not path else api.post
        assert method(f"/v1/campaigns/0123456789abcdef0123456789abcdef{path}").status_code == 404


def test_a_key_limited_to_other_accounts_gets_403_for_campaigns(api_server, api):
    c = create(api).json()
    _, key = create_key(f"badkey-only-{uuid.uuid4().hex[:8]}", ["badkey"])
    limited = {"Authorization": f"Bearer {key}"}
    r = httpx.post(f"{api_server.url}/v1/campaigns", content=ROWS.encode(), headers={**CSV, **limited},
                   params={"provider": "alerts", "template": "x"})
    assert (r.status_code, r.json()["error"]["field"]) == (403, "provider")
    assert httpx.get(f"{api_server.url}/v1/campaigns/{c['id']}", headers=limited).status_code == 403
    assert httpx.post(f"{api_server.url}/v1/campaigns/{c['id']}/cancel", headers=limited).status_code == 403
    assert api.get(f"/v1/campaigns/{c['id']}").json()["state"] == "running"
    assert count(Campaign) == 1


def test_a_campaign_posted_over_http_reaches_the_provider(api, celery_worker_thread, sandbox):
    from dispatcher.feeder import feed_round
    from dispatcher.queue import enqueue

    c = create(api).json()
    feed_round(runtime.settings(), utcnow(), lambda ids, countdown: enqueue(ids, countdown))  # the beat's step
    wait_for(lambda: api.get(f"/v1/campaigns/{c['id']}").json()["counts"] == {"accepted": 2})
    sent = sorted((r.json["to"], r.json["message"]) for r in sandbox.requests("emsgnow") if r.method == "POST")
    assert sent == [("+14155550101", "Hi Ada"), ("+14155550104", "Hi Cyd")]

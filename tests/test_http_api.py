"""The HTTP API over real HTTP: `dispatcher api` on a loopback port, the real store and Redis.

What a producer in another language sees: keys (401/403), sends (201, 200 again with an
Idempotency-Key, also when two requests race), refusals in send()'s words (422) with nothing
stored, batches stored whole or not at all, reads (404), cancels (409), and a message posted
over HTTP reaching the provider's sandbox once.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from sqlalchemy import func, select, text

import dispatcher
from dispatcher import runtime
from dispatcher.api_keys import create_key, revoke_key
from dispatcher.store.models import Message

from .conftest import wait_for

E164 = "+14155550123"


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def api_server():
    """`dispatcher api` in a thread of this process, on a free loopback port."""
    from dispatcher.httpapi import ApiThread

    with ApiThread() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, dispatcher_env, monkeypatch):
    """The test's store: the per-test SQLite file, or this session's PostgreSQL schema."""
    if request.param == "postgresql":
        from dispatcher.store.db import upgrade

        url = request.getfixturevalue("pg_url")
        upgrade(url)
        monkeypatch.setenv("DISPATCHER_DATABASE_URL", url)
        runtime.configure(None)
    yield request.param


@pytest.fixture()
def api(request, api_server, dispatcher_env):
    """An HTTP client for the API with a key for every account, on the test's `store` when it has one."""
    if "store" in request.fixturenames:
        request.getfixturevalue("store")  # the key lives in the store the test uses
    _, key = create_key(f"all-{uuid.uuid4().hex[:8]}")
    with httpx.Client(base_url=api_server.url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
        client.key = key  # type: ignore[attr-defined]
        yield client


def stored_count() -> int:
    with runtime.session() as db:
        return db.execute(select(func.count()).select_from(Message)).scalar_one()


def posts_to_provider(sandbox) -> list:
    return [r for r in sandbox.requests("emsgnow") if r.method == "POST"]


def later(hours: float = 1) -> str:
    from datetime import datetime, timedelta, timezone

    return (datetime.now(timezone.utc) + timedelta(hours=hours)).isoformat()


# --------------------------------------------------------------------------- keys
def test_healthz_and_the_openapi_document_answer_without_a_key(api_server):
    assert httpx.get(f"{api_server.url}/healthz").json() == {"status": "ok"}
    doc = httpx.get(f"{api_server.url}/openapi.json").json()
    assert {"/v1/messages", "/v1/messages/batch", "/v1/messages/{id}", "/v1/messages/{id}/cancel"} <= set(doc["paths"])
    post = doc["paths"]["/v1/messages"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/MessageIn"}
    assert {"201", "200", "401", "403", "422"} <= set(post["responses"])
    assert set(doc["components"]["schemas"]["MessageIn"]["properties"]) == {
        "provider", "to", "text", "not_before", "not_after", "options"}


@pytest.mark.parametrize("header", [None, "Bearer dsp_0123456789ab_" + "x" * 43, "Bearer not-a-key", "Basic abc"])
def test_a_missing_or_wrong_key_gets_401_and_stores_nothing(api_server, dispatcher_env, header):
    headers = {"Authorization": header} if header else {}
    r = httpx.post(f"{api_server.url}/v1/messages", headers=headers,
                   json={"provider": "alerts", "to": E164, "text": "hi"})
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"] == "Bearer"
    assert r.json()["error"]["field"] == "Authorization"
    if header:
        assert header.split()[-1] not in r.text  # what was presented is never echoed
    assert stored_count() == 0


def test_a_revoked_key_gets_401_and_is_never_logged(api_server, dispatcher_env, caplog):
    name = f"gone-{uuid.uuid4().hex[:8]}"
    _, key = create_key(name)
    auth = {"Authorization": f"Bearer {key}"}
    assert httpx.get(f"{api_server.url}/v1/messages/nope", headers=auth).status_code == 404
    revoke_key(name)
    # every API process remembers a good key for at most a second
    wait_for(lambda: httpx.get(f"{api_server.url}/v1/messages/nope", headers=auth).status_code == 401, timeout=5)
    r = httpx.get(f"{api_server.url}/v1/messages/nope", headers=auth)
    assert r.json() == {"error": {"field": "Authorization", "message": "Authorization: unknown or revoked API key"}}
    secret = key.split("_", 2)[2]
    assert secret not in caplog.text and secret not in r.text


def test_the_store_keeps_only_a_hash_of_each_key(api_server, dispatcher_env):
    _, key = create_key(f"hashed-{uuid.uuid4().hex[:8]}")
    with runtime.session() as db:
        rows = db.execute(text("SELECT * FROM api_keys")).all()
    dumped = json.dumps([list(map(str, row)) for row in rows])
    assert key not in dumped and key.split("_", 2)[2] not in dumped
    raw = (dispatcher_env / "dispatcher.db").read_bytes() + (
        (dispatcher_env / "dispatcher.db-wal").read_bytes() if (dispatcher_env / "dispatcher.db-wal").exists() else b"")
    assert key.split("_", 2)[2].encode() not in raw


def test_a_key_limited_to_some_accounts_gets_403_for_others_and_nothing_is_stored(api_server, dispatcher_env, broker_down):
    _, key = create_key(f"alerts-only-{uuid.uuid4().hex[:8]}", ["alerts"])
    auth = {"Authorization": f"Bearer {key}"}
    url = api_server.url
    ok = httpx.post(f"{url}/v1/messages", headers=auth, json={"provider": "alerts", "to": E164, "text": "hi"})
    assert ok.status_code == 201
    r = httpx.post(f"{url}/v1/messages", headers=auth, json={"provider": "badkey", "to": E164, "text": "hi"})
    assert r.status_code == 403
    assert r.json()["error"] == {"field": "provider",
                                 "message": "provider: this API key may not use provider account 'badkey'"}
    batch = {"messages": [{"provider": "alerts", "to": E164, "text": "a"}, {"provider": "badkey", "to": E164, "text": "b"}]}
    r = httpx.post(f"{url}/v1/messages/batch", headers=auth, json=batch)
    assert (r.status_code, r.json()["error"]["field"]) == (403, "messages[1].provider")
    assert stored_count() == 1
    other = dispatcher.send("badkey", E164, "not yours")
    assert httpx.get(f"{url}/v1/messages/{other.id}", headers=auth).status_code == 403
    assert httpx.post(f"{url}/v1/messages/{other.id}/cancel", headers=auth).status_code == 403
    assert dispatcher.get(other.id).status == "queued"


# --------------------------------------------------------------------------- single sends
def test_a_message_posted_is_stored_queued_and_readable(api, broker_down):
    r = api.post("/v1/messages", json={"provider": "alerts", "to": E164, "text": "Your code is 482910",
                                       "options": {"client_id": "order-17"}})
    assert r.status_code == 201
    body = r.json()
    assert body["status"] == "queued" and body["to"] == E164 and body["segments"] == 1
    assert body["options"] == {"client_id": "order-17"}  # its own options; the account's defaults join at send time
    assert dispatcher.get(body["id"]).text == "Your code is 482910"
    got = api.get(f"/v1/messages/{body['id']}")
    assert got.status_code == 200
    assert (got.json()["id"], got.json()["status"], got.json()["events"], got.json()["attempts"]) == (
        body["id"], "queued", [], [])


def test_a_message_with_not_before_is_scheduled(api, broker_down):
    r = api.post("/v1/messages", json={"provider": "alerts", "to": E164, "text": "later", "not_before": later(2)})
    assert (r.status_code, r.json()["status"]) == (201, "scheduled")


def test_many_sends_at_once_are_each_stored_once_and_answered_with_their_own_id(api, broker_down):
    texts = [f"message {i}" for i in range(200)]
    with ThreadPoolExecutor(32) as pool:  # they share transactions in the server: each still gets its own row
        answers = list(pool.map(lambda t: api.post("/v1/messages", json={"provider": "alerts", "to": E164, "text": t}),
                                texts))
    assert [r.status_code for r in answers] == [201] * 200
    assert [dispatcher.get(r.json()["id"]).text for r in answers] == texts
    assert stored_count() == 200


def test_an_unreachable_store_gets_503_not_a_traceback(api, monkeypatch):
    key = api.headers["Authorization"].split()[1]
    assert api.get("/v1/messages/nope").status_code == 404
    monkeypatch.setenv("DISPATCHER_DATABASE_URL", "postgresql://postgres@127.0.0.1:1/none?connect_timeout=1")
    runtime.configure(None)
    r = api.post("/v1/messages", json={"provider": "alerts", "to": E164, "text": "hi"})
    assert r.status_code == 503
    assert r.json()["error"] == {"field": None, "message": "the store is not available; try again"}
    assert r.headers["Retry-After"] == "1"
    assert key not in r.text


@pytest.mark.parametrize("body, field", [
    ({"provider": "alerts", "to": "555-0123", "text": "hi"}, "to"),
    ({"provider": "alerts", "to": E164, "text": "x" * 2000}, "text"),
    ({"provider": "nope", "to": E164, "text": "hi"}, "provider"),
    ({"provider": "alerts", "to": E164, "text": "hi", "options": {"colour": "red"}}, "colour"),
    ({"provider": "alerts", "to": E164, "text": "hi", "not_after": "2020-01-01T00:00:00Z"}, "not_after"),
    ({"provider": "alerts", "to": E164, "text": "hi", "not_before": "2030-01-01T00:00:00"}, "not_before"),
])
def test_invalid_input_gets_422_in_the_words_of_send_and_stores_nothing(api, body, field):
    with pytest.raises(dispatcher.ValidationError) as python_error:
        args = dict(body)
        options = args.pop("options", {})
        for name in ("not_before", "not_after"):
            if name in args:
                from datetime import datetime

                args[name] = datetime.fromisoformat(args[name].replace("Z", "+00:00"))
        dispatcher.send(args.pop("provider"), args.pop("to"), args.pop("text"), **args, **options)
    r = api.post("/v1/messages", json=body)
    assert r.status_code == 422
    assert r.json() == {"error": {"field": field, "message": str(python_error.value)}}
    assert stored_count() == 0


@pytest.mark.parametrize("body, field, rule", [
    ({"provider": "alerts", "text": "hi"}, "to", "is required"),
    ({"provider": "alerts", "to": 14155550123, "text": "hi"}, "to", "must be a string"),
    ({"provider": "alerts", "to": E164, "txt": "hi"}, "txt", "is not a field of this call"),
    ({"provider": "alerts", "to": E164, "text": "hi", "not_before": "tomorrow"}, "not_before",
     "must be an ISO 8601 date-time with a time zone (e.g. 2026-06-01T07:00:00Z)"),
    ([1, 2], "body", "must be a JSON object"),
])
def test_a_body_of_the_wrong_shape_gets_422_naming_the_field(api, body, field, rule):
    r = api.post("/v1/messages", json=body)
    assert r.status_code == 422
    assert r.json() == {"error": {"field": field, "message": f"{field}: {rule}"}}
    assert stored_count() == 0


def test_a_body_not_json_too_large_or_of_another_type_gets_a_clear_4xx(api):
    r = api.post("/v1/messages", content=b'{"provider": ', headers={"Content-Type": "application/json"})
    assert (r.status_code, r.json()["error"]) == (400, {"field": "body", "message": "body: is not valid JSON"})
    r = api.post("/v1/messages", content=b"provider=alerts", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert (r.status_code, r.json()["error"]["field"]) == (415, "Content-Type")
    big = json.dumps({"provider": "alerts", "to": E164, "text": "x" * (1024 * 1024)})
    r = api.post("/v1/messages", content=big, headers={"Content-Type": "application/json"})
    assert (r.status_code, r.json()["error"]["field"]) == (413, "body")
    assert stored_count() == 0


def test_unknown_message_gets_404_and_cancel_of_one_too(api):
    assert api.get("/v1/messages/0123456789abcdef0123456789abcdef").status_code == 404
    r = api.post("/v1/messages/0123456789abcdef0123456789abcdef/cancel")
    assert (r.status_code, r.json()["error"]["field"]) == (404, "id")


# --------------------------------------------------------------------------- idempotency
def test_the_same_idempotency_key_twice_returns_the_first_message_with_200(api, store, broker_down):
    key = f"order-{uuid.uuid4().hex}"
    first = api.post("/v1/messages", json={"provider": "alerts", "to": E164, "text": "once"},
                     headers={"Idempotency-Key": key})
    again = api.post("/v1/messages", json={"provider": "alerts", "to": E164, "text": "once"},
                     headers={"Idempotency-Key": key})
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"]
    with runtime.session() as db:
        assert db.execute(select(func.count()).select_from(Message).where(Message.idempotency_key == key)).scalar_one() == 1


def test_an_idempotency_race_stores_one_message_and_sends_it_once(api, store, celery_worker_thread, sandbox, monkeypatch):
    """Two clients post the same key at once; on PostgreSQL both have looked the key up before
    either inserts (forced here), so the store's unique index settles it."""
    from dispatcher.store import queries

    if store == "postgresql":
        both_looked = threading.Barrier(2, timeout=10)
        real_find, calls = queries.find_by_idempotency_key, []

        def find_after_both_looked(db, key):
            found = real_find(db, key)
            calls.append(key)
            if len(calls) <= 2:
                both_looked.wait()  # neither inserts before the other has seen no row
            return found

        monkeypatch.setattr(queries, "find_by_idempotency_key", find_after_both_looked)
    key = f"race-{uuid.uuid4().hex}"
    start = threading.Barrier(2)

    def post() -> httpx.Response:
        start.wait()
        return api.post("/v1/messages", json={"provider": "alerts", "to": E164, "text": "just once"},
                        headers={"Idempotency-Key": key})

    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: post(), range(2)))
    assert sorted(r.status_code for r in answers) == [200, 201]
    assert answers[0].json()["id"] == answers[1].json()["id"]
    message_id = answers[0].json()["id"]
    with runtime.session() as db:
        assert db.execute(select(func.count()).select_from(Message).where(Message.idempotency_key == key)).scalar_one() == 1
    wait_for(lambda: dispatcher.get(message_id).status == "accepted")
    assert len([r for r in posts_to_provider(sandbox) if r.json["message"] == "just once"]) == 1


# --------------------------------------------------------------------------- batches
def test_a_batch_is_stored_with_its_ids_in_input_order(api, store, broker_down):
    numbers = [f"+1415555{n:04d}" for n in range(50)]
    r = api.post("/v1/messages/batch", json={"messages": [
        {"provider": "alerts", "to": to, "text": f"hello {i}"} for i, to in enumerate(numbers)]})
    assert r.status_code == 201
    ids = r.json()["ids"]
    assert [dispatcher.get(i).to for i in ids] == numbers
    assert [dispatcher.get(i).text for i in ids] == [f"hello {i}" for i in range(50)]


def test_a_batch_with_one_bad_item_is_refused_whole_naming_its_index(api, store):
    before = stored_count()
    messages = [{"provider": "alerts", "to": E164, "text": "fine"} for _ in range(5)]
    messages[3]["to"] = "not-a-number"
    r = api.post("/v1/messages/batch", json={"messages": messages})
    assert r.status_code == 422
    assert r.json()["error"]["field"] == "messages[3].to"
    assert r.json()["error"]["message"].startswith("messages[3].to: must be an E.164")
    assert stored_count() == before


@pytest.mark.parametrize("count, rule", [(0, "at least 1 message"), (1001, "at most 1000 messages")])
def test_a_batch_must_hold_1_to_1000_messages(api, count, rule):
    r = api.post("/v1/messages/batch", json={"messages": [{"provider": "alerts", "to": E164, "text": "x"}] * count})
    assert (r.status_code, r.json()["error"]) == (422, {"field": "messages", "message": f"messages: {rule}"})
    assert stored_count() == 0


def test_a_batch_posted_again_with_its_idempotency_key_returns_the_same_ids(api, store, broker_down):
    key = f"batch-{uuid.uuid4().hex}"
    body = {"messages": [{"provider": "alerts", "to": E164, "text": f"n{i}"} for i in range(3)]}
    first = api.post("/v1/messages/batch", json=body, headers={"Idempotency-Key": key})
    again = api.post("/v1/messages/batch", json=body, headers={"Idempotency-Key": key})
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["ids"] == first.json()["ids"]
    assert [dispatcher.get(i).idempotency_key for i in first.json()["ids"]] == [f"{key}#{i}" for i in range(3)]


# --------------------------------------------------------------------------- cancel
def test_cancel_before_sending_gives_200_and_the_message_never_goes_out(api, sandbox, broker_down):
    from dispatcher.dispatch import dispatch_batch

    posted = api.post("/v1/messages", json={"provider": "alerts", "to": E164, "text": "cancel me"}).json()
    r = api.post(f"/v1/messages/{posted['id']}/cancel")
    assert (r.status_code, r.json()["status"]) == (200, "cancelled")
    assert dispatch_batch([posted["id"]]).claimed == 0
    assert posts_to_provider(sandbox) == []


def test_cancel_of_a_message_already_with_the_provider_gets_409(api, sandbox, broker_down):
    from dispatcher.dispatch import dispatch_batch

    posted = api.post("/v1/messages", json={"provider": "alerts", "to": E164, "text": "gone already"}).json()
    dispatch_batch([posted["id"]])
    assert dispatcher.get(posted["id"]).status == "accepted"
    r = api.post(f"/v1/messages/{posted['id']}/cancel")
    assert r.status_code == 409
    assert r.json()["error"] == {"field": "id", "message": f"id: message {posted['id']} is already accepted; "
                                                           "it can no longer be cancelled"}
    assert dispatcher.get(posted["id"]).status == "accepted"


# --------------------------------------------------------------------------- end to end
def test_a_message_posted_over_http_reaches_the_provider_once(api, celery_worker_thread, sandbox):
    r = api.post("/v1/messages", json={"provider": "alerts", "to": E164, "text": "over HTTP",
                                       "options": {"client_id": "http-1"}})
    assert r.status_code == 201
    message_id = r.json()["id"]
    wait_for(lambda: api.get(f"/v1/messages/{message_id}").json()["status"] == "accepted")
    [sent] = posts_to_provider(sandbox)
    assert sent.json == {"to": E164, "from": "ACME", "message": "over HTTP", "clientId": "http-1"}
    got = api.get(f"/v1/messages/{message_id}").json()
    assert [(a["number"], a["outcome"], a["http_status"]) for a in got["attempts"]] == [(1, "accepted", 200)]
    assert got["provider_ref"]


# --------------------------------------------------------------------------- the commands
def test_api_key_commands_create_list_and_revoke(dispatcher_env, capsys):
    from dispatcher.cli import main

    assert main(["api-key", "create", "shop", "--accounts", "alerts"]) == 0
    out = capsys.readouterr().out.splitlines()
    key = out[-1]
    assert key.startswith("dsp_") and len(key) > 40
    assert main(["api-key", "create", "shop"]) == 2
    assert "exists already" in capsys.readouterr().err
    assert main(["api-key", "create", "other", "--accounts", "nope"]) == 2
    assert "no provider account named 'nope'" in capsys.readouterr().err
    assert main(["api-key", "list"]) == 0
    listed = capsys.readouterr().out
    assert "shop" in listed and "alerts" in listed and "active" in listed and key.split("_", 2)[2] not in listed
    assert main(["api-key", "revoke", "shop"]) == 0
    assert main(["api-key", "revoke", "shop"]) == 2
    capsys.readouterr()
    assert main(["api-key", "list"]) == 0
    assert "revoked" in capsys.readouterr().out
    assert main(["api-key", "create", "shop"]) == 0  # a revoked key's name may be used again
    assert capsys.readouterr().out.splitlines()[-1] != key


def test_the_api_command_serves_on_the_port_it_is_given(dispatcher_env, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _, key = create_key("cmd")
    proc = subprocess.Popen([sys.executable, "-m", "dispatcher.cli", "api", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def healthy() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
            except httpx.TransportError:
                return proc.poll() is not None  # stop waiting if it died
        wait_for(healthy, timeout=30)
        assert proc.poll() is None
        r = httpx.post(f"http://127.0.0.1:{port}/v1/messages", headers={"Authorization": f"Bearer {key}"},
                       json={"provider": "alerts", "to": E164, "text": "from the command"})
        assert r.status_code == 201
        assert dispatcher.get(r.json()["id"]).text == "from the command"
    finally:
        proc.terminate()
        output = proc.communicate(timeout=15)[0]
    assert f"http://127.0.0.1:{port}" in output
    assert key not in output

"""The sandbox's network and answer faults over real HTTP: reset before or after the twin took
the request, malformed JSON, a proxy's HTML page, a slow drip; switched through the control API,
SandboxThread.set_faults and SandboxProcess.set_faults alike."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from dispatcher.testing import SandboxProcess

KEY = {"x-api-key": "sandbox-emsgnow-key"}
SMS = {"to": "+254712345678", "from": "ACME", "message": "Hello"}


@pytest.fixture()
def sb(clean_sandbox):
    return clean_sandbox


def sms_url(sb) -> str:
    return sb.base_url("emsgnow") + "/sms"


def post_sms(sb, **kwargs) -> httpx.Response:
    return httpx.post(sms_url(sb), json=SMS, headers=KEY, **kwargs)


def tracked(sb, tracking_id: str) -> bool:
    """Whether the eMsgNow twin holds a message with this trackingId (it took the request)."""
    return httpx.get(f"{sb.base_url('emsgnow')}/sms/{tracking_id}", headers=KEY).status_code == 200


def raw_exchange(url: str) -> bytes:
    """Send one POST over a plain socket and return what came back; ConnectionResetError on an RST."""
    host_port = url.split("//", 1)[1]
    authority, _, path = host_port.partition("/")
    host, port = authority.split(":")
    body = json.dumps(SMS).encode()
    request = (f"POST /{path} HTTP/1.1\r\nHost: {authority}\r\nx-api-key: {KEY['x-api-key']}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    with socket.create_connection((host, int(port)), timeout=5) as conn:
        conn.sendall(request)
        received = b""
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                return received
            received += chunk


# --------------------------------------------------------------------------- connection faults
def test_reset_next_resets_the_connection_after_reading_and_the_twin_never_sees_it(sb):
    sb.set_faults("emsgnow", reset_next=1)
    with pytest.raises(ConnectionResetError):  # an RST, not a quiet close
        raw_exchange(sms_url(sb))
    assert post_sms(sb).status_code == 200  # one only
    reset, answered = sb.requests("emsgnow")
    assert (reset.fault, reset.status, reset.response_json, reset.json) == ("reset", None, None, SMS)
    assert answered.fault is None and answered.status == 200


def test_drop_next_closes_quietly_where_reset_next_resets(sb):
    sb.set_faults("emsgnow", drop_next=1)
    assert raw_exchange(sms_url(sb)) == b""  # FIN: the read simply ends
    [dropped] = sb.requests("emsgnow")
    assert dropped.fault == "drop" and dropped.status is None


def test_reset_processed_next_lets_the_twin_act_then_resets(sb):
    sb.set_faults("emsgnow", reset_processed_next=1)
    with pytest.raises(ConnectionResetError):
        raw_exchange(sms_url(sb))
    [entry] = sb.requests("emsgnow")
    assert entry.fault == "reset_processed" and entry.status == 200
    assert tracked(sb, entry.response_json["trackingId"])  # the twin took the message all the same


def test_a_reset_reaches_an_http_client_as_a_reset_connection(sb):
    sb.set_faults("emsgnow", reset_next=1, reset_processed_next=1)
    for _ in range(2):
        with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
            post_sms(sb)
    assert [e.fault for e in sb.requests("emsgnow")] == ["reset", "reset_processed"]


# --------------------------------------------------------------------------- answers that are not JSON
def test_malformed_next_cuts_the_twins_own_answer_which_did_happen(sb):
    sb.set_faults("emsgnow", malformed_next=1)
    r = post_sms(sb)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    assert r.headers["X-RateLimit-Limit"]  # the twin's own headers go out
    with pytest.raises(ValueError):
        r.json()
    [entry] = sb.requests("emsgnow")
    assert entry.fault == "malformed" and entry.status == 200
    assert r.content == json.dumps(entry.response_json).encode()[: len(r.content)]  # its first half
    assert tracked(sb, entry.response_json["trackingId"])


@pytest.mark.parametrize("status", [500, 200])
def test_malformed_status_answers_that_status_with_a_body_that_is_not_json_and_the_twin_untouched(sb, status):
    sb.set_faults("emsgnow", malformed_next=1, malformed_status=status)
    r = post_sms(sb)
    assert r.status_code == status
    with pytest.raises(ValueError):
        r.json()
    [entry] = sb.requests("emsgnow")
    assert entry.fault == "malformed" and entry.response_json is None
    assert post_sms(sb).json()["trackingId"]  # the next one is answered normally


@pytest.mark.parametrize("status", [502, 504])
def test_html_next_answers_a_proxys_html_error_page(sb, status):
    sb.set_faults("esms_africa", html_next=1, html_status=status)
    r = httpx.post(sb.base_url("esms_africa") + "/api/messages/send", json={"to": "+256712345678", "text": "hi"},
                   headers={"Authorization": f"Bearer {sb.credentials('esms_africa')['api_key']}"})
    assert r.status_code == status and r.headers["content-type"].startswith("text/html")
    assert r.text.startswith("<!DOCTYPE html>") and str(status) in r.text
    [entry] = sb.requests("esms_africa")
    assert entry.fault == "html" and entry.status == status


def test_fail_headers_go_with_the_injected_failure(sb):
    sb.set_faults("emsgnow", fail_next=1, fail_status=429, fail_headers={"Retry-After": "nan"})
    r = post_sms(sb)
    assert (r.status_code, r.headers["Retry-After"]) == (429, "nan")


# --------------------------------------------------------------------------- the slow drip
def test_drip_sends_the_headers_then_trickles_the_body_so_a_read_timeout_fires_mid_body(sb):
    sb.set_faults("emsgnow", drip_next=1, drip_ms=400)
    with httpx.Client(timeout=httpx.Timeout(5.0, read=0.2)) as client:
        with client.stream("POST", sms_url(sb), json=SMS, headers=KEY) as r:
            assert r.status_code == 200 and r.headers["X-RateLimit-Limit"]  # the headers came at once
            with pytest.raises(httpx.ReadTimeout):
                r.read()
    [entry] = sb.requests("emsgnow")
    assert entry.fault == "drip" and tracked(sb, entry.response_json["trackingId"])


def test_a_patient_reader_gets_the_whole_dripped_answer(sb):
    sb.set_faults("emsgnow", drip_next=1, drip_ms=2)
    started = time.monotonic()
    r = post_sms(sb)
    [entry] = sb.requests("emsgnow")
    assert r.json() == entry.response_json and r.headers.get("transfer-encoding") == "chunked"
    assert time.monotonic() - started >= len(r.content) * 0.002


# --------------------------------------------------------------------------- switching them
def test_every_new_fault_is_switched_through_the_control_api(sb):
    values = {"reset_next": 1, "reset_processed_next": 2, "malformed_next": 3, "malformed_status": 500,
              "html_next": 4, "html_status": 504, "drip_next": 5, "drip_ms": 50, "fail_headers": {"Retry-After": "9"}}
    r = httpx.post(sb.url + "/_sandbox/faults", json={"kind": "emnify", **values})
    assert r.status_code == 200
    assert {k: r.json()[k] for k in values} == values
    bad = httpx.post(sb.url + "/_sandbox/faults", json={"kind": "emnify", "reset_next": "many"})
    assert bad.status_code == 400
    sb.reset()
    assert sb.set_faults("emnify")["reset_next"] == 0  # reset clears them


def test_a_sandbox_process_takes_the_new_faults_too():
    with SandboxProcess() as proc:
        assert proc.set_faults("emsgnow", reset_next=1, html_next=1)["reset_next"] == 1
        url = proc.base_url("emsgnow") + "/sms"
        with pytest.raises(ConnectionResetError):
            raw_exchange(url)
        r = httpx.post(url, json=SMS, headers=KEY)
        assert r.status_code == 502 and r.headers["content-type"].startswith("text/html")
        assert [e["fault"] for e in proc.requests("emsgnow")] == ["reset", "html"]

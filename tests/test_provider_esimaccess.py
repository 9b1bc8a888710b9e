"""eSIM Access adapter: configuration, validation, both auth modes, the envelope table, the sandbox."""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import hmac
import json
import time
import uuid

import httpx
import pytest

from dispatcher.config import ProviderAccount, load_settings
from dispatcher.errors import ConfigError, InvalidAddress, InvalidOption, TextTooLong
from dispatcher.providers import adapter_class
from dispatcher.providers.base import Accepted, OutboundMessage, Rejected, RetryLater
from dispatcher.providers.esimaccess import SEND_PATH, EsimAccessAdapter

ACCESS_CODE = "esa_test_code"
SECRET = "esa_test_secret"
TRAN_NO = "23072017992029"  # the seed's example
ICCID = "8948010010036785060"
TEXT = "Your Message!"
REQUEST_ID = "3f2b8c1e-7a4d-4e8b-9c2a-1d5e6f7a8b9c"
FIXED_CLOCK = lambda: 1_700_000_000.0  # noqa: E731  -> RT-Timestamp "1700000000000"


def make_adapter(auth: str | None = None, base_url: str = "https://esimaccess.example",
                 access_code: str = ACCESS_CODE, secret_key: str = SECRET, clock=FIXED_CLOCK) -> EsimAccessAdapter:
    fields = {"access_code": access_code, "secret_key": secret_key}
    if auth is not None:
        fields["auth"] = auth
    account = ProviderAccount(name="acc", kind="esimaccess", base_url=base_url, fields=fields,
                              secret_fields=EsimAccessAdapter.secret_fields())
    return EsimAccessAdapter(account, clock=clock)


def make_msg(to: str = TRAN_NO, text: str = TEXT, attempt_key: str = REQUEST_ID, **options) -> OutboundMessage:
    return OutboundMessage(id="m1", to=to, text=text, options=options, attempt_key=attempt_key)


def signed(adapter: EsimAccessAdapter, msg: OutboundMessage) -> httpx.Request:
    """Drive the Auth flow by hand, as httpx would, and return the request it sends."""
    return next(adapter.auth().sync_auth_flow(adapter.build_request(msg)))


def expected_signature(secret: str, timestamp: str, request_id: str, access_code: str, body: bytes) -> str:
    """providers.md: hex HMAC-SHA256(secretKey, timestamp + requestId + accessCode + body)."""
    return hmac.new(secret.encode(), (timestamp + request_id + access_code).encode() + body, hashlib.sha256).hexdigest()


# --------------------------------------------------------------------------- declarations and config
def test_registry_finds_the_adapter_with_its_declarations():
    cls = adapter_class("esimaccess")
    assert cls is EsimAccessAdapter
    assert cls.credentials == ("access_code", "secret_key") and cls.optional_credentials == {"auth": "header"}
    assert (cls.max_length, cls.default_rate_limit, cls.has_status, cls.idempotent_retry) == (500, "8/s", False, False)


def test_an_unknown_auth_mode_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError) as err:
        make_adapter(auth="oauth")
    assert err.value.key == "auth" and "'header' or 'hmac'" in str(err.value)


def test_the_config_file_reports_a_bad_auth_mode_with_its_line_and_no_secret(tmp_path):
    path = tmp_path / "dispatcher.toml"
    path.write_text(
        '[providers.esa]\nkind = "esimaccess"\nbase_url = "https://api.esimaccess.example"\n'
        'access_code = "code"\nsecret_key = "${ESA_SECRET}"\nauth = "oauth"\n'
    )
    with pytest.raises(ConfigError) as err:
        load_settings(path, env={"ESA_SECRET": "very-secret-value"})
    assert ":6: providers.esa.auth:" in str(err.value) and "very-secret-value" not in str(err.value)


def test_the_config_file_defaults_to_header_auth_and_the_published_limit(tmp_path):
    path = tmp_path / "dispatcher.toml"
    path.write_text('[providers.esa]\nkind = "esimaccess"\nbase_url = "https://x.example"\n'
                    'access_code = "code"\nsecret_key = "secret"\n')
    account = load_settings(path, env={}).providers["esa"]
    assert account.get("auth") == "header" and (account.rate_limit.count, account.rate_limit.period) == (8, 1)
    assert "secret" not in repr(account).replace("secret_key", "")


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize("to", ["", "abc", "+23072017992029", "2307 2017992029", "1" * 33, None])
def test_validate_refuses_a_to_that_is_not_an_esim_tran_no(to):
    with pytest.raises(InvalidAddress) as err:
        make_adapter().validate(to, TEXT, {})
    assert err.value.field == "to"


@pytest.mark.parametrize("to", ["", None, ICCID])
def test_validate_accepts_iccid_with_an_empty_or_matching_to(to):
    make_adapter().validate(to, TEXT, {"iccid": ICCID})


@pytest.mark.parametrize("iccid", ["123", "7948010010036785060", 8948010010036785060])
def test_validate_refuses_an_iccid_option_that_is_not_an_iccid(iccid):
    with pytest.raises(InvalidOption) as err:
        make_adapter().validate("", TEXT, {"iccid": iccid})
    assert err.value.field == "iccid"


def test_validate_refuses_an_esim_tran_no_and_an_iccid_together():
    with pytest.raises(InvalidAddress) as err:
        make_adapter().validate(TRAN_NO, TEXT, {"iccid": ICCID})
    assert err.value.field == "to"


def test_validate_refuses_text_over_500_utf16_units():
    adapter = make_adapter()
    adapter.validate(TRAN_NO, "x" * 500, {})
    for text in ("x" * 501, "x" * 499 + "👋"):
        with pytest.raises(TextTooLong) as err:
            adapter.validate(TRAN_NO, text, {})
        assert err.value.field == "text"


def test_validate_refuses_an_unknown_option_by_name():
    with pytest.raises(InvalidOption) as err:
        make_adapter().validate(TRAN_NO, TEXT, {"esim_id": 3})
    assert err.value.field == "esim_id"


# --------------------------------------------------------------------------- the request, both auth modes
def test_header_mode_sends_the_seeds_curl_request():
    request = signed(make_adapter(), make_msg())
    assert (request.method, str(request.url)) == ("POST", "https://esimaccess.example" + SEND_PATH)
    assert request.content == b'{"esimTranNo":"23072017992029","message":"Your Message!"}'
    assert request.headers["Content-Type"] == "application/json"
    assert (request.headers["RT-AccessCode"], request.headers["RT-SecretKey"]) == (ACCESS_CODE, SECRET)
    assert not {"RT-Signature", "RT-Timestamp", "RT-RequestID"} & set(request.headers)


def test_hmac_mode_signs_the_exact_bytes_sent_and_sends_no_secret():
    request = signed(make_adapter(auth="hmac"), make_msg(text="Grüße 👋"))
    assert json.loads(request.content) == {"esimTranNo": TRAN_NO, "message": "Grüße 👋"}
    assert request.headers["RT-AccessCode"] == ACCESS_CODE
    assert request.headers["RT-RequestID"] == REQUEST_ID
    assert request.headers["RT-Timestamp"] == "1700000000000"
    assert request.headers["RT-Signature"] == expected_signature(
        SECRET, "1700000000000", REQUEST_ID, ACCESS_CODE, request.content)
    assert "RT-SecretKey" not in request.headers and SECRET not in str(request.headers)


def test_iccid_option_is_sent_instead_of_the_esim_tran_no():
    request = signed(make_adapter(), make_msg(to="", iccid=ICCID))
    assert request.content == b'{"iccid":"8948010010036785060","message":"Your Message!"}'


def test_secrets_never_show_in_reprs():
    for mode in ("header", "hmac"):
        adapter = make_adapter(auth=mode, access_code="live_code", secret_key="live_secret")
        for shown in (repr(adapter.auth()), repr(adapter.account)):
            assert "live_secret" not in shown and "live_code" not in shown


# --------------------------------------------------------------------------- the envelope table
def answer(status: int, body, headers: dict[str, str] | None = None) -> httpx.Response:
    request = httpx.Request("POST", "https://esimaccess.example" + SEND_PATH)
    if isinstance(body, (bytes, str)):
        return httpx.Response(status, content=body, headers=headers, request=request)
    return httpx.Response(status, json=body, headers=headers, request=request)


def envelope(code=None, text=None, success=False, field="errorMsg") -> dict:
    return {"errorCode": code, field: text, "success": success, "obj": None}


ANSWERS = [
    # status, body, outcome class, code, message
    (200, envelope(success=True), Accepted, None, None),
    (200, envelope("200002", "This operation is not allowed"), Rejected, "200002", "This operation is not allowed"),
    (200, envelope("310403", "The eSIM transaction number does not exist"), Rejected, "310403",
     "The eSIM transaction number does not exist"),
    (200, envelope("101001", "The timestamp has expired"), RetryLater, "101001", "The timestamp has expired"),
    (200, envelope("101002", "IP is blocked"), Rejected, "101002", "IP is blocked"),
    (200, envelope("101003", "Signature mismatch"), Rejected, "101003", "Signature mismatch"),
    (200, envelope("101003", "Signature mismatch", field="errorMessage"), Rejected, "101003", "Signature mismatch"),
    (200, envelope(310403, "numeric code"), Rejected, "310403", "numeric code"),
    (200, envelope("999999", "Something new"), Rejected, "999999", "Something new"),
    (400, envelope("200002", "This operation is not allowed"), Rejected, "200002", "This operation is not allowed"),
    (429, envelope("900001", "Too many requests"), RetryLater, "900001", "Too many requests"),
    (429, b"", RetryLater, "http_429", None),
    (500, envelope("500", "injected failure"), RetryLater, "500", "injected failure"),
    (502, b"<html>Bad Gateway</html>", RetryLater, "http_502", None),
    (200, b"<html>maintenance</html>", RetryLater, "unreadable_answer", None),  # 200 proves nothing here
    (403, b"Forbidden", Rejected, "http_403", None),
]


@pytest.mark.parametrize("status,body,kind,code,message", ANSWERS,
                         ids=[f"{a[0]}-{a[3] or a[2].__name__}" for a in ANSWERS])
def test_every_documented_answer_reads_as_one_outcome(status, body, kind, code, message):
    outcome = make_adapter().parse_response(answer(status, body), make_msg())
    assert type(outcome) is kind
    if code is not None:
        assert outcome.code == code
    if message is not None:
        assert outcome.message == message


def test_success_has_no_provider_ref():
    assert make_adapter().parse_response(answer(200, envelope(success=True)), make_msg()) == Accepted()


def test_429_retries_after_the_stated_seconds():
    response = answer(429, envelope("900001", "Too many requests"), {"Retry-After": "7"})
    adapter = make_adapter()
    outcome = adapter.parse_response(response, make_msg())
    assert outcome.retry_at == pytest.approx(time.time() + 7, abs=1.0)
    assert adapter.read_rate(response).pause_until == pytest.approx(time.time() + 7, abs=1.0)


def test_429_retries_at_the_stated_http_date():
    at = float(int(time.time()) + 3600)
    stated = email.utils.formatdate(at, usegmt=True)  # e.g. "Tue, 01 Jan 2030 12:00:00 GMT"
    response = answer(429, envelope("900001", "Too many requests"), {"Retry-After": stated})
    outcome = make_adapter().parse_response(response, make_msg())
    assert outcome.retry_at == at


# --------------------------------------------------------------------------- against the sandbox
NOT_ALLOWED_TRAN_NO = "23072017990002"  # the twin's magic endings
MISSING_TRAN_NO = "23072017990403"


def sandbox_adapter(sandbox, auth: str = "header", secret_key: str | None = None, clock=time.time) -> EsimAccessAdapter:
    creds = sandbox.credentials("esimaccess")
    return make_adapter(auth, sandbox.base_url("esimaccess"), creds["access_code"],
                        secret_key or creds["secret_key"], clock=clock)


def send(adapter: EsimAccessAdapter, msg: OutboundMessage):
    async def go():
        async with httpx.AsyncClient(timeout=5.0) as client:
            return await adapter.send(client, msg)

    return asyncio.run(go())


def fresh_msg(**kwargs) -> OutboundMessage:
    return make_msg(attempt_key=str(uuid.uuid4()), **kwargs)


def test_sandbox_accepts_header_auth_and_sees_the_seeds_request(clean_sandbox):
    creds = clean_sandbox.credentials("esimaccess")
    result = send(sandbox_adapter(clean_sandbox), fresh_msg())
    assert result.outcome == Accepted() and result.http_status == 200
    (seen,) = clean_sandbox.requests("esimaccess")
    assert (seen.method, seen.path) == ("POST", SEND_PATH)
    assert seen.body == b'{"esimTranNo":"23072017992029","message":"Your Message!"}'
    assert seen.headers["RT-AccessCode"] == creds["access_code"]
    assert seen.headers["RT-SecretKey"] == creds["secret_key"]
    assert seen.headers["Content-Type"] == "application/json"
    assert "RT-Signature" not in seen.headers


def test_sandbox_accepts_hmac_auth_whose_signature_verifies(clean_sandbox):
    creds = clean_sandbox.credentials("esimaccess")
    msg = fresh_msg(to="", iccid=ICCID)
    result = send(sandbox_adapter(clean_sandbox, auth="hmac"), msg)
    assert result.outcome == Accepted(), result.outcome
    (seen,) = clean_sandbox.requests("esimaccess")
    assert seen.json == {"iccid": ICCID, "message": TEXT}
    assert seen.headers["RT-RequestID"] == msg.attempt_key and "RT-SecretKey" not in seen.headers
    assert seen.headers["RT-Signature"] == expected_signature(
        creds["secret_key"], seen.headers["RT-Timestamp"], msg.attempt_key, creds["access_code"], seen.body)


@pytest.mark.parametrize("to,code", [(NOT_ALLOWED_TRAN_NO, "200002"), (MISSING_TRAN_NO, "310403")])
def test_sandbox_refusals_inside_a_200_envelope_are_final(clean_sandbox, to, code):
    result = send(sandbox_adapter(clean_sandbox), fresh_msg(to=to))
    assert result.http_status == 200
    assert isinstance(result.outcome, Rejected) and result.outcome.code == code


def test_sandbox_wrong_signature_is_final_and_the_error_text_is_read_under_either_name(clean_sandbox):
    clean_sandbox.configure("esimaccess", extra={"error_field": "errorMessage"})
    result = send(sandbox_adapter(clean_sandbox, auth="hmac", secret_key="wrong"), fresh_msg())
    assert result.outcome == Rejected(code="101003", message="Signature mismatch")


def test_sandbox_blocked_ip_is_final(clean_sandbox):
    clean_sandbox.configure("esimaccess", extra={"blocked": True})
    result = send(sandbox_adapter(clean_sandbox), fresh_msg())
    assert result.outcome == Rejected(code="101002", message="IP is blocked")


def test_sandbox_expired_timestamp_is_retried(clean_sandbox):
    ten_minutes_slow = lambda: time.time() - 600  # noqa: E731
    result = send(sandbox_adapter(clean_sandbox, auth="hmac", clock=ten_minutes_slow), fresh_msg())
    assert isinstance(result.outcome, RetryLater) and result.outcome.code == "101001"


def test_sandbox_server_error_is_retried_later(clean_sandbox):
    clean_sandbox.set_faults("esimaccess", fail_next=1)
    result = send(sandbox_adapter(clean_sandbox), fresh_msg())
    assert isinstance(result.outcome, RetryLater) and result.http_status == 500


def test_sandbox_rate_limit_retries_after_the_stated_seconds(clean_sandbox):
    window_start = (time.time() // 60) * 60
    clean_sandbox.settings("esimaccess").clock = lambda: window_start + 30.0  # 30 s left in the window
    clean_sandbox.configure("esimaccess", rate_limit=1, rate_window=60)
    adapter = sandbox_adapter(clean_sandbox)
    first, second = send(adapter, fresh_msg()), send(adapter, fresh_msg())
    assert first.outcome == Accepted()
    assert isinstance(second.outcome, RetryLater) and second.http_status == 429
    assert second.outcome.retry_at == pytest.approx(time.time() + 30, abs=2.0)
    assert second.rate.pause_until == pytest.approx(second.outcome.retry_at, abs=0.1)  # Retry-After is a delta

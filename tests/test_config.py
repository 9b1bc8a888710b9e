"""Configuration: TOML + environment, ${NAME} interpolation, errors that name key and line, no secret shown."""

from __future__ import annotations

import pytest

from dispatcher.cli import main
from dispatcher.config import load_settings, parse_rate_limit
from dispatcher.errors import ConfigError

GOOD = """
[dispatcher]
max_attempts = 3

[providers.alerts]
kind = "emsgnow"
base_url = "https://api.example.test/v1/"
api_key = "${EMSGNOW_KEY}"
rate_limit = "10/s"
from = "ACME"
"""


def write(tmp_path, text):
    path = tmp_path / "dispatcher.toml"
    path.write_text(text)
    return path


def test_a_good_file_gives_named_accounts_with_secrets_from_the_environment(tmp_path):
    s = load_settings(write(tmp_path, GOOD), env={"EMSGNOW_KEY": "s3cr3t"})
    acc = s.providers["alerts"]
    assert (acc.kind, acc.base_url, acc.get("api_key"), acc.get("from")) == (
        "emsgnow", "https://api.example.test/v1", "s3cr3t", "ACME")
    assert (acc.rate_limit.count, acc.rate_limit.period) == (10, 1)
    assert s.max_attempts == 3
    assert "s3cr3t" not in repr(acc)


def test_environment_overrides_database_and_redis_urls(tmp_path):
    s = load_settings(write(tmp_path, GOOD), env={"EMSGNOW_KEY": "k", "DISPATCHER_DATABASE_URL": "sqlite:///x.db",
                                                  "DISPATCHER_REDIS_URL": "redis://h:1/2"})
    assert (s.database_url, s.redis_url) == ("sqlite:///x.db", "redis://h:1/2")


def test_a_missing_file_means_defaults(tmp_path):
    s = load_settings(tmp_path / "absent.toml", env={})
    assert s.providers == {} and s.database_url == "sqlite:///dispatcher.db"


@pytest.mark.parametrize(
    "replace, expected",
    [
        (('api_key = "${EMSGNOW_KEY}"', 'api_key = "${NOPE}"'), ":8: providers.alerts.api_key: environment variable NOPE is not set"),
        (('kind = "emsgnow"', 'kind = "smoke"'), ":6: providers.alerts.kind: unknown kind 'smoke'"),
        (('rate_limit = "10/s"', 'rate_limit = "lots"'), ":9: providers.alerts.rate_limit: must look like"),
        (('base_url = "https://api.example.test/v1/"', 'base_url = "ftp://x"'), ":7: providers.alerts.base_url: must be an http(s) URL"),
        (('from = "ACME"', 'form = "ACME"'), ":10: providers.alerts.form: unknown key for kind 'emsgnow'"),
        (('api_key = "${EMSGNOW_KEY}"', ''), ":5: providers.alerts: missing credential 'api_key'"),
        (("max_attempts = 3", "max_attempts = 'many'"), ":3: dispatcher.max_attempts: must be a int"),
        (('from = "ACME"', 'from = "ACME"\non_timeout = "resend"'),
         ":11: providers.alerts.on_timeout: must be one of retry, unknown, got 'resend'"),
    ],
)
def test_errors_name_the_line_and_the_key(tmp_path, replace, expected):
    path = write(tmp_path, GOOD.replace(*replace))
    with pytest.raises(ConfigError) as err:
        load_settings(path, env={"EMSGNOW_KEY": "k"})
    assert expected in str(err.value)


def test_rate_limits_parse_in_every_unit():
    assert parse_rate_limit("1000/h").interval == 3.6
    assert parse_rate_limit("2000/5m").period == 300
    assert parse_rate_limit("8/s", burst=4).burst == 4


def test_check_config_reports_ok_without_printing_secrets(tmp_path, monkeypatch, capsys):
    path = write(tmp_path, GOOD)
    monkeypatch.setenv("EMSGNOW_KEY", "very-secret-value")
    assert main(["check-config", "--file", str(path)]) == 0
    out = capsys.readouterr().out
    assert "provider alerts: kind=emsgnow" in out and "api_key=***" in out
    assert "very-secret-value" not in out


def test_check_config_exits_2_with_one_line_naming_the_key(tmp_path, monkeypatch, capsys):
    path = write(tmp_path, GOOD.replace('"10/s"', '"ten"'))
    monkeypatch.setenv("EMSGNOW_KEY", "very-secret-value")
    assert main(["check-config", "--file", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "providers.alerts.rate_limit" in err and ":9:" in err
    assert "very-secret-value" not in err


def test_invalid_toml_is_reported_with_its_position(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(write(tmp_path, "[providers.alerts\nkind="), env={})

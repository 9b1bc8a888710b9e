"""One sandbox account of every kind, and a valid address for each: shared by the input and secret tests."""

from __future__ import annotations

ACCOUNTS = """
[providers.fly]
kind = "esimfly"
base_url = "{esimfly}"
access_code = "{fly_code}"
secret_key = "{fly_secret}"

[providers.access]
kind = "esimaccess"
base_url = "{esimaccess}"
access_code = "{access_code}"
secret_key = "{access_secret}"

[providers.iot]
kind = "emnify"
base_url = "{emnify}"
application_token = "{emnify_token}"
source_address = "12345"

[providers.africa]
kind = "esms_africa"
base_url = "{esms_africa}"
api_key = "{esms_key}"
sender_id = "eSMSAfrica"
"""

# account -> (kind, a valid `to`)
VALID_TO = {
    "alerts": ("emsgnow", "+14155550123"),
    "fly": ("esimfly", "8948010010036785060"),
    "access": ("esimaccess", "23072017992029"),
    "iot": ("emnify", "12345"),
    "africa": ("esms_africa", "+254712345678"),
}


def accounts_toml(sandbox) -> str:
    """The [providers.*] tables of ACCOUNTS filled in with the sandbox's URLs and credentials."""
    c = sandbox.credentials
    return ACCOUNTS.format(
        esimfly=sandbox.base_url("esimfly"), fly_code=c("esimfly")["access_code"], fly_secret=c("esimfly")["secret_key"],
        esimaccess=sandbox.base_url("esimaccess"), access_code=c("esimaccess")["access_code"],
        access_secret=c("esimaccess")["secret_key"], emnify=sandbox.base_url("emnify"),
        emnify_token=c("emnify")["application_token"], esms_africa=sandbox.base_url("esms_africa"),
        esms_key=c("esms_africa")["api_key"])

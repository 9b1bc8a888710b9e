"""Checks that a delivery webhook comes from the provider: pure functions, no I/O.

* eSMS Africa signs the raw body: `X-Webhook-Signature: sha256=<hex HMAC-SHA256(secret, body)>`.
* emnify sends `Authorization: Bearer <JWT>` signed HS256 with the callback secret; the
  signature is checked, and the token must carry an `exp` that has not passed (with `LEEWAY`
  seconds of clock skew): a token without one would be good forever once seen. No other
  claim is required.
* eMsgNow documents no signature, so the dispatcher puts a shared token in the callback URL
  (`?token=<webhook_secret>`) and checks it.

Every comparison of secret material runs in constant time (`hmac.compare_digest`). The
functions answer True or False, or `why_*` gives the reason for a log line; neither ever
includes the secret or the presented credential.
"""

from __future__ import annotations

import hashlib
import hmac

import jwt

SIGNATURE_PREFIX = "sha256="
LEEWAY = 30.0  # seconds of clock skew allowed on a JWT's exp


def esms_signature(secret: str, body: bytes) -> str:
    """The header value eSMS Africa sends for `body`: "sha256=<hex>"."""
    return SIGNATURE_PREFIX + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def why_esms_signature_fails(secret: str, body: bytes, header: str | None) -> str | None:
    """None when `header` is the body's valid signature, else a short reason."""
    if not header:
        return "no X-Webhook-Signature header"
    header = header.strip()
    if not header.lower().startswith(SIGNATURE_PREFIX):
        return "X-Webhook-Signature is not of the form sha256=<hex>"
    given = header[len(SIGNATURE_PREFIX):].lower()
    expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(given.encode(), expected.encode()):
        return "X-Webhook-Signature does not match the body"
    return None


def verify_esms_signature(secret: str, body: bytes, header: str | None) -> bool:
    return why_esms_signature_fails(secret, body, header) is None


def why_emnify_jwt_fails(secret: str, authorization: str | None) -> str | None:
    """None when `authorization` is "Bearer <JWT>" signed HS256 with `secret`, with an exp not passed."""
    if not authorization:
        return "no Authorization header"
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return "Authorization is not a Bearer token"
    try:
        jwt.decode(token.strip(), secret, algorithms=["HS256"], leeway=LEEWAY,
                   options={"verify_aud": False, "verify_iat": False, "verify_nbf": True, "require": ["exp"]})
    except jwt.ExpiredSignatureError:
        return "the JWT has expired"
    except jwt.MissingRequiredClaimError:
        return "the JWT carries no exp claim"
    except jwt.InvalidSignatureError:
        return "the JWT signature does not match the callback secret"
    except jwt.InvalidTokenError as exc:
        return f"the JWT is not valid ({type(exc).__name__})"
    return None


def verify_emnify_jwt(secret: str, authorization: str | None) -> bool:
    return why_emnify_jwt_fails(secret, authorization) is None


def why_token_fails(secret: str, given: str | None) -> str | None:
    """None when the callback URL's `token` query parameter equals the secret."""
    if not given:
        return "no token query parameter"
    if not hmac.compare_digest(given.encode(), secret.encode()):
        return "the token query parameter is wrong"
    return None


def verify_token(secret: str, given: str | None) -> bool:
    return why_token_fails(secret, given) is None

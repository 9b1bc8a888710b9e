"""The HTTP API for producers in any language (`dispatcher api`): JSON over HTTP with the same
rules, errors and guarantees as dispatcher.send(). See docs/http-api.md.

    app.py           the app: routes, the key check, refusals answered as JSON (aiohttp)
    common.py        what handlers share: refusals, replies, reading bodies and query strings
    messages.py      send one, send a batch, read, cancel; liveness
    campaigns.py     campaigns: create from a CSV body, read, pause, resume, cancel
    models.py        the request and response bodies (pydantic), shared with /openapi.json
    openapi.py       the route declarations and the OpenAPI document built from them
    group_commit.py  single sends arriving together share one transaction and one publish
    server.py        serving it: `dispatcher api`, and a thread for tests
"""

from .app import build_app, openapi_document
from .server import DEFAULT_HOST, DEFAULT_PORT, ApiThread, serve

__all__ = ["ApiThread", "DEFAULT_HOST", "DEFAULT_PORT", "build_app", "openapi_document", "serve"]

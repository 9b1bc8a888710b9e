"""schemathesis against the running API's own /openapi.json: no 5xx, and every answer (status,
content type, body) is one the document declares; bodies outside the schema are refused.

Kept short: a bounded number of generated requests per operation. Business rules the schema
cannot state (an E.164 number, a configured account) make many schema-valid bodies 422s,
which the document declares; so schema-valid data is not required to be accepted here
(the other API tests show what is).
"""

from __future__ import annotations

import uuid

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from dispatcher.httpapi.app import routes

from .conftest import write_config

EXAMPLES = 15  # per operation and mode: the whole module runs in seconds

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection, ignored_auth]


@pytest.fixture(scope="module")
def schema_env(tmp_path_factory, sandbox, redis_url):
    """A store and config of this module's own, and no enqueueing: generated sends stay in the store."""
    from dispatcher import queue, runtime
    from dispatcher.api_keys import create_key
    from dispatcher.httpapi import ApiThread

    work = tmp_path_factory.mktemp("schema")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DISPATCHER_CONFIG", write_config(work / "dispatcher.toml", sandbox))
        mp.setenv("DISPATCHER_DATABASE_URL", f"sqlite:///{work / 'dispatcher.db'}")
        mp.setattr(queue, "enqueue", lambda ids, countdown=0.0, batch_size=None, priority=False: None)
        runtime.configure(None)
        _, key = create_key(f"schemathesis-{uuid.uuid4().hex[:6]}")
        with ApiThread() as server:
            yield server, key
    runtime.configure(None)


@pytest.fixture(scope="module")
def api_schema(schema_env):
    server, _ = schema_env
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


# schemathesis's own pytest glue (schema.parametrize) does not run under pytest 9.2, so each
# operation gets a plain Hypothesis test over schemathesis's strategy for it.
OPERATIONS = [(r.method, r.path) for r in routes()]
NO_INPUT = {(r.method, r.path) for r in routes() if "{" not in r.path and r.body is None and r.raw_body is None
            and r.query is None and not r.headers}


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
@pytest.mark.parametrize("method, path", OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_every_answer_is_documented_and_none_is_a_server_error(api_schema, schema_env, method, path, mode):
    if mode is GenerationMode.NEGATIVE and (method, path) in NO_INPUT:
        pytest.skip("nothing to send wrong: the operation takes no input")
    _, key = schema_env
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    def check(case):
        case.call_and_validate(headers={"Authorization": f"Bearer {key}"}, checks=CHECKS)

    check()

"""The route table's declarations, and /openapi.json built from them.

Each `Route` names its handler, the pydantic models it parses (JSON body, query string) and
the model it answers with for every status. app.py registers the handlers from this table and
checks at run time that a handler answers only with a declared status and model; `spec()`
turns the same table into an OpenAPI 3.1 document (the models' JSON Schemas come from
pydantic). So the document cannot drift from what the handlers do: there is no second copy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Sequence

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from .models import ErrorOut

Handler = Callable[..., Awaitable[Any]]

# What each refusal means, for the document; the same words serve every route.
STATUS_TEXT = {
    200: "OK", 201: "Created",
    400: "The body is not valid JSON",
    401: "No API key, or a wrong or revoked one (`Authorization: Bearer KEY`)",
    403: "The API key may not use this provider account",
    404: "No such message",
    409: "Too late: the message is already with the provider",
    413: "The body is larger than 1 MiB",
    415: "The body is not of the content type this call takes",
    422: "Invalid input: `error.field` names the field, `error.message` the rule; nothing was stored",
    503: "The store is not reachable (or not migrated): try again",
}


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    responses: dict[int, type[BaseModel]]  # the handler's own answers; refusals common to all are added
    body: type[BaseModel] | None = None  # a JSON body of this model
    raw_body: str | None = None  # or a body of this media type, read as text (e.g. "text/csv")
    query: type[BaseModel] | None = None  # query parameters, one per field of this model
    headers: tuple[tuple[str, str], ...] = ()  # optional request headers: (name, description)
    public: bool = False  # answers without an API key
    description: str = ""
    answers: dict[int, type[BaseModel]] = field(init=False)

    def __post_init__(self) -> None:
        answers = dict(self.responses)
        if not self.public:
            answers.update({401: ErrorOut, 503: ErrorOut})
        if self.body is not None or self.raw_body is not None:
            answers.update({413: ErrorOut, 415: ErrorOut, 422: ErrorOut})
        if self.body is not None:
            answers[400] = ErrorOut
        if self.query is not None:
            answers[422] = ErrorOut
        object.__setattr__(self, "answers", answers)

    @property
    def operation_id(self) -> str:
        return self.handler.__name__


def spec(routes: Sequence[Route], *, title: str, version: str, description: str = "") -> dict[str, Any]:
    """The OpenAPI 3.1 document of `routes`."""
    inputs = {m for r in routes for m in (r.body, r.query) if m is not None}
    outputs = {m for r in routes for m in r.answers.values()}
    pairs = [(m, "validation") for m in sorted(inputs, key=lambda m: m.__name__)]
    pairs += [(m, "serialization") for m in sorted(outputs - inputs, key=lambda m: m.__name__)]
    refs, defs = models_json_schema(pairs, ref_template="#/components/schemas/{model}")
    schemas = defs.get("$defs", {})

    def ref(model: type[BaseModel]) -> dict[str, Any]:
        return refs[(model, "validation" if model in inputs else "serialization")]

    paths: dict[str, dict[str, Any]] = {}
    for r in routes:
        op: dict[str, Any] = {"operationId": r.operation_id, "summary": r.summary, "responses": {}}
        if r.description:
            op["description"] = r.description
        params = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                  for name in re.findall(r"{(\w+)}", r.path)]
        params += [{"name": name, "in": "header", "required": False, "description": text, "schema": {"type": "string"}}
                   for name, text in r.headers]
        if r.query is not None:
            params += _query_parameters(r.query, schemas)
        if params:
            op["parameters"] = params
        if r.body is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref(r.body)}}}
        elif r.raw_body is not None:
            op["requestBody"] = {"required": True, "content": {r.raw_body: {"schema": {"type": "string"}}}}
        for status, model in sorted(r.answers.items()):
            op["responses"][str(status)] = {"description": STATUS_TEXT.get(status, "OK"),
                                            "content": {"application/json": {"schema": ref(model)}}}
        if not r.public:
            op["security"] = [{"bearer": []}]
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version, "description": description},
        "paths": paths,
        "components": {"schemas": schemas,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                                      "description": "a key from `dispatcher api-key create NAME`"}}},
    }


def _query_parameters(model: type[BaseModel], schemas: dict[str, Any]) -> list[dict[str, Any]]:
    schema = schemas.get(model.__name__) or model.model_json_schema()
    required = set(schema.get("required", ()))
    params = []
    for name, prop in schema.get("properties", {}).items():
        prop = dict(prop)
        text = prop.pop("description", "")
        prop.pop("title", None)
        param = {"name": name, "in": "query", "required": name in required, "schema": prop}
        if text:
            param["description"] = text
        params.append(param)
    return params

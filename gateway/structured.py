"""`response_format`: OpenAI's structured-output field, checked and turned into the engine's grammar request.

{"type": "text"} (the default) constrains nothing; {"type": "json_object"} asks for any JSON object;
{"type": "json_schema", "json_schema": {"name", "description"?, "schema"?, "strict"?}} for an instance of the
schema. The output is guaranteed to follow it (the engine masks every token), strict or not: strict only matters
to OpenAI, which refuses schemas it can't guarantee; here every schema the grammar library accepts is enforced.
A malformed field or a schema the library refuses is a 400 naming `response_format`.
"""

from __future__ import annotations

import re

from gateway.errors import ApiError
from protocol import structured

PARAM = "response_format"
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for json_schema.name
_SCHEMA_KEYS = {"name", "description", "schema", "strict"}


def _refuse(message: str) -> ApiError:
    return ApiError(400, f"'{PARAM}' {message}", param=PARAM)


def parse_response_format(body: dict) -> str | None:
    """The grammar request for ``body['response_format']`` (None: unconstrained); ApiError 400 if malformed."""
    value = body.get(PARAM)
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") not in ("text", "json_object", "json_schema"):
        raise _refuse("must be an object with a 'type' of text, json_object or json_schema")
    kind = value["type"]
    expected = {"type", "json_schema"} if kind == "json_schema" else {"type"}
    extra = sorted(str(k)[:32] for k in value if k not in expected)
    if extra:
        raise _refuse(f"of type {kind} has an unknown key '{extra[0]}'")
    if kind == "text":
        return None
    if kind == "json_object":
        request = structured.json_object(PARAM)
    else:
        request = structured.json_schema(_schema(value.get("json_schema")), PARAM)
    return checked(request)


def _schema(spec: object) -> dict:
    if not isinstance(spec, dict):
        raise _refuse("of type json_schema needs a 'json_schema' object with a 'name' and a 'schema'")
    extra = sorted(str(k)[:32] for k in spec if k not in _SCHEMA_KEYS)
    if extra:
        raise _refuse(f"json_schema has an unknown key '{extra[0]}'")
    if not isinstance(spec.get("name"), str) or not NAME.match(spec["name"]):
        raise _refuse("json_schema.name must be 1-64 characters of a-z, A-Z, 0-9, _ and -")
    if not isinstance(spec.get("strict", False), bool | None):
        raise _refuse("json_schema.strict must be a boolean")
    if not isinstance(spec.get("description", ""), str):
        raise _refuse("json_schema.description must be a string")
    schema = spec.get("schema", {})  # OpenAI: no schema means any JSON value
    if not isinstance(schema, dict):
        raise _refuse("json_schema.schema must be a JSON Schema object")
    return schema


def checked(request: str) -> str:
    """``request`` if the grammar library compiles it, else a 400 naming the field it came from."""
    try:
        structured.check(request)
    except structured.GrammarError as exc:
        raise ApiError(400, str(exc), param=exc.param) from None
    return request

"""Grammar requests (`SamplingParams.structured`): built by the gateway, compiled by the engine, checked by both.

The format is documented in `gpu_runtime.engine.grammar`. This half needs no torch and no tokenizer: the gateway
uses it to refuse a bad grammar with a 400 before anything is queued, and the engine to turn the text into an
llguidance grammar. llguidance's core is a Rust extension without Python dependencies (torch stays out).
"""

from __future__ import annotations

import json

import llguidance

from protocol.errors import InvalidRequest

# Whitespace a JSON value may carry between two of its tokens: one space, or one line break and an indent of up to
# 24 blanks. That covers compact, spaced and pretty-printed JSON, and keeps a model (greedy ones loop; random
# weights do nothing else) from spending max_tokens on blanks, which arbitrary whitespace would allow.
JSON_OPTIONS = {"whitespace_pattern": r"\x20|\r?\n[\x20\t]{0,24}"}
KINDS = ("json_object", "json_schema", "lark")


class GrammarError(InvalidRequest):
    """A grammar request the library refuses; ``param`` is the request field it came from."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"'{param}': {message}")
        self.param = param
        self.detail = message


def guided(schema: dict) -> dict:
    """``schema`` with WarmServe's JSON options, as it is embedded in any grammar (llguidance reads x-guidance)."""
    return {**schema, "x-guidance": JSON_OPTIONS}


def json_object(param: str = "response_format") -> str:
    return json.dumps({"type": "json_object", "param": param})


def json_schema(schema: dict, param: str = "response_format") -> str:
    return json.dumps({"type": "json_schema", "schema": schema, "param": param})


def lark(grammar: str, param: str) -> str:
    return json.dumps({"type": "lark", "grammar": grammar, "param": param})


def to_llguidance(structured: str) -> tuple[str, str]:
    """(llguidance grammar, the request field it came from); GrammarError when the request is malformed (the
    grammar itself is checked by ``check`` or by compiling it)."""
    try:
        request = json.loads(structured)
    except ValueError as exc:
        raise GrammarError("structured", f"not JSON: {exc}") from None
    if not isinstance(request, dict) or request.get("type") not in KINDS:
        raise GrammarError("structured", f"must be an object with a 'type' of {', '.join(KINDS)}")
    param = str(request.get("param") or "structured")
    kind = request["type"]
    if kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema(guided({"type": "object"})), param
    if kind == "json_schema":
        schema = request.get("schema")
        if not isinstance(schema, dict):
            raise GrammarError(param, "the schema must be a JSON object")
        return llguidance.LLMatcher.grammar_from_json_schema(guided(schema)), param
    if not isinstance(request.get("grammar"), str):
        raise GrammarError(param, "a lark request needs a 'grammar' string")
    return llguidance.LLMatcher.grammar_from_lark(request["grammar"]), param


def check(structured: str) -> None:
    """GrammarError naming the request field unless ``structured`` compiles (no tokenizer needed)."""
    grammar, param = to_llguidance(structured)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise GrammarError(param, f"invalid grammar: {messages[0].strip()[:400]}")

"""Structured output and tools end to end: the official openai client against real gateway and worker processes."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from tool_models import TOOLS, WEATHER, build_tool_model

from gpu_runtime.tokenizer import Tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 8},
        "rain": {"type": "boolean"},
        "level": {"enum": ["low", "high"]},
    },
    "required": ["city", "rain", "level"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA, "strict": True}}
ASK = [{"role": "user", "content": "Weather in Oslo?"}]


@pytest.fixture(scope="module")
def client(stack, tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e-tool-models")
    models = {"tiny-json": tiny_model, **{f"tiny-{s}": build_tool_model(root, s) for s in ("llama3", "hermes")}}
    for name, path in models.items():
        spec = {"name": name, "model": str(path), "engine": "builtin", "max_model_len": 1024}
        resp = httpx.post(f"{stack.url}/functions", json=spec)
        assert resp.status_code == 201, resp.text
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_json_schema_answers_validate(client):
    for seed in range(3):
        resp = client.chat.completions.create(
            model="tiny-json", messages=ASK, response_format=RESPONSE_FORMAT, seed=seed, max_tokens=150
        )
        assert resp.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(resp.choices[0].message.content), SCHEMA)


def test_json_schema_streamed_validates(client):
    stream = client.chat.completions.create(
        model="tiny-json", messages=ASK, response_format=RESPONSE_FORMAT, seed=5, max_tokens=150, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_on_completions(client, tiny_model):
    # a bias towards '"' and '}' keeps random weights' strings short; the grammar makes the answer an object
    tok = Tokenizer.from_pretrained(tiny_model)
    bias = {str(tok.token_to_id(t)): 4 for t in ('"', "}")}
    resp = client.completions.create(
        model="tiny-json", prompt="Hi", max_tokens=120, seed=1, logit_bias=bias,
        extra_body={"response_format": {"type": "json_object"}},
    )  # fmt: skip
    assert isinstance(json.loads(resp.choices[0].text), dict)


@pytest.mark.parametrize("style", ["llama3", "hermes"])
def test_required_tool_call(client, style):
    resp = client.chat.completions.create(
        model=f"tiny-{style}", messages=ASK, tools=TOOLS, tool_choice="required", seed=2, max_tokens=200
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.type == "function" and call.id and call.function.name in ("get_weather", "noop")
        assert isinstance(json.loads(call.function.arguments), dict)


@pytest.mark.parametrize("style", ["llama3", "hermes"])
def test_named_tool_call_streamed_matches_whole(client, style):
    body = dict(
        model=f"tiny-{style}", messages=ASK, tools=TOOLS, seed=4, max_tokens=200, parallel_tool_calls=False,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )  # fmt: skip
    whole = client.chat.completions.create(**body).choices[0]
    calls: dict[int, dict] = {}
    reasons = []
    for chunk in client.chat.completions.create(**body, stream=True):
        for c in chunk.choices:
            reasons += [c.finish_reason] if c.finish_reason else []
            for d in c.delta.tool_calls or ():
                entry = calls.setdefault(d.index, {"name": "", "arguments": ""})
                entry["name"] += d.function.name or ""
                entry["arguments"] += d.function.arguments or ""
    assert reasons == ["tool_calls"] and whole.finish_reason == "tool_calls"
    (call,) = whole.message.tool_calls
    assert calls == {0: {"name": "get_weather", "arguments": call.function.arguments}}
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
         "response_format"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 3}}}]}, "tools"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "missing"}}}, "tool_choice"),
    ],
)  # fmt: skip
def test_bad_requests_are_400_naming_the_field(client, extra, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny-hermes", messages=ASK, max_tokens=4, extra_body=extra)
    assert err.value.status_code == 400 and err.value.param == param

"""Tools and response_format at the gateway (rendering, checking, parsing, streaming) and forced calls in the engine."""

from __future__ import annotations

import json

import jsonschema
import pytest
from tool_models import NOOP, TOOLS, WEATHER, build_tool_model

from functions.spec import parse_spec
from gateway.errors import ApiError
from gateway.openai_api import parse_chat, parse_completion
from gateway.tools import ToolStream, parse_calls, parse_tools
from gpu_runtime import Engine, SamplingParams, Tokenizer
from protocol.messages import FinishReason

STYLES = ("llama3", "hermes")
ASK = [{"role": "user", "content": "What is the weather in Oslo?"}]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tool-models")
    return {style: str(build_tool_model(root, style)) for style in STYLES}


@pytest.fixture(scope="module")
def toks(models) -> dict[str, Tokenizer]:
    return {style: Tokenizer.from_pretrained(path) for style, path in models.items()}


@pytest.fixture(scope="module")
def engines(models) -> dict[str, Engine]:
    return {style: Engine.from_pretrained(path) for style, path in models.items()}


def chat(models, toks, style: str, **body):
    spec = parse_spec({"name": f"tools-{style}", "model": models[style], "max_model_len": 1024})
    return parse_chat({"model": spec.name, "messages": ASK, **body}, spec, toks[style])


@pytest.mark.parametrize("style", STYLES)
def test_tools_are_rendered_by_the_chat_template(models, toks, style):
    parsed = chat(models, toks, style, tools=TOOLS)
    prompt = toks[style].decode(list(parsed.prompts[0].ids))
    assert '"name": "get_weather"' in prompt and '"name": "noop"' in prompt
    assert parsed.tools.fmt == style and parsed.sampling.structured is None  # auto: the model may answer in text
    plain = chat(models, toks, style, tools=TOOLS, tool_choice="none")
    assert "get_weather" not in toks[style].decode(list(plain.prompts[0].ids)) and plain.tools is None


@pytest.mark.parametrize("style", STYLES)
def test_past_calls_and_results_are_rendered(models, toks, style):
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "cold"}]  # fmt: skip
    parsed = chat(models, toks, style, tools=TOOLS, messages=messages)
    prompt = toks[style].decode(list(parsed.prompts[0].ids))
    key = "parameters" if style == "llama3" else "arguments"
    assert f'{{"name": "get_weather", "{key}": {{"city": "Oslo"}}}}' in prompt and "cold" in prompt


ANSWERS = {
    "llama3": '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "c", "days": 2}}; '
    '{"name": "noop", "parameters": {}}',
    "hermes": 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c", '
    '"days": 2}}\n</tool_call>\n<tool_call>\n{"name": "noop", "arguments": {}}\n</tool_call>',
}


@pytest.mark.parametrize("style", STYLES)
def test_calls_are_parsed_whole_and_streamed(style):
    request = parse_tools({"tools": TOOLS}, "<tool_call>" if style == "hermes" else "<|python_tag|>")
    content, calls = parse_calls(ANSWERS[style], request)
    assert content == ("Let me check." if style == "hermes" else None)
    assert [(c["index"], c["function"]["name"]) for c in calls] == [(0, "get_weather"), (1, "noop")]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo", "unit": "c", "days": 2}
    stream = ToolStream(request)
    deltas = [d for k in range(0, len(ANSWERS[style]), 5) for d in stream.feed(ANSWERS[style][k : k + 5])]
    deltas += stream.finish()
    streamed = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert [(c["index"], c["function"]) for c in streamed] == [(c["index"], c["function"]) for c in calls]
    assert "".join(d.get("content", "") for d in deltas).strip() == (content or "")
    assert stream.called


def test_text_answers_stay_text():
    for template, text in (("<|python_tag|>", "The weather is fine."), ("<tool_call>", "No call <tool_ here.")):
        request = parse_tools({"tools": TOOLS}, template)
        assert parse_calls(text, request) == (text, [])
        stream = ToolStream(request)
        deltas = [d for ch in text for d in stream.feed(ch)] + stream.finish()
        assert "".join(d["content"] for d in deltas) == text and not stream.called


def test_one_call_only_without_parallel_tool_calls():
    request = parse_tools({"tools": TOOLS, "parallel_tool_calls": False}, "<tool_call>")
    assert [c["function"]["name"] for c in parse_calls(ANSWERS["hermes"], request)[1]] == ["get_weather"]


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_calls_are_valid_calls(models, toks, engines, style, choice):
    parsed = chat(models, toks, style, tools=TOOLS, tool_choice=choice, parallel_tool_calls=False)
    params = [SamplingParams(max_tokens=200, seed=s, structured=parsed.sampling.structured) for s in range(2)]
    outs = engines[style].generate([list(parsed.prompts[0].ids)] * len(params), params)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, NOOP)}
    for out in outs:
        assert out.finish_reason == FinishReason.STOP
        content, calls = parse_calls(toks[style].decode(out.token_ids, skip_special_tokens=True), parsed.tools)
        assert len(calls) == 1 and not (content or "").strip()
        name = calls[0]["function"]["name"]
        assert name == "get_weather" if isinstance(choice, dict) else name in schemas
        jsonschema.validate(json.loads(calls[0]["function"]["arguments"]), schemas[name])


BAD_TOOLS = [
    ({"tools": "get_weather"}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools"),
    ({"tools": [{"type": "code_interpreter"}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objectx"}}}]}, "tools"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
]
BAD_FORMATS = [
    {"type": "xml"},
    "json_object",
    {"type": "json_object", "schema": {}},
    {"type": "json_schema"},
    {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}},
    {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}},
    {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "objectx"}}},
    {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "string", "pattern": "[a-"}}},
    {"type": "json_schema", "json_schema": {"name": "s", "schema": [], "strict": True}},
]


@pytest.mark.parametrize(
    ("extra", "param"), BAD_TOOLS + [({"response_format": f}, "response_format") for f in BAD_FORMATS]
)
def test_bad_tools_and_response_formats_are_400_naming_the_field(models, toks, extra, param):
    with pytest.raises(ApiError) as err:
        chat(models, toks, "hermes", **extra)
    assert (err.value.status, err.value.param) == (400, param)


def test_tools_need_a_template_that_renders_calls(tiny_model):
    spec = parse_spec({"name": "plain", "model": str(tiny_model)})
    with pytest.raises(ApiError) as err:
        parse_chat({"model": "plain", "messages": ASK, "tools": TOOLS}, spec, Tokenizer.from_pretrained(tiny_model))
    assert (err.value.status, err.value.param) == (400, "tools")


def test_response_format_on_completions(tiny_model):
    spec = parse_spec({"name": "plain", "model": str(tiny_model)})
    tok = Tokenizer.from_pretrained(tiny_model)
    body = {"model": "plain", "prompt": "Hi", "response_format": {"type": "json_object"}}
    assert json.loads(parse_completion(body, spec, tok).sampling.structured)["type"] == "json_object"
    with pytest.raises(ApiError) as err:
        parse_completion({**body, "response_format": {"type": "yaml"}}, spec, tok)
    assert err.value.param == "response_format"

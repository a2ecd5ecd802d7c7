"""Property-based fuzzing of every endpoint and every spec field against a real gateway app, a real Redis and a
worker serving a real (tiny) model: no response is a 5xx, nothing escapes the app (a crash would surface as an
exception through the ASGI transport), and every error is in OpenAI's JSON shape. Bounded in examples and time
so it runs in CI in seconds."""

from __future__ import annotations

import json
from urllib.parse import quote

import orjson
import pytest
import redis
import yaml
from gateway_inproc import FAST, AppClient, db_url, serve_hot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.app import create_app

FN = "fuzz-fn"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
names = st.just(FN) | st.text(max_size=12).filter(lambda n: not n.startswith("fz-"))
deploy_names = st.from_regex(r"fz-[a-z0-9._-]{0,8}", fullmatch=True) | st.text(max_size=12).map(lambda t: "fz-" + t)
models = st.sampled_from(
    ["cache:tiny-llama", "cache:../../..", "cache:", "/etc", "relative", "~/x", "/tmp/a\x00b", "/" + "x" * 5000]
) | st.text(max_size=30)
small_ints = st.integers(min_value=-5, max_value=70)

SAMPLING = {
    "max_tokens": small_ints | json_values,
    "max_completion_tokens": small_ints,
    "temperature": st.floats(-1, 3) | json_values,
    "top_p": st.floats(-1, 2),
    "top_k": small_ints,
    "seed": st.integers() | json_values,
    "stop": json_values | st.lists(st.text(max_size=5), max_size=5),
    "stop_token_ids": st.lists(st.integers(), max_size=3),
    "ignore_eos": json_values,
    "stream": st.booleans() | json_values,
    "stream_options": json_values | st.just({"include_usage": True}),
    "n": small_ints,
    "best_of": small_ints,
    "logprobs": small_ints | json_values,
    "top_logprobs": small_ints,
    "echo": json_values,
    "presence_penalty": st.floats(-3, 3) | json_values,
    "frequency_penalty": st.floats(-3, 3),
    "repetition_penalty": st.floats(-1, 3),
    "logit_bias": st.dictionaries(st.text(max_size=4) | st.integers(-2, 600).map(str), st.floats(-200, 200))
    | json_values,
    "min_tokens": small_ints,
    "suffix": json_values,
    "response_format": json_values
    | st.sampled_from([{"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}])
    | st.fixed_dictionaries({"type": st.just("json_schema"), "json_schema": json_values}),
    "tools": json_values | st.lists(st.fixed_dictionaries({"type": st.just("function"), "function": json_values})),
    "tool_choice": json_values | st.sampled_from(["auto", "none", "required"]),
}
completion = st.fixed_dictionaries(
    {"model": names},
    optional={"prompt": st.text(max_size=40) | st.lists(st.integers(-2, 600), max_size=8) | json_values, **SAMPLING},
)
messages = st.lists(
    st.fixed_dictionaries({}, optional={"role": st.sampled_from(["user", "system", "x"]), "content": json_values}),
    max_size=3,
)
chat = st.fixed_dictionaries({"model": names}, optional={"messages": messages | json_values, **SAMPLING})
section = st.dictionaries(st.text(max_size=14), json_values, max_size=3)
spec = st.fixed_dictionaries(
    {},
    optional={
        "name": deploy_names | json_values,
        "model": models | json_values,
        "engine": st.sampled_from(["builtin", "transformers", "vllm"]) | json_values,
        "dtype": st.sampled_from(["float32", "bfloat16", "int4"]) | json_values,
        "max_model_len": small_ints | json_values,
        "scaling": section
        | st.fixed_dictionaries(
            {},
            optional={
                k: small_ints | json_values for k in ("min_instances", "max_instances", "keep_alive_s", "max_queue")
            },
        ),
        "slo": section | st.fixed_dictionaries({}, optional={"ttft_ms": st.floats() | json_values}),
        "extra": json_values,
    },
)
function_paths = deploy_names.map(lambda n: f"/functions/{quote(n, safe='')}")
content_types = st.sampled_from(
    ["application/json", "application/yaml", "text/yaml", "text/plain", "", "application/json; charset=utf-8"]
)


def encode(doc: object, ctype: str) -> bytes:
    if "yaml" in ctype:
        return yaml.safe_dump(doc, allow_unicode=True).encode()
    return json.dumps(doc).encode()  # the standard library's: big integers and NaN too, as a client may send


requests = st.one_of(
    st.tuples(st.just("POST"), st.just("/v1/completions"), completion, st.just("application/json")),
    st.tuples(st.just("POST"), st.just("/v1/chat/completions"), chat, st.just("application/json")),
    st.tuples(st.just("POST"), st.just("/functions"), spec, content_types),
    st.tuples(st.just("PUT"), function_paths, spec, content_types),
    st.tuples(st.sampled_from(["GET", "DELETE"]), function_paths, st.none(), st.just("")),
    st.tuples(
        st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
        st.sampled_from(["/v1/models", "/functions", "/status", "/metrics", "/healthz", "/v1/x", "/"]),
        st.none() | json_values,
        content_types,
    ),
    st.tuples(
        st.just("POST"),
        st.sampled_from(["/v1/completions", "/functions"]),
        st.binary(max_size=200),
        content_types,
    ),
)


@pytest.fixture(scope="module")
def gw(redis_url, tiny_model):
    url = db_url(redis_url, 12)
    redis.Redis.from_url(url).flushdb()
    worker = serve_hot(url, FN, str(tiny_model), "fuzz-worker", max_model_len=32)
    client = AppClient(create_app(url, FAST))
    yield client
    client.close()
    worker.stop()


def check(resp) -> None:
    assert resp.status_code < 500, resp.text
    if resp.status_code >= 400:
        error = resp.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
        assert len(error["message"]) < 1000
    elif resp.headers.get("content-type", "").startswith("text/event-stream"):
        for line in resp.text.splitlines():
            if line.startswith("data: {"):
                assert "error" not in orjson.loads(line[6:]), line


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI failures reproduce
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(request=requests)
def test_no_input_gets_a_5xx_or_breaks_the_shape(gw, request):
    method, path, body, ctype = request
    if isinstance(body, bytes):
        content = body
    elif body is None:
        content = None
    else:
        content = encode(body, ctype)
    headers = {"content-type": ctype} if ctype else {}
    check(gw.request(method, path, content=content, headers=headers))

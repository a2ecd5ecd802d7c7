"""End to end over real HTTP, real Redis, real worker processes: deploy, invoke, errors, status."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import openai
import pytest
import redis
from conftest import wait_for

from protocol import keys

FN = "e2e-tiny"
YAML = {"content-type": "application/yaml"}  # deploys name their type: text/plain is refused (cross-site forms)


def spec_yaml(model, name=FN, **extra) -> str:
    lines = [f"name: {name}", f"model: {model}", "engine: builtin", "max_model_len: 128"]
    lines += [f"{k}: {v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def cli(stack, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "warmserve.cli", *args, "--url", stack.url], capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def deployed(stack, tiny_model):
    resp = httpx.post(f"{stack.url}/functions", content=spec_yaml(tiny_model), headers={"content-type": "text/yaml"})
    assert resp.status_code == 201, resp.text
    return stack


@pytest.fixture(scope="module")
def client(deployed):
    return openai.OpenAI(base_url=f"{deployed.url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_lists_the_function(deployed):
    ids = [m["id"] for m in httpx.get(f"{deployed.url}/v1/models").json()["data"]]
    assert FN in ids


def test_completion_httpx_greedy_is_deterministic(deployed):
    body = {"model": FN, "prompt": "Hello world", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    a = httpx.post(f"{deployed.url}/v1/completions", json=body, timeout=60)
    b = httpx.post(f"{deployed.url}/v1/completions", json=body, timeout=60)
    assert a.status_code == 200, a.text
    ja, jb = a.json(), b.json()
    assert ja["object"] == "text_completion"
    assert ja["choices"][0]["finish_reason"] == "length"
    assert ja["usage"]["completion_tokens"] == 12
    assert ja["usage"]["prompt_tokens"] > 0
    assert ja["choices"][0]["text"] == jb["choices"][0]["text"] != ""


def test_openai_client_completion_stream_matches_non_stream(client):
    kw = {
        "model": FN,
        "prompt": "The quick brown fox",
        "max_tokens": 10,
        "temperature": 0,
        "extra_body": {"ignore_eos": True},
    }
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, **kw))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_openai_client_chat_stream_and_not(client):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Hello, how are you?"}]
    kw = {"model": FN, "messages": msgs, "max_tokens": 8, "temperature": 0, "extra_body": {"ignore_eos": True}}
    whole = client.chat.completions.create(**kw)
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant"
    assert whole.usage.completion_tokens == 8
    stream = client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 8


def test_seeded_sampling_repeats(client):
    kw = {"model": FN, "prompt": "Numbers like", "max_tokens": 10, "temperature": 1.0, "seed": 7}
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


def test_vanishing_temperature_is_greedy(deployed):
    body = {"model": FN, "prompt": "Hello", "max_tokens": 8, "ignore_eos": True}
    greedy = httpx.post(f"{deployed.url}/v1/completions", json={**body, "temperature": 0}, timeout=60)
    tiny = httpx.post(f"{deployed.url}/v1/completions", json={**body, "temperature": 1e-40}, timeout=60)
    assert tiny.status_code == 200, tiny.text
    assert tiny.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]


def test_malformed_stream_entry_is_dropped_not_stuck(deployed):
    r = redis.Redis.from_url(deployed.redis_url)
    r.xadd(keys.invocations(FN), {"inv": b"not json"})
    body = {"model": FN, "prompt": "Hello", "max_tokens": 3, "temperature": 0}
    assert httpx.post(f"{deployed.url}/v1/completions", json=body, timeout=60).status_code == 200
    # the answer reaches the client just before its entry is acknowledged: await the queue, don't race it
    wait_for(lambda: r.xlen(keys.invocations(FN)) == 0, 20, "the queue to empty")
    assert r.xpending(keys.invocations(FN), keys.GROUP)["pending"] == 0


def test_stop_string_ends_the_answer(deployed):
    body = {"model": FN, "prompt": "Hello", "max_tokens": 20, "temperature": 0, "ignore_eos": True}
    full = httpx.post(f"{deployed.url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    # a two-character stop string whose first occurrence is past the start of the answer
    at = next(i for i in range(2, len(full) - 1) if full.find(full[i : i + 2]) == i)
    stop = full[at : at + 2]
    cut = httpx.post(f"{deployed.url}/v1/completions", json={**body, "stop": [stop]}, timeout=60).json()
    assert cut["choices"][0]["text"] == full[: full.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"prompt": "hi"}, 400, "model"),
        ({"model": "nope", "prompt": "hi"}, 404, "model"),
        ({"model": FN}, 400, "prompt"),
        ({"model": FN, "prompt": ""}, 400, "prompt"),
        ({"model": FN, "prompt": [1, 2, 10**9]}, 400, "prompt"),
        ({"model": FN, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": FN, "prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
        ({"model": FN, "prompt": "hi", "temperature": 5}, 400, "temperature"),
        ({"model": FN, "prompt": "hi", "top_p": 0}, 400, "top_p"),
        ({"model": FN, "prompt": "hi", "n": 0}, 400, "n"),
        ({"model": FN, "prompt": "hi", "stop": [1]}, 400, "stop"),
        ({"model": FN, "prompt": "hi", "stream": "yes"}, 400, "stream"),
        ({"model": FN, "prompt": "hi", "max_tokens": 500}, 400, "max_tokens"),
        ({"model": FN, "prompt": "word " * 400}, 400, "prompt"),
        ({"model": FN, "prompt": "hi", "seed": 2**70}, 400, "seed"),
        ({"model": FN, "prompt": "hi", "top_k": 10**9}, 400, "top_k"),
        ({"model": FN, "prompt": "hi", "stop_token_ids": [10**9]}, 400, "stop_token_ids"),
    ],
)
def test_bad_completion_requests(deployed, body, status, param):
    resp = httpx.post(f"{deployed.url}/v1/completions", json=body, timeout=30)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["param"] == param and err["message"]


def test_overlong_prompt_code(deployed):
    resp = httpx.post(f"{deployed.url}/v1/completions", json={"model": FN, "prompt": "word " * 400}, timeout=30)
    assert resp.json()["error"]["code"] == "context_length_exceeded"
    assert "max_model_len" in resp.json()["error"]["message"]


def test_bad_chat_requests(deployed):
    for messages in (None, [], [{"role": "robot", "content": "x"}], [{"role": "user", "content": 3}]):
        resp = httpx.post(f"{deployed.url}/v1/chat/completions", json={"model": FN, "messages": messages})
        assert resp.status_code == 400
        assert resp.json()["error"]["param"] == "messages"


def test_malformed_json_body(deployed):
    resp = httpx.post(
        f"{deployed.url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert resp.status_code == 400
    assert "not valid JSON" in resp.json()["error"]["message"]


def test_openai_client_sees_not_found(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="missing-fn", prompt="x", max_tokens=2)


def test_function_crud_json_and_yaml(deployed, tiny_model):
    url = deployed.url
    spec = {"name": "crud-fn", "model": str(tiny_model), "engine": "transformers", "max_model_len": 64}
    assert httpx.post(f"{url}/functions", json=spec).status_code == 201
    assert httpx.put(f"{url}/functions/crud-fn", json={**spec, "max_model_len": 96}).status_code == 200
    assert httpx.get(f"{url}/functions/crud-fn").json()["max_model_len"] == 96
    bad = httpx.post(f"{url}/functions", content=f"name: crud-fn\nmodel: {tiny_model}-missing\n", headers=YAML)
    assert bad.status_code == 400 and "does not exist" in bad.json()["error"]["message"]
    assert httpx.get(f"{url}/functions/crud-fn").json()["model"] == str(tiny_model)  # the bad update changed nothing
    assert httpx.delete(f"{url}/functions/crud-fn").status_code == 200
    assert httpx.delete(f"{url}/functions/crud-fn").status_code == 404
    assert httpx.get(f"{url}/functions/crud-fn").status_code == 404


def test_reference_engine_agrees_with_builtin(deployed, tiny_model):
    url = deployed.url
    assert httpx.post(
        f"{url}/functions", content=spec_yaml(tiny_model, "ref-fn").replace("builtin", "transformers"), headers=YAML
    ).is_success
    body = {"prompt": "Hello world", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    ref = httpx.post(f"{url}/v1/completions", json={**body, "model": "ref-fn"}, timeout=120).json()
    ours = httpx.post(f"{url}/v1/completions", json={**body, "model": FN}, timeout=60).json()
    assert ref["choices"][0]["text"] == ours["choices"][0]["text"]


def test_queue_limit_gives_429_with_retry_after(deployed, tiny_model):
    url = deployed.url
    httpx.post(f"{url}/functions", content=spec_yaml(tiny_model, "tiny-queue", scaling="{max_queue: 2}"), headers=YAML)
    r = redis.Redis.from_url(deployed.redis_url)
    for _ in range(2):  # nobody hosts this function yet, so these entries stay queued
        r.xadd(keys.invocations("tiny-queue"), {"inv": b"{}"})
    resp = httpx.post(f"{url}/v1/completions", json={"model": "tiny-queue", "prompt": "hi"})
    assert resp.status_code == 429
    assert int(resp.headers["Retry-After"]) >= 1
    assert resp.json()["error"]["code"] == "queue_full"
    r.delete(keys.invocations("tiny-queue"))
    httpx.delete(f"{url}/functions/tiny-queue")


def test_metrics_and_health(deployed):
    assert httpx.get(f"{deployed.url}/healthz").json() == {"status": "ok"}
    text = httpx.get(f"{deployed.url}/metrics").text
    assert f'warmserve_requests_total{{function="{FN}",status="200"}}' in text
    assert f'warmserve_requests_total{{function="{FN}",status="400"}}' in text
    assert "warmserve_ttft_seconds_bucket" in text
    assert "warmserve_live_workers 1" in text


def test_cli_deploy_invoke_ls_status_rm(deployed, tiny_model, tmp_path):
    good = tmp_path / "cli-fn.yaml"
    good.write_text(spec_yaml(tiny_model, "cli-fn"))
    out = cli(deployed, "deploy", str(good))
    assert out.returncode == 0, out.stderr
    assert "deployed cli-fn" in out.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: cli-bad\nmodel: {unclosed\n")
    out = cli(deployed, "deploy", str(bad))
    assert out.returncode == 1 and str(bad) in out.stderr and "invalid YAML" in out.stderr
    out = cli(deployed, "invoke", "cli-fn", "Hello", "--stream", "--max-tokens", "5")
    assert out.returncode == 0, out.stderr
    assert "cli-fn" in cli(deployed, "ls").stdout
    status = cli(deployed, "status").stdout
    assert "1 live worker(s)" in status
    assert any(line.split()[:2] == ["cli-fn", "HOT"] for line in status.splitlines())
    assert cli(deployed, "rm", "cli-fn").returncode == 0
    assert cli(deployed, "invoke", "cli-fn", "Hello").returncode == 1


def test_no_workers_gives_503(redis_url, tiny_model, tmp_path):
    from conftest import start_stack

    url = redis_url.rsplit("/", 1)[0] + "/5"  # an empty database: no worker ever registered there
    redis.Redis.from_url(url).flushdb()
    s = start_stack(url, tmp_path, workers=0)
    try:
        assert httpx.post(f"{s.url}/functions", content=spec_yaml(tiny_model), headers=YAML).status_code == 201
        resp = httpx.post(f"{s.url}/v1/completions", json={"model": FN, "prompt": "hi"})
        assert resp.status_code == 503 and "Retry-After" in resp.headers
        assert json.loads(resp.text)["error"]["code"] == "no_workers"
    finally:
        s.stop()


def test_a_broken_tokenizer_is_a_server_error_naming_the_function(deployed, tiny_model, tmp_path):
    """Our fault, not the client's: 500, and the message says which function and why."""
    import shutil

    broken = tmp_path / "broken-tok"
    shutil.copytree(tiny_model, broken)
    deployed_broken = httpx.post(f"{deployed.url}/functions", content=spec_yaml(broken, "broken-tok"), headers=YAML)
    assert deployed_broken.status_code == 201
    (broken / "tokenizer.json").write_text("{ not a tokenizer")
    resp = httpx.post(f"{deployed.url}/v1/completions", json={"model": "broken-tok", "prompt": "hi"}, timeout=60)
    assert resp.status_code == 500
    error = resp.json()["error"]
    assert error["type"] == "server_error"
    assert "function 'broken-tok'" in error["message"] and "tokenizer" in error["message"]
    assert httpx.delete(f"{deployed.url}/functions/broken-tok").status_code == 200


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"suffix": "and then"}, "suffix"),
        ({"logprobs": 99}, "logprobs"),
        ({"frobnicate": 1}, "frobnicate"),
    ],
)
def test_unsupported_fields_are_refused_by_name_not_ignored(deployed, extra, param):
    body = {"model": FN, "prompt": "hi", "max_tokens": 2, **extra}
    resp = httpx.post(f"{deployed.url}/v1/completions", json=body, timeout=60)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == param


def test_default_values_of_unsupported_fields_are_accepted(client):
    out = client.completions.create(
        model=FN, prompt="hi", max_tokens=2, temperature=0, logprobs=None, echo=False, presence_penalty=0, user="u1"
    )
    assert out.usage.completion_tokens == 2


def test_health_alias_and_one_model(deployed, client):
    assert httpx.get(f"{deployed.url}/health").json()["status"] == "ok"
    assert client.models.retrieve(FN).id == FN
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-function")
